"""A new user's first hour (issue 13): threads, an interrupted demo, switching choices by --set,
damaged files, short schedules, inputs of the wrong shape, resuming with another model, API
errors in API words, and TensorBoard. Timings are measured by benchmarks/shared_machine.py."""

import json
import os
import subprocess
import sys
import shlex
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from soteacher import ArrayDataset, Trainer, TrainSettings, distill, train_teacher
from soteacher.cli.main import main
from soteacher.config import load_config
from soteacher.engine import threads as threads_mod
from soteacher.engine.evaluate import resolve_device
from soteacher.engine.io import CheckpointError, safe_torch_load
from soteacher.engine.optim import ScheduleWarning
from soteacher.engine.trainer import InputShapeError, save_weights
from soteacher.models import create_model
from soteacher.pipeline import load_model
from soteacher.teachers import build_teacher_objective

ROOT = Path(__file__).resolve().parent.parent

TINY = ["--set", "data.options.num_train=120", "--set", "data.options.num_test=80",
        "--set", "teacher.train.epochs=2", "--set", "student.train.epochs=2",
        "--set", "teacher.train.milestones=[1]", "--set", "student.train.milestones=[1]",
        "--set", "teacher.train.batch_size=32", "--set", "student.train.batch_size=32",
        "--set", "teacher.model.options.widths=[8, 16]", "--threads", "1", "--quiet"]


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_data(n=32, features=8, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.randn(n, 1, features, generator=g),
                        torch.randint(0, classes, (n,), generator=g))


# ---- 1. threads ---------------------------------------------------------------------------------
def test_threads_from_the_cli_the_config_and_the_api(tmp_path):
    torch.set_num_threads(2)
    args = [a for a in TINY if a not in ("--threads", "1")]
    assert main(["train-teacher", "--out", str(tmp_path / "a"), *args, "--threads", "1"]) == 0
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    assert main(["train-teacher", "--out", str(tmp_path / "b"), *args,
                 "--set", "threads=1"]) == 0
    assert torch.get_num_threads() == 1
    assert "threads" not in (tmp_path / "b" / "config.yaml").read_text()   # a runtime setting
    torch.set_num_threads(2)
    train_teacher(create_model("mlp_small", 3, (1, 8)), tiny_data(), method="standard",
                  epochs=1, milestones=[], batch_size=8, progress=False, threads=1)
    assert torch.get_num_threads() == 1
    with pytest.raises(ValueError, match="threads must be a whole number >= 1"):
        threads_mod.set_threads(0)
    assert main(["train-teacher", "--out", str(tmp_path / "c"), *args, "--threads", "0"]) == 2


