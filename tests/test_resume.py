"""Crash-exact resume: a run killed with SIGKILL at any moment resumes to the same weights,
also inside and after a distiller's preliminary stage."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from soteacher.engine.io import CheckpointError, safe_torch_load

CHILD = textwrap.dedent("""
    import sys, time
    import torch
    from torch import nn
    from soteacher import ArrayDataset, Trainer, TrainSettings
    from soteacher.data import RandomRoll
    from soteacher.teachers import build_teacher_objective

    torch.set_num_threads(1)
    run_dir, resume, delay = sys.argv[1], sys.argv[2] == "1", float(sys.argv[3])
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.randn(80, 1, 8, generator=g), torch.randint(0, 3, (80,), generator=g))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(32, 3))
    objective = build_teacher_objective("soteacher", {"lipschitz_weight": 1e-3},
                                        num_samples=80, num_classes=3, num_epochs=3)
    forward = objective.forward
    def slow_forward(*args):
        time.sleep(delay)            # gives the parent time to kill us mid-run
        return forward(*args)
    objective.forward = slow_forward
    settings = TrainSettings(epochs=3, batch_size=16, lr=0.1, milestones=[2], checkpoint_every=1)
    Trainer(model, objective, data, settings, augment=RandomRoll(), seed=1, run_dir=run_dir,
            resume=resume, progress=False).fit()
""")


# A distiller with a preliminary stage (AB: 2 extra epochs before the 2 of the main schedule).
STAGED_CHILD = textwrap.dedent("""
    import sys, time
    import torch
    from soteacher import ArrayDataset, Trainer, TrainSettings, create_model
    from soteacher.data import RandomRoll
    from soteacher.distillers import build_distiller

    torch.set_num_threads(1)
    run_dir, resume, delay = sys.argv[1], sys.argv[2] == "1", float(sys.argv[3])
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.randn(80, 1, 8, generator=g), torch.randint(0, 3, (80,), generator=g))
    torch.manual_seed(0)
    teacher = create_model("cnn1d", 3, (1, 8), widths=(6, 12))
    student = create_model("cnn1d_small", 3, (1, 8))
    objective = build_distiller("ab", teacher, {"init_epochs": 2}, student=student, num_classes=3)
    forward = objective.forward
    def slow_forward(*args):
        time.sleep(delay)
        return forward(*args)
    objective.forward = slow_forward
    settings = TrainSettings(epochs=2, batch_size=16, lr=0.1, milestones=[1], checkpoint_every=1)
    Trainer(student, objective, data, settings, augment=RandomRoll(), seed=1, run_dir=run_dir,
            resume=resume, progress=False).fit()
""")


def run_child(run_dir, resume=False, delay=0.0, wait=True, script=CHILD):
    args = [sys.executable, "-c", script, str(run_dir), "1" if resume else "0", str(delay)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if wait:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    return proc


def progress(run_dir):
    try:
        ckpt = safe_torch_load(run_dir / "checkpoint.pt")
    except CheckpointError:
        return -1
    return ckpt["epoch"] * 5 + ckpt["step"]       # 80 samples / 16 = 5 steps per epoch


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("reference")
    run_child(d)
    return safe_torch_load(d / "model.pt")["state_dict"]


@pytest.mark.parametrize("kill_after", [2, 5, 8, 13])
def test_sigkill_then_resume_gives_identical_weights(tmp_path, reference, kill_after):
    proc = run_child(tmp_path, delay=0.03, wait=False)
    deadline = time.monotonic() + 60
    while progress(tmp_path) < kill_after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "model.pt").exists()
    run_child(tmp_path, resume=True)
    resumed = safe_torch_load(tmp_path / "model.pt")["state_dict"]
    for k, v in reference.items():
        assert torch.equal(v, resumed[k]), k
    assert not list(tmp_path.glob(".*.tmp"))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3


@pytest.fixture(scope="module")
def staged_reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("staged_reference")
    run_child(d, script=STAGED_CHILD)
    return d


@pytest.mark.parametrize("kill_after", [7])     # inside the preliminary stage (epoch 2, step 3)
def test_sigkill_inside_the_preliminary_stage_resumes_exactly(tmp_path, staged_reference,
                                                              kill_after):
    proc = run_child(tmp_path, delay=0.03, wait=False, script=STAGED_CHILD)
    deadline = time.monotonic() + 60
    while progress(tmp_path) < kill_after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = safe_torch_load(tmp_path / "checkpoint.pt")["stage"]["name"]
    assert killed_at == "init"
    run_child(tmp_path, resume=True, script=STAGED_CHILD)
    reference = safe_torch_load(staged_reference / "checkpoint.pt")
    resumed = safe_torch_load(tmp_path / "checkpoint.pt")
    for part in ("model", "objective"):
        for k, v in reference[part].items():
            assert torch.equal(v, resumed[part][k]), (part, k)
    drop = lambda line: {k: v for k, v in json.loads(line).items() if k != "epoch_time"}
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [drop(l) for l in lines] == [
        drop(l) for l in (staged_reference / "metrics.jsonl").read_text().splitlines()]
    assert [json.loads(l)["stage"] for l in lines] == ["init", "init", "main", "main"]
