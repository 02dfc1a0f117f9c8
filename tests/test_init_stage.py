"""The preliminary stage of AB, FSP and FT as RepDistiller runs it (train_student.py and
helper/pretrain.py ``init``): ``init_epochs`` extra epochs before the full main schedule, an own
SGD optimiser over the stage's modules at a constant learning rate, the student in eval mode
except those modules; then a fresh main optimiser without the frozen modules. Also the named
``in_run`` variant, the records and the progress lines, and exact resumes inside the stage."""

import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from soteacher import ArrayDataset, Trainer, TrainSettings, create_model
from soteacher.distillers import build_distiller, ft_loss
from soteacher.distillers.common import feature_modules
from soteacher.engine.io import CheckpointError, safe_torch_load

SHAPE = (1, 16)
N = 24                                  # 3 steps of 8 per epoch


pytestmark = pytest.mark.usefixtures("one_thread")


def make_pair(method, seed=0):
    torch.manual_seed(seed)
    # FSP needs equal channel numbers at the paired stages: a teacher as wide as the student.
    teacher = create_model("cnn1d", 3, SHAPE, widths=(8, 16) if method == "fsp" else (12, 24))
    student = create_model("cnn1d_small", 3, SHAPE)
    return teacher, student


def make_data(seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.randn(n, *SHAPE, generator=g), torch.randint(0, 3, (n,), generator=g))


def make_trainer(method, epochs=2, run_dir=None, resume=False, seed=0, options=None, **kw):
    teacher, student = make_pair(method, seed)
    data = make_data()
    d = build_distiller(method, teacher, {"init_epochs": 2, **(options or {})}, student=student,
                        num_samples=N, num_classes=3)
    settings = TrainSettings(epochs=epochs, batch_size=8, lr=0.05, milestones=[1],
                             **kw.pop("settings", {}))
    return Trainer(student, d, data, settings, seed=seed, run_dir=run_dir, resume=resume,
                   progress=False, **kw)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


# ==== what the stage trains ======================================================================
@pytest.mark.parametrize("method", ["ab", "fsp", "ft"])
def test_the_stage_changes_only_its_modules(method):
    t = make_trainer(method)
    student, d = t.model, t.objective
    s0, d0 = snapshot(student), snapshot(d)
    modes = []
    hooks = [m.register_forward_pre_hook(lambda m, _, name=name: modes.append((name, m.training)))
             for name, m in (("stage0", student.stages[0].body), ("head", student.head))]
    rec = t.run_epoch(1)                          # epoch 1 of the run: the preliminary stage
    for h in hooks:
        h.remove()
    assert rec["stage"] == "init" and rec["epoch"] == 1
    s_changed, d_changed = changed(s0, student), changed(d0, d)
    assert not any(k.startswith("teacher.") for k in d_changed)
    if method == "ft":
        # only the paraphraser learns; the student runs in eval mode without gradients
        assert s_changed == set()
        assert d_changed and all(k.startswith("paraphraser.") for k in d_changed)
        assert set(modes) == {("stage0", False), ("head", False)}
    else:
        # the feature modules learn (batch-norm statistics included); the classifier does not
        assert not any(k.startswith("head.") for k in s_changed)
        assert {"stages.0.body.0.weight", "stages.0.body.1.running_mean"} <= s_changed
        assert set(modes) == {("stage0", True), ("head", False)}
        if method == "ab":
            assert d_changed and all(k.startswith("connectors.") for k in d_changed)
        else:
            assert d_changed == set()
    # a fresh main optimiser: nothing of the stage leaks into it
    assert len(t.optimizer.state) == 0 and len(t.init_optimizer.state) > 0


def test_the_rest_of_the_student_stays_in_eval_mode():
    """WRN's batch norm after the last stage is not among RepDistiller's feat modules: during
    AB's preliminary stage it stays in eval mode, its running statistics unchanged."""
    torch.manual_seed(0)
    teacher, student = create_model("wrn_16_2", 4), create_model("wrn_16_1", 4)
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 4, (8,), generator=g))
    d = build_distiller("ab", teacher, {"init_epochs": 1}, student=student, num_classes=4)
    t = Trainer(student, d, data, TrainSettings(epochs=1, batch_size=4), progress=False)
    s0, d0 = snapshot(student), snapshot(d)
    t.run_epoch(1)
    s_changed = changed(s0, student)
    assert not any(k.startswith(("final_bn.", "head.")) for k in s_changed)
    assert any(k.startswith("stem_conv.") for k in s_changed)
    assert any(k.startswith("stages.2.") and k.endswith("running_var") for k in s_changed)
    assert any(k.startswith("connectors.") for k in changed(d0, d))


