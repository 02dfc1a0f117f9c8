"""``soteacher experiment --backend ray``: the tiny grid on a simulated two-node Ray cluster
(``ray.cluster_utils.Cluster``, one CPU per node, so two runs at once) equals the local backend
run for run; a run that fails mid-run is started again and resumes from its checkpoint; a failing
teacher leaves its students unrun. One cluster for the module (starting Ray takes seconds)."""

import csv
import json

import pytest
import torch
import yaml

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

from soteacher.cli.main import main  # noqa: E402
from soteacher.config import load_experiment_config  # noqa: E402
from soteacher.experiment import run_experiment, write_report  # noqa: E402
from conftest import tiny_grid  # noqa: E402

GRID = tiny_grid(["standard", "soteacher"])
TEACHER = "known_truth/cnn1d-cnn1d_small/seed{seed}/teachers/{name}"


def _config(tmp_path, **experiment):
    grid = json.loads(json.dumps(GRID))
    grid["experiment"].update(experiment)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    """A folder through which a test makes runs fail in the Ray workers: ``plan.json``
    ``{"fail": [run_dir, ...], "after_epoch": e, "once": bool}`` makes those runs raise right
    after the checkpoint of epoch ``e`` (only on their first attempt with ``once``); every resume
    from a checkpoint is appended to ``resumed.jsonl``."""
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def cluster(faults):
    folder = str(faults)

    def inject_faults():            # runs in every Ray worker process (pickled by value)
        import json
        import os
        from soteacher.engine.trainer import Trainer
        write, load = Trainer._write_checkpoint, Trainer._load_for_resume

        def write_checkpoint(self):
            write(self)
            plan_file = os.path.join(folder, "plan.json")
            if not os.path.isfile(plan_file):
                return
            plan = json.load(open(plan_file))
            if str(self.run_dir) not in plan["fail"] or self.epoch != plan["after_epoch"]:
                return
            if plan["once"]:
                try:
                    os.close(os.open(os.path.join(folder, f"failed-{self.run_dir.name}"),
                                     os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    return
            raise RuntimeError(f"injected failure after epoch {self.epoch}")

        def load_for_resume(self):
            load(self)
            with open(os.path.join(folder, "resumed.jsonl"), "a") as f:
                f.write(json.dumps({"run_dir": str(self.run_dir), "epoch": self.epoch}) + "\n")

        Trainer._write_checkpoint, Trainer._load_for_resume = write_checkpoint, load_for_resume

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    c.add_node(num_cpus=1)
    ray.init(address=c.address, runtime_env={"worker_process_setup_hook": inject_faults},
             logging_level="warning")
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def local_grid(tmp_path_factory):
    """The grid on the local backend, one torch thread (as each Ray task)."""
    tmp = tmp_path_factory.mktemp("local")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_experiment_config(_config(tmp))
        run_experiment(cfg, tmp / "out", log=lambda m: None)
    finally:
        torch.set_num_threads(n)
    write_report(tmp / "out", plots=False)
    return tmp / "out"


def _rows(out):
    return {(r["kind"], r["teacher"], r["distiller"], r["seed"]): r
            for r in csv.DictReader((out / "results.csv").open())}


def _weights(run_dir):
    return torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)["state_dict"]


def _assert_same_run(a, b):
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["metrics"] == sb["metrics"]           # exactly: same floats
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_ray_on_two_nodes_equals_local_run_for_run(cluster, local_grid, tmp_path):
    out = tmp_path / "out"
    counts = run_experiment(load_experiment_config(_config(tmp_path, backend="ray")), out,
                            log=lambda m: None)
    assert counts == {"trained": 4, "skipped": 0}
    write_report(out, plots=False)
    local, remote = _rows(local_grid), _rows(out)
    assert len(remote) == 4 and local == remote     # every column, metrics as written
    assert (out / "summary.md").read_text() == (local_grid / "summary.md").read_text()
    for r in remote.values():
        run = r["student_dir"] or r["teacher_dir"]
        _assert_same_run(local_grid / run, out / run)
    status = json.loads((out / "known_truth" / "status.json").read_text())
    assert status["state"] == "finished" and status["backend"] == "ray"
    assert status["counts"] == {"total": 4, "finished": 4, "before": 0, "running": 0,
                                "waiting": 0, "failed": 0, "unrun": 0}
    assert status["slots"] == 2
    assert len({r["node"] for r in status["runs"]}) == 2     # both nodes trained runs
    assert not list(out.rglob(".lock"))


def test_failed_attempt_is_retried_and_resumes_to_the_uninterrupted_run(
        cluster, local_grid, faults, tmp_path):
    out = (tmp_path / "out").resolve()
    teacher = out / TEACHER.format(seed=0, name="standard")
    (faults / "plan.json").write_text(json.dumps(
        {"fail": [str(teacher)], "after_epoch": 1, "once": True}))
    try:
        cfg = load_experiment_config(_config(tmp_path, backend="ray", teachers=["standard"],
                                             retries=1))
        assert run_experiment(cfg, out, log=lambda m: None) == {"trained": 2, "skipped": 0}
    finally:
        (faults / "plan.json").unlink()
    assert (faults / "failed-standard").is_file()           # the first attempt did fail
    resumed = [json.loads(line) for line in (faults / "resumed.jsonl").read_text().splitlines()]
    assert {"run_dir": str(teacher), "epoch": 1} in resumed  # the second resumed at epoch 1
    status = json.loads((out / "known_truth" / "status.json").read_text())
    by_run = {r["run"]: r for r in status["runs"]}
    assert by_run[TEACHER.format(seed=0, name="standard")]["attempts"] == 2
    # it ends where the local, uninterrupted run ended, and so does its student
    _assert_same_run(local_grid / TEACHER.format(seed=0, name="standard"), teacher)
    student = "known_truth/cnn1d-cnn1d_small/seed0/students/standard/kd"
    _assert_same_run(local_grid / student, out / student)


def test_failing_teacher_leaves_its_students_unrun(cluster, faults, tmp_path, capsys):
    out = (tmp_path / "out").resolve()
    teacher = out / TEACHER.format(seed=0, name="soteacher")
    (faults / "plan.json").write_text(json.dumps(
        {"fail": [str(teacher)], "after_epoch": 1, "once": False}))
    try:
        cfg = _config(tmp_path, retries=0)
        code = main(["experiment", str(cfg), "--out", str(out), "--backend", "ray", "--quiet",
                     "--no-plots"])
    finally:
        (faults / "plan.json").unlink()
    err = capsys.readouterr().err
    assert code == 1
    line = next(x for x in err.splitlines() if x.startswith("soteacher experiment: error:"))
    assert "teacher soteacher (RuntimeError: injected failure after epoch 1; after 1 attempt" \
        in line
    assert "left unrun because their teacher failed: cnn1d-cnn1d_small seed 0: student of " \
           "soteacher by kd" in line
    assert not (out / "known_truth/cnn1d-cnn1d_small/seed0/students/soteacher").exists()
    # the other teacher and its student finished, and the report covers them
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted((r["kind"], r["teacher"]) for r in rows) == [("student", "standard"),
                                                               ("teacher", "standard")]
    status = json.loads((out / "known_truth" / "status.json").read_text())
    assert status["state"] == "failed"
    assert (status["counts"]["finished"], status["counts"]["failed"],
            status["counts"]["unrun"]) == (2, 1, 1)
