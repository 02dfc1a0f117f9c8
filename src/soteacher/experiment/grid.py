"""The experiment grid: teacher methods (and their swept variants) x distillers x seeds x pairs.

Layout of an experiment directory ``OUT``::

    OUT/<data>/experiment.yaml                                   the resolved experiment config
    OUT/<data>/<pair>/seed<s>/teachers/<variant>/                 one teacher run
    OUT/<data>/<pair>/seed<s>/students/<variant>/<distiller>/     one student of that teacher

``<data>`` is ``experiment.name`` (default: ``data.name``); directory names are the variant and
distiller names with characters other than letters, digits and ``._=+-`` replaced by ``_``.
Every run directory is a normal run (``config.yaml``, ``metrics.jsonl``, ``checkpoint.pt``,
``model.pt``) plus ``summary.json``, written last: a run with one is finished and is skipped when
the experiment is started again; a run without one resumes from its checkpoint. A run whose
``config.yaml`` differs from the one the grid asks for is an error (delete it or choose another
``--out``), never silently reused. Each teacher is trained once per (pair, seed) and reused for
every distiller; a student's ``summary.json`` names its teacher's directory.

Under torchrun (``torchrun --nproc_per_node N -m soteacher experiment ...``) every process walks
the same grid in the same order and each run is trained distributed by the trainer. Rank 0
alone reads the run directories to decide what to do (new, resume, skip), creates directories
and writes every file; its decisions and the teacher run ids are broadcast, so all processes take
the same branches, and an error it raises is raised on every process
(:func:`~soteacher.engine.distributed.run_on_main`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from ..config import (Config, ConfigError, DistillSpec, ExperimentConfig, ExperimentSpec,
                      ModelSpec, config_to_dict, parse_yaml, validate)
from ..engine.distributed import is_main, run_on_main
from ..engine.io import atomic_write_json, atomic_write_text
from ..engine.trainer import CHECKPOINT
from .report import RUN_FORMAT

__all__ = ["Pair", "RunEntry", "Variant", "distiller_entries", "format_value", "model_pairs",
           "run_experiment", "slug", "teacher_variants", "validate_experiment"]


@dataclass(frozen=True)
class Variant:
    """One teacher-training method with fixed options, under a display name."""
    name: str
    method: str
    options: dict[str, Any]


@dataclass(frozen=True)
class RunEntry:
    """One distiller with fixed options, under a display name."""
    name: str
    method: str
    options: dict[str, Any]


@dataclass(frozen=True)
class Pair:
    name: str
    teacher: ModelSpec
    student: ModelSpec


# ---- names -------------------------------------------------------------------------------------
def format_value(v: Any) -> str:
    """A compact, stable text for an option value in a variant name (``2e-06`` -> ``2e-6``)."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        s = f"{v:g}"
        return re.sub(r"e([+-])0*(\d)", lambda m: "e" + ("-" if m.group(1) == "-" else "")
                      + m.group(2), s)
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def slug(name: str) -> str:
    """A directory name for ``name``."""
    s = re.sub(r"[^A-Za-z0-9._=+-]+", "_", name).strip("_")
    if not s or s in (".", ".."):
        raise ConfigError(f"{name!r} does not make a usable directory name; choose another name")
    return s


def _entry(item: Any, key: str, kind: str,
           defaults: dict[str, dict[str, Any]] | None = None) -> tuple[str, str, dict[str, Any]]:
    if isinstance(item, str):
        # a bare name takes the options the run config gives that method, if any
        return item, item, dict((defaults or {}).get(item, {}))
    if not isinstance(item, dict):
        raise ConfigError(f"{key} must be a {kind} name or a mapping {{method, options, name}}, "
                          f"got {item!r}")
    unknown = sorted(set(item) - {"method", "options", "name"})
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {key}; valid keys: method, options, "
                          f"name")
    if not isinstance(item.get("method"), str):
        raise ConfigError(f"{key} needs a 'method' (a {kind} name), got {item!r}")
    options = item.get("options") or {}
    if not isinstance(options, dict):
        raise ConfigError(f"{key}.options must be a mapping, got {options!r}")
    name = item.get("name") or item["method"]
    if not isinstance(name, str):
        raise ConfigError(f"{key}.name must be a string, got {name!r}")
    return name, item["method"], dict(options)