@pytest.mark.parametrize("name,excluded", [
    ("resnet8", {"head"}), ("wrn_16_1", {"final_bn", "head"}), ("vgg8", {"head"}),
    ("mobilenetv2", {"last_conv", "head"}), ("shufflev1", {"head"}),
])
def test_feature_modules_are_the_references_feat_modules(name, excluded):
    """RepDistiller's get_feat_modules: stem and stages, not what follows the last stage."""
    model = create_model(name, 10)
    covered = {id(p) for m in feature_modules(model) for p in m.parameters()}
    for child, module in model.named_children():
        params = {id(p) for p in module.parameters()}
        assert (params <= covered) == (child not in excluded), child
        assert not (params & covered) or child not in excluded, child


def test_the_main_stage_freezes_connectors_and_paraphraser():
    for method, frozen in (("ab", "connectors"), ("ft", "paraphraser")):
        t = make_trainer(method)
        main = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
        init = {id(p) for g in t.init_optimizer.param_groups for p in g["params"]}
        frozen_ids = {id(p) for p in getattr(t.objective, frozen).parameters()}
        assert frozen_ids and frozen_ids <= init and not frozen_ids & main
        assert {id(p) for p in t.model.parameters()} <= main
        if method == "ft":
            assert {id(p) for p in t.objective.translator.parameters()} <= main
            assert not init & {id(p) for p in t.model.parameters()}
        t.run_epoch(3)                                   # epoch 1 of the main schedule
        assert not getattr(t.objective, frozen).training
        assert t.model.training and t.objective.stage == "main"


# ==== learning rates and the schedule =============================================================
def ft_plan_lr(teacher_name, student_name, lr, **options):
    torch.manual_seed(0)
    student = create_model(student_name, 10)
    d = build_distiller("ft", create_model(teacher_name, 10), options, student=student)
    return d.preliminary_stage(student, lr).lr


def test_init_lr_follows_the_reference_rule():
    # RepDistiller helper/pretrain.py: 0.01 for FT with a CIFAR ResNet/WRN student
    assert ft_plan_lr("resnet8", "resnet8", 0.05) == 0.01
    assert ft_plan_lr("wrn_16_2", "wrn_16_1", 0.05) == 0.01
    # otherwise the main run's learning rate (0.01 for MobileNetV2/ShuffleNet students)
    assert ft_plan_lr("vgg8", "vgg8", 0.05) == 0.05
    assert ft_plan_lr("vgg8", "mobilenetv2", 0.01) == 0.01
    assert ft_plan_lr("resnet8", "resnet8", 0.05, init_lr=0.2) == 0.2
    for method in ("ab", "fsp"):
        torch.manual_seed(0)
        student = create_model("resnet8", 10)
        d = build_distiller(method, create_model("resnet8", 10), {}, student=student)
        plan = d.preliminary_stage(student, 0.05)
        assert plan.lr == 0.05 and plan.epochs == 30           # RepDistiller --init_epochs 30


def test_init_optimizer_is_sgd_with_the_main_momentum_and_weight_decay():
    t = make_trainer("ab", settings={"momentum": 0.8, "weight_decay": 1e-3},
                     options={"init_lr": 0.2})
    assert isinstance(t.init_optimizer, torch.optim.SGD)
    (group,) = t.init_optimizer.param_groups
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.2, 0.8, 1e-3)


def test_the_main_stage_gets_its_full_schedule(capsys):
    t = make_trainer("ab", epochs=3, evaluate=lambda m: {"test_metric": 1.0})
    t.progress.enabled = True                       # one line per epoch (not a terminal)
    hist = t.fit()
    assert [(r["stage"], r["epoch"]) for r in hist] == [
        ("init", 1), ("init", 2), ("main", 1), ("main", 2), ("main", 3)]
    # constant preliminary rate; the main schedule from its own epoch 1 (milestone 1)
    assert [r["lr"] for r in hist] == pytest.approx([0.05, 0.05, 0.05, 0.005, 0.005])
    assert all(set(k for k in r if k.startswith("loss_")) == {"loss_ab_init"} for r in hist[:2])
    assert all(set(k for k in r if k.startswith("loss_")) == {"loss_ce"} for r in hist[2:])
    assert all("test_metric" not in r for r in hist[:2])
    assert all(r["test_metric"] == 1.0 for r in hist[2:])
    lines = capsys.readouterr().err.splitlines()
    assert [re.match(r"(.*?) \(", l).group(1).split(" loss")[0] for l in lines] == [
        "train [init stage] epoch 1/2", "train [init stage] epoch 2/2",
        "train [main stage] epoch 1/3", "train [main stage] epoch 2/3",
        "train [main stage] epoch 3/3"]


