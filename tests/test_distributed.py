"""DDP on the CPU with gloo and two processes: a run on 2 processes with global batch B equals a
single-process run with batch B (weights, consistency bank, CRD memories), a 2-process checkpoint
resumes on 1 process, and the command line runs under torchrun's environment variables.

The processes are started with subprocess and torchrun's environment variables (MASTER_ADDR
127.0.0.1, a free port, RANK, WORLD_SIZE, LOCAL_RANK), loopback only. The equivalence runs use
an MLP without batch norm and no augmentation: with augmentation each process augments its own
slice from a generator of (seed, epoch, step, rank), which cannot equal a single process's draws;
that path is checked for keeping the processes in step instead.
"""

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from soteacher import ArrayDataset, IndexedDataset, Trainer, TrainSettings
from soteacher.distillers import build_distiller
from soteacher.engine import distributed
from soteacher.engine.io import safe_torch_load
from soteacher.regularizers import ConsistencyBank
from soteacher.teachers import build_teacher_objective
from soteacher.teachers.crl import ConfidenceRanking, crl_loss, normalised_counts

HERE = Path(__file__).resolve().parent
N, D, C = 48, 6, 3

# Cross-process tolerances. A 2-process run computes the same float32 values as one process,
# but splits and orders its sums differently (each process reduces its slice, then the slices are
# combined; some statistics are reduced in float64 across processes). Rounding then differs by a
# few float32 ulps per term of the reduction that produced a value, so values are compared as
# |a - b| <= ATOL + ULPS * eps32 * n_terms * |b|, n_terms the length of that reduction: the
# relative part covers large values (CRD's normalising constants are ~1e4: a few ulps there
# exceed any fixed small atol), ATOL the O(1) values (weights, bank rows) after the rounding
# differences of every step have passed through training (observed: < 1e-6). A wrong all-gather
# or a missing sample moves values by percents (one sample less in CRD's constant: > 3%; see
# test_tolerances_catch_a_missing_sample), far outside these bounds.
EPS32 = torch.finfo(torch.float32).eps
ULPS = 4
ATOL = 1e-5
TEACHER_TERMS = 16        # the teacher MLP's widest reduction (hidden width 16; batch 7)
CRD_TERMS = 8             # CRD's batch (the gradients' reduction over rows)
CRD_Z_TERMS = 8 * 11      # CRD's constants: a mean over the batch's B x (1 + nce_k) scores
EPOCH_TERMS = N           # an epoch's average of the per-sample losses


def within(a: torch.Tensor, b: torch.Tensor, n_terms: int, atol: float = ATOL) -> torch.Tensor:
    """Elementwise: is ``a`` within the cross-process tolerance of ``b`` (the single-process
    value) for a value reduced over ``n_terms`` float32 terms?"""
    a, b = a.double(), b.double()
    return (a - b).abs() <= atol + ULPS * EPS32 * n_terms * b.abs()


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the runs, shared by the test (one process) and the children (two) --------------------------
def make_data() -> ArrayDataset:
    g = torch.Generator().manual_seed(0)
    return ArrayDataset(torch.randn(N, D, generator=g), torch.randint(0, C, (N,), generator=g))


def mlp(seed: int, width: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, width), nn.ReLU(), nn.Linear(width, C))


class Jitter(nn.Module):
    def forward(self, x):
        return x + 0.1 * torch.randn_like(x)


def teacher_trainer(run_dir=None, resume=False, data=None, **kw) -> Trainer:
    # batch 7 on 2 processes: slices of 3 and 4 (unequal), and a last batch of 6 (3 + 3)
    s = TrainSettings(epochs=3, batch_size=7, lr=0.1, milestones=[2], checkpoint_every=2,
                      **kw.pop("settings", {}))
    obj = build_teacher_objective("soteacher", {"lipschitz_weight": 1e-3}, num_samples=N,
                                  num_classes=C, num_epochs=s.epochs)
    return Trainer(mlp(1), obj, data if data is not None else make_data(), s, seed=5,
                   run_dir=run_dir, resume=resume, progress=False, **kw)