def _unique(names: list[str], what: str) -> None:
    seen: dict[str, str] = {}
    for n in names:
        s = slug(n)
        if s in seen:
            same = "twice" if seen[s] == n else f"and {seen[s]!r} (same directory name)"
            raise ConfigError(f"{what} {n!r} appears {same}; give the entries distinct names "
                              f"with 'name:'")
        seen[s] = n


def teacher_variants(spec: ExperimentSpec,
                     defaults: dict[str, dict[str, Any]] | None = None) -> list[Variant]:
    """The teacher entries; those named in ``sweep_teachers`` expanded over the sweep grid.

    ``defaults`` (method -> options) are the options of entries given by bare name, e.g. the
    run config's ``{teacher.method: teacher.options}``."""
    from ..teachers import TEACHER_CONTEXT, teacher_params
    sweep = spec.sweep or {}
    for k, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"experiment.sweep.{k} must be a non-empty list of values, got "
                              f"{values!r}")
    out: list[Variant] = []
    swept = 0
    for i, item in enumerate(spec.teachers):
        name, method, options = _entry(item, f"experiment.teachers[{i}]", "teacher method",
                                       defaults)
        try:
            params = [p for p in teacher_params(method) if p not in TEACHER_CONTEXT]
        except KeyError as e:
            raise ConfigError(f"experiment.teachers[{i}]: {e.args[0]}") from None
        if not sweep or name not in spec.sweep_teachers:
            out.append(Variant(name, method, options))
            continue
        missing = [k for k in sweep if k not in params]
        if missing:
            raise ConfigError(f"experiment.sweep.{missing[0]}: teacher {name!r} (method "
                              f"{method!r}) has no option {missing[0]!r}; valid options: "
                              f"{', '.join(params)}")
        swept += 1
        keys = list(sweep)
        for combo in itertools.product(*(sweep[k] for k in keys)):
            opts = {**options, **dict(zip(keys, combo))}
            label = ",".join(f"{k}={format_value(v)}" for k, v in zip(keys, combo))
            out.append(Variant(f"{name}[{label}]", method, opts))
    if sweep and not swept:
        raise ConfigError(f"experiment.sweep is set but experiment.sweep_teachers "
                          f"({spec.sweep_teachers}) names no teacher entry of the grid")
    if not out:
        raise ConfigError("experiment.teachers is empty; list at least one teacher method")
    _unique([v.name for v in out], "teacher variant")
    return out


def distiller_entries(spec: ExperimentSpec,
                      defaults: dict[str, dict[str, Any]] | None = None) -> list[RunEntry]:
    """The distiller entries (``defaults`` as for :func:`teacher_variants`)."""
    out = [RunEntry(*_entry(item, f"experiment.distillers[{i}]", "distiller", defaults))
           for i, item in enumerate(spec.distillers)]
    _unique([d.name for d in out], "distiller")
    return out


def _model_spec(value: Any, key: str) -> ModelSpec:
    if isinstance(value, str):
        return ModelSpec(value, {})
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise ConfigError(f"{key} must be a model name or a mapping {{name, options}}, got "
                          f"{value!r}")
    unknown = sorted(set(value) - {"name", "options"})
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {key}; valid keys: name, options")
    options = value.get("options") or {}
    if not isinstance(options, dict):
        raise ConfigError(f"{key}.options must be a mapping, got {options!r}")
    return ModelSpec(value["name"], dict(options))


