"""The CIFAR-100 configs: every pair in every recipe, each recipe's numbers and anchors as the
reference it names, end-to-end runs (shrunk) of each pair and of each recipe, and the speed
options, data download and throughput commands on the CPU.

Layout: ``configs/cifar100/<teacher>-<student>.yaml`` follow the SoTeacher authors' scripts;
``configs/cifar100/<recipe>/<teacher>-<student>.yaml`` follow the reference recipe the folder is
named after. Every file's header names its recipe (``# recipe: NAME``) and the published anchor
that belongs to it (``# anchor: ...``); the tables below are the reference numbers, read from the
reference repositories (README tables, config files and log names quoted per table).
"""

import json
import re
from pathlib import Path

import pytest
import torch

from soteacher.cli.main import main
from soteacher.config import load_config, validate
from test_image_data import make_cifar

CIFAR = Path(__file__).parents[1] / "configs" / "cifar100"
CONFIGS = sorted(CIFAR.glob("*.yaml"))                 # the SoTeacher scripts' recipe
RECIPE_CONFIGS = sorted(CIFAR.glob("*/*.yaml"))
PAIRS = {"wrn_40_2-wrn_40_1", "resnet32x4-resnet8x4", "wrn_40_2-wrn_16_2", "resnet56-resnet20",
         "vgg13-vgg8", "vgg13-mobilenetv2", "resnet110-resnet32"}
RECIPES = {"repdistiller-kd", "mdistiller-dkd", "logit-std-kd", "logit-std-dkd"}
#: RepDistiller's train_student.py gives these students lr 0.01 instead of 0.05 (SoTeacher's
#: config_student.py and mdistiller's configs do the same)
LOW_LR_STUDENTS = {"mobilenetv2", "shufflev1", "shufflev2"}

#: RepDistiller README, CIFAR-100 top-1 %, KD row: (student, teacher)
REPDISTILLER_KD = {
    "wrn_40_2-wrn_16_2": (74.92, 75.61), "wrn_40_2-wrn_40_1": (73.54, 75.61),
    "resnet56-resnet20": (70.66, 72.34), "resnet110-resnet32": (73.08, 74.31),
    "resnet32x4-resnet8x4": (73.33, 79.42), "vgg13-vgg8": (72.98, 74.64),
    "vgg13-mobilenetv2": (67.37, 74.64)}
#: mdistiller configs/cifar100/dkd/*.yaml: DKD.BETA (res32x4_res8x4.yaml sets none: the cfg
#: default 8); README DKD row
MDISTILLER_DKD = {
    "resnet56-resnet20": (2.0, 71.97), "resnet110-resnet32": (2.0, 74.11),
    "resnet32x4-resnet8x4": (8.0, 76.32), "wrn_40_2-wrn_16_2": (6.0, 76.23),
    "wrn_40_2-wrn_40_1": (6.0, 74.81), "vgg13-vgg8": (6.0, 74.68),
    "vgg13-mobilenetv2": (6.0, 69.71)}
#: logit-standardization-KD README, KD+Ours row, and the log each number links to
#: (logs/KD/kd,TEACHER,STUDENT,T,KD_WEIGHT.txt): (T, KD weight, student)
LOGIT_STD_KD = {
    "resnet32x4-resnet8x4": (2, 9, 76.62), "vgg13-vgg8": (3, 9, 74.36),
    "wrn_40_2-wrn_40_1": (2, 9, 74.37), "wrn_40_2-wrn_16_2": (2, 9, 76.11),
    "resnet56-resnet20": (2, 9, 71.43), "resnet110-resnet32": (2, 9, 74.17),
    "vgg13-mobilenetv2": (3, 9, 68.61)}
#: the same README's DKD+Ours row and its logs (logs/DKD/dkd,TEACHER,STUDENT,T,KD_WEIGHT[,BETA]
#: .txt; no BETA: the cfg default 8): (T, KD weight, BETA, student). Their tools/train.py
#: multiplies DKD.ALPHA (1) and DKD.BETA by the KD weight and sets DKD.T to the base temperature.
LOGIT_STD_DKD = {
    "resnet32x4-resnet8x4": (2, 9, 8.0, 77.01), "vgg13-vgg8": (2, 15, 2.0, 74.81),
    "wrn_40_2-wrn_40_1": (2, 12, 2.0, 74.89), "wrn_40_2-wrn_16_2": (2, 12, 2.0, 76.39),
    "resnet56-resnet20": (3, 18, 2.0, 72.32), "resnet110-resnet32": (2, 15, 2.0, 74.29),
    "vgg13-mobilenetv2": (3, 9, 2.0, 69.98)}


def recipe_of(path: Path) -> str:
    return "soteacher-scripts" if path.parent == CIFAR else path.parent.name


def header(path: Path, key: str) -> str:
    """The value of the ``# key: value`` line of a config's header comment."""
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith(f"# {key}: ")]
    assert len(lines) == 1, f"{path} must have exactly one '# {key}:' line"
    return lines[0][len(f"# {key}: "):]


def anchor_numbers(path: Path) -> list[float]:
    return [float(v) for v in re.findall(r"(?:student|teacher) (\d+\.\d+)", header(path, "anchor"))]


