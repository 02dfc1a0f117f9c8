"""The ``oracle`` teacher of experiment grids: p*(y|x) itself, with a summary like any teacher,
students distilled from it, skipped once finished, and clear errors where it cannot be."""

import csv
import json

import pytest
import torch
import yaml

from soteacher.cli.main import main
from soteacher.config import ConfigError, load_experiment_config
from soteacher.data import NetOracleTeacher, RandomFlip, build_dataset
from soteacher.experiment import run_experiment, validate_experiment, write_report
from soteacher.experiment.grid import logit_distillers
from conftest import tiny_grid

GRID = tiny_grid(["standard", "oracle"])
NET_DATA = {"name": "known_truth_net", "val_fraction": 0.0,
            "options": {"num_classes": 4, "input_shape": [1, 16], "num_train": 100,
                        "num_test": 60, "seed": 0}}


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path, data=None, **experiment):
    grid = json.loads(json.dumps(GRID))
    grid["experiment"].update(experiment)
    if data is not None:
        grid["data"] = data
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def _bayes_accuracy(data_spec, split):
    d = build_dataset(data_spec["name"], **data_spec["options"])
    ds = getattr(d, split)
    return float((d.truth.log_prob(ds.x).argmax(1) == ds.y).double().mean())


def test_grid_with_the_oracle_reports_it_and_distils_from_p_star(tmp_path, monkeypatch):
    import soteacher.pipeline as pipeline
    seen = []
    build = pipeline.build_distiller

    def recording(method, teacher, *args, **kwargs):
        seen.append(type(teacher).__name__)
        return build(method, teacher, *args, **kwargs)

    monkeypatch.setattr(pipeline, "build_distiller", recording)
    cfg, out = _config(tmp_path), tmp_path / "out"
    assert main(["experiment", str(cfg), "--out", str(out), "--quiet", "--no-plots"]) == 0
    assert len(seen) == 2 and seen.count("OracleTeacher") == 1      # one student of each

    rows = list(csv.DictReader((out / "results.csv").open()))
    by = {(r["kind"], r["teacher"]): r for r in rows}
    assert set(by) == {("teacher", "standard"), ("teacher", "oracle"),
                       ("student", "standard"), ("student", "oracle")}
    oracle = by[("teacher", "oracle")]
    assert oracle["teacher_method"] == "oracle"
    for split in ("train", "test"):
        assert float(oracle[f"teacher_{split}_tv_true"]) == pytest.approx(0, abs=1e-6)
        assert float(oracle[f"teacher_{split}_kl_true"]) == pytest.approx(0, abs=1e-6)
        # its accuracy is the Bayes classifier's on the drawn labels
        assert float(oracle[f"teacher_{split}_acc"]) == pytest.approx(
            _bayes_accuracy(GRID["data"], split), abs=1e-12)
    assert float(by[("teacher", "standard")]["teacher_train_tv_true"]) > 0.01

    tdir = out / oracle["teacher_dir"]
    assert {p.name for p in tdir.iterdir()} == {"config.yaml", "summary.json",
                                                "reliability.json", "predictions.pt"}
    stored = yaml.safe_load((tdir / "config.yaml").read_text())
    assert stored["teacher"]["method"] == "oracle" and stored["teacher"]["options"] == {}
    preds = torch.load(tdir / "predictions.pt", weights_only=True)["test"]
    d = build_dataset("known_truth", **GRID["data"]["options"])
    torch.testing.assert_close(preds.float(), d.truth.prob(d.test.x), atol=1e-3, rtol=0)

    student = by[("student", "oracle")]
    sdir = out / student["student_dir"]
    assert (sdir / "model.pt").is_file() and (sdir / "metrics.jsonl").is_file()
    assert 0 <= float(student["student_test_acc"]) <= 1
    assert 0 < float(student["student_test_tv_true"]) < 1
    summary = json.loads((sdir / "summary.json").read_text())
    assert summary["teacher_run"] == json.loads((tdir / "summary.json").read_text())["teacher_run"]
    assert "| oracle |" in (out / "summary.md").read_text().replace("`", "")

    # started again: everything is finished, nothing trains and the oracle is not rewritten
    stamp = (tdir / "summary.json").stat().st_mtime_ns

    def no_training(self):
        raise AssertionError("the restarted experiment trained a model")

    monkeypatch.setattr("soteacher.engine.trainer.Trainer.fit", no_training)
    counts = run_experiment(load_experiment_config(cfg), out, log=lambda m: None)
    assert counts == {"trained": 0, "skipped": 4}
    assert (tdir / "summary.json").stat().st_mtime_ns == stamp


