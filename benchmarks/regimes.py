"""The regime map on known-truth data: when does a SoTeacher teacher give better students?

One factor at a time around the base setting of ``benchmarks/regimes.yaml`` (training-set size,
Bayes error, teacher width, teacher epochs, lambda_CR, lambda_LR), each level run as a
``soteacher experiment`` grid with the standard and SoTeacher teachers (and the exact-p* oracle
teacher where the library has one) x KD x seeds, into one ``--out``; then the paired student
gain, the fraction of the standard-to-oracle gap it closes, figures and a report with one
conclusion sentence per factor (``soteacher.experiment.regimes``) go to ``docs/regimes/``.

How the cells are laid out: a level that changes the data, the models or their training is its
own experiment, named ``<family>.<factor>=<level>`` (the ``dataset`` column of results.csv); the
base setting is ``<family>.base``. A level of a SoTeacher option (lambda_CR, lambda_LR) is a
teacher variant, ``soteacher[consistency_weight=3]``, of the base experiment, so they share its
standard teachers. A level that changes only the teacher shares the base's oracle students (the
oracle does not depend on the teacher's settings). The level equal to the base is the base.

Runs go on Ray with ``--workers`` one-CPU workers when Ray is installed (``--backend auto``),
else one after another in this process. The run count and the CPU time are estimated and
printed before anything starts (``--dry-run`` stops there); finished runs are skipped when the
script is started again, so it can be stopped and restarted at any time.
``--previous CSV`` takes the runs of an earlier map of the same spec (its ``results.csv``, e.g.
the committed ``docs/regimes/results.csv``): an experiment whose every run it holds is not run
again (typically the base, shared by every factor), and its rows enter the report wherever
``--out`` has no run of the same name.

    .venv/bin/python benchmarks/regimes.py --dry-run                 # the plan and its cost
    .venv/bin/python benchmarks/regimes.py                           # all factors, 10 seeds
    .venv/bin/python benchmarks/regimes.py --factors num_train separation --seeds 5
    .venv/bin/python benchmarks/regimes.py --report-only             # remake docs/regimes/
    .venv/bin/python benchmarks/regimes.py --factors num_train --previous docs/regimes/results.csv
    .venv/bin/python benchmarks/regimes.py --tiny                    # toy scale, a few minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from soteacher.config import (ConfigError, ExperimentConfig, apply_overrides,
                              load_experiment_config, parse_yaml)
from soteacher.engine.io import atomic_write_json, atomic_write_text
from soteacher.experiment.grid import format_value, plan_grid, validate_experiment
from soteacher.experiment.regimes import Cell, Factor, write_regimes

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "benchmarks" / "regimes.yaml"
X_KINDS = ("value", "bayes_error", "teacher_params", "index")
FACTOR_KEYS = {"label", "x_label", "key", "option", "values", "tiny_values", "log", "x", "hold",
               "min_epochs",
               "families"}


# ---- the spec ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FactorSpec:
    """One factor of ``regimes.factors``: a config ``key`` (or a treated-teacher ``option``)
    and its ``values``."""
    name: str
    label: str
    values: list
    key: str | None = None
    option: str | None = None
    x_label: str = ""
    log: bool = False
    x: str = "value"
    hold: str = "epochs"
    families: tuple[str, ...] | None = None
    #: with ``hold: steps``, the fewest epochs the teacher and the student get, whatever the size
    min_epochs: tuple[tuple[str, int], ...] = ()

    @property
    def factor(self) -> Factor:
        return Factor(self.name, self.label, self.x_label or self.label, self.log)


@dataclass
class Spec:
    """``benchmarks/regimes.yaml``: the base experiment config (as a mapping) and its
    ``regimes:`` section."""
    base: dict
    factors: list[FactorSpec]
    families: dict[str, dict]
    treated: str
    baseline: str
    oracle: str | None
    metric: str
    workers: int
    cost: dict
    tiny: list[str]
    path: Path


def _overrides(mapping: dict) -> list[str]:
    """``{dotted.key: value}`` as ``key=value`` strings (JSON is YAML)."""
    return [f"{k}={json.dumps(v)}" for k, v in (mapping or {}).items()]


def load_spec(path: str | Path = CONFIG, *, tiny: bool = False) -> Spec:
    """Read the regime map's config; with ``tiny`` the factors take their ``tiny_values``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"regime config {str(path)!r} does not exist")
    data = parse_yaml(path.read_text()) or {}
    if not isinstance(data, dict) or not isinstance(data.get("regimes"), dict):
        raise ConfigError(f"{path} needs a 'regimes:' section (factors, families, ...) beside the "
                          f"base experiment config; see benchmarks/regimes.yaml")
    reg = data.pop("regimes")
    unknown = sorted(set(reg) - {"factors", "families", "treated", "oracle", "metric", "workers",
                                 "cost", "tiny"})
    if unknown:
        raise ConfigError(f"unknown key regimes.{unknown[0]} in {path}; valid keys: cost, "
                          f"factors, families, metric, oracle, tiny, treated, workers")
    factors = []
    for name, f in (reg.get("factors") or {}).items():
        where = f"regimes.factors.{name}"
        if not isinstance(f, dict):
            raise ConfigError(f"{where} must be a mapping with 'key' or 'option' and 'values'")
        bad = sorted(set(f) - FACTOR_KEYS)
        if bad:
            raise ConfigError(f"unknown key {bad[0]!r} in {where}; valid keys: "
                              f"{', '.join(sorted(FACTOR_KEYS))}")
        if ("key" in f) == ("option" in f):
            raise ConfigError(f"{where} needs exactly one of 'key' (a config key such as "
                              f"data.options.num_train) and 'option' (an option of the treated "
                              f"teacher method such as consistency_weight)")
        values = f.get("tiny_values" if tiny and "tiny_values" in f else "values")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.values must be a non-empty list")
        x = f.get("x", "value")
        if x not in X_KINDS:
            raise ConfigError(f"{where}.x must be one of {', '.join(X_KINDS)}, got {x!r}")
        hold = f.get("hold", "epochs")
        if hold not in ("epochs", "steps"):
            raise ConfigError(f"{where}.hold must be 'epochs' or 'steps', got {hold!r}")
        if hold == "steps" and f.get("key") != "data.options.num_train":
            raise ConfigError(f"{where}.hold: steps applies to the key data.options.num_train only")
        floor = f.get("min_epochs") or {}
        if floor and (hold != "steps" or not isinstance(floor, dict)
                      or set(floor) - {"teacher", "student"}
                      or not all(isinstance(v, int) and v >= 1 for v in floor.values())):
            raise ConfigError(f"{where}.min_epochs must go with hold: steps and be a mapping "
                              f"like {{teacher: 8, student: 5}} (whole numbers >= 1)")
        fams = f.get("families")
        factors.append(FactorSpec(name, str(f.get("label", name)), list(values), f.get("key"),
                                  f.get("option"), str(f.get("x_label", "")), bool(f.get("log")),
                                  x, hold, tuple(fams) if fams else None,
                                  tuple(sorted(floor.items()))))
    if not factors:
        raise ConfigError(f"{path}: regimes.factors lists no factor")
    families = reg.get("families") or {data.get("data", {}).get("name", "data"): {}}
    return Spec(base=data, factors=factors,
                families={k: dict(v or {}) for k, v in families.items()},
                treated=str(reg.get("treated", "soteacher")),
                baseline=str((data.get("experiment") or {}).get("baseline", "standard")),
                oracle=reg.get("oracle", "oracle"), metric=str(reg.get("metric",
                                                                       "student_test_acc")),
                workers=int(reg.get("workers", 2)), cost=dict(reg.get("cost") or {}),
                tiny=list(reg.get("tiny") or []), path=path)