def test_default_threads_follow_omp_num_threads_then_the_cpus(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads_mod.default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads_mod.default_threads() == len(os.sched_getaffinity(0))


def test_import_soteacher_asks_openmp_for_passive_waiting():
    """Set before torch starts OpenMP, never over the user's own choice, never too late."""
    probe = textwrap.dedent("""
        import os, sys
        first = sys.argv[1]
        if first == "torch":
            import torch
        import soteacher
        print(os.environ.get("OMP_WAIT_POLICY", "unset"))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}

    def run(first, **extra):
        out = subprocess.run([sys.executable, "-c", probe, first], env={**env, **extra},
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()

    assert run("soteacher") == "PASSIVE"
    assert run("soteacher", OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
    assert run("torch") == "unset"          # too late: OpenMP has read its environment


# ---- 2. an interrupted demo -------------------------------------------------------------------
def interrupt_at(monkeypatch, call: int):
    """Make the ``call``-th training epoch of the process raise KeyboardInterrupt (Ctrl-C)."""
    original = Trainer._train_epoch
    count = {"n": 0}

    def epoch(self, run_epoch):
        count["n"] += 1
        if count["n"] == call:
            raise KeyboardInterrupt
        return original(self, run_epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", epoch)


def test_ctrl_c_in_the_demo_says_what_was_kept_and_resume_continues(tmp_path, capsys,
                                                                     monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["demo", "--out", str(full), *TINY]) == 0
    # epochs 1-2: the standard teacher; 3-4: the SoTeacher teacher; Ctrl-C in its epoch 2
    capsys.readouterr()
    with monkeypatch.context() as m:
        interrupt_at(m, 4)
        assert main(["demo", "--out", str(cut), *TINY]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    line = err[0]
    assert line.startswith("soteacher demo: interrupted; kept 1 finished run(s) "
                           "(seed0/teacher_standard) and the checkpoint of "
                           "seed0/teacher_soteacher at epoch 1, step 0")
    assert line.endswith("continue with: " + shlex.join(["soteacher", "demo", "--out", str(cut),
                                                          *TINY, "--resume"]))
    # without --resume the directory is not overwritten silently
    assert main(["demo", "--out", str(cut), *TINY]) == 2
    assert "pass --resume to continue it" in capsys.readouterr().err
    # another config is refused
    assert main(["demo", "--out", str(cut), *TINY, "--set", "seed=3", "--resume"]) == 2
    assert "was run with another config (seed: 0 there, 3 now)" in capsys.readouterr().err
    assert main(["demo", "--out", str(cut), *TINY, "--resume"]) == 0
    a = json.loads((full / "results.json").read_text())
    b = json.loads((cut / "results.json").read_text())
    a.pop("wall_time_s"), b.pop("wall_time_s")
    assert a == b                       # the same numbers as a demo never interrupted


def test_ctrl_c_in_train_teacher_names_the_checkpoint_and_the_command(tmp_path, capsys,
                                                                      monkeypatch):
    out = tmp_path / "t"
    with monkeypatch.context() as m:
        interrupt_at(m, 1)                          # before any checkpoint
        assert main(["train-teacher", "--out", str(out), *TINY]) == 130
    err = capsys.readouterr().err
    assert "no checkpoint had been written" in err and "start again with:" in err
    assert err.strip().endswith("--overwrite")
    with monkeypatch.context() as m:
        interrupt_at(m, 2)
        assert main(["train-teacher", "--out", str(out), *TINY, "--overwrite"]) == 130
    err = capsys.readouterr().err
    assert f"kept the checkpoint at epoch 1, step 0 in {out}" in err
    assert err.strip().endswith("--resume") and "--overwrite" not in err
    assert main(["train-teacher", "--out", str(out), *TINY, "--resume"]) == 0


# ---- 3. switching a method, distiller or dataset by --set -------------------------------------
def test_readme_switch_to_the_standard_teacher_just_works(tmp_path, capsys):
    assert main(["train-teacher", "--out", str(tmp_path / "t"), *TINY,
                 "--set", "teacher.method=standard"]) == 0
    err = capsys.readouterr().err
    assert ("note: teacher.method is now 'standard' (was 'soteacher'): dropped teacher.options "
            "lipschitz_weight, consistency_weight, consistency_schedule, which it does not take"
            in err)
    # an option the new method rejects, set explicitly, is still an error
    assert main(["train-teacher", "--out", str(tmp_path / "u"), *TINY,
                 "--set", "teacher.method=standard",
                 "--set", "teacher.options.lipschitz_weight=1e-5"]) == 2
    assert "unknown option(s) 'lipschitz_weight' for teacher method 'standard'" in \
        capsys.readouterr().err


# ---- 4. damaged files -------------------------------------------------------------------------
def test_truncated_model_and_checkpoint_at_every_offset(tmp_path, capsys):
    run = tmp_path / "run"
    train_teacher(create_model("mlp_small", 3, (1, 8)), tiny_data(), method="soteacher",
                  epochs=1, milestones=[], batch_size=8, progress=False, run_dir=run)
    for name in ("model.pt", "checkpoint.pt"):
        good = (run / name).read_bytes()
        step = max(1, len(good) // 97)
        offsets = [0, 1, 2, 10, 100, len(good) - 2, len(good) - 1, *range(3, len(good), step)]
        bad = tmp_path / name
        for off in offsets:
            bad.write_bytes(good[:off])
            with pytest.raises(CheckpointError, match="the file is corrupt or truncated") as e:
                safe_torch_load(bad)
            assert "\n" not in str(e.value)
    # the same through the API and the command line
    (run / "model.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="corrupt or truncated.*empty, 0 bytes"):
        load_model(run)
    (run / "checkpoint.pt").write_bytes((tmp_path / "checkpoint.pt").read_bytes()[:500])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        train_teacher(create_model("mlp_small", 3, (1, 8)), tiny_data(), method="soteacher",
                      epochs=1, milestones=[], batch_size=8, progress=False, run_dir=run,
                      resume=True)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--config", str(ROOT / "src/soteacher/configs/demo.yaml")]) == 2
    assert "the file is corrupt or truncated" in capsys.readouterr().err


# ---- 5. milestones outside the run --------------------------------------------------------------
def test_milestones_beyond_a_short_run_are_not_silent(tmp_path, capsys):
    with pytest.warns(ScheduleWarning, match=r"150, 180, 210 of the 3-epoch run fall at or "
                                             r"after its last epoch.*scaled to 3 epochs: \[2\]"):
        train_teacher(create_model("mlp_small", 3, (1, 8)), tiny_data(), method="standard",
                      epochs=3, batch_size=8, progress=False)
    with pytest.warns(ScheduleWarning, match=r"milestone\(s\) 5 of the 4-epoch run"):
        TrainSettings(epochs=4, milestones=[2, 5]).validate()
    assert main(["train-teacher", "--out", str(tmp_path / "t"), *TINY,
                 "--set", "teacher.train.milestones=[60, 85]"]) == 0
    err = capsys.readouterr().err
    assert err.count("note: milestone(s) 60, 85 of the 2-epoch run") == 1     # once, not twice


# ---- 6. inputs of the wrong shape ---------------------------------------------------------------
def test_a_model_that_cannot_read_the_inputs_says_what_it_expects(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3))
    data = tiny_data(features=7)
    with pytest.raises(InputShapeError, match=r"the model \(Sequential\) cannot read the "
                                              r"dataset's inputs: each sample has shape \(1, 7\)"
                                              r".*expects 20 input features \(layer '1'"):
        train_teacher(model, data, method="standard", epochs=1, milestones=[], batch_size=8,
                      progress=False)
    # straight through the Trainer (num_classes given: no probe in the API) and a conv net
    conv = nn.Sequential(nn.Conv1d(4, 8, 3), nn.Flatten(), nn.Linear(8 * 5, 3))
    obj = build_teacher_objective("standard", {}, num_samples=32, num_classes=3, num_epochs=1)
    t = Trainer(conv, obj, data, TrainSettings(epochs=1, milestones=[], batch_size=8),
                progress=False)
    with pytest.raises(InputShapeError, match=r"expects inputs \(C, L\) with C = 4 channels"):
        t.fit()
    # a teacher for other inputs, in distill
    student = create_model("mlp_small", 3, (1, 7))
    teacher = create_model("cnn1d_small", 3, (2, 7))
    with pytest.raises(InputShapeError, match=r"the teacher \(.*\) cannot read.*shape \(1, 7\)"
                                              r".*expects inputs of shape \(2, 7\)"):
        distill(student, teacher, data, epochs=1, milestones=[], batch_size=8, progress=False)


# ---- 7. resuming with another model ---------------------------------------------------------------
def test_resume_with_another_model_shows_a_few_differences_and_a_count(tmp_path):
    data = tiny_data()
    train_teacher(create_model("mlp", 3, (1, 8)), data, method="standard", epochs=1,
                  milestones=[], batch_size=8, progress=False, run_dir=tmp_path)
    with pytest.raises(CheckpointError) as e:
        train_teacher(create_model("cnn1d", 3, (1, 8)), data, method="standard", epochs=2,
                      milestones=[], batch_size=8, progress=False, run_dir=tmp_path, resume=True)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("the checkpoint does not fit this model/objective")
    assert msg.count(";") == 4 and "more (" in msg and "differences in all)" in msg


# ---- 8. API errors in API words, and the rest of the rough edges ------------------------------
def test_api_errors_speak_the_api(tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cpu' in the Python API"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="batch_size=N in the Python API"):
        train_teacher(create_model("mlp_small", 3, (1, 8)), tiny_data(n=4), method="standard",
                      epochs=1, milestones=[], batch_size=8, progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for bad in (blocker, blocker / "run"):
        with pytest.raises(ValueError, match="run_dir .*choose another run_dir"):
            train_teacher(create_model("mlp_small", 3, (1, 8)), tiny_data(), method="standard",
                          epochs=1, milestones=[], batch_size=8, progress=False, run_dir=bad)


def test_resume_says_where_it_resumes(tmp_path, capsys):
    kw = dict(method="standard", milestones=[], batch_size=8, run_dir=tmp_path)
    train_teacher(create_model("mlp_small", 3, (1, 8)), tiny_data(), epochs=1, progress=False,
                  **kw)
    train_teacher(create_model("mlp_small", 3, (1, 8)), tiny_data(), epochs=2, progress=True,
                  resume=True, **kw)
    err = capsys.readouterr().err
    assert f"teacher[standard]: resuming from epoch 1, step 0 (1 of 2 epochs done" in err
    train_teacher(create_model("mlp_small", 3, (1, 8)), tiny_data(), epochs=2, progress=True,
                  resume=True, **kw)
    assert "had finished (epoch 2 of 2); its weights are kept" in capsys.readouterr().err


def test_bench_json_prints_only_json(capsys):
    assert main(["bench", "throughput", "--model", "resnet8", "--batch-size", "4", "--steps",
                 "1", "--repeats", "1", "--num-classes", "10", "--threads", "1", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["threads"] == 1 and out.count("\n") == 1


def test_offline_download_says_what_to_do(tmp_path, capsys):
    assert main(["data", "download", "cifar10", "--root", str(tmp_path),
                 "--url", f"file://{tmp_path}/missing.tar.gz"]) == 2
    err = capsys.readouterr().err
    assert "cannot download CIFAR-10 from file://" in err and "No such file" in err
    assert "cifar-10-python.tar.gz" in err and "<urlopen error" not in err
    assert [p.name for p in tmp_path.iterdir()] == []        # no partial file left


def test_package_metadata_has_project_urls():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in Python 3.11+")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["urls"] and all(u.startswith("https://") for u in meta["urls"].values())
    assert "tensorboard" in meta["optional-dependencies"]
    assert any("tensorboard" in d for d in meta["optional-dependencies"]["dev"])


# ---- 9. TensorBoard -------------------------------------------------------------------------------
def test_tensorboard_gets_the_metrics_beside_the_jsonl(tmp_path, capsys):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed "
                                              "(pip install 'soteacher[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "t"
    assert main(["train-teacher", "--out", str(out), *TINY, "--set",
                 "logging.tensorboard=true"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/total", "loss/ce", "loss/consistency", "train/acc", "test/acc",
            "train/lr"} <= tags
    got = [(e.step, e.value) for e in acc.Scalars("loss/ce")]
    assert got == [(i + 1, pytest.approx(r["loss_ce"], rel=1e-6)) for i, r in enumerate(records)]
    # a resumed run appends, and each epoch appears once
    assert main(["train-teacher", "--out", str(out), *TINY, "--set", "logging.tensorboard=true",
                 "--set", "teacher.train.epochs=3", "--resume"]) == 0
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/acc")] == [1, 2, 3]
    # off by default
    assert main(["train-teacher", "--out", str(tmp_path / "u"), *TINY]) == 0
    assert not (tmp_path / "u" / "tensorboard").exists()


def test_a_real_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    """SIGINT to the installed command, as a terminal's Ctrl-C sends it, mid-run."""
    import signal
    import time
    out = tmp_path / "t"
    args = [*TINY, "--set", "teacher.train.epochs=200", "--set", "teacher.train.milestones=[]"]
    proc = subprocess.Popen([sys.executable, "-m", "soteacher", "train-teacher", "--out",
                             str(out), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("soteacher train-teacher: interrupted; kept "
                                                   "the checkpoint at epoch "), err
    assert lines[0].endswith("--resume")


def test_default_threads_are_only_raised_when_idle_threads_sleep(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")           # spinning: leave torch's count
    assert threads_mod.set_threads(None) == 1 and torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert threads_mod.set_threads(None) == len(os.sched_getaffinity(0))
    assert torch.get_num_threads() == len(os.sched_getaffinity(0))
