"""End-to-end runs of the command line on tiny configs."""

import json

import pytest
import torch

from soteacher.cli.main import main

TINY = ["--set", "data.options.num_train=120", "--set", "data.options.num_test=80",
        "--set", "teacher.train.epochs=2", "--set", "student.train.epochs=2",
        "--set", "teacher.train.batch_size=32", "--set", "student.train.batch_size=32",
        "--set", "teacher.train.milestones=[1]", "--set", "student.train.milestones=[1]",
        "--set", "teacher.model.options.widths=[8, 16]", "--threads", "1", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_list(capsys):
    for what, expected in [("teachers", {"standard", "soteacher"}), ("distillers", {"kd"}),
                           ("datasets", {"known_truth", "mnist1d", "digits"}),
                           ("models", {"mlp", "cnn1d", "cnn2d"})]:
        assert main(["list", what]) == 0
        names = capsys.readouterr().out.split()
        assert expected <= set(names) and names == sorted(names)


def test_demo_quick_end_to_end(tmp_path, capsys):
    assert main(["demo", "--quick", "--quiet", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["teachers"]) == {"standard", "soteacher", "oracle"}
    assert set(res["students"]) == {"standard", "soteacher", "oracle", "none"}
    for m in res["teachers"].values():
        assert {"test_acc", "test_nll", "test_ece", "train_tv_true", "test_tv_true",
                "train_kl_true"} <= set(m)
    for m in res["students"].values():
        assert {"test_acc", "test_nll", "test_ece"} <= set(m) and 0 <= m["test_acc"] <= 1
    oracle = res["teachers"]["oracle"]
    assert oracle["train_tv_true"] == pytest.approx(0, abs=1e-5)
    assert oracle["train_kl_true"] == pytest.approx(0, abs=1e-5)
    # the oracle's accuracy is the realised Bayes accuracy of the labels
    assert abs(oracle["test_acc"] - res["bayes_accuracy"]["test"]) < 0.06
    for name in ("standard", "soteacher"):
        assert res["teachers"][name]["train_tv_true"] > 0.05
    out = capsys.readouterr().out
    assert "soteacher" in out and "Bayes accuracy" in out
    for run in ("teacher_standard", "teacher_soteacher", "student_oracle", "student_none"):
        assert (tmp_path / "seed0" / run / "model.pt").is_file()
        assert (tmp_path / "seed0" / run / "config.yaml").is_file()
    assert (tmp_path / "config.yaml").is_file()


def test_demo_seeds_report_mean_and_std(tmp_path):
    assert main(["demo", "--out", str(tmp_path), "--seeds", "2", *TINY]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    m = res["students"]["soteacher"]
    assert "test_acc_std" in m and len(m["per_seed"]) == 2
    vals = [r["test_acc"] for r in m["per_seed"]]
    assert m["test_acc"] == pytest.approx(sum(vals) / 2)
    assert res["seeds"] == [0, 1]


def test_train_distill_evaluate_and_resume(tmp_path, capsys):
    t = tmp_path / "teacher"
    assert main(["train-teacher", "--out", str(t), *TINY]) == 0
    summary = json.loads((t / "summary.json").read_text())
    assert "train_tv_true" in summary
    lines = (t / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "loss_consistency" in json.loads(lines[1])
    # a second run into the same directory is refused ...
    assert main(["train-teacher", "--out", str(t), *TINY]) == 2
    assert "already holds a run" in capsys.readouterr().err
    # ... resuming a finished run keeps its weights; extending it trains on
    before = torch.load(t / "model.pt", weights_only=True)["state_dict"]
    assert main(["train-teacher", "--out", str(t), "--resume", *TINY]) == 0
    after = torch.load(t / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert main(["train-teacher", "--out", str(t), "--resume", *TINY,
                 "--set", "teacher.train.epochs=3"]) == 0
    assert len((t / "metrics.jsonl").read_text().splitlines()) == 3

    s = tmp_path / "student"
    assert main(["distill", "--teacher", str(t), "--out", str(s), *TINY]) == 0
    assert (s / "model.pt").is_file()
    assert "test_agreement" in json.loads((s / "summary.json").read_text())
    capsys.readouterr()
    assert main(["evaluate", str(s), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= {"train_acc", "test_acc", "test_ece", "test_tv_true"}


@pytest.mark.parametrize("args,message", [
    (["--set", "teacher.train.lrr=1"], "unknown config key 'teacher.train.lrr'; valid keys"),
    (["--set", "teacher.method=sotaecher"], "unknown teacher method 'sotaecher'; available"),
    (["--set", "data.name=nope"], "unknown dataset 'nope'; available"),
    (["--set", "teacher.train.batch_size=500"], "larger than the training set"),
    (["--set", "teacher.options.consistency_weight=-1"], "consistency_weight must be"),
])
def test_bad_input_exits_2_with_a_clear_message(tmp_path, capsys, args, message):
    assert main(["train-teacher", "--out", str(tmp_path / "run"), *TINY, *args]) == 2
    assert message in capsys.readouterr().err


def test_distill_with_a_teacher_for_other_data_is_refused(tmp_path, capsys):
    t = tmp_path / "teacher"
    assert main(["train-teacher", "--out", str(t), *TINY]) == 0
    rc = main(["distill", "--teacher", str(t), "--out", str(tmp_path / "s"), *TINY,
               "--set", "data.options.num_classes=5"])
    assert rc == 2 and "5" in capsys.readouterr().err
    assert main(["distill", "--teacher", str(tmp_path / "none"), "--out",
                 str(tmp_path / "s2"), *TINY]) == 2
    assert "no model weights" in capsys.readouterr().err


def test_teacher_that_cannot_read_the_inputs(tmp_path, capsys):
    t = tmp_path / "teacher"
    assert main(["train-teacher", "--out", str(t), *TINY]) == 0
    capsys.readouterr()
    # a 1-D CNN teacher cannot read 8x8 images
    rc = main(["distill", "--teacher", str(t), "--out", str(tmp_path / "s"), *TINY,
               "--set", "data.name=digits", "--set", "data.options={}",
               "--set", "student.model.name=mlp_small", "--set", "student.model.options={}"])
    assert rc == 2
    assert "cannot read this dataset's inputs of shape (1, 8, 8)" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_demo_needs_known_truth(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path / "d"), *TINY, "--set", "data.name=digits",
               "--set", "data.options={}", "--set", "teacher.model.name=cnn2d_small",
               "--set", "teacher.model.options={}", "--set", "student.model.name=mlp_small",
               "--set", "student.model.options={}"])
    assert rc == 2
    assert "needs a dataset whose true label distribution is known" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_another_method_on_a_soteacher_config_says_it_keeps_the_terms(tmp_path, capsys):
    tiny = [*TINY, "--set", "teacher.train.epochs=1", "--set", "teacher.train.milestones=[]",
            "--set", "data.val_fraction=0.2"]
    assert main(["train-teacher", "--out", str(tmp_path / "a"), *tiny,
                 "--set", "teacher.method=early_stop"]) == 0
    err = capsys.readouterr().err
    assert "note: teacher method 'early_stop'" in err and "consistency_weight=" in err
    assert main(["train-teacher", "--out", str(tmp_path / "b"), *tiny,
                 "--set", "teacher.method=early_stop", "--set", "teacher.options={}"]) == 0
    assert main(["train-teacher", "--out", str(tmp_path / "c"), *tiny]) == 0      # soteacher
    assert "note:" not in capsys.readouterr().err