def model_pairs(cfg: Config, spec: ExperimentSpec) -> list[Pair]:
    """The teacher/student model pairs (default: the config's teacher and student models)."""
    if not spec.pairs:
        t, s = cfg.teacher.model, cfg.student.model
        return [Pair(f"{t.name}-{s.name}", t, s)]
    out = []
    for i, item in enumerate(spec.pairs):
        key = f"experiment.pairs[{i}]"
        if not isinstance(item, dict) or "teacher" not in item or "student" not in item:
            raise ConfigError(f"{key} must be a mapping {{teacher, student, name}}, got {item!r}")
        unknown = sorted(set(item) - {"teacher", "student", "name"})
        if unknown:
            raise ConfigError(f"unknown key {unknown[0]!r} in {key}; valid keys: teacher, "
                              f"student, name")
        t = _model_spec(item["teacher"], f"{key}.teacher")
        s = _model_spec(item["student"], f"{key}.student")
        out.append(Pair(str(item.get("name") or f"{t.name}-{s.name}"), t, s))
    _unique([p.name for p in out], "pair")
    return out


def data_label(cfg: ExperimentConfig) -> str:
    return cfg.experiment.name or cfg.data.name


# ---- per-run configs ---------------------------------------------------------------------------
def teacher_config(base: Config, seed: int, pair: Pair, variant: Variant) -> Config:
    return dataclasses.replace(
        base, seed=seed,
        teacher=dataclasses.replace(base.teacher, method=variant.method,
                                    options=dict(variant.options), model=pair.teacher),
        student=dataclasses.replace(base.student, model=pair.student))


def student_config(teacher_cfg: Config, distiller: RunEntry) -> Config:
    return dataclasses.replace(teacher_cfg,
                               distill=DistillSpec(distiller.method, dict(distiller.options)))


def validate_experiment(cfg: ExperimentConfig) -> tuple[list[Variant], list[RunEntry], list[Pair]]:
    """Check the whole grid before anything trains; return its variants, distillers, pairs."""
    from ..teachers import teacher_params
    spec = cfg.experiment
    base = cfg.base()
    validate(base)
    if not spec.seeds:
        raise ConfigError("experiment.seeds is empty; list at least one seed, e.g. [0, 1, 2]")
    if len(set(spec.seeds)) != len(spec.seeds):
        raise ConfigError(f"experiment.seeds lists a seed twice: {spec.seeds}")
    variants = teacher_variants(spec, {base.teacher.method: dict(base.teacher.options)})
    distillers = distiller_entries(spec, {base.distill.method: dict(base.distill.options)})
    pairs = model_pairs(base, spec)
    for v in variants:
        for pair in pairs:
            c = teacher_config(base, spec.seeds[0], pair, v)
            try:
                validate(c, ("teacher", "student"))
            except ConfigError as e:
                raise ConfigError(f"teacher {v.name!r}, pair {pair.name!r}: {e}") from None
        if "val_set" in teacher_params(v.method) and base.data.val_fraction == 0:
            raise ConfigError(f"teacher {v.name!r} (method {v.method!r}) needs a validation "
                              f"split of the training set; set data.val_fraction=0.1 (it then "
                              f"applies to every run of the grid, for a fair comparison)")
    for d in distillers:
        c = student_config(teacher_config(base, spec.seeds[0], pairs[0], variants[0]), d)
        try:
            validate(c, ("distill",))
        except ConfigError as e:
            raise ConfigError(f"distiller {d.name!r}: {e}") from None
    return variants, distillers, pairs


# ---- run directories ---------------------------------------------------------------------------
def _normalised(cfg: Config) -> Any:
    return parse_yaml(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
    return f"{prefix or '(top level)'}: {a!r} here, {b!r} asked for"


def _run_state(run_dir: Path, cfg: Config) -> str:
    """``"done"``, ``"resume"`` (checkpoint of the same config), or ``"new"``."""
    stored = run_dir / "config.yaml"
    if not stored.is_file():
        return "new"
    have = parse_yaml(stored.read_text())
    want = _normalised(cfg)
    if have != want:
        raise ConfigError(f"{run_dir} holds a run with a different config "
                          f"({_first_difference(have, want)}); delete that directory or choose "
                          f"another --out")
    if (run_dir / "summary.json").is_file():
        return "done"
    return "resume" if (run_dir / CHECKPOINT).is_file() else "new"


def _fresh(run_dir: Path) -> None:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)


