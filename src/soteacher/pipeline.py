"""Config-driven runs: train a teacher, distil a student, evaluate, and the end-to-end demo.

These functions turn a ``Config`` into plain constructor arguments for the library's parts; the
command line is a thin layer over them.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .config import (Config, ConfigError, ModelSpec, config_to_dict, first_difference, parse_yaml,
                     validate)
from .data import DataBundle, build_dataset, oracle_teacher
from .distillers import build_distiller
from .engine.distributed import is_main
from .engine.evaluate import evaluate, predict, resolve_device
from .engine.io import (CheckpointError, atomic_write_json, atomic_write_text, safe_torch_load,
                        state_dict_mismatch)
from .engine.trainer import (CHECKPOINT, METRICS, WEIGHTS, WEIGHTS_FORMAT, Trainer,
                             expected_input)
from .metrics import agreement
from .models import create_model
from .teachers import build_teacher_objective, teacher_params, wrap_for_spec

RUN_FILES = ("config.yaml", CHECKPOINT, WEIGHTS, METRICS, "summary.json", "results.json")


# ---- run directories and weights ---------------------------------------------------------------
def prepare_run_dir(path: str | Path, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Make ``path`` ready for a run; refuse to mix two runs in one directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output path {str(path)!r} exists and is not a directory")
    existing = [f for f in RUN_FILES if (path / f).exists()] if path.is_dir() else []
    if existing and not resume:
        if not overwrite:
            raise ConfigError(f"{str(path)!r} already holds a run ({', '.join(existing)}); "
                              f"pass --resume to continue it, --overwrite to replace it, or "
                              f"choose another --out")
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to output directory {str(path)!r}: {e.strerror}; "
                          f"choose another --out") from None
    return path


def load_model(path: str | Path, map_location: Any = "cpu") -> nn.Module:
    """Rebuild a model saved by soteacher from ``model.pt`` (or a run directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"no model weights at {path}; pass a run directory of "
                              f"'soteacher train-teacher' or its {WEIGHTS}")
    blob = safe_torch_load(path, map_location=map_location)
    if not isinstance(blob, dict) or blob.get("format") != WEIGHTS_FORMAT:
        raise CheckpointError(f"{path} is not a soteacher model file (expected format "
                              f"{WEIGHTS_FORMAT!r})")
    spec = blob.get("spec")
    if not spec:
        raise CheckpointError(f"{path} holds weights of a custom model without a registry name; "
                              f"build the model yourself and call model.load_state_dict(...)")
    model = create_model(spec["name"], num_classes=spec["num_classes"],
                         input_shape=tuple(spec["input_shape"]), **spec.get("options", {}))
    problem = state_dict_mismatch(model.state_dict(), blob["state_dict"])
    if problem:
        raise CheckpointError(f"weights in {path} do not fit model {spec['name']!r} "
                              f"({spec['num_classes']} classes): {problem}")
    model.load_state_dict(blob["state_dict"])
    return wrap_for_spec(model, spec)      # e.g. a fitted temperature


def model_spec(spec: ModelSpec, data: DataBundle) -> dict[str, Any]:
    return {"name": spec.name, "options": dict(spec.options), "num_classes": data.num_classes,
            "input_shape": list(data.input_shape)}


def build_model(spec: ModelSpec, data: DataBundle) -> nn.Module:
    return create_model(spec.name, num_classes=data.num_classes,
                        input_shape=tuple(data.input_shape), **spec.options)


def build_data(cfg: Config) -> DataBundle:
    """The configured dataset; with ``data.val_fraction > 0`` a validation split (seeded by
    ``cfg.seed``) is taken out of the training set and kept as the bundle's ``val``."""
    return split_validation(build_dataset(cfg.data.name, **cfg.data.options),
                            cfg.data.val_fraction, cfg.seed)


@dataclasses.dataclass
class SplitDataBundle(DataBundle):
    """A ``DataBundle`` whose training set had a validation split ``val`` taken out of it."""

    val: Any = None


class _Subset(torch.utils.data.Dataset):
    """Items ``indices[i]`` of ``dataset``, re-indexed 0..n-1 (per-sample state stays dense)."""

    def __init__(self, dataset: Any, indices: torch.Tensor) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        x, y, _ = self.dataset[int(self.indices[int(i)])]
        return x, y, int(i)