def test_init_epochs_zero_skips_the_stage():
    t = make_trainer("fsp", options={"init_epochs": 0})
    assert t.plan is None and t.init_optimizer is None and t.init_epochs == 0
    hist = t.fit()
    assert [(r["stage"], r["epoch"]) for r in hist] == [("main", 1), ("main", 2)]


def test_in_run_variant_labels_the_first_epochs_of_the_run():
    t = make_trainer("ab", epochs=3, options={"init_stage": "in_run", "init_epochs": 1})
    assert t.plan is None and t.init_epochs == 0
    hist = t.fit()
    assert [(r["stage"], r["epoch"]) for r in hist] == [("init", 1), ("main", 2), ("main", 3)]
    assert [r["lr"] for r in hist] == pytest.approx([0.05, 0.005, 0.005])   # the run's schedule


def test_bad_stage_options_are_refused():
    teacher, student = make_pair("ab")
    with pytest.raises(ValueError, match="unknown init_stage 'later'.*separate.*in_run"):
        build_distiller("ab", teacher, {"init_stage": "later"}, student=student)
    with pytest.raises(ValueError, match="init_lr"):
        build_distiller("ab", teacher, {"init_lr": 0.0}, student=student)
    with pytest.raises(ValueError, match="init_lr applies to init_stage='separate'"):
        build_distiller("ab", teacher, {"init_stage": "in_run", "init_lr": 0.1}, student=student)
    with pytest.raises(ValueError, match="init_epochs must be an int"):
        build_distiller("ab", teacher, {"init_epochs": 1.5}, student=student)


# ==== the same run, written out by hand ===========================================================
def batches(seed, run_epoch, data, b=8):
    """The trainer's batch order: a permutation drawn from (seed, epoch of the whole run)."""
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(
        seed * 1_000_003 + run_epoch))
    return [(data.x[perm[i:i + b]], data.y[perm[i:i + b]]) for i in range(0, len(data), b)]


@pytest.mark.parametrize("method", ["ab", "ft"])
def test_trainer_equals_the_reference_procedure_written_out(method):
    """helper/pretrain.py then train_student.py, step by step, against the trainer's run."""
    t = make_trainer(method, epochs=2)
    t.fit()
    teacher, student = make_pair(method)
    d = build_distiller(method, teacher, {"init_epochs": 2}, student=student, num_samples=N,
                        num_classes=3)
    data = make_data()
    torch.manual_seed(0)
    init_modules = ([d.connectors, *student.stages] if method == "ab" else [d.paraphraser])
    opt = torch.optim.SGD([p for m in init_modules for p in m.parameters()], lr=0.05,
                          momentum=0.9, weight_decay=5e-4)
    for epoch in (1, 2):
        teacher.eval()
        student.eval()
        for m in init_modules:
            m.train()
        for x, y in batches(0, epoch, data):
            if method == "ab":
                s_feats = student.forward_features(x, preact=True)[1]
                with torch.no_grad():
                    t_feats = teacher.forward_features(x, preact=True)[1]
                loss = d.ab_total(s_feats, t_feats)
            else:
                with torch.no_grad():
                    f_t = teacher.forward_features(x)[1]["stages"][-1]
                loss = F.mse_loss(d.paraphraser(f_t)[1], f_t)
            opt.zero_grad()
            loss.backward()
            opt.step()
    main_params = list(student.parameters()) + (list(d.translator.parameters())
                                                if method == "ft" else [])
    opt = torch.optim.SGD(main_params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    for epoch in (1, 2):
        for g in opt.param_groups:
            g["lr"] = 0.05 * 0.1 ** (epoch > 1)
        student.train()
        d.train()
        (d.connectors if method == "ab" else d.paraphraser).eval()
        for x, y in batches(0, 2 + epoch, data):
            logits, s_feats = student.forward_features(x)
            loss = F.cross_entropy(logits, y)
            if method == "ft":
                with torch.no_grad():
                    factor_t = d.paraphraser.encode(teacher.forward_features(x)[1]["stages"][-1])
                factor_s = d.translator(s_feats["stages"][-1])
                loss = loss + d.ft_weight * ft_loss(factor_s, factor_t)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for k, v in student.state_dict().items():
        assert torch.equal(v, t.model.state_dict()[k]), k
    for k, v in d.state_dict().items():
        assert torch.equal(v, t.objective.state_dict()[k]), k


def totals(module):
    """(sum, sum of absolute values) of a module's floating-point state, in float64."""
    vals = [v.double() for v in module.state_dict().values() if v.is_floating_point()]
    return sum(float(v.sum()) for v in vals), sum(float(v.abs().sum()) for v in vals)


def test_stage_equals_repdistillers_init_on_the_same_models():
    """Constants from running RepDistiller's helper/pretrain.py ``init`` itself (exported to a
    scratch folder, not part of the project) on these very models, data and batch order: small
    adapters gave our models its ``model(x, is_feat=True, preact=...)`` feature list, its
    ``ABLoss`` (AB) or ``nn.MSELoss`` (FT) was the criterion, ``opt`` had learning_rate 0.05,
    momentum 0.9, weight_decay 5e-4, init_epochs 2 and model_s "cnn1d_small" (AB: lr 0.05) or
    "resnet8" (FT: its rule gives lr 0.01). Our trainer's two preliminary epochs reproduced its
    weights bit for bit; the sums below are (sum, sum |.|) of the student's state and of the
    connectors / paraphraser after them, and its logged epoch losses (init_train_loss)."""
    t = make_trainer("ab")
    losses = [t.run_epoch(e)["loss"] for e in (1, 2)]
    assert losses == pytest.approx([1.5748233795166016, 1.456066370010376], rel=1e-6)
    assert totals(t.model) == pytest.approx((39.97754201076678, 119.0969721552127), rel=1e-6)
    assert totals(t.objective.connectors) == pytest.approx((61.964565749745816, 130.4845703264),
                                                           rel=1e-6)
    torch.manual_seed(0)
    teacher, student = create_model("resnet8", 4), create_model("resnet8", 4)
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.randn(16, 3, 32, 32, generator=g),
                        torch.randint(0, 4, (16,), generator=g))
    d = build_distiller("ft", teacher, {"init_epochs": 2}, student=student, num_classes=4)
    t = Trainer(student, d, data, TrainSettings(epochs=1, batch_size=8, lr=0.05), progress=False)
    assert t.plan.lr == 0.01
    losses = [t.run_epoch(e)["loss"] for e in (1, 2)]
    assert losses == pytest.approx([0.15953686088323593, 0.15943647921085358], rel=1e-6)
    assert totals(student) == pytest.approx((712.6932721563162, 5053.653326908665), rel=1e-6)
    assert totals(d.paraphraser) == pytest.approx((15.608016267354088, 2850.6823823528607),
                                                  rel=1e-6)