def _teacher_run_of(student_dir: Path) -> str | None:
    """The teacher run id a finished student was distilled from (``None`` if unfinished)."""
    path = student_dir / "summary.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("teacher_run")


def _teacher_plan(run_dir: Path, cfg: Config) -> tuple[str, str | None]:
    """``(state, run id)`` of a teacher run: the id of a finished one, else ``None``."""
    state = _run_state(run_dir, cfg)
    if state != "done":
        return state, None
    return state, json.loads((run_dir / "summary.json").read_text()).get("teacher_run")


def _student_plan(run_dir: Path, cfg: Config, retrained: bool, run_id: str | None) -> str:
    """The state of a student run; ``"new"`` when it was distilled from an earlier instance of
    its teacher (it starts over)."""
    state = _run_state(run_dir, cfg)
    if state != "new" and (retrained or _teacher_run_of(run_dir) not in (None, run_id)):
        state = "new"
    return state


def _check_grid(cells: list[tuple[Path, Config]]) -> None:
    for run_dir, c in cells:
        _run_state(run_dir, c)


def _start(root: Path, cfg: ExperimentConfig) -> None:
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "experiment.yaml",
                      yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _finish_teacher(tdir: Path, teacher: torch.nn.Module, data: Any, device: Any,
                    meta: dict[str, Any]) -> str:
    """Evaluate a trained teacher, write its summary; return its new run id."""
    metrics, bins = teacher_report(teacher, data, device)
    run_id = uuid.uuid4().hex
    atomic_write_json(tdir / "reliability.json", bins)
    atomic_write_json(tdir / "summary.json", {**meta, "teacher_run": run_id, "metrics": metrics})
    return run_id


def _finish_student(sdir: Path, student: torch.nn.Module, teacher: torch.nn.Module, data: Any,
                    device: Any, summary: dict[str, Any]) -> None:
    from ..pipeline import model_report
    metrics = model_report(student, data, device, teacher)
    atomic_write_json(sdir / "summary.json", {**summary, "metrics": metrics})


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


# ---- reports of single runs --------------------------------------------------------------------
def teacher_report(model: torch.nn.Module, data: Any, device: Any) -> tuple[dict, dict]:
    """Metrics of a teacher on train, test (and validation) inputs, and its reliability-diagram
    bins on train and test inputs. One prediction pass per split."""
    from ..engine.evaluate import predict, resolve_device
    from ..metrics import classification_metrics, reliability, truth_metrics
    device = resolve_device(device)
    metrics: dict[str, float] = {}
    bins: dict[str, Any] = {}
    splits = [("train", data.train), ("test", data.test)]
    if getattr(data, "val", None) is not None:
        splits.append(("val", data.val))
    for split, ds in splits:
        pred = predict(model, ds, device, truth=data.truth, preprocess=data.preprocess)
        m = classification_metrics(pred["logits"], pred["y"])
        if data.truth is not None:
            m.update(truth_metrics(pred["logits"], pred["log_p_true"]))
        metrics.update({f"{split}_{k}": v for k, v in m.items()})
        if split != "val":
            bins[split] = reliability(pred["logits"], pred["y"])
    t = getattr(model, "temperature", None)
    if isinstance(t, torch.Tensor):
        metrics["temperature"] = float(t)
    return metrics, bins