def crd_trainer() -> Trainer:
    teacher, student = mlp(2, 12), mlp(3, 8)
    obj = build_distiller("crd", teacher, {"feat_dim": 8, "nce_k": 10, "kd_weight": 0.5,
                                           "nce_momentum": 0.5},
                          student=student, num_samples=N, num_classes=C, input_shape=[D])
    s = TrainSettings(epochs=2, batch_size=8, lr=0.05, schedule="constant")
    return Trainer(student, obj, make_data(), s, seed=7, progress=False)


def crl_batches(epochs: int = 3, batch: int = 7):
    """Fixed global batches ``(epoch, logits, labels, indices)`` for CRL: every epoch a
    permutation of the N samples in batches of ``batch`` (the last one smaller)."""
    g = torch.Generator().manual_seed(11)
    y = torch.randint(0, C, (N,), generator=g)
    for k in range(1, epochs + 1):
        perm = torch.randperm(N, generator=g)
        z = torch.randn(N, C, generator=g) + torch.nn.functional.one_hot(y, C)
        for i in range(0, N, batch):
            idx = perm[i:i + batch]
            yield k, z[idx], y[idx], idx


def bank_of(t: Trainer):
    b = t.objective.consistency.bank
    return b.bank.clone(), b.count.clone()


class Crash(Exception):
    pass


def child_main(out: str) -> None:
    """One process of the 2-process runs; everything it finds goes to ``out``."""
    import datetime
    torch.set_num_threads(1)
    out = Path(out)
    with distributed.process_group(timeout=datetime.timedelta(seconds=30)):
        r = distributed.rank()
        res = {"world": distributed.world_size()}

        # 1. SoTeacher teacher, no augmentation.
        t = teacher_trainer(run_dir=out / "teacher")
        t.fit()
        res["teacher"] = {"model": t.model.state_dict(), "bank": bank_of(t),
                          "history": json.dumps(t.history)}

        # 2. CRD distillation.
        t = crd_trainer()
        t.fit()
        res["crd"] = {"model": t.model.state_dict(), "objective": {
            k: v for k, v in t.objective.state_dict().items() if not k.startswith("teacher.")}}

        # 3. The teacher run of 1, through the DataLoader path, killed in epoch 2 at step 5
        #    (its last checkpoint: epoch 2, step 4, with running sums).
        pairs = [(x, int(y)) for x, y, _ in make_data()]
        t = teacher_trainer(run_dir=out / "crashed", data=IndexedDataset(pairs))
        forward, calls = t.objective.forward, [0]

        def crash_at_step_12(*args):
            calls[0] += 1
            if calls[0] == 12:
                raise Crash
            return forward(*args)

        t.objective.forward = crash_at_step_12
        try:
            t.fit()
        except Crash:
            pass

        # 4. sync_bn has no CPU implementation.
        try:
            teacher_trainer(settings={"sync_bn": True})
            res["sync_bn_error"] = None
        except ValueError as e:
            res["sync_bn_error"] = str(e)

        # 5. Augmentation and a non-finite loss on rank 1 only: both skip the step.
        t = teacher_trainer(augment=Jitter(), settings={"nonfinite": "skip"})
        forward, calls = t.objective.forward, [0]

        def nan_on_rank_1(*args):
            o = forward(*args)
            calls[0] += 1
            if r == 1 and calls[0] == 3:
                o.losses["ce"] = o.losses["ce"] * float("nan")
            return o

        t.objective.forward = nan_on_rank_1
        t.fit()
        res["skip"] = {"model": t.model.state_dict(), "bank": bank_of(t),
                       "skipped": [h["skipped_steps"] for h in t.history]}

        # 6. With augmentation: a whole run, and the same run killed in epoch 2 (child_resume
        #    resumes it on two processes).
        t = teacher_trainer(augment=Jitter())
        t.fit()
        res["aug"] = {"model": t.model.state_dict(), "bank": bank_of(t)}
        t = teacher_trainer(run_dir=out / "aug_crashed", augment=Jitter())
        forward, calls = t.objective.forward, [0]
        t.objective.forward = crash_at_step_12
        try:
            t.fit()
        except Crash:
            pass

        # 7. An error on rank 0 inside run_on_main reaches every process.
        def refuse():
            raise ValueError(f"refused on rank {distributed.rank()}")

        try:
            distributed.run_on_main(refuse)
        except ValueError as e:
            res["error"] = str(e)
        res["broadcast"] = distributed.run_on_main(lambda: {"rank": distributed.rank()})

        # 8. CRL: each process ranks its slice; the counts take the whole global batch.
        crl, losses = ConfidenceRanking(N), []
        for k, z, y, idx in crl_batches():
            lo, hi = distributed.batch_slice(len(idx), r, distributed.world_size())
            losses.append(crl(z[lo:hi], y[lo:hi], idx[lo:hi], k))
        res["crl"] = {"counts": crl.counts.clone(), "losses": torch.stack(losses)}
        torch.save(res, out / f"rank{r}.pt")