# ---- the plan ------------------------------------------------------------------------------------
@dataclass
class Plan:
    """The experiments to run (by name, in order) and the cells of the map."""
    experiments: dict[str, ExperimentConfig]
    cells: list[Cell]
    factors: list[Factor]
    notes: list[str]


def level_label(value: Any) -> str:
    """A level's name: ``16-32-64`` for a list, ``1e-4`` for a small number, else as written."""
    if isinstance(value, (list, tuple)):
        return "-".join(level_label(v) for v in value)
    if isinstance(value, float) and value != 0 and abs(value) < 1e-2:
        mantissa, _, exponent = f"{value:.1e}".partition("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return format_value(value)


def _get(cfg: Any, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
    return node


def _scaled_milestones(milestones: Sequence[int], old: int, new: int) -> list[int]:
    out = sorted({round(m * new / old) for m in milestones} if old else set())
    return [m for m in out if 0 < m < new]


def _epoch_overrides(cfg: ExperimentConfig, who: str, epochs: int) -> list[str]:
    """``who.train.epochs=epochs`` and its milestones scaled by the same factor."""
    train = getattr(cfg, who).train
    ms = _scaled_milestones(train.milestones, train.epochs, epochs)
    return [f"{who}.train.epochs={epochs}", f"{who}.train.milestones={json.dumps(ms)}"]


def _level_overrides(base: ExperimentConfig, f: FactorSpec, value: Any) -> tuple[list[str], str]:
    """Overrides that set a key-factor's level, and a note on what else changed."""
    out = [f"{f.key}={json.dumps(value)}"]
    note = ""
    if f.hold == "steps":
        ratio = float(_get(base, f.key)) / float(value)
        floor = dict(f.min_epochs)
        scaled = {who: max(1, round(getattr(base, who).train.epochs * ratio))
                  for who in ("teacher", "student")}
        epochs = {who: max(floor.get(who, 1), e) for who, e in scaled.items()}
        for who, e in epochs.items():
            out += _epoch_overrides(base, who, e)
        note = f"teacher {epochs['teacher']} / student {epochs['student']} epochs"
        if epochs != scaled:
            note += " (the min_epochs floor: more steps than the base)"
    else:
        for who in ("teacher", "student"):
            if f.key == f"{who}.train.epochs":
                out = _epoch_overrides(base, who, int(value))
    return out, note


def _method_defaults(method: str) -> dict[str, Any]:
    from soteacher.teachers import TEACHERS
    return {k: p.default for k, p in inspect.signature(TEACHERS.get(method)).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _with(cfg: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    notes: list[str] = []
    return apply_overrides(cfg, overrides, notes=notes)


def oracle_available(cfg: ExperimentConfig, baseline: str, oracle: str | None) -> bool:
    """Whether ``oracle`` is a teacher this library's grids accept on ``cfg``'s data."""
    if not oracle:
        return False
    try:
        validate_experiment(_with(cfg, [f"experiment.teachers={json.dumps([baseline, oracle])}"]))
    except (ConfigError, KeyError, ValueError):
        return False
    return True


def _data(cfg: ExperimentConfig) -> Any:
    from soteacher.experiment.runs import raw_data
    return raw_data(cfg.data)


def bayes_accuracy(cfg: ExperimentConfig) -> float | None:
    """The Bayes accuracy of the test inputs, mean of max_y p*(y|x), where p* is known."""
    data = _data(cfg)
    truth = getattr(data, "truth", None)
    x = getattr(data.test, "x", None)
    if truth is None or x is None:
        return None
    if hasattr(truth, "bayes_accuracy"):
        return float(truth.bayes_accuracy(x))
    if hasattr(truth, "prob"):
        return float(truth.prob(x).max(1).values.mean())
    return None


def model_params(cfg: ExperimentConfig, who: str) -> int:
    from soteacher.pipeline import build_model
    return sum(p.numel() for p in build_model(getattr(cfg, who).model, _data(cfg)).parameters())


def build_plan(spec: Spec, out: Path, *, factors: Sequence[str] | None = None,
               families: Sequence[str] | None = None, seeds: int | None = None,
               tiny: bool = False, overrides: Sequence[str] = ()) -> Plan:
    """The experiments and cells for the chosen ``factors`` (default: all) and ``families``
    (default: those without ``default: false``; one whose data set this version of the library
    does not have is left out with a note)."""
    from soteacher.data import DATASETS
    chosen = [f for f in spec.factors if factors is None or f.name in factors]
    unknown = sorted(set(factors or ()) - {f.name for f in spec.factors})
    if unknown:
        raise ConfigError(f"unknown factor {unknown[0]!r}; factors of {spec.path.name}: "
                          f"{', '.join(f.name for f in spec.factors)}")
    out.mkdir(parents=True, exist_ok=True)
    base_file = out / "regimes_base.yaml"
    atomic_write_text(base_file, yaml.safe_dump(spec.base, sort_keys=False))
    extra = list(spec.tiny if tiny else []) + list(overrides)
    if seeds is not None:
        extra.append(f"experiment.seeds={json.dumps(list(range(seeds)))}")
    treated = spec.treated
    notes: list[str] = []
    experiments: dict[str, ExperimentConfig] = {}
    cells: list[Cell] = []
    fams = list(families) if families else [k for k, v in spec.families.items()
                                            if v.get("default", True)]
    for fam in fams:
        fam_experiments: dict[str, ExperimentConfig] = {}
        if fam not in spec.families:
            raise ConfigError(f"unknown family {fam!r}; families of {spec.path.name}: "
                              f"{', '.join(spec.families)}")
        bad = sorted(set(spec.families[fam]) - {"set", "default"})
        if bad:
            raise ConfigError(f"unknown key {bad[0]!r} in regimes.families.{fam}; valid keys: "
                              f"default, set")
        fam_set = spec.families[fam].get("set", {})
        switched: list[str] = []
        # the family's settings first: --tiny and --set then change the family's base
        fam_cfg = load_experiment_config(base_file, _overrides(fam_set) + extra, notes=switched)
        notes += [f"family {fam}: {n}" for n in switched]
        base_opts = {**_method_defaults(treated),
                     **(fam_cfg.teacher.options if fam_cfg.teacher.method == treated else {})}
        if fam_cfg.data.name not in DATASETS:
            notes.append(f"family {fam}: data set {fam_cfg.data.name!r} is not in this version "
                         f"of the library; left out")
            continue
        oracle = spec.oracle if oracle_available(fam_cfg, spec.baseline, spec.oracle) else None
        if spec.oracle and not oracle:
            notes.append(f"family {fam}: no {spec.oracle!r} teacher in this version of the "
                         f"library; the oracle gap and the gap closed are left empty")
        teachers = [spec.baseline, treated] + ([oracle] if oracle else [])
        base_name = f"{fam}.base"
        base_teachers = list(teachers)
        for f in chosen:
            if f.families and fam not in f.families:
                continue
            for value in f.values:
                label = level_label(value)
                if f.option is not None:
                    if f.option not in base_opts:
                        raise ConfigError(f"regimes.factors.{f.name}: teacher method {treated!r} "
                                          f"has no option {f.option!r}")
                    is_base = value == base_opts[f.option]
                    variant = treated
                    if not is_base:
                        variant = f"{treated}[{f.option}={format_value(value)}]"
                        base_teachers.append({"name": variant, "method": treated,
                                              "options": {**base_opts, f.option: value}})
                    cells.append(Cell(fam, f.name, label, base_name, variant, spec.baseline,
                                      oracle, None, float(value) if f.x == "value" else None,
                                      is_base))
                    continue
                here = _get(fam_cfg, f.key)
                if here is None:
                    raise ConfigError(f"regimes.factors.{f.name}: the base config does not set "
                                      f"{f.key}; set it there explicitly, so that the level equal "
                                      f"to the base is recognised as the base")
                is_base = value == here
                level_over, note = _level_overrides(fam_cfg, f, value)
                cfg = fam_cfg if is_base else _with(fam_cfg, level_over)
                teacher_only = f.key.startswith("teacher.")
                name = base_name if is_base else f"{fam}.{f.name}={label}"
                x: float | None = None
                if f.x == "value" and isinstance(value, (int, float)):
                    x = float(value)
                elif f.x == "bayes_error":
                    acc = bayes_accuracy(cfg)
                    if acc is not None:
                        x = 1.0 - acc
                        note = ", ".join(filter(None, [f"Bayes accuracy {acc * 100:.1f}%", note]))
                elif f.x == "teacher_params":
                    x = float(model_params(cfg, "teacher"))
                    note = ", ".join(filter(None, [f"{x / 1000:.0f}k parameters", note]))
                if not is_base:
                    own = [spec.baseline, treated] + ([oracle] if oracle and not teacher_only
                                                      else [])
                    fam_experiments[name] = _with(cfg, [f"experiment.name={name}",
                                                    f"experiment.teachers={json.dumps(own)}"])
                cells.append(Cell(fam, f.name, label, name, treated, spec.baseline, oracle,
                                  base_name if teacher_only else None, x, is_base, note))
        experiments[base_name] = _with(fam_cfg, [
            f"experiment.name={base_name}", f"experiment.teachers={json.dumps(base_teachers)}"])
        experiments.update(fam_experiments)
    if not experiments:
        raise ConfigError("nothing to run: no family of the config is available here")
    for name, cfg in experiments.items():
        try:
            validate_experiment(cfg)
        except ConfigError as e:
            raise ConfigError(f"experiment {name}: {e}") from None
    order = {f.name: i for i, f in enumerate(spec.factors)}
    factor_list = [f.factor for f in sorted(chosen, key=lambda f: order[f.name])]
    return Plan(experiments, cells, factor_list, notes)


# ---- the cost ------------------------------------------------------------------------------------
def run_seconds(run: Any, cost: dict, cache: dict) -> float:
    """Estimated CPU seconds of one run (one thread): per sample and epoch ``a + b * params``
    for a training step, ``forward_fraction`` of that for the teacher's forward pass in
    distillation (``oracle_forward`` for the oracle), times ``method_factor[method]``, plus
    ``per_run`` seconds of evaluation and start-up."""
    cfg = run.config
    a, b = cost.get("per_sample_epoch", [2.0e-4, 2.4e-9])
    key = (json.dumps(dataclasses.asdict(cfg.data), sort_keys=True, default=str),
           json.dumps(dataclasses.asdict(cfg.teacher.model), sort_keys=True),
           json.dumps(dataclasses.asdict(cfg.student.model), sort_keys=True))
    if key not in cache:
        from soteacher.experiment.runs import grid_data
        from soteacher.pipeline import build_model
        data = grid_data(cfg)
        count = lambda spec: sum(p.numel() for p in build_model(spec, data).parameters())
        cache[key] = (len(data.train), count(cfg.teacher.model), count(cfg.student.model))
    n, p_t, p_s = cache[key]
    method = cfg.teacher.method
    oracle = method == cost.get("oracle_method", "oracle")
    per_run = float(cost.get("per_run", 2.5))
    if run.kind == "teacher":
        if oracle:
            return per_run
        step = (a + b * p_t) * float(cost.get("method_factor", {}).get(method, 1.0))
        return per_run + n * cfg.teacher.train.epochs * step
    forward = (float(cost.get("oracle_forward", 3.0e-5)) if oracle
               else float(cost.get("forward_fraction", 0.25)) * (a + b * p_t))
    return per_run + n * cfg.student.train.epochs * (a + b * p_s + forward)


def estimate(plan: Plan, out: Path, cost: dict) -> dict[str, Any]:
    """Runs and estimated CPU seconds per experiment, those already finished in ``out`` apart."""
    from soteacher.experiment.schedule import finished_runs
    cache: dict = {}
    per: dict[str, dict[str, float]] = {}
    for name, cfg in plan.experiments.items():
        _, runs = plan_grid(cfg, out)
        done = finished_runs(runs)
        todo = [r for r in runs if r.run_dir not in done]
        per[name] = {"runs": len(runs), "done": len(done),
                     "seconds": sum(run_seconds(r, cost, cache) for r in todo)}
    total = sum(p["seconds"] for p in per.values())
    return {"experiments": per, "runs": sum(p["runs"] for p in per.values()),
            "done": sum(p["done"] for p in per.values()), "seconds": total}


def format_estimate(est: dict[str, Any], workers: int, backend: str) -> str:
    lines = [f"{'experiment':<48} {'runs':>5} {'done':>5} {'CPU min':>8}"]
    for name, p in est["experiments"].items():
        lines.append(f"{name:<48} {p['runs']:>5} {p['done']:>5} {p['seconds'] / 60:>8.1f}")
    hours = est["seconds"] / 3600
    par = workers if backend == "ray" else 1
    lines.append(f"{est['runs']} runs ({est['done']} finished already); about {hours:.1f} "
                 f"CPU-hours left at one thread per run, {hours / par:.1f} h of wall time on "
                 f"{par} worker{'s' if par > 1 else ''} ({backend}); the per-epoch costs were "
                 f"measured on a shared 2-core machine: expect 0.5-2x")
    return "\n".join(lines)


def measured_seconds(out: Path) -> float:
    """Training time of the runs under ``out``: the sum of their epochs' ``epoch_time``."""
    total = 0.0
    for path in out.rglob("metrics.jsonl"):
        for line in path.read_text().splitlines():
            try:
                total += float(json.loads(line).get("epoch_time") or 0.0)
            except (ValueError, AttributeError):
                continue
    return total


# ---- running -------------------------------------------------------------------------------------
def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "ray" if importlib.util.find_spec("ray") is not None else "local"
    return backend


def run_plan(plan: Plan, out: Path, backend: str, workers: int,
             log: Callable[[str], None]) -> list[dict[str, str]]:
    """Every experiment of the plan, one after another (each on ``backend``); returns the runs
    that failed (a failed experiment does not stop the others)."""
    from soteacher.engine.trainer import NonFiniteLossError
    from soteacher.experiment import GridFailed, run_experiment
    started = False
    if backend == "ray":
        import ray
        if not ray.is_initialized():
            ray.init(address="local", num_cpus=workers, include_dashboard=False,
                     logging_level="warning")
            started = True
    failures: list[dict[str, str]] = []
    try:
        for name, cfg in plan.experiments.items():
            extra = [f"experiment.backend={backend}"]
            if backend == "ray":
                gpus = 1.0 / workers if cfg.device.startswith("cuda") else 0
                extra.append(f"experiment.resources={json.dumps({'cpus': 1, 'gpus': gpus})}")
            log(f"== {name}")
            try:
                run_experiment(_with(cfg, extra), out, log=lambda m, n=name: log(f"{n} {m}"))
            except GridFailed as e:
                failures += [{"experiment": name, "run": label, "error": err}
                             for label, err in e.failed]
                log(f"{name}: {e}")
            except NonFiniteLossError as e:         # the local backend stops at the first
                failures.append({"experiment": name, "run": "?", "error": str(e)})
                log(f"{name}: {e}; its remaining runs were not started")
    finally:
        if started:
            import ray
            ray.shutdown()
    return failures


def covered_by(plan: Plan, out: Path, previous: Sequence[dict[str, Any]]) -> list[str]:
    """The experiments of ``plan`` whose every run has a row in ``previous``."""
    from soteacher.experiment.report import run_key
    have = {run_key(r) for r in previous}
    names = []
    for name, cfg in plan.experiments.items():
        _, runs = plan_grid(cfg, out)
        if runs and all(run_key({**r.meta, "distiller": r.meta.get("distiller")}) in have
                        for r in runs):
            names.append(name)
    return names


# ---- the report ----------------------------------------------------------------------------------
def intro_lines(spec: Spec, plan: Plan, args: argparse.Namespace, est: dict | None,
                measured: float, failures: list[dict]) -> list[str]:
    base = next(iter(plan.experiments.values()))
    t, s = base.teacher, base.student
    seeds = base.experiment.seeds
    where = spec.path.relative_to(ROOT) if spec.path.is_relative_to(ROOT) else spec.path
    distillers = [d if isinstance(d, str) else d.get("name") or d["method"]
                  for d in base.experiment.distillers]
    lines = [
        f"Base setting (`{where}`): {base.data.name} {json.dumps(base.data.options)}; teacher "
        f"{t.model.name} {json.dumps(t.model.options)}, {t.train.epochs} epochs; student "
        f"{s.model.name} {json.dumps(s.model.options)}, {s.train.epochs} epochs; "
        f"{', '.join(distillers)} students; {len(seeds)} seeds ({seeds[0]}-{seeds[-1]}). One "
        f"factor changes at a time; the other settings stay at the base. Seeds vary the "
        f"initialisation, the batch order and the augmentation; the task and its training and "
        f"test sets are one draw per level (data seed fixed).", ""]
    held = [f.label for f in spec.factors if f.hold == "steps"
            and any(c.factor == f.name for c in plan.cells)]
    if held:
        lines += [f"{', '.join(held)}: the number of optimisation steps stays at the base's "
                     f"(epochs scaled by base size / size, milestones alike), so the smaller "
                     f"sets are seen more often, except where the factor's min_epochs floor "
                     f"gives a large set more; each level's epochs are in its row.", ""]
    options = [f.label for f in spec.factors if f.option
               and any(c.factor == f.name for c in plan.cells)]
    if options:
        lines += [f"{', '.join(options)}: options of the {spec.treated} teacher; their "
                  f"levels are teacher variants of the base experiment, compared with its "
                  f"{spec.baseline} teachers.", ""]
    lines.append("Levels that change only the teacher share the base's oracle students.")
    lines += ["", *(f"- {n}" for n in plan.notes)] if plan.notes else []
    lines += ["", (f"Estimated before the run: {est['runs']} runs, {est['seconds'] / 3600:.2f} "
                   f"CPU-hours left. " if est is not None else "")
              + f"Training time measured (the sum of the epoch times of the runs in the "
                f"experiment directory): {measured / 3600:.2f} CPU-hours."]
    if failures:
        lines += ["", f"{len(failures)} run(s) failed; their cells lack those seeds:"]
        lines += [f"- {f['experiment']}: {f['run']}: {f['error']}" for f in failures]
    cmd = "benchmarks/regimes.py" + (" --tiny" if args.tiny else "")
    lines += ["", f"Made by `.venv/bin/python {cmd}` (see `docs/regimes/README.md`)."]
    return lines


def conclusions(report: str) -> list[str]:
    """The conclusion sentences of a report (the list under each "### Conclusions")."""
    out, inside = [], False
    for line in report.splitlines():
        if line.startswith("#"):
            inside = line == "### Conclusions"
        elif inside and line.startswith("- "):
            out.append(line)
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--out", type=Path, default=None,
                   help="experiment directory (default runs/bench/regimes, with --tiny "
                        "runs/bench/regimes_tiny)")
    p.add_argument("--docs", type=Path, default=None,
                   help="where report.md, results.csv, regimes.csv and the figures go (default "
                        "docs/regimes; with --tiny OUT/docs)")
    p.add_argument("--factors", nargs="+", default=None, metavar="FACTOR",
                   help="run and report only these factors (default: all of the config)")
    p.add_argument("--families", nargs="+", default=None, metavar="FAMILY",
                   help="data families of the config (default: those without 'default: false')")
    p.add_argument("--seeds", type=int, default=None, help="use seeds 0..N-1 (default: the "
                                                           "config's)")
    p.add_argument("--tiny", action="store_true", help="toy scale, to check that it all runs")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing; remake the report from --out")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its cost; run "
                                                          "nothing")
    p.add_argument("--backend", choices=["auto", "ray", "local"], default="auto",
                   help="ray (one-CPU workers) when installed, else local (default: auto)")
    p.add_argument("--workers", type=int, default=None, help="Ray workers (default: the "
                                                             "config's, 2)")
    p.add_argument("--device", default=None, help="cpu (default), cuda, auto, ...")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the local backend (Ray runs use one each)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--previous", type=Path, default=None, metavar="CSV",
                   help="results.csv of an earlier map of this spec: experiments it covers are "
                        "not rerun and its rows enter the report")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the base config, e.g. --set teacher.train.epochs=30")
    args = p.parse_args(argv)
    out = args.out or ROOT / "runs" / "bench" / ("regimes_tiny" if args.tiny else "regimes")
    docs = args.docs or (out / "docs" if args.tiny else ROOT / "docs" / "regimes")
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:7.0f}s] {msg}", file=sys.stderr,
                            flush=True)
    spec = load_spec(args.config, tiny=args.tiny)
    overrides = list(args.overrides) + ([f"device={args.device}"] if args.device else [])
    if args.threads:
        overrides.append(f"threads={args.threads}")
    plan = build_plan(spec, out, factors=args.factors, families=args.families, seeds=args.seeds,
                      tiny=args.tiny, overrides=overrides)
    for n in plan.notes:
        log(n)
    backend = resolve_backend(args.backend)
    workers = args.workers or spec.workers
    from soteacher.experiment.report import collect_rows, merge_rows, read_results_csv
    previous = read_results_csv(args.previous) if args.previous else []
    skip = covered_by(plan, out, previous)
    for name in skip:
        log(f"{name}: every run is in {args.previous}; not run again")
    todo = dataclasses.replace(plan, experiments={n: c for n, c in plan.experiments.items()
                                                  if n not in skip})
    est = None
    failures: list[dict] = []
    failures_file = out / "failures.json"
    if not args.report_only:
        est = estimate(todo, out, spec.cost)
        print(format_estimate(est, workers, backend), file=sys.stderr, flush=True)
        if args.dry_run:
            return {"plan": plan, "estimate": est}
        if args.threads and backend == "local":
            from soteacher.engine.threads import set_threads
            set_threads(args.threads)
        failures = run_plan(todo, out, backend, workers, log)
        atomic_write_json(failures_file, failures)
    elif failures_file.is_file():
        failures = json.loads(failures_file.read_text())
    rows = merge_rows(collect_rows(out), previous)
    measured = measured_seconds(out)
    result = write_regimes(rows, plan.cells, plan.factors, docs, metric=spec.metric,
                           plots=not args.no_plots,
                           intro=intro_lines(spec, plan, args, est, measured, failures))
    print("\n".join(conclusions(result["report"])))
    print(f"\nreport: {result['report_md']}; cells: {result['regimes_csv']}; "
          f"{len(result['figures'])} figures in {docs} ({time.perf_counter() - t0:.0f}s)")
    return {"plan": plan, "estimate": est, **result}


if __name__ == "__main__":
    main()