def _subset(dataset: Any, idx: torch.Tensor) -> Any:
    if hasattr(dataset, "x") and hasattr(dataset, "y"):
        try:
            return type(dataset)(dataset.x[idx], dataset.y[idx])     # keeps the in-memory path
        except TypeError:
            pass
    return _Subset(dataset, idx)


def split_validation(data: DataBundle, fraction: float, seed: int) -> DataBundle:
    """``data`` with ``round(fraction * N)`` random training samples moved to ``val`` (at least
    one when ``fraction > 0``); ``fraction == 0`` returns ``data`` unchanged."""
    if fraction == 0:
        return data
    if not 0 < fraction < 1:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {fraction}")
    n = len(data.train)
    n_val = max(1, round(fraction * n))
    if n_val >= n:
        raise ConfigError(f"data.val_fraction={fraction} leaves no training samples out of {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(10_007 * seed + 17))
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    fields = {f.name: getattr(data, f.name) for f in dataclasses.fields(DataBundle)}
    fields["train"] = _subset(data.train, train_idx)
    return SplitDataBundle(**fields, val=_subset(data.train, val_idx))


def save_config(cfg: Config, run_dir: Path) -> None:
    atomic_write_text(run_dir / "config.yaml",
                      yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


# ---- phases ------------------------------------------------------------------------------------
def run_teacher(cfg: Config, data: DataBundle, run_dir: Path | None, *, method: str | None = None,
                options: dict[str, Any] | None = None, resume: bool = False,
                progress: bool = True) -> nn.Module:
    """Train the configured teacher (optionally with another method) and return it."""
    method = method or cfg.teacher.method
    options = cfg.teacher.options if options is None else options
    if "student_model" in teacher_params(method) and "student_model" not in options:
        # methods built around the student (sftn) default to the configured one
        options = {**options, "student_model": cfg.student.model.name,
                   "student_options": dict(cfg.student.model.options)}
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.teacher.model, data)
    objective = build_teacher_objective(method, options, num_samples=len(data.train),
                                        num_classes=data.num_classes,
                                        num_epochs=cfg.teacher.train.epochs,
                                        input_shape=data.input_shape,
                                        val_set=getattr(data, "val", None), model=model)
    trainer = _train(cfg, data, model, objective, cfg.teacher.train, run_dir, resume, progress,
                     f"teacher[{method}]", model_spec(cfg.teacher.model, data),
                     callbacks=getattr(objective, "callbacks", ()))
    return wrap_for_spec(model, trainer.model_spec)     # e.g. a fitted temperature


def run_student(cfg: Config, data: DataBundle, teacher: nn.Module | None, run_dir: Path | None,
                *, resume: bool = False, progress: bool = True, name: str = "student") -> nn.Module:
    """Distil ``teacher`` into the configured student; without a teacher, plain cross-entropy."""
    torch.manual_seed(cfg.seed)
    student = build_model(cfg.student.model, data)
    if teacher is None:
        objective = build_teacher_objective("standard", {}, num_samples=len(data.train),
                                            num_classes=data.num_classes,
                                            num_epochs=cfg.student.train.epochs)
    else:
        objective = build_distiller(cfg.distill.method, teacher, cfg.distill.options,
                                    student=student, num_samples=len(data.train),
                                    num_classes=data.num_classes,
                                    input_shape=tuple(data.input_shape), train_set=data.train)
    _train(cfg, data, student, objective, cfg.student.train, run_dir, resume, progress, name,
           model_spec(cfg.student.model, data))
    return student


def _train(cfg, data, model, objective, settings, run_dir, resume, progress, name, spec,
           callbacks=()) -> Trainer:
    device = resolve_device(cfg.device)
    if run_dir is not None and is_main():       # under torchrun, rank 0 writes the files
        save_config(cfg, run_dir)
    pre = data.preprocess
    test_eval = (lambda m: evaluate(m, data.test, device=device, prefix=f"{data.test_name}_",
                                         preprocess=pre))
    trainer = Trainer(model, objective, data.train, settings,
                      augment=data.augment if cfg.data.augment else None, device=device,
                      seed=cfg.seed, run_dir=run_dir, resume=resume, evaluate=test_eval,
                      name=name, progress=progress, num_workers=cfg.data.num_workers,
                      model_spec=spec, num_classes=data.num_classes,
                      config=config_to_dict(cfg), preprocess=pre, callbacks=callbacks,
                      tensorboard=cfg.logging.tensorboard and run_dir is not None)
    trainer.fit()
    return trainer


def check_teacher_fits(teacher: nn.Module, data: DataBundle) -> None:
    x = data.train[0][0][None]
    device = next((p.device for p in teacher.parameters()), torch.device("cpu"))
    teacher.eval()
    try:
        with torch.no_grad():
            x = x.to(device)
            if data.preprocess is not None:
                x = data.preprocess.to(device)(x)
            out = teacher(x)
    except RuntimeError as e:
        expects = expected_input(teacher)
        raise ConfigError(f"the teacher cannot read this dataset's inputs of shape "
                          f"{tuple(data.input_shape)}" + (f"; it expects {expects}" if expects
                                                          else "")
                          + f": {str(e).splitlines()[0]}") from None
    if out.shape[-1] != data.num_classes:
        raise ConfigError(f"the teacher predicts {out.shape[-1]} classes but dataset "
                          f"{data.name!r} has {data.num_classes}")


# ---- reports -----------------------------------------------------------------------------------
def model_report(model: nn.Module, data: DataBundle, device: Any = None,
                 teacher: nn.Module | None = None) -> dict[str, float]:
    """Train and test metrics of ``model``; with known truth also its distance to p*; with a
    ``teacher``, the test-set agreement between the two."""
    device = resolve_device(device)
    out: dict[str, float] = {}
    pre = data.preprocess
    for split, ds in (("train", data.train), ("test", data.test)):
        out.update(evaluate(model, ds, truth=data.truth, device=device, prefix=f"{split}_",
                            preprocess=pre))
    if teacher is not None:
        a = predict(model, data.test, device, preprocess=pre)["logits"]
        b = predict(teacher, data.test, device, preprocess=pre)["logits"]
        out["test_agreement"] = agreement(a, b)
    return out


DEMO_TEACHERS = ("standard", "soteacher")


def _check_demo_resume(cfg: Config, out: Path) -> None:
    """Refuse ``--resume`` where there is no demo, or a demo of another config."""
    stored = out / "config.yaml"
    if not stored.is_file():
        raise ConfigError(f"nothing to resume: no demo in {str(out)!r}; run the demo without "
                          f"--resume")
    have = parse_yaml(stored.read_text())
    want = parse_yaml(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    if have != want:
        raise ConfigError(f"the demo in {str(out)!r} was run with another config "
                          f"({first_difference(have, want)}); resume it with the options it was "
                          f"started with (e.g. --quick), or pass --overwrite to start again")




def run_demo(cfg: Config, out: Path, seeds: int = 1, progress: bool = True,
             log=print, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    """Standard vs SoTeacher teacher on known-truth data, a KD student from each (and from the
    oracle p*), and a student without a teacher; ``seeds`` repetitions, mean and spread.
    Results go to ``out`` (prepared only once the inputs are known to be good).

    ``resume`` continues a demo interrupted in ``out`` with the same config: finished runs are
    read back from their checkpoints (not trained again), an interrupted one continues from its
    last checkpoint, and the results equal those of a demo that was never interrupted.
    ``wall_time_s`` counts this call only."""
    validate(cfg)
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one of them")
    data = build_data(cfg)
    if data.truth is None:
        raise ConfigError(f"the demo needs a dataset whose true label distribution is known; "
                          f"{cfg.data.name!r} has none (use data.name=known_truth or known_truth_net)")
    if resume:
        _check_demo_resume(cfg, Path(out))
    out = prepare_run_dir(out, overwrite=overwrite, resume=resume)
    save_config(cfg, out)
    t0 = time.perf_counter()
    per_seed: list[dict[str, dict[str, dict[str, float]]]] = []

    def phase(run_dir: Path, what: str) -> bool:
        """Whether the run in ``run_dir`` continues from a checkpoint; logs what happens."""
        again = resume and (run_dir / CHECKPOINT).is_file()
        done = again and (run_dir / WEIGHTS).is_file()
        log(f"{what}" + (" (finished before; read back)" if done else
                         " (continued from its checkpoint)" if again else ""))
        return again

    for i in range(seeds):
        seed_cfg = _with_seed(cfg, cfg.seed + i)
        root = out / f"seed{seed_cfg.seed}"
        teachers: dict[str, nn.Module] = {}
        run = {"teachers": {}, "students": {}}
        for method in DEMO_TEACHERS:
            run_dir = root / f"teacher_{method}"
            again = phase(run_dir, f"[seed {seed_cfg.seed}] training the {method} teacher")
            options = seed_cfg.teacher.options if method == "soteacher" else {}
            teachers[method] = run_teacher(seed_cfg, data, run_dir, method=method,
                                           options=options, progress=progress, resume=again)
        teachers["oracle"] = oracle_teacher(data.truth)
        for name, teacher in teachers.items():
            run["teachers"][name] = model_report(teacher, data, seed_cfg.device)
        for name in (*teachers, "none"):
            run_dir = root / f"student_{name}"
            again = phase(run_dir, f"[seed {seed_cfg.seed}] training the student " +
                          ("without a teacher" if name == "none" else f"of the {name} teacher"))
            teacher = teachers.get(name)
            student = run_student(seed_cfg, data, teacher, run_dir, progress=progress,
                                  name=f"student[{name}]", resume=again)
            run["students"][name] = model_report(student, data, seed_cfg.device, teacher)
        per_seed.append(run)
    results = summarise(per_seed)
    results["bayes_accuracy"] = {"train": data.truth.bayes_accuracy(data.train.x),
                                 "test": data.truth.bayes_accuracy(data.test.x)}
    results["seeds"] = [cfg.seed + i for i in range(seeds)]
    results["wall_time_s"] = time.perf_counter() - t0
    atomic_write_json(out / "results.json", results)
    return results


def _with_seed(cfg: Config, seed: int) -> Config:
    return dataclasses.replace(cfg, seed=seed)


def summarise(per_seed: list[dict[str, dict[str, dict[str, float]]]]) -> dict[str, Any]:
    """Mean over seeds of every metric, with ``<key>_std`` (sample standard deviation) when
    there is more than one seed, and the per-seed values under ``per_seed``."""
    out: dict[str, Any] = {}
    for group in ("teachers", "students"):
        out[group] = {}
        for name in per_seed[0][group]:
            runs = [r[group][name] for r in per_seed]
            m: dict[str, Any] = {}
            for key in runs[0]:
                vals = [r[key] for r in runs]
                m[key] = statistics.fmean(vals)
                if len(vals) > 1:
                    m[f"{key}_std"] = statistics.stdev(vals)
            if len(runs) > 1:
                m["per_seed"] = runs
            out[group][name] = m
    return out


def format_results(results: dict[str, Any]) -> str:
    """The demo's results as two plain-text tables."""
    def cell(m: dict, key: str, pct: bool) -> str:
        if key not in m:
            return "-"
        scale = 100.0 if pct else 1.0
        s = f"{m[key] * scale:.2f}" if pct else f"{m[key]:.3f}"
        if f"{key}_std" in m:
            s += f"±{m[key + '_std'] * scale:.2f}" if pct else f"±{m[key + '_std']:.3f}"
        return s

    def table(title: str, group: dict, cols: list[tuple[str, str, bool]]) -> str:
        header = [title] + [c[0] for c in cols]
        rows = [[name] + [cell(m, key, pct) for _, key, pct in cols] for name, m in group.items()]
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        fmt = lambda r: "  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                                  for i, (v, w) in enumerate(zip(r, widths)))
        return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])

    teacher_cols = [("test acc %", "test_acc", True), ("test ECE", "test_ece", False),
                    ("train acc %", "train_acc", True), ("train TV(p*)", "train_tv_true", False),
                    ("train KL(p*)", "train_kl_true", False), ("test TV(p*)", "test_tv_true", False)]
    student_cols = [("test acc %", "test_acc", True), ("test NLL", "test_nll", False),
                    ("test ECE", "test_ece", False), ("agree %", "test_agreement", True),
                    ("test TV(p*)", "test_tv_true", False)]
    lines = [table("teacher", results["teachers"], teacher_cols), "",
             table("student of", results["students"], student_cols)]
    if "bayes_accuracy" in results:
        b = results["bayes_accuracy"]
        lines += ["", f"Bayes accuracy (expected): train {100 * b['train']:.2f}%, "
                      f"test {100 * b['test']:.2f}%"]
    return "\n".join(lines)