def expected_distill(recipe: str, pair: str) -> tuple[str, dict]:
    """The distill section each recipe prescribes for a pair."""
    if recipe == "soteacher-scripts":
        return "kd", {"temperature": 4.0, "ce_weight": 0.5, "kl_weight": 0.5}
    if recipe == "repdistiller-kd":
        return "kd", {"temperature": 4.0, "ce_weight": 0.1, "kl_weight": 0.9}
    if recipe == "mdistiller-dkd":
        beta, _ = MDISTILLER_DKD[pair]
        return "dkd", {"alpha": 1.0, "beta": beta, "temperature": 4.0, "ce_weight": 1.0,
                       "warmup_epochs": 20}
    if recipe == "logit-std-kd":
        T, w, _ = LOGIT_STD_KD[pair]
        return "kd", {"temperature": T, "ce_weight": 0.1, "kl_weight": w,
                      "logit_standardize": True}
    if recipe == "logit-std-dkd":
        T, w, beta, _ = LOGIT_STD_DKD[pair]
        return "dkd", {"alpha": 1.0 * w, "beta": beta * w, "temperature": T, "ce_weight": 1.0,
                       "warmup_epochs": 20, "logit_standardize": True}
    raise AssertionError(f"no expectation for recipe {recipe!r}")


def expected_anchor(recipe: str, pair: str) -> list[float]:
    return {"soteacher-scripts": lambda: [],
            "repdistiller-kd": lambda: list(REPDISTILLER_KD[pair]),
            "mdistiller-dkd": lambda: [MDISTILLER_DKD[pair][1]],
            "logit-std-kd": lambda: [LOGIT_STD_KD[pair][-1]],
            "logit-std-dkd": lambda: [LOGIT_STD_DKD[pair][-1]]}[recipe]()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    make_cifar(root, "cifar100", n=24, archive=True)
    return root


def shrink(config: Path, cifar_root: Path) -> list[str]:
    return ["--config", str(config), "--quiet", "--set", f"data.options.root={cifar_root}",
            "--set", "teacher.train.epochs=1", "--set", "student.train.epochs=1",
            "--set", "teacher.train.batch_size=8", "--set", "student.train.batch_size=8"]


def test_every_pair_has_a_config_in_every_recipe():
    assert {c.stem for c in CONFIGS} == PAIRS
    assert {p.name for p in CIFAR.iterdir() if p.is_dir()} == RECIPES
    for recipe in RECIPES:
        assert {c.stem for c in (CIFAR / recipe).glob("*.yaml")} == PAIRS, recipe


@pytest.mark.parametrize("config", CONFIGS + RECIPE_CONFIGS,
                         ids=lambda c: f"{recipe_of(c)}/{c.stem}")
def test_config_follows_its_recipe(config):
    cfg = load_config(config)
    validate(cfg)
    recipe, pair = recipe_of(config), config.stem
    t, s = cfg.teacher.model.name, cfg.student.model.name
    assert pair == f"{t}-{s}"
    assert header(config, "recipe") == recipe
    for train in (cfg.teacher.train, cfg.student.train):
        assert (train.epochs, train.batch_size, train.milestones) == (240, 64, [150, 180, 210])
        assert (train.momentum, train.weight_decay, train.gamma) == (0.9, 5e-4, 0.1)
        assert train.schedule == "step"
    assert cfg.teacher.train.lr == 0.05
    assert cfg.student.train.lr == (0.01 if s in LOW_LR_STUDENTS else 0.05)
    assert (cfg.data.name, cfg.data.augment) == ("cifar100", True)
    # the anchors are standard-teacher numbers: a reference recipe trains that teacher
    assert cfg.teacher.method == ("soteacher" if recipe == "soteacher-scripts" else "standard")
    method, options = expected_distill(recipe, pair)
    assert cfg.distill.method == method
    assert cfg.distill.options == options
    assert anchor_numbers(config) == expected_anchor(recipe, pair)
    if recipe == "soteacher-scripts":
        # RepDistiller's numbers (CE 0.1 / KL 0.9) are not this recipe's anchor
        assert header(config, "anchor") == "none published"


def test_dkd_beta_per_pair_is_mdistillers():
    """The DKD beta of every pair is the one in mdistiller's CIFAR-100 config of that pair."""
    betas = {c.stem: load_config(c).distill.options["beta"]
             for c in (CIFAR / "mdistiller-dkd").glob("*.yaml")}
    assert betas == {"resnet56-resnet20": 2.0, "resnet110-resnet32": 2.0,
                     "vgg13-vgg8": 6.0, "vgg13-mobilenetv2": 6.0, "wrn_40_2-wrn_16_2": 6.0,
                     "wrn_40_2-wrn_40_1": 6.0, "resnet32x4-resnet8x4": 8.0}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_config_runs_end_to_end_shrunk(config, cifar_root, tmp_path):
    args = shrink(config, cifar_root)
    assert main(["train-teacher", "--out", str(tmp_path / "t"), *args]) == 0
    assert main(["distill", "--teacher", str(tmp_path / "t"), "--out", str(tmp_path / "s"),
                 *args]) == 0
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert 0 <= summary["test_acc"] <= 1 and "test_agreement" in summary


@pytest.fixture(scope="module")
def standard_resnet56(cifar_root, tmp_path_factory):
    """A (shrunk) standard teacher, trained by a reference recipe's config."""
    out = tmp_path_factory.mktemp("standard_resnet56")
    config = CIFAR / "repdistiller-kd" / "resnet56-resnet20.yaml"
    assert main(["train-teacher", "--out", str(out), *shrink(config, cifar_root)]) == 0
    assert load_config(out / "config.yaml").teacher.method == "standard"
    return out


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_distils_end_to_end_shrunk(recipe, standard_resnet56, cifar_root, tmp_path):
    config = CIFAR / recipe / "resnet56-resnet20.yaml"
    assert main(["distill", "--teacher", str(standard_resnet56), "--out", str(tmp_path),
                 *shrink(config, cifar_root)]) == 0
    terms = {"kd": {"loss_ce", "loss_kd"},
             "dkd": {"loss_ce", "loss_tckd", "loss_nckd"}}[load_config(config).distill.method]
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert terms <= set(first), sorted(first)
    assert 0 <= json.loads((tmp_path / "summary.json").read_text())["test_acc"] <= 1


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