# ---- the grid ----------------------------------------------------------------------------------
def run_experiment(cfg: ExperimentConfig, out: str | Path, *, progress: bool = False,
                   log: Callable[[str], None] = print) -> dict[str, int]:
    """Run every cell of the grid not already finished in ``out``; return counts of the runs
    ``trained`` and ``skipped``. Reports are made separately (:mod:`.report`)."""
    from ..data import build_dataset
    from ..engine.evaluate import resolve_device
    from ..pipeline import load_model, run_student, run_teacher, split_validation

    variants, distillers, pairs = validate_experiment(cfg)
    spec, base = cfg.experiment, cfg.base()
    out = Path(out)
    root = out / slug(data_label(cfg))
    cells: list[tuple[Path, Config]] = []
    for seed in spec.seeds:           # a run made with another config: an error before any work
        for pair in pairs:
            seed_dir = root / slug(pair.name) / f"seed{seed}"
            for v in variants:
                tcfg = teacher_config(base, seed, pair, v)
                cells.append((seed_dir / "teachers" / slug(v.name), tcfg))
                for d in distillers:
                    cells.append((seed_dir / "students" / slug(v.name) / slug(d.name),
                                  student_config(tcfg, d)))
    run_on_main(_check_grid, cells)     # under torchrun: rank 0 reads, every process learns
    raw = build_dataset(base.data.name, **base.data.options)    # data errors before any file
    run_on_main(_start, root, cfg)
    device = resolve_device(base.device)
    counts = {"trained": 0, "skipped": 0}
    total = len(spec.seeds) * len(pairs) * len(variants) * (1 + len(distillers))
    done = 0
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        if is_main():               # under torchrun, rank 0 speaks
            log(f"[{done}/{total} {time.perf_counter() - t0:5.0f}s] {msg}")

    for seed in spec.seeds:
        data = split_validation(raw, base.data.val_fraction, seed)
        for pair in pairs:
            seed_dir = root / slug(pair.name) / f"seed{seed}"
            for v in variants:
                tcfg = teacher_config(base, seed, pair, v)
                tdir = seed_dir / "teachers" / slug(v.name)
                meta = {"format": RUN_FORMAT, "kind": "teacher", "dataset": data_label(cfg),
                        "pair": pair.name, "teacher": v.name, "teacher_method": v.method,
                        "teacher_options": v.options, "seed": seed, "teacher_dir": _rel(tdir, out)}
                teacher = None
                # decisions from files: taken on rank 0, the same on every process
                state, run_id = run_on_main(_teacher_plan, tdir, tcfg)
                retrained = state != "done"
                if not retrained:
                    counts["skipped"] += 1
                    say(f"{pair.name} seed {seed}: teacher {v.name} already finished")
                else:
                    say(f"{pair.name} seed {seed}: training teacher {v.name}")
                    if state == "new":
                        run_on_main(_fresh, tdir)
                    teacher = run_teacher(tcfg, data, tdir, method=v.method, options=v.options,
                                          resume=state == "resume", progress=progress)
                    run_id = run_on_main(_finish_teacher, tdir, teacher, data, device, meta)
                    counts["trained"] += 1
                done += 1
                for d in distillers:
                    scfg = student_config(tcfg, d)
                    sdir = seed_dir / "students" / slug(v.name) / slug(d.name)
                    # distilled from an earlier instance of this teacher: start over ("new")
                    state = run_on_main(_student_plan, sdir, scfg, retrained, run_id)
                    if state == "done":
                        counts["skipped"] += 1
                        done += 1
                        continue
                    say(f"{pair.name} seed {seed}: student of {v.name} by {d.name}")
                    if teacher is None:
                        teacher = load_model(tdir).to(device)
                    if state == "new":
                        run_on_main(_fresh, sdir)
                    student = run_student(scfg, data, teacher, sdir, resume=state == "resume",
                                          progress=progress, name=f"student[{d.name}]")
                    run_on_main(_finish_student, sdir, student, teacher, data, device, {
                        **meta, "kind": "student", "distiller": d.name,
                        "distiller_method": d.method, "distiller_options": d.options,
                        "teacher_run": run_id, "student_dir": _rel(sdir, out)})
                    counts["trained"] += 1
                    done += 1
                del teacher
    say(f"grid finished: {counts['trained']} runs trained, {counts['skipped']} already done")
    return counts
