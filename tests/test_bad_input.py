"""Bad input gets a clear error that says what to do, and leaves nothing half-written.

Together with test_config.py and test_cli.py this covers the table in README's
"When something is wrong" section.
"""

import os
import pickle

import pytest
import torch
from torch import nn

from soteacher import ArrayDataset, IndexedDataset, Trainer, TrainSettings, train_teacher
from soteacher.api import as_indexed
from soteacher.config import ConfigError, apply_overrides, load_config, validate
from soteacher.engine.evaluate import resolve_device
from soteacher.engine.io import CheckpointError, atomic_write_bytes, safe_torch_load
from soteacher.engine.trainer import InputShapeError, save_weights
from soteacher.models import create_model
from soteacher.pipeline import load_model, prepare_run_dir
from soteacher.teachers import build_teacher_objective


def tiny_data(n=32, labels=None):
    x = torch.randn(n, 1, 8)
    y = torch.randint(0, 3, (n,)) if labels is None else labels
    return ArrayDataset(x, y)


def test_nan_weight_is_refused():
    cfg = apply_overrides(load_config(), ["teacher.options.lipschitz_weight=.nan"])
    validate(cfg)   # the name is fine; the value is checked when the objective is built
    with pytest.raises(ValueError, match="lipschitz_weight must be a finite number >= 0"):
        build_teacher_objective("soteacher", cfg.teacher.options, num_samples=4, num_classes=2,
                                num_epochs=1)


def test_labels_outside_the_class_range():
    data = tiny_data(labels=torch.tensor([0, 1, 2, 5] * 8))
    model = create_model("mlp_small", 3, (1, 8))
    with pytest.raises(ValueError, match=r"label 5 of sample \d+ is outside \[0, 3\)"):
        train_teacher(model, data, method="standard", epochs=1, batch_size=8, progress=False)


def test_dataset_items_that_are_not_pairs():
    with pytest.raises(ValueError, match=r"\(input, label\).*got Tensor"):
        as_indexed([torch.zeros(3), torch.zeros(3)])
    with pytest.raises(ValueError, match="length 4"):
        as_indexed([(1, 2, 3, 4)])
    wrapped = as_indexed([(torch.zeros(2), 1)])
    assert isinstance(wrapped, IndexedDataset) and wrapped[0][2] == 0


def test_inputs_of_the_wrong_shape():
    model = create_model("cnn1d_small", 3, (1, 8))
    data = ArrayDataset(torch.randn(16, 8), torch.randint(0, 3, (16,)))   # (N, L), no channel
    with pytest.raises(InputShapeError, match=r"each sample has shape \(8,\).*expects inputs "
                                              r"of shape \(1, 8\) per sample"):
        train_teacher(model, data, method="standard", epochs=1, milestones=[], batch_size=8,
                      progress=False)


def test_corrupt_and_truncated_checkpoints(tmp_path):
    good = tmp_path / "model.pt"
    save_weights(create_model("mlp_small", 3, (1, 8)), good,
                 {"name": "mlp_small", "options": {}, "num_classes": 3, "input_shape": [1, 8]})
    assert isinstance(load_model(good), nn.Module)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        load_model(garbage)
    with pytest.raises(CheckpointError, match="no model weights"):
        load_model(tmp_path / "missing.pt")


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PAYLOAD_MARKER']}",))


def test_checkpoint_crafted_to_run_code_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PAYLOAD_MARKER", str(marker))
    evil = tmp_path / "evil.pt"
    torch.save({"format": "soteacher-model/1", "state_dict": {}, "spec": _Payload()}, evil)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_model(evil)
    with pytest.raises(CheckpointError, match="refusing to load"):
        safe_torch_load(evil)
    assert not marker.exists(), "the payload ran"
    # a plain pickle file (not a torch zip) with the same payload is refused too
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(CheckpointError):
        safe_torch_load(raw)
    assert not marker.exists(), "the payload ran"


def test_weights_of_another_architecture(tmp_path):
    path = tmp_path / "model.pt"
    save_weights(create_model("mlp_small", 3, (1, 8)), path,
                 {"name": "mlp_small", "options": {}, "num_classes": 5, "input_shape": [1, 8]})
    with pytest.raises(CheckpointError, match=r"do not fit model 'mlp_small' \(5 classes\): head.weight has shape \(3, 64\) in the file but \(5, 64\) in the model"):
        load_model(path)


def test_output_path_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        prepare_run_dir(blocker)
    with pytest.raises(ConfigError, match="cannot write to output directory"):
        prepare_run_dir(blocker / "run")


def test_full_disk_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    atomic_write_bytes(target, b"old")

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(target, b"new" * 1000)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_cuda_requested_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="CUDA is not available; use the CPU \\(device='cpu' "
                                         "in the Python API, --device cpu on the command line"):
        resolve_device("cuda")


def test_checkpoint_of_another_run_does_not_fit(tmp_path):
    data = tiny_data()
    obj = build_teacher_objective("soteacher", {}, num_samples=32, num_classes=3, num_epochs=1)
    Trainer(create_model("mlp_small", 3, (1, 8)), obj, data, TrainSettings(epochs=1, batch_size=8),
            run_dir=tmp_path, progress=False).fit()
    obj2 = build_teacher_objective("soteacher", {}, num_samples=32, num_classes=3, num_epochs=2)
    t = Trainer(create_model("mlp", 3, (1, 8)), obj2, data, TrainSettings(epochs=2, batch_size=8),
                run_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="does not fit this model/objective"):
        t.fit()


def test_skip_mode_counts_non_finite_steps():
    from soteacher.objective import Objective, StepOutput

    class NanOnFirstBatchOfEpoch2(Objective):
        calls = 0

        def forward(self, model, x, y, index):
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
            if self.epoch == 2 and index.min() >= 0 and not getattr(self, "done", False):
                self.done = True
                loss = loss * float("nan")
            return StepOutput(logits, {"ce": loss})

    t = Trainer(create_model("mlp_small", 3, (1, 8)), NanOnFirstBatchOfEpoch2(), tiny_data(),
                TrainSettings(epochs=2, batch_size=8, nonfinite="skip"), progress=False)
    hist = t.fit()
    assert [r["skipped_steps"] for r in hist] == [0, 1]
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