def test_oracle_alone_on_known_truth_net_with_every_logit_distiller(tmp_path):
    assert logit_distillers() == ["dist", "dkd", "kd"]
    cfg = _config(tmp_path, data=NET_DATA, teachers=["oracle"], distillers=["kd", "dkd"])
    out = tmp_path / "out"
    counts = run_experiment(load_experiment_config(cfg), out, log=lambda m: None)
    assert counts == {"trained": 3, "skipped": 0}
    write_report(out, plots=False)
    rows = list(csv.DictReader((out / "results.csv").open()))
    teacher = [r for r in rows if r["kind"] == "teacher"]
    students = sorted(r["distiller"] for r in rows if r["kind"] == "student")
    assert len(teacher) == 1 and students == ["dkd", "kd"]
    assert float(teacher[0]["teacher_train_tv_true"]) == pytest.approx(0, abs=1e-6)
    assert float(teacher[0]["teacher_test_acc"]) == pytest.approx(
        _bayes_accuracy(NET_DATA, "test"), abs=1e-12)
    # the student run keeps the oracle: after its teacher's summary goes, both are made again
    tdir = out / teacher[0]["teacher_dir"]
    (tdir / "summary.json").unlink()
    counts = run_experiment(load_experiment_config(cfg), out, log=lambda m: None)
    assert counts == {"trained": 3, "skipped": 0}


def test_a_student_run_on_its_own_rebuilds_the_oracle_from_its_data(tmp_path, monkeypatch):
    # as a Ray task does: the student is given no teacher model
    import soteacher.pipeline as pipeline
    from soteacher.experiment.grid import plan_grid
    from soteacher.experiment.runs import execute_run
    seen = []
    build = pipeline.build_distiller
    monkeypatch.setattr(pipeline, "build_distiller",
                        lambda method, teacher, *a, **k: seen.append(teacher)
                        or build(method, teacher, *a, **k))
    cfg = load_experiment_config(_config(tmp_path, data=NET_DATA, teachers=["oracle"]))
    _, runs = plan_grid(cfg, tmp_path / "out")
    teacher, student = runs
    assert execute_run(teacher)["state"] == "new"
    assert execute_run(student)["state"] == "new"
    assert len(seen) == 1 and isinstance(seen[0], NetOracleTeacher)
    assert (student.run_dir / "summary.json").is_file()
    assert not (teacher.run_dir / "model.pt").exists()


def _validate(tmp_path, data=None, **experiment):
    return validate_experiment(load_experiment_config(_config(tmp_path, data, **experiment)))


def test_feature_distillers_cannot_distil_from_the_oracle(tmp_path):
    with pytest.raises(ConfigError) as err:
        _validate(tmp_path, distillers=["kd", "fitnet"])
    msg = str(err.value)
    assert "distiller 'fitnet' (method 'fitnet') reads the teacher's intermediate features" in msg
    assert "with the oracle use a logit distiller: dist, dkd, kd" in msg
    _validate(tmp_path, teachers=["standard"], distillers=["fitnet"])     # fine without it


def test_data_without_p_star_cannot_have_the_oracle(tmp_path):
    pytest.importorskip("sklearn")
    data = {"name": "digits", "val_fraction": 0.0, "options": {}}
    with pytest.raises(ConfigError, match="the oracle teacher needs data whose p\\* is known, "
                                          "e.g. data.name=known_truth; 'digits' has none"):
        _validate(tmp_path, data=data)


