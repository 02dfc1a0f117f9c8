"""The CIFAR-100 configs of the published teacher/student pairs run end to end (shrunk), and the
speed options, data download and throughput commands work on the CPU."""

import json
from pathlib import Path

import pytest
import torch

from soteacher.cli.main import main
from soteacher.config import load_config, validate
from test_image_data import make_cifar

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "cifar100").glob("*.yaml"))
PAIRS = {"wrn_40_2-wrn_40_1", "resnet32x4-resnet8x4", "wrn_40_2-wrn_16_2", "resnet56-resnet20",
         "vgg13-vgg8"}


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    make_cifar(root, "cifar100", n=24, archive=True)
    return root


def test_every_published_pair_has_a_config_with_the_paper_protocol():
    assert {c.stem for c in CONFIGS} == PAIRS
    for c in CONFIGS:
        cfg = load_config(c)
        validate(cfg)
        t, s = cfg.teacher.model.name, cfg.student.model.name
        assert c.stem == f"{t}-{s}"
        for train in (cfg.teacher.train, cfg.student.train):
            assert (train.epochs, train.batch_size, train.milestones) == (240, 64, [150, 180, 210])
            assert (train.momentum, train.weight_decay, train.gamma) == (0.9, 5e-4, 0.1)
        assert cfg.teacher.train.lr == 0.05 and cfg.distill.method == "kd"
        assert cfg.distill.options == {"temperature": 4.0, "ce_weight": 0.5, "kl_weight": 0.5}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_config_runs_end_to_end_shrunk(config, cifar_root, tmp_path):
    shrink = ["--config", str(config), "--quiet", "--set", f"data.options.root={cifar_root}",
              "--set", "teacher.train.epochs=1", "--set", "student.train.epochs=1",
              "--set", "teacher.train.batch_size=8", "--set", "student.train.batch_size=8"]
    assert main(["train-teacher", "--out", str(tmp_path / "t"), *shrink]) == 0
    assert main(["train-teacher", "--out", str(tmp_path / "ts"), *shrink,
                 "--set", "teacher.method=standard"]) == 0
    assert main(["distill", "--teacher", str(tmp_path / "t"), "--out", str(tmp_path / "s"),
                 *shrink]) == 0
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert 0 <= summary["test_acc"] <= 1 and "test_agreement" in summary


@pytest.mark.parametrize("settings", [["amp=bf16"], ["amp=fp16"], ["channels_last=true"]])
def test_speed_options_train_on_cpu(settings, cifar_root, tmp_path):
    sets = []
    for s in settings:
        sets += ["--set", f"teacher.train.{s}"]
    args = ["train-teacher", "--out", str(tmp_path), "--quiet", "--config",
            str(CONFIGS[0].parent / "resnet56-resnet20.yaml"),
            "--set", f"data.options.root={cifar_root}", "--set", "teacher.model.name=resnet8",
            "--set", "teacher.train.epochs=1", "--set", "teacher.train.batch_size=8", *sets]
    assert main(args) == 0
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    if "amp=fp16" in settings:
        assert ckpt["scaler"]["scale"] > 0          # the grad scaler's state is checkpointed


def test_compile_option_compiles_the_forward_model(monkeypatch):
    from soteacher import ArrayDataset, Trainer, TrainSettings
    from soteacher.teachers import build_teacher_objective
    calls = []
    monkeypatch.setattr(torch, "compile", lambda m: calls.append(m) or m)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    t = Trainer(model, build_teacher_objective("standard", num_samples=8, num_classes=2,
                                               num_epochs=1),
                ArrayDataset(torch.randn(8, 1, 4), torch.randint(0, 2, (8,))),
                TrainSettings(epochs=1, batch_size=4, compile=True), progress=False)
    assert calls == [model] and t.forward_model is model
    t.fit()


def test_data_download_from_a_local_url(tmp_path, capsys):
    import hashlib
    src = tmp_path / "src"
    src.mkdir()
    make_cifar(src, "cifar10", n=3, archive=True)
    archive = src / "cifar-10-python.tar.gz"
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    root = tmp_path / "data"
    assert main(["data", "download", "cifar10", "--root", str(root), "--url",
                 archive.as_uri(), "--md5", md5]) == 0
    assert (root / "cifar-10-batches-py" / "test_batch").is_file()
    assert main(["data", "download", "cifar10", "--root", str(tmp_path / "d2"), "--url",
                 archive.as_uri(), "--md5", "0" * 32]) == 2
    assert "md5" in capsys.readouterr().err.lower()
    assert not any((tmp_path / "d2").glob("*.part"))


def test_missing_cifar_is_a_clear_error(tmp_path, capsys):
    rc = main(["train-teacher", "--out", str(tmp_path / "run"), "--quiet", "--config",
               str(CONFIGS[0]), "--set", f"data.options.root={tmp_path / 'nothing'}"])
    assert rc == 2
    assert "soteacher data download cifar100" in capsys.readouterr().err


def test_bench_throughput_json(capsys):
    assert main(["bench", "throughput", "--model", "resnet8", "--batch-size", "4", "--steps",
                 "2", "--repeats", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"loop_efficiency", "soteacher_overhead", "pure_images_per_s"} <= set(r)
    assert r["loop_efficiency"] > 0 and r["soteacher_overhead"] > 0
    lo, hi = r["soteacher_overhead_range"]
    assert lo <= r["soteacher_overhead"] <= hi