# ==== checkpoints and resume ======================================================================
def test_checkpoint_holds_the_stage_and_both_optimisers(tmp_path):
    t = make_trainer("ab", run_dir=tmp_path)
    original = t._train_epoch
    t._train_epoch = lambda e: (_ for _ in ()).throw(KeyboardInterrupt) if e == 2 else original(e)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    ckpt = safe_torch_load(tmp_path / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and ckpt["init_epochs"] == 2
    assert ckpt["stage"] == {"name": "init", "epochs_done": 1, "steps_done": 0}
    assert ckpt["init_optimizer"]["state"] and not ckpt["optimizer"]["state"]
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in records] == [("init", 1)]
    # another preliminary length cannot continue this run
    with pytest.raises(CheckpointError, match="preliminary stage of 2 epoch.*this run has 3"):
        make_trainer("ab", run_dir=tmp_path, resume=True, options={"init_epochs": 3}).fit()


@pytest.mark.parametrize("method,crash_epoch,crash_step", [
    ("ab", 2, None),          # between the two preliminary epochs
    ("ft", 2, 2),             # inside the second preliminary epoch (mid-epoch checkpoint)
    ("fsp", 3, None),         # right after the stage, before the first main epoch
])
def test_resume_inside_or_after_the_stage_is_exact(tmp_path, method, crash_epoch, crash_step):
    settings = {"checkpoint_every": 1}
    full = make_trainer(method, run_dir=tmp_path / "a", settings=settings)
    full.fit()
    cut = make_trainer(method, run_dir=tmp_path / "b", settings=settings)
    if crash_step is None:
        original = cut._train_epoch
        cut._train_epoch = (lambda e: (_ for _ in ()).throw(KeyboardInterrupt)
                            if e == crash_epoch else original(e))
    else:
        forward = cut.objective.forward
        calls = {"n": 0}

        def crashing_forward(*args):
            calls["n"] += 1
            if calls["n"] == (crash_epoch - 1) * 3 + crash_step:
                raise KeyboardInterrupt
            return forward(*args)
        cut.objective.forward = crashing_forward
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    torch.manual_seed(12345)                    # the checkpoint must restore the RNG
    resumed = make_trainer(method, run_dir=tmp_path / "b", resume=True, settings=settings)
    resumed.fit()
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    for k, v in full.objective.state_dict().items():
        assert torch.equal(v, resumed.objective.state_dict()[k]), k
    drop = lambda r: {k: v for k, v in r.items() if k != "epoch_time"}
    a = [drop(json.loads(l)) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [drop(json.loads(l)) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert a == b and [r["stage"] for r in a] == ["init", "init", "main", "main"]