def child_resume(out: str) -> None:
    import datetime
    torch.set_num_threads(1)
    out = Path(out)
    with distributed.process_group(timeout=datetime.timedelta(seconds=30)):
        torch.manual_seed(1234)          # the checkpoint must restore the RNG
        t = teacher_trainer(run_dir=out / "aug_crashed", resume=True, augment=Jitter())
        t.fit()
        torch.save({"model": t.model.state_dict(), "bank": bank_of(t)},
                   out / f"resumed{distributed.rank()}.pt")


# ---- launching ----------------------------------------------------------------------------------
def free_port() -> int:
    """A free port below the ephemeral range, so that no outgoing connection takes it between
    now and the moment rank 0 binds it."""
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def launch(argv: list[str], nproc: int = 2, timeout: float = 120) -> list[tuple[int, str, str]]:
    """Run ``python argv`` as ``nproc`` processes of one group; (returncode, stdout, stderr).
    Started again on another port if the port was taken meanwhile."""
    for _ in range(3):
        results = _launch(argv, nproc, timeout)
        if not any("address already in use" in err.lower() for _, _, err in results):
            break
    return results


def _launch(argv: list[str], nproc: int, timeout: float) -> list[tuple[int, str, str]]:
    port = str(free_port())
    with tempfile.TemporaryDirectory() as logs:
        procs, files = [], []
        for r in range(nproc):
            env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                   "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc),
                   "LOCAL_WORLD_SIZE": str(nproc), "GLOO_SOCKET_IFNAME": "lo",
                   "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
            out, err = (open(os.path.join(logs, f"{r}.{k}"), "w+") for k in ("out", "err"))
            files.append((out, err))
            procs.append(subprocess.Popen([sys.executable, *argv], env=env, stdout=out,
                                          stderr=err, text=True))
        # One process failing leaves the others waiting for it: stop them soon after.
        deadline, failed_at = time.monotonic() + timeout, None
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                failed_at = now
            if now > deadline or (failed_at is not None and now - failed_at > 10):
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
                break
            time.sleep(0.05)
        results = []
        for p, (out, err) in zip(procs, files):
            out.seek(0)
            err.seek(0)
            results.append((p.returncode, out.read(), err.read()))
            out.close()
            err.close()
    return results


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    code = "import test_distributed as T, sys; T.child_main(sys.argv[1])"
    results = launch(["-c", code, str(out)])
    for rc, _, err in results:
        assert rc == 0, err
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def single():
    t = teacher_trainer()
    t.fit()
    c = crd_trainer()
    c.fit()
    return {"teacher": {"model": t.model.state_dict(), "bank": bank_of(t), "history": t.history},
            "crd": {"model": c.model.state_dict(), "objective": {
                k: v for k, v in c.objective.state_dict().items() if not k.startswith("teacher.")}}}


