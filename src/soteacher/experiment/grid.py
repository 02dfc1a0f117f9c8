"""The experiment grid: teacher methods (and their swept variants) x distillers x seeds x pairs.

This module *plans*: it expands the ``experiment:`` section into named variants, checks the whole
grid before anything trains, and lists its runs (:func:`plan_grid`), each with its directory
(see :mod:`.layout`), config and the teacher it depends on. Executing one run is :mod:`.runs`;
putting the runs on a backend (one after another here, or Ray tasks) is :mod:`.schedule`; the
results table and summary are :mod:`.report`.

Each teacher is trained once per (pair, seed) and reused for every distiller of the grid.

The teacher entry ``oracle`` trains nothing: it is the exact p*(y|x) of data whose truth is known
(``known_truth``, ``known_truth_net``; :func:`soteacher.data.oracle_teacher`), the best teacher
there can be. Its run directory holds its metrics like any teacher's, and its students distil
from p*. It takes no options, and only logit distillers (those that read nothing but the
teacher's logits: ``kd``, ``dkd``, ``dist``) can distil from it. During distillation it sees the
student's augmented batch, so p* must not change under the data's augmentation (the random
circular shift of both known-truth families leaves it unchanged; this is checked on a batch).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import (Config, ConfigError, DistillSpec, ExperimentConfig, ExperimentSpec,
                      ModelSpec, validate)
from .layout import RUN_FORMAT, slug

__all__ = ["BACKENDS", "ORACLE", "Pair", "Run", "RunEntry", "Variant", "distiller_entries",
           "format_value", "logit_distillers", "model_pairs", "plan_grid", "run_resources", "slug",
           "teacher_variants", "validate_experiment"]

#: The ways to execute a grid (``experiment.backend``, ``--backend``).
BACKENDS = ("local", "ray")
#: The teacher entry that is p*(y|x) itself (data with known truth only); it trains nothing.
ORACLE = "oracle"
RESOURCE_KEYS = ("cpus", "gpus")


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
        if method == ORACLE:
            if options:
                raise ConfigError(f"experiment.teachers[{i}]: the oracle teacher takes no options "
                                  f"(it is p*(y|x) itself); got {options!r}")
            if sweep and name in spec.sweep_teachers:
                raise ConfigError(f"experiment.sweep_teachers names {name!r}, the oracle "
                                  f"teacher, which has no options to sweep; leave it out")
            out.append(Variant(name, method, {}))
            continue
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
    run_resources(spec, base.device)
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
                validate(c, ("student",) if v.method == ORACLE else ("teacher", "student"))
            except ConfigError as e:
                raise ConfigError(f"teacher {v.name!r}, pair {pair.name!r}: {e}") from None
        if v.method == ORACLE:
            continue
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
    oracles = [v.name for v in variants if v.method == ORACLE]
    if oracles:
        _check_oracle(base, oracles[0], distillers)
    return variants, distillers, pairs


def logit_distillers() -> list[str]:
    """The distillers that read only the teacher's logits, so that they can distil from the
    oracle: every registered one that is not a feature distiller (``kd``, ``dkd``, ``dist``)."""
    from ..distillers import DISTILLERS, FeatureDistiller
    return [n for n in DISTILLERS.names()
            if not (isinstance(DISTILLERS.get(n), type)
                    and issubclass(DISTILLERS.get(n), FeatureDistiller))]


def _check_oracle(base: Config, name: str, distillers: list[RunEntry]) -> None:
    """The oracle teacher ``name`` needs data with known p*, a p* that the data's augmentation
    leaves unchanged (it sees the augmented batches), and distillers of logits only."""
    import torch
    from .datasets import raw_data
    allowed = logit_distillers()
    for d in distillers:
        if d.method not in allowed:
            raise ConfigError(f"distiller {d.name!r} (method {d.method!r}) reads the teacher's "
                              f"intermediate features, and the oracle teacher {name!r} has none "
                              f"(it is p*(y|x) itself); with the oracle use a logit distiller: "
                              f"{', '.join(allowed)}")
    data = raw_data(base.data)          # built once per process; the grid reuses it
    if data.truth is None:
        raise ConfigError(f"the oracle teacher needs data whose p* is known, e.g. "
                          f"data.name=known_truth; {base.data.name!r} has none (leave "
                          f"{name!r} out of experiment.teachers)")
    if data.preprocess is not None:
        raise ConfigError(f"the oracle teacher {name!r} reads raw inputs, and {base.data.name!r} "
                          f"preprocesses its batches before the models see them; leave "
                          f"{name!r} out of experiment.teachers")
    if base.data.augment and data.augment is not None and len(data.train) > 0:
        x = torch.stack([data.train[i][0] for i in range(min(64, len(data.train)))])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            xa = data.augment(x)
        if xa.shape != x.shape or not torch.allclose(data.truth.log_prob(xa),
                                                     data.truth.log_prob(x), atol=1e-4):
            raise ConfigError(f"the oracle teacher {name!r} sees the students' augmented inputs, "
                              f"and the augmentation of {base.data.name!r} changes p*(y|x); set "
                              f"data.augment=false for a grid with the oracle")


def run_resources(spec: ExperimentSpec, device: str = "cpu") -> dict[str, float]:
    """Check how the grid is to be executed (``backend``, ``address``, ``resources``,
    ``retries``) and return what one run asks for, ``{"cpus": c, "gpus": g}``."""
    if spec.backend not in BACKENDS:
        raise ConfigError(f"unknown experiment.backend {spec.backend!r}; available: "
                          f"{', '.join(BACKENDS)}")
    if spec.address is not None and not isinstance(spec.address, str):
        raise ConfigError(f"experiment.address must be a Ray address such as 'HOST:6379', got "
                          f"{spec.address!r}")
    if spec.address and spec.backend != "ray":
        raise ConfigError(f"experiment.address ({spec.address!r}) is a Ray cluster's address; "
                          f"add --backend ray (experiment.backend=ray), or leave the address out")
    if isinstance(spec.retries, bool) or not isinstance(spec.retries, int) or spec.retries < 0:
        raise ConfigError(f"experiment.retries must be a whole number >= 0, got {spec.retries!r}")
    unknown = sorted(set(spec.resources) - set(RESOURCE_KEYS))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in experiment.resources; valid keys: "
                          f"{', '.join(RESOURCE_KEYS)}")
    res = {"cpus": 1.0, "gpus": 0.0}
    for k, v in spec.resources.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"experiment.resources.{k} must be a number >= 0, got {v!r}")
        res[k] = float(v)
    for k in ("cpus", "gpus"):      # Ray takes fractions below one, whole numbers above
        if res[k] > 1 and res[k] != int(res[k]):
            raise ConfigError(f"experiment.resources.{k} = {res[k]:g}: Ray accepts a fraction "
                              f"below 1 or a whole number; use {math.ceil(res[k])} or a "
                              f"fraction")
    if spec.backend == "ray":
        if device.startswith("cuda") and res["gpus"] == 0:
            raise ConfigError(f"device {device!r} with experiment.backend=ray: give every run a "
                              f"GPU share, e.g. --set experiment.resources.gpus=1 (or 0.25 for "
                              f"four runs per GPU); Ray assigns GPUs only to runs that ask for "
                              f"a share, the others would all use their node's first GPU")
        if device.startswith("cuda:"):
            raise ConfigError(f"device {device!r} with experiment.backend=ray: Ray assigns each "
                              f"run its GPU; set device=cuda")
    return res


# ---- the runs ----------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Run:
    """One run of the grid: a teacher, or a student of one teacher (``teacher_dir``)."""
    kind: str                          # "teacher" or "student"
    run_dir: Path
    config: Config
    meta: dict[str, Any]               # what its summary.json records besides the metrics
    label: str                         # for people: "cnn1d-mlp seed 0: student of standard by kd"
    teacher_dir: Path | None = None


def plan_grid(cfg: ExperimentConfig, out: str | Path) -> tuple[Path, list[Run]]:
    """Check the grid and list its runs: the experiment's directory ``OUT/<data>`` and the runs
    in the order the local backend trains them (seed, pair, teacher variant; each teacher
    followed by its students)."""
    variants, distillers, pairs = validate_experiment(cfg)
    spec, base = cfg.experiment, cfg.base()
    out = Path(out)
    root = out / slug(data_label(cfg))
    runs: list[Run] = []
    for seed in spec.seeds:
        for pair in pairs:
            seed_dir = root / slug(pair.name) / f"seed{seed}"
            for v in variants:
                tcfg = teacher_config(base, seed, pair, v)
                tdir = seed_dir / "teachers" / slug(v.name)
                meta = {"format": RUN_FORMAT, "kind": "teacher", "dataset": data_label(cfg),
                        "pair": pair.name, "teacher": v.name, "teacher_method": v.method,
                        "teacher_options": v.options, "seed": seed,
                        "teacher_dir": tdir.relative_to(out).as_posix()}
                runs.append(Run("teacher", tdir, tcfg, meta,
                                f"{pair.name} seed {seed}: teacher {v.name}"))
                for d in distillers:
                    sdir = seed_dir / "students" / slug(v.name) / slug(d.name)
                    runs.append(Run(
                        "student", sdir, student_config(tcfg, d),
                        {**meta, "kind": "student", "distiller": d.name,
                         "distiller_method": d.method, "distiller_options": d.options,
                         "student_dir": sdir.relative_to(out).as_posix()},
                        f"{pair.name} seed {seed}: student of {v.name} by {d.name}", tdir))
    return root, runs