def test_oracle_takes_no_options_and_is_not_swept(tmp_path):
    with pytest.raises(ConfigError, match="the oracle teacher takes no options"):
        _validate(tmp_path, teachers=[{"method": "oracle", "options": {"temperature": 2}}])
    with pytest.raises(ConfigError, match="names 'oracle', the oracle teacher, which has no "
                                          "options to sweep"):
        _validate(tmp_path, teachers=["soteacher", "oracle"],
                  sweep={"lipschitz_weight": [1e-6]}, sweep_teachers=["soteacher", "oracle"])
    variants, _, _ = _validate(tmp_path, teachers=[{"method": "oracle", "name": "p*"}])
    assert [(v.name, v.method, v.options) for v in variants] == [("p*", "oracle", {})]


def test_an_augmentation_that_changes_p_star_is_refused(tmp_path, monkeypatch):
    import soteacher.experiment.datasets as datasets
    real = datasets.raw_data

    def flipped(spec):
        data = real(spec)
        data.augment = RandomFlip(p=1.0)        # a mirror image changes the shifted mixture's p*
        return data

    monkeypatch.setattr(datasets, "_RAW", {})
    monkeypatch.setattr(datasets, "raw_data", flipped)
    with pytest.raises(ConfigError, match="the augmentation of 'known_truth' changes p"):
        _validate(tmp_path)
    data = {**GRID["data"], "augment": False}
    _validate(tmp_path, data=data)              # without augmentation it is fine


def test_oracle_on_ray_equals_the_local_backend(tmp_path):
    ray = pytest.importorskip("ray")
    cfg = _config(tmp_path, data=NET_DATA, teachers=["oracle"], distillers=["kd"])
    local, remote = tmp_path / "local", tmp_path / "ray"
    run_experiment(load_experiment_config(cfg), local, log=lambda m: None)
    ray.init(num_cpus=1, include_dashboard=False, logging_level="warning")
    try:
        spec = load_experiment_config(cfg)
        spec.experiment.backend = "ray"
        assert run_experiment(spec, remote, log=lambda m: None) == {"trained": 2, "skipped": 0}
    finally:
        ray.shutdown()
    for out in (local, remote):
        write_report(out, plots=False)
    rows = [{(r["kind"], r["distiller"]): r for r in csv.DictReader((o / "results.csv").open())}
            for o in (local, remote)]
    assert rows[0] == rows[1] and len(rows[0]) == 2


def test_the_oracle_sees_the_augmented_batch_and_gives_p_star_of_it(tmp_path):
    from soteacher.data import oracle_teacher
    from soteacher.pipeline import run_student
    cfg = load_experiment_config(_config(tmp_path, data=NET_DATA)).base()
    data = build_dataset("known_truth_net", **NET_DATA["options"])
    oracle = oracle_teacher(data.truth)
    seen = []
    oracle.register_forward_hook(lambda m, args, out: seen.append((args[0].clone(), out.clone())))
    run_student(cfg, data, oracle, None, progress=False)
    assert cfg.data.augment and len(seen) == 5          # 100 samples, batches of 20, 1 epoch
    raw = data.train.x
    shifts = torch.stack([torch.roll(raw, s, dims=2) for s in range(16)])   # (S, N, 1, L)
    shifted = 0
    for x, logits in seen:
        for row, out in zip(x, logits):
            # each input is a circular shift of a training input, and the oracle gives its p*
            match = (shifts == row).flatten(2).all(dim=2).nonzero()
            assert len(match), "the oracle saw an input that is no shift of a training input"
            s, i = match[0].tolist()
            shifted += s != 0
            torch.testing.assert_close(out, data.truth.log_prob(raw[i][None])[0],
                                       atol=1e-5, rtol=0)
    assert shifted > 50                                 # the batches were augmented