def assert_close(a: dict, b: dict, n_terms: int, terms: dict[str, int] | None = None) -> None:
    """Every tensor of ``a`` within the cross-process tolerance of ``b``'s (the single-process
    run's); ``terms`` gives the reduction length of keys that differ from ``n_terms``."""
    assert a.keys() == b.keys()
    for k in a:
        n = (terms or {}).get(k, n_terms)
        assert a[k].shape == b[k].shape, k
        assert within(a[k], b[k], n).all(), \
            (k, (a[k].double() - b[k].double()).abs().max(), "allowed", ATOL,
             "+", ULPS * EPS32 * n, "x |value|")


def assert_same_history(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k, v in ra.items():
            if k == "epoch_time":
                continue
            if isinstance(v, float):
                assert rb[k] == pytest.approx(v, abs=ATOL, rel=ULPS * EPS32 * EPOCH_TERMS), k
            else:                                    # epoch, stage, counts: exactly equal
                assert rb[k] == v, k


# ---- equivalence --------------------------------------------------------------------------------
def test_two_processes_match_one_process_soteacher(two, single):
    out, ranks = two
    assert ranks[0]["world"] == 2
    ref = single["teacher"]
    for res in ranks:
        assert_close(res["teacher"]["model"], ref["model"], TEACHER_TERMS)
        bank, count = res["teacher"]["bank"]
        assert_close({"bank": bank}, {"bank": ref["bank"][0]}, TEACHER_TERMS)
        assert torch.equal(count, ref["bank"][1])         # every sample seen once per epoch
        assert_same_history(ref["history"], json.loads(res["teacher"]["history"]))
    # the replicas are identical, not merely close
    assert torch.equal(ranks[0]["teacher"]["bank"][0], ranks[1]["teacher"]["bank"][0])
    for k, v in ranks[0]["teacher"]["model"].items():
        assert torch.equal(v, ranks[1]["teacher"]["model"][k]), k
    assert ref["history"][1]["loss_consistency"] > 0
    # rank 0 wrote the files: the unwrapped model and the whole bank
    ckpt = safe_torch_load(out / "teacher" / "checkpoint.pt")
    assert torch.equal(ckpt["objective"]["consistency.bank.bank"], ranks[0]["teacher"]["bank"][0])
    assert set(ckpt["model"]) == set(ref["model"])
    assert (out / "teacher" / "model.pt").is_file()
    assert len((out / "teacher" / "metrics.jsonl").read_text().splitlines()) == 3


def test_two_processes_match_one_process_crd(two, single):
    _, ranks = two
    ref = single["crd"]
    z_terms = {"z_student": CRD_Z_TERMS, "z_teacher": CRD_Z_TERMS}
    for res in ranks:
        assert_close(res["crd"]["model"], ref["model"], CRD_TERMS)
        # memories, Z, embeddings
        assert_close(res["crd"]["objective"], ref["objective"], CRD_TERMS, z_terms)
    # the replicas are identical: every process applied the same global rows and statistics
    for k in ("memory_s", "memory_t", "z_student", "z_teacher"):
        assert torch.equal(ranks[0]["crd"]["objective"][k], ranks[1]["crd"]["objective"][k]), k
    assert float(ref["objective"]["z_student"]) > 0


def test_two_processes_keep_crl_counts_of_one_process(two):
    _, ranks = two
    crl, counts_after, expected = ConfidenceRanking(N), [], {0: [], 1: []}
    for k, z, y, idx in crl_batches():
        norm = normalised_counts(crl.counts, k)
        for r in range(2):
            lo, hi = distributed.batch_slice(len(idx), r, 2)
            expected[r].append(crl_loss(z[lo:hi], norm[idx[lo:hi]]))
        crl(z, y, idx, k)
    assert crl.counts.sum() > 0 and len(set(crl.counts.tolist())) > 2
    for r, res in enumerate(ranks):
        # integer counts: exactly the single process's (a lost or doubled row would show)
        assert torch.equal(res["crl"]["counts"], crl.counts)
        # each process's loss: its own slice ranked with the replicated counts
        assert torch.allclose(res["crl"]["losses"], torch.stack(expected[r]), atol=1e-7, rtol=0)
    assert ranks[0]["crl"]["losses"].abs().sum() > 0


def test_tolerances_catch_a_missing_sample():
    """The cross-process check accepts float32 vs float64 summation of CRD-like scores, and
    rejects the same statistic with one sample of the batch missing."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(8, 11, generator=g).mul(2).exp()        # B x (1 + K) positive scores
    z32 = scores.mean() * N
    z64 = (scores.double().mean() * N).float()
    assert within(z32, z64, CRD_Z_TERMS)
    assert not within(scores[:-1].mean() * N, z64, CRD_Z_TERMS)
    assert not within(scores[:4].mean() * N, z64, CRD_Z_TERMS)  # one process's slice only
    # O(1) values: a few ulps pass, a difference of 1e-3 (far less than one SGD step here) fails
    w = torch.randn(16, 6, generator=g)
    assert within(w + 2 * EPS32 * w, w, TEACHER_TERMS).all()
    assert not within(w + 1e-3, w, TEACHER_TERMS).any()


def test_two_process_checkpoint_resumes_on_one_process(two, single, tmp_path):
    out, _ = two
    run = tmp_path / "crashed"
    shutil.copytree(out / "crashed", run)
    ckpt = safe_torch_load(run / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 4) and ckpt["partial"]["seen"] == 28
    assert not (run / "model.pt").exists()
    t = teacher_trainer(run_dir=run, resume=True)
    history = t.fit()
    ref = single["teacher"]
    assert_close(t.model.state_dict(), ref["model"], TEACHER_TERMS)
    assert_close({"bank": bank_of(t)[0]}, {"bank": ref["bank"][0]}, TEACHER_TERMS)
    # epoch 2's averages include the steps the two processes did before the crash
    assert_same_history(ref["history"], history)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


def test_skipped_step_and_augmentation_keep_the_processes_in_step(two):
    _, ranks = two
    a, b = ranks[0]["skip"], ranks[1]["skip"]
    assert a["skipped"] == b["skipped"] == [1, 0, 0]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert torch.equal(a["bank"][0], b["bank"][0]) and torch.equal(a["bank"][1], b["bank"][1])
    # the bank was updated before the loss went bad: every row of every step entered it
    assert int(a["bank"][1].sum()) == 3 * N


def test_two_process_resume_with_augmentation_is_exact(two):
    out, ranks = two
    results = launch(["-c", "import test_distributed as T, sys; T.child_resume(sys.argv[1])",
                      str(out)])
    for rc, _, err in results:
        assert rc == 0, err
    for r in range(2):
        resumed = torch.load(out / f"resumed{r}.pt", weights_only=False)
        full = ranks[r]["aug"]
        for k, v in full["model"].items():
            assert torch.equal(v, resumed["model"][k]), k
        assert torch.equal(full["bank"][0], resumed["bank"][0])
    # each process augmented its own slice, and the replicas stayed identical
    assert torch.equal(ranks[0]["aug"]["bank"][0], ranks[1]["aug"]["bank"][0])


def test_sync_bn(two):
    _, ranks = two
    assert "sync_bn needs CUDA" in ranks[0]["sync_bn_error"]
    # in a single process it changes nothing
    t = Trainer(nn.Sequential(nn.Linear(D, 4), nn.BatchNorm1d(4)),
                build_teacher_objective("standard", num_samples=N, num_classes=C, num_epochs=1),
                make_data(), TrainSettings(epochs=1, batch_size=8, sync_bn=True), progress=False)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in t.model.modules())


# ---- command line under torchrun's environment --------------------------------------------------
TINY = ["--set", "data.options.num_train=64", "--set", "data.options.num_test=32",
        "--set", "teacher.train.epochs=2", "--set", "student.train.epochs=1",
        "--set", "teacher.train.batch_size=16", "--set", "student.train.batch_size=16",
        "--set", "teacher.model.options.widths=[4, 8]",
        "--set", "student.model.options.widths=[4]", "--quiet"]


def test_cli_train_teacher_and_distill_on_two_processes(tmp_path):
    teacher = tmp_path / "teacher"
    results = launch(["-m", "soteacher", "train-teacher", "--out", str(teacher), *TINY])
    for rc, _, err in results:
        assert rc == 0, err
    assert "teacher weights" in results[0][1] and results[1][1] == ""     # rank 0 prints
    for f in ("model.pt", "checkpoint.pt", "metrics.jsonl", "summary.json", "config.yaml"):
        assert (teacher / f).is_file(), f
    student = tmp_path / "student"
    results = launch(["-m", "soteacher", "distill", "--teacher", str(teacher), "--out",
                      str(student), "--set", "distill.method=crd",
                      "--set", "distill.options={feat_dim: 8, nce_k: 16}", *TINY])
    for rc, _, err in results:
        assert rc == 0, err
    assert "student weights" in results[0][1] and results[1][1] == ""
    ckpt = safe_torch_load(student / "checkpoint.pt")
    assert ckpt["objective"]["memory_s"].shape == (64, 8)


EXPERIMENT = {
    "seed": 0,
    "data": {"name": "known_truth", "val_fraction": 0.0,
             "options": {"num_classes": 3, "input_shape": [1, 16], "num_train": 64,
                         "num_test": 32, "seed": 0}},
    "teacher": {"model": {"name": "cnn1d", "options": {"widths": [4, 8]}},
                "train": {"epochs": 1, "batch_size": 16, "milestones": [], "eval_every": 0}},
    "student": {"model": {"name": "cnn1d", "options": {"widths": [4]}},
                "train": {"epochs": 1, "batch_size": 16, "milestones": [], "eval_every": 0}},
    "experiment": {"teachers": ["standard", "soteacher"], "distillers": ["kd"], "seeds": [0]},
}


def test_cli_experiment_on_two_processes_then_restart_skips_everything(tmp_path):
    import csv
    import yaml
    cfg, out = tmp_path / "grid.yaml", tmp_path / "out"
    cfg.write_text(yaml.safe_dump(EXPERIMENT))
    argv = ["-m", "soteacher", "experiment", str(cfg), "--out", str(out), "--quiet",
            "--no-plots"]
    results = launch(argv)
    for rc, _, err in results:
        assert rc == 0, err
    assert "results:" in results[0][1] and results[1][1] == ""          # rank 0 reports
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted((r["kind"], r["teacher"], r.get("distiller") or "") for r in rows) == [
        ("student", "soteacher", "kd"), ("student", "standard", "kd"),
        ("teacher", "soteacher", ""), ("teacher", "standard", "")]
    for r in rows:
        assert r["seed"] == "0"
    for r in (r for r in rows if r["kind"] == "student"):
        summary = json.loads((out / r["student_dir"] / "summary.json").read_text())
        teacher = json.loads((out / r["teacher_dir"] / "summary.json").read_text())
        assert summary["teacher_run"] == teacher["teacher_run"]
        assert 0 <= summary["metrics"]["test_acc"] <= 1
    weights = sorted(out.rglob("model.pt"))
    assert len(weights) == 4
    files = weights + sorted(out.rglob("summary.json")) + sorted(out.rglob("checkpoint.pt"))
    stamps = {p: p.stat().st_mtime_ns for p in files}
    csv_before = (out / "results.csv").read_text()

    # the same command again: rank 0 finds every run finished, every process skips it
    results = launch(argv)
    for rc, _, err in results:
        assert rc == 0, err
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    assert (out / "results.csv").read_text() == csv_before
    assert results[1][1] == ""

    # an error found on rank 0 (a changed config) stops every process, none hangs
    results = launch([*argv, "--set", "teacher.train.epochs=2"], timeout=60)
    for rc, _, err in results:
        assert rc == 2 and "teacher.train.epochs: 1 here, 2 asked for" in err, err


def test_errors_and_results_of_rank_0_reach_every_process(two):
    _, ranks = two
    for res in ranks:
        assert res["error"] == "refused on rank 0"
        assert res["broadcast"] == {"rank": 0}


# ---- pieces -------------------------------------------------------------------------------------
def test_batch_slices_cover_the_global_batch_in_rank_order():
    for n in range(1, 30):
        for world in (1, 2, 3, 8):
            if n < world:
                continue
            bounds = [distributed.batch_slice(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert max(h - l for l, h in bounds) - min(h - l for l, h in bounds) <= 1
    assert distributed.batch_layout(5) == (0, 5, 5)           # a single process
    x = torch.arange(6.0).view(3, 2)
    assert distributed.all_gather_rows(x)[0] is x
    assert distributed.run_on_main(lambda a: a + 1, 1) == 2


def test_bank_dtype_and_device():
    f32 = ConsistencyBank(1000, 100)
    f16 = ConsistencyBank(1000, 100, dtype="float16")
    bf16 = ConsistencyBank(1000, 100, dtype="bfloat16")
    assert f16.bank.dtype == torch.float16 and bf16.bank.dtype == torch.bfloat16
    rows = lambda b: b.bank.numel() * b.bank.element_size()
    assert rows(f16) * 2 == rows(f32) == rows(bf16) * 2 == 1000 * 100 * 4
    assert f16.bank.untyped_storage().nbytes() * 2 == f32.bank.untyped_storage().nbytes()
    assert f16.nbytes == 1000 * 100 * 2 + 1000 * 4
    # a float32 checkpoint loads into a float16 bank
    f32.bank.uniform_()
    f16.load_state_dict(f32.state_dict())
    assert torch.allclose(f16.bank.float(), f32.bank, atol=1e-3)
    # a CPU bank stays on the CPU (and keeps its dtype) when the objective is moved
    obj = build_teacher_objective("soteacher", {"bank_dtype": "bfloat16", "bank_device": "cpu"},
                                  num_samples=10, num_classes=4, num_epochs=2)
    obj.to(torch.float64)
    assert obj.consistency.bank.bank.dtype == torch.bfloat16
    assert obj.consistency.bank.bank.device.type == "cpu"
    with pytest.raises(ValueError, match="bank_dtype"):
        build_teacher_objective("soteacher", {"bank_dtype": "int8"}, num_samples=10,
                                num_classes=4, num_epochs=2)
    with pytest.raises(ValueError, match="bank_device"):
        build_teacher_objective("soteacher", {"bank_device": "gpu"}, num_samples=10,
                                num_classes=4, num_epochs=2)


def test_float16_bank_trains_close_to_float32():
    data = make_data()
    runs = {}
    for dtype in ("float32", "float16"):
        s = TrainSettings(epochs=3, batch_size=8, lr=0.1)
        obj = build_teacher_objective("soteacher", {"bank_dtype": dtype}, num_samples=N,
                                      num_classes=C, num_epochs=3)
        t = Trainer(mlp(1), obj, data, s, seed=5, progress=False)
        t.fit()
        runs[dtype] = t.objective.consistency.bank.bank.float()
    assert torch.allclose(runs["float16"], runs["float32"], atol=5e-3)
