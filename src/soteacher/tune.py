"""Student-oriented selection of the teacher's settings on a validation split (``soteacher tune``).

An Optuna study (TPE sampler, seeded) searches the teacher's settings: its method, SoTeacher's
weights ``consistency_weight`` (lambda_CR) and ``lipschitz_weight`` (lambda_LR), the consistency
schedule and the number of teacher epochs. Each trial trains a teacher with the trial's settings
on the training split (``data.val_fraction`` of it held out) and scores it by a *proxy* measured
on the held-out validation split:

* ``student_val_acc`` (the most direct, and the default): a KD student is distilled from the
  trial's teacher with the config's ``student`` and ``distill`` settings, on the same training
  split, and the proxy is its validation accuracy (higher is better);
* every proxy of :data:`soteacher.experiment.proxies.PROXIES` (measures of the teacher itself,
  from training and validation metrics, each with its direction).

The test split is never read: the trials see a copy of the data whose ``test`` slot holds the
validation split, named ``val`` (a trial's ``metrics.jsonl`` logs ``val_acc``, ``val_loss``, ...,
never a ``test_*`` entry), and the reports of teachers and students are computed on the training
and validation splits only.

Search space (``tune.space`` in the config overrides the default one key by key; ``null`` removes
a key)::

    method:               [standard, soteacher]          # a list: one of these
    consistency_weight:   {low: 0.1, high: 100, log: true}
    lipschitz_weight:     {low: 1.0e-7, high: 1.0e-4, log: true}
    consistency_schedule: [linear, step]
    epochs:               [E/2, 3E/4, E, 3E/2]           # E: the config's teacher.train.epochs

A key is ``method``, ``epochs`` or an option of a teacher method (any option that one of the
methods searched takes, e.g. ``label_smoothing``, ``consistency_start_epoch``); a value is a list
(the choices), a mapping ``{low, high, log: false, int: false}`` (a range) or a single value
(fixed). The space is conditional: an option is sampled only in trials whose method takes it. A
trial with other epochs than the config's has the config's milestones scaled to them, and a
``step`` consistency schedule starts at the reference's 50 of 240 epochs scaled to the trial's
epochs unless ``consistency_start_epoch`` is set (in the config's teacher options or the space).

Files in ``OUT``::

    OUT/study.db             the Optuna study (SQLite), named "soteacher-tune"
    OUT/trials/<number>/     trial <number>'s teacher run (a normal run directory with
                             summary.json); its student in OUT/trials/<number>/student/
    OUT/trials.csv           one row per trial: state, proxy value, settings, metrics
    OUT/best.yaml            the best trial's teacher settings as a config overlay
    OUT/best_config.yaml     the config with that overlay applied (a --config for train-teacher)
    OUT/tune.json            proxy, direction, the best trial and the counts

Resuming: ``tune`` on an ``OUT`` that holds a study of the same config, proxy, space and seed
continues it; ``n_trials`` is the number of *completed* trials wanted in total, so completed
trials are kept and only the missing ones run. A trial that was interrupted (Ctrl-C, or a process
killed while it was running) is marked failed and retried with the same settings as a new trial,
which takes over its run directory and continues from its last checkpoint. A trial whose teacher
or student meets a non-finite loss (e.g. a weight too large) fails and does not count; one of any
other error stops the study with that error. One ``tune`` process at a time works in ``OUT``
(``OUT/.lock``).

Backends: ``local`` runs the trials one after another; ``ray`` runs ``k`` at a time as Ray tasks
(``tune.parallel``, default as many as fit into the cluster with ``tune.resources`` per trial;
``pip install 'soteacher[ray]'``), asking the sampler for a new trial whenever one finishes.
Optuna itself is optional: ``pip install 'soteacher[tune]'``.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import inspect
import io
import json
import math
import os
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from .config import (Config, ConfigError, apply_overrides, config_to_dict, first_difference,
                     load_config, validate)
from .engine.io import atomic_write_json, atomic_write_text
from .engine.trainer import NonFiniteLossError
from .experiment.proxies import PROXIES, proxy_value
from .regularizers.schedules import STEP_START

__all__ = ["BACKENDS", "DEFAULT_SPACE_KEYS", "INSTALL", "STUDENT_PROXY", "STUDY_NAME",
           "TuneConfig", "TuneFailed", "TuneSpec", "apply_overlay", "default_space",
           "format_result", "load_tune_config", "parse_space", "proxy_names", "require_optuna",
           "require_ray", "run_trial", "trial_config", "tune"]

STUDY_NAME = "soteacher-tune"
STUDY_FILE = "study.db"
TRIALS_DIR = "trials"
STUDENT_DIR = "student"
SUMMARY = "summary.json"
TRIAL_FORMAT = "soteacher-tune-trial/1"
BACKENDS = ("local", "ray")
INSTALL = "pip install 'soteacher[tune]'"
#: The proxy that distils a student from each trial's teacher.
STUDENT_PROXY = "student_val_acc"
#: The reference's epochs, of which its step schedule waits ``STEP_START`` (50 of 240).
REFERENCE_EPOCHS = 240
#: The keys of the default search space.
DEFAULT_SPACE_KEYS = ("method", "consistency_weight", "lipschitz_weight", "consistency_schedule",
                      "epochs")
#: Fractions of the config's teacher epochs in the default space.
EPOCH_FRACTIONS = (0.5, 0.75, 1.0, 1.5)
RANGE_KEYS = ("low", "high", "log", "int")


class TuneFailed(RuntimeError):
    """Too many trials in a row failed (each with a non-finite loss): the space needs narrowing."""


# ---- the config's tune section -----------------------------------------------------------------
@dataclass
class TuneSpec:
    """The ``tune:`` section of a config (every key may also be given to :func:`tune`).

    ``space``: overrides of the default search space (see the module doc). ``trials``: completed
    trials wanted. ``proxy``: ``student_val_acc`` or a name of ``PROXIES``. ``seed``: the
    sampler's seed (default: the config's ``seed``). ``backend``: ``local`` or ``ray``;
    ``address``: the Ray cluster (default: a local instance); ``parallel``: trials at once on Ray
    (0: as many as fit); ``resources``: what one trial asks Ray for, ``{cpus: 1, gpus: 0}``."""

    space: dict[str, Any] = field(default_factory=dict)
    trials: int = 20
    proxy: str = STUDENT_PROXY
    seed: int | None = None
    backend: str = "local"
    address: str | None = None
    parallel: int = 0
    resources: dict[str, Any] = field(default_factory=lambda: {"cpus": 1, "gpus": 0})


@dataclass
class TuneConfig(Config):
    """A run config plus a ``tune:`` section (see :class:`TuneSpec`)."""

    tune: TuneSpec = field(default_factory=TuneSpec)

    def base(self) -> Config:
        """The plain run config, without the tune section."""
        return Config(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Config)})


def load_tune_config(path: str | Path, overrides: list[str] | None = None,
                     notes: list[str] | None = None) -> TuneConfig:
    """A config file with an optional ``tune:`` section, and ``key=value`` overrides."""
    return load_config(path, overrides, schema=TuneConfig, notes=notes)


def _base(cfg: Config) -> Config:
    return cfg.base() if isinstance(cfg, TuneConfig) else cfg


def proxy_names() -> list[str]:
    """Every proxy ``tune`` can select by: the student's validation accuracy, then PROXIES."""
    return [STUDENT_PROXY, *PROXIES]


def _direction(proxy: str) -> str:
    if proxy == STUDENT_PROXY:
        return "maximize"
    if proxy not in PROXIES:
        raise ConfigError(f"unknown proxy {proxy!r}; available: {', '.join(proxy_names())} "
                          f"(measures that need p* or test data cannot select a teacher)")
    return "maximize" if PROXIES[proxy].direction == "higher" else "minimize"


# ---- optional dependencies -----------------------------------------------------------------------
def require_optuna() -> Any:
    """The ``optuna`` module, or an ``ImportError`` with the install command."""
    try:
        import optuna
    except ImportError:
        raise ImportError(f"soteacher tune needs Optuna: {INSTALL}") from None
    return optuna


def require_ray() -> Any:
    """The ``ray`` module, or an ``ImportError`` with the install command."""
    from .experiment.ray_backend import require_ray as grid_require_ray
    return grid_require_ray("tune with --backend local")


# ---- the search space --------------------------------------------------------------------------
def _method_options(method: str) -> set[str]:
    """The user options teacher method ``method`` takes."""
    from .teachers import TEACHER_CONTEXT, TEACHERS
    params = inspect.signature(TEACHERS.get(method)).parameters
    return {n for n, p in params.items() if n not in TEACHER_CONTEXT
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def epoch_choices(epochs: int) -> list[int]:
    """The default space's teacher epochs around the config's ``epochs``."""
    return sorted({max(1, round(epochs * f)) for f in EPOCH_FRACTIONS})


def default_space(cfg: Config) -> dict[str, Any]:
    """The default search space, in the form ``tune.space`` is written in."""
    return {"method": ["standard", "soteacher"],
            "consistency_weight": {"low": 0.1, "high": 100.0, "log": True},
            "lipschitz_weight": {"low": 1e-7, "high": 1e-4, "log": True},
            "consistency_schedule": ["linear", "step"],
            "epochs": epoch_choices(cfg.teacher.train.epochs)}


@dataclass(frozen=True)
class Dimension:
    """One searched (or fixed) setting: ``kind`` is ``choice``, ``float``, ``int`` or ``fixed``."""

    name: str
    kind: str
    choices: tuple = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    value: Any = None

    def suggest(self, trial: Any) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return self.value

    def values(self) -> list[Any]:
        """The values to check before searching: the choices, the ends of a range."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "fixed":
            return [self.value]
        return [self.low, self.high]


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _dimension(name: str, spec: Any) -> Dimension:
    key = f"tune.space.{name}"
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{key} is an empty list; give at least one choice")
        bad = [v for v in spec if not _scalar(v)]
        if bad:
            raise ConfigError(f"{key}: choices must be numbers, strings, booleans or null, "
                              f"got {bad[0]!r}")
        return Dimension(name, "choice", choices=tuple(dict.fromkeys(spec)))
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - set(RANGE_KEYS))
        if unknown:
            raise ConfigError(f"unknown key {unknown[0]!r} in {key}; a range is "
                              f"{{low, high, log: false, int: false}}")
        if "low" not in spec or "high" not in spec:
            raise ConfigError(f"{key} needs both 'low' and 'high', got {spec!r}")
        low, high = spec["low"], spec["high"]
        log, is_int = spec.get("log", False), spec.get("int", False)
        if not isinstance(log, bool) or not isinstance(is_int, bool):
            raise ConfigError(f"{key}: 'log' and 'int' must be true or false, got {spec!r}")
        for end in (low, high):
            if isinstance(end, bool) or not isinstance(end, (int, float)) or not math.isfinite(end):
                raise ConfigError(f"{key}: 'low' and 'high' must be finite numbers, got {end!r}")
            if is_int and int(end) != end:
                raise ConfigError(f"{key}: an integer range needs whole ends, got {end!r}")
        if not low < high:
            raise ConfigError(f"{key}: 'low' ({low}) must be below 'high' ({high}); for one "
                              f"value write it alone (tune.space.{name}: {low})")
        if log and low <= 0:
            raise ConfigError(f"{key}: a log range needs 'low' > 0, got {low}")
        return Dimension(name, "int" if is_int else "float", low=low, high=high, log=log)
    if _scalar(spec):
        return Dimension(name, "fixed", value=spec)
    raise ConfigError(f"{key} must be a list of choices, a range {{low, high, log}} or one "
                      f"value, got {spec!r}")


def parse_space(cfg: Config, space: Mapping[str, Any] | None = None) -> dict[str, Dimension]:
    """The search space: :func:`default_space` with ``space`` (``tune.space``) laid over it key by
    key (``None`` removes a key), checked; raises ``ConfigError`` naming the bad key."""
    from .teachers import TEACHERS
    if space is None:
        space = cfg.tune.space if isinstance(cfg, TuneConfig) else {}
    if not isinstance(space, Mapping):
        raise ConfigError(f"tune.space must be a mapping of setting names to choices, got "
                          f"{space!r}")
    merged = {**default_space(cfg), **space}
    merged = {k: v for k, v in merged.items() if v is not None}
    dims = {name: _dimension(name, spec) for name, spec in merged.items()}
    method = dims.get("method")
    methods = method.values() if method is not None else [cfg.teacher.method]
    for m in methods:
        if not isinstance(m, str) or m not in TEACHERS:
            raise ConfigError(f"tune.space.method: unknown teacher method {m!r}; available: "
                              f"{', '.join(TEACHERS.names())}")
    if "epochs" in dims:
        for v in dims["epochs"].values():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"tune.space.epochs: epochs must be whole numbers >= 1, got "
                                  f"{v!r}")
        if dims["epochs"].kind == "float":
            raise ConfigError("tune.space.epochs: a range of epochs needs 'int: true'")
    taken = set().union(*(_method_options(m) for m in methods))
    for name in list(dims):
        if name in ("method", "epochs") or name in taken:
            continue
        if name in space:               # the user's key: an error; a default one: irrelevant
            raise ConfigError(
                f"unknown key tune.space.{name}: none of the teacher methods searched "
                f"({', '.join(methods)}) takes it; valid keys: method, epochs, "
                f"{', '.join(sorted(taken))}")
        del dims[name]
    return dims


def sample_settings(trial: Any, dims: Mapping[str, Dimension], cfg: Config) -> dict[str, Any]:
    """The settings of ``trial`` (define-by-run: an option only where the method takes it)."""
    method = dims["method"].suggest(trial) if "method" in dims else cfg.teacher.method
    takes = _method_options(method)
    settings: dict[str, Any] = {"method": method}
    for name, dim in dims.items():
        if name == "method":
            continue
        if name == "epochs" or name in takes:
            settings[name] = dim.suggest(trial)
    return settings


def _scaled_milestones(milestones: list[int], epochs: int, new: int) -> list[int]:
    """``milestones`` of a run of ``epochs`` moved to a run of ``new`` epochs (in proportion,
    rounded; those at or after the last epoch dropped)."""
    if new == epochs:
        return list(milestones)
    scaled = sorted({max(1, round(m * new / epochs)) for m in milestones})
    return [m for m in scaled if m < new]


def trial_config(cfg: Config, settings: Mapping[str, Any]) -> Config:
    """The run config of a trial with ``settings`` (see the module doc), checked.

    The config's teacher options are kept where the trial's method takes them (all of them for
    the config's own method); the settings replace them."""
    base = copy.deepcopy(_base(cfg))
    method = settings.get("method", base.teacher.method)
    takes = _method_options(method)
    options = dict(base.teacher.options)
    if method != base.teacher.method:
        options = {k: v for k, v in options.items() if k in takes}
    options.update({k: v for k, v in settings.items() if k not in ("method", "epochs")})
    train = base.teacher.train
    epochs = int(settings.get("epochs", train.epochs))
    if (options.get("consistency_schedule") == "step" and "consistency_start_epoch" in takes
            and "consistency_start_epoch" not in options):
        options["consistency_start_epoch"] = round(epochs * STEP_START / REFERENCE_EPOCHS)
    train.milestones = _scaled_milestones(train.milestones, train.epochs, epochs)
    train.epochs = epochs
    base.teacher.method, base.teacher.options = method, options
    validate(base, ("teacher",))
    return base


def overlay_of(trial_cfg: Config) -> dict[str, Any]:
    """The teacher settings of ``trial_cfg`` as a config overlay."""
    t = trial_cfg.teacher
    return {"teacher": {"method": t.method, "options": dict(t.options),
                        "train": {"epochs": t.train.epochs,
                                  "milestones": list(t.train.milestones)}}}


def _overrides(overlay: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in overlay.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and k != "options":
            out += _overrides(v, key)
        else:
            out.append(f"{key}={json.dumps(v)}")
    return out


def apply_overlay(cfg: Config, overlay: Mapping[str, Any] | str | Path) -> Config:
    """``cfg`` with an overlay (a mapping, or ``best.yaml``) laid over it; an ``options`` mapping
    replaces the config's whole. Raises ``ConfigError`` for keys the config does not have."""
    if not isinstance(overlay, Mapping):
        path = Path(overlay)
        if not path.is_file():
            raise ConfigError(f"no overlay file {str(path)!r}")
        from .config import parse_yaml
        overlay = parse_yaml(path.read_text()) or {}
        if not isinstance(overlay, Mapping):
            raise ConfigError(f"{str(path)!r} must hold a mapping at the top level")
    new = apply_overrides(cfg, _overrides(overlay), notes=[])
    validate(new, ("teacher",))
    return new


# ---- one trial ---------------------------------------------------------------------------------
def tuning_data(cfg: Config) -> Any:
    """The data of a trial: the training split without the validation split, which also fills
    the ``test`` slot (the test split is never read during tuning)."""
    from .experiment import runs
    data = runs.grid_data(cfg)
    val = getattr(data, "val", None)
    if val is None:
        raise ConfigError("soteacher tune scores teachers on a validation split held out of the "
                          "training set; set data.val_fraction (e.g. 0.1)")
    return dataclasses.replace(data, test=val, test_name="val")


def _report(model: Any, data: Any, device: Any) -> dict[str, float]:
    """Training- and validation-split metrics (``train_*``, ``val_*``) of ``model`` on tuning
    data (its ``test`` slot holds the validation split)."""
    from .experiment.runs import teacher_report
    metrics, _ = teacher_report(model, dataclasses.replace(data, val=None), device)
    return {(f"val_{k[5:]}" if k.startswith("test_") else k): v for k, v in metrics.items()}


def _empty(run_dir: Path) -> None:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)


def _summary(run_dir: Path, kind: str, settings: Mapping[str, Any],
             metrics: Mapping[str, float]) -> None:
    atomic_write_json(run_dir / SUMMARY, {
        "format": TRIAL_FORMAT, "kind": kind, "settings": dict(settings),
        "metrics": dict(metrics),
        "note": "the test split is not read while tuning: metrics.jsonl holds training and "
                "validation (val_*) metrics"})


def run_trial(cfg: Config, settings: Mapping[str, Any], proxy: str, run_dir: str | Path, *,
              progress: bool = False) -> dict[str, Any]:
    """Train the teacher of one trial in ``run_dir`` (and, for ``student_val_acc``, its KD
    student in ``run_dir/student``) and return ``{"value", "teacher", "student"}``: the proxy's
    value and the training/validation metrics of both (``student``: None without one).

    A run that finished before is read back; one with a checkpoint of the same config
    continues from it."""
    from .engine.evaluate import resolve_device
    from .experiment.runs import run_state
    from .pipeline import load_model, run_student, run_teacher
    _direction(proxy)
    run_dir = Path(run_dir)
    tcfg = trial_config(cfg, settings)
    data = tuning_data(tcfg)
    device = resolve_device(tcfg.device)
    state = run_state(run_dir, tcfg)
    if state == "done":
        teacher = load_model(run_dir).to(device)
        t_metrics = json.loads((run_dir / SUMMARY).read_text())["metrics"]
    else:
        if state == "new":
            _empty(run_dir)
        teacher = run_teacher(tcfg, data, run_dir, resume=state == "resume", progress=progress)
        t_metrics = _report(teacher, data, device)
        _summary(run_dir, "teacher", settings, t_metrics)
    out: dict[str, Any] = {"teacher": t_metrics, "student": None}
    if proxy != STUDENT_PROXY:
        out["value"] = proxy_value(proxy, t_metrics)
        return out
    validate(tcfg, ("student", "distill"))
    student_dir = run_dir / STUDENT_DIR
    s_state = "new" if state != "done" else run_state(student_dir, tcfg)
    if s_state == "done":
        s_metrics = json.loads((student_dir / SUMMARY).read_text())["metrics"]
    else:
        if s_state == "new":
            _empty(student_dir)
        student = run_student(tcfg, data, teacher, student_dir, resume=s_state == "resume",
                              progress=progress, name=f"student[{tcfg.distill.method}]")
        s_metrics = _report(student, data, device)
        _summary(student_dir, "student", settings, s_metrics)
    out["student"] = s_metrics
    out["value"] = float(s_metrics["val_acc"])
    return out


def _ray_trial(cfg: Config, settings: dict, proxy: str, run_dir: str, threads: int,
               cwd: str) -> dict[str, Any]:
    """One trial in a Ray worker."""
    from .engine.threads import set_threads
    if os.path.isdir(cwd):
        os.chdir(cwd)               # relative paths of the config as on the driver
    set_threads(threads)
    t0 = time.perf_counter()
    result = run_trial(cfg, settings, proxy, run_dir)
    result["seconds"] = time.perf_counter() - t0
    return result


# ---- the study ---------------------------------------------------------------------------------
def _normalised(obj: Any) -> Any:
    return json.loads(json.dumps(obj))




def _open_study(optuna: Any, out: Path, identity: dict[str, Any], direction: str,
                resume: bool) -> Any:
    path = out / STUDY_FILE
    existed = path.is_file()
    if existed and not resume:
        raise ConfigError(f"{str(out)!r} already holds a study ({STUDY_FILE}); continue it "
                          f"(resume=True), or choose another output directory")
    storage = optuna.storages.RDBStorage(f"sqlite:///{path.resolve()}")
    names = [s.study_name for s in storage.get_all_studies()] if existed else []
    if existed and STUDY_NAME not in names:
        raise ConfigError(f"{path} holds no study named {STUDY_NAME!r}; it was not written by "
                          f"soteacher tune: choose another output directory")
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction=direction,
                                load_if_exists=True)
    have = study.user_attrs.get("identity")
    if have is None:
        study.set_user_attr("identity", identity)
    elif have != identity:
        raise ConfigError(f"{str(out)!r} holds a study of another config "
                          f"({first_difference(have, identity)}); continue it with the config "
                          f"it was started with, or choose another output directory")
    return study


def _mark_interrupted(study: Any, trial: Any) -> None:
    """Record that ``trial`` did not finish (it is retried when the study continues)."""
    from optuna.trial import TrialState
    try:
        trial.set_user_attr("interrupted", True)
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    except Exception:               # the storage is gone too: the next start marks it
        pass


def _interrupted(t: Any) -> bool:
    """A failed trial that did not fail by itself (every such failure records an error)."""
    from optuna.trial import TrialState
    return t.state == TrialState.FAIL and "error" not in t.user_attrs


def _recover(study: Any) -> list[int]:
    """Mark trials left running by a process that died as failed, and queue a retry (same
    settings) of every interrupted trial not retried yet; returns the interrupted numbers."""
    from optuna.trial import TrialState
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    queued = []
    for t in trials:
        if _interrupted(t) and t.number not in retried:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            queued.append(t.number)
    return queued


def _completed(study: Any) -> int:
    from optuna.trial import TrialState
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def _ask(study: Any, seed: int) -> Any:
    """The next trial, sampled by TPE seeded with the study's seed and the trial's number (so a
    resumed study samples as an uninterrupted one would)."""
    import optuna
    number = len(study.get_trials(deepcopy=False))
    study.sampler = optuna.samplers.TPESampler(seed=(seed * 1_000_003 + number) % 2 ** 32)
    return study.ask()


def _prepare_trial_dir(out: Path, trial: Any) -> Path:
    """``OUT/trials/<number>``; a retry takes over the interrupted trial's directory."""
    run_dir = out / TRIALS_DIR / str(trial.number)
    if run_dir.exists():
        shutil.rmtree(run_dir)          # left by a study that was deleted
    source = trial.user_attrs.get("retry_of")
    if source is not None and (out / TRIALS_DIR / str(source)).is_dir():
        os.replace(out / TRIALS_DIR / str(source), run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return run_dir


def _settings_text(settings: Mapping[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    return " ".join(f"{k}={fmt(v)}" for k, v in settings.items())


def _finish(study: Any, trial: Any, result: Mapping[str, Any], proxy: str,
            log: Callable[[str], None]) -> bool:
    """Tell the study ``trial``'s result; returns whether it completed."""
    from optuna.trial import TrialState
    for key in ("teacher", "student"):
        if result.get(key):
            trial.set_user_attr(key, dict(result[key]))
    trial.set_user_attr("seconds", float(result.get("seconds", 0.0)))
    value = result["value"]
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        trial.set_user_attr("error", f"the proxy {proxy} is not a number ({value!r})")
        study.tell(trial, state=TrialState.FAIL)
        log(f"trial {trial.number}: failed, {proxy} is not a number")
        return False
    study.tell(trial, float(value))
    log(f"trial {trial.number}: {proxy} = {value:.4f} ({result.get('seconds', 0.0):.0f}s)")
    return True


def _fail(study: Any, trial: Any, error: BaseException, log: Callable[[str], None]) -> None:
    from optuna.trial import TrialState
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    try:
        trial.set_user_attr("error", f"{type(error).__name__}: {text}")
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    except Exception:
        pass
    log(f"trial {trial.number}: failed ({type(error).__name__}: {text})")


class _Failures:
    """Counts trials that failed in a row; too many is :class:`TuneFailed`."""

    def __init__(self, limit: int) -> None:
        self.limit, self.run = limit, 0

    def add(self, error: BaseException) -> None:
        self.run += 1
        if self.run >= self.limit:
            raise TuneFailed(f"{self.run} trials in a row failed, the last with: {error}; "
                             f"narrow tune.space (e.g. smaller weights) and run again (completed "
                             f"trials are kept)")

    def ok(self) -> None:
        self.run = 0


def _check_resources(resources: Mapping[str, Any]) -> dict[str, float]:
    unknown = sorted(set(resources) - {"cpus", "gpus"})
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in tune.resources; valid keys: cpus, gpus")
    res = {"cpus": 1.0, "gpus": 0.0}
    for k, v in resources.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"tune.resources.{k} must be a number >= 0, got {v!r}")
        res[k] = float(v)
    return res


def tune(cfg: Config, out: str | Path, n_trials: int | None = None, proxy: str | None = None,
         space: Mapping[str, Any] | None = None, seed: int | None = None,
         backend: str | None = None, resume: bool = True, *, progress: bool = False,
         log: Callable[[str], None] = print) -> dict[str, Any]:
    """Select the teacher's settings of ``cfg`` by ``proxy`` on the validation split.

    Arguments left ``None`` come from ``cfg.tune`` (a :class:`TuneConfig`) or its defaults:
    ``n_trials`` (completed trials in total, counting those of a study continued), ``proxy``,
    ``space`` (overrides of the default space), ``seed`` (of the sampler; default ``cfg.seed``),
    ``backend`` (``local`` or ``ray``). ``resume``: continue a study of the same settings in
    ``out`` (with False, an existing study is an error). Returns :func:`format_result`'s input:
    ``{"proxy", "direction", "completed", "failed", "best", "rows", "out"}``; ``best`` is None
    when no trial completed. See the module doc for the files written."""
    spec = cfg.tune if isinstance(cfg, TuneConfig) else TuneSpec()
    base = _base(cfg)
    n_trials = spec.trials if n_trials is None else n_trials
    proxy = spec.proxy if proxy is None else proxy
    seed = (spec.seed if spec.seed is not None else base.seed) if seed is None else seed
    backend = spec.backend if backend is None else backend
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ConfigError(f"the number of trials must be a whole number >= 1, got {n_trials!r}")
    direction = _direction(proxy)
    if backend not in BACKENDS:
        raise ConfigError(f"unknown tune backend {backend!r}; available: {', '.join(BACKENDS)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"the sampler's seed must be a whole number, got {seed!r}")
    if base.data.val_fraction <= 0:
        raise ConfigError("soteacher tune scores teachers on a validation split held out of the "
                          "training set; set data.val_fraction (e.g. 0.1)")
    validate(base, ("teacher", "student", "distill") if proxy == STUDENT_PROXY else ("teacher",))
    raw_space = cfg.tune.space if space is None and isinstance(cfg, TuneConfig) else space
    dims = parse_space(base, raw_space or {})
    for m in (dims["method"].values() if "method" in dims else [base.teacher.method]):
        trial_config(base, {"method": m})            # every method with the config's options
    optuna = require_optuna()
    ray = require_ray() if backend == "ray" else None
    resources = _check_resources(spec.resources)
    if isinstance(spec.parallel, bool) or not isinstance(spec.parallel, int) or spec.parallel < 0:
        raise ConfigError(f"tune.parallel must be a whole number >= 0, got {spec.parallel!r}")
    out = Path(out)
    from .engine.io import ensure_writable_dir
    ensure_writable_dir(out)
    identity = _normalised({
        "config": config_to_dict(base), "proxy": proxy, "seed": seed,
        "space": {k: dataclasses.asdict(d) for k, d in dims.items()}})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from .experiment.lock import RunLock
    with RunLock(out / ".lock"):
        study = _open_study(optuna, out, identity, direction, resume)
        retried = _recover(study)
        if retried:
            log(f"retrying interrupted trial(s) {', '.join(map(str, retried))}")
        done = _completed(study)
        if done:
            log(f"{done} completed trial(s) kept in {out / STUDY_FILE}")
        failures = _Failures(max(3, n_trials))
        t0 = time.perf_counter()
        try:
            if ray is None:
                _run_local(study, base, dims, proxy, out, n_trials, seed, failures, progress, log)
            else:
                _run_ray(ray, study, base, dims, proxy, out, n_trials, seed, failures, spec,
                         resources, log)
        finally:
            result = _write_outputs(study, base, out, proxy, direction)
        result["wall_time_s"] = time.perf_counter() - t0
    return result


def _start(study: Any, base: Config, dims: Mapping[str, Dimension], out: Path,
           seed: int, log: Callable[[str], None]) -> tuple[Any, dict[str, Any], Path]:
    trial = _ask(study, seed)
    settings = sample_settings(trial, dims, base)
    trial.set_user_attr("settings", settings)
    run_dir = _prepare_trial_dir(out, trial)
    again = trial.user_attrs.get("retry_of")
    log(f"trial {trial.number}" + (f" (retry of {again})" if again is not None else "") +
        f": {_settings_text(settings)}")
    return trial, settings, run_dir


def _run_local(study, base, dims, proxy, out, n_trials, seed, failures, progress, log) -> None:
    while _completed(study) < n_trials:
        trial, settings, run_dir = _start(study, base, dims, out, seed, log)
        t0 = time.perf_counter()
        try:
            result = run_trial(base, settings, proxy, run_dir, progress=progress)
        except NonFiniteLossError as e:
            _fail(study, trial, e, log)
            _write_outputs(study, base, out, proxy, study.direction.name.lower())
            failures.add(e)
            continue
        except KeyboardInterrupt:
            _mark_interrupted(study, trial)
            raise
        except BaseException as e:
            _fail(study, trial, e, log)
            raise
        result["seconds"] = time.perf_counter() - t0
        if _finish(study, trial, result, proxy, log):
            failures.ok()
        else:
            failures.add(ValueError(f"{proxy} is not a number"))
        _write_outputs(study, base, out, proxy, study.direction.name.lower())


def _run_ray(ray, study, base, dims, proxy, out, n_trials, seed, failures, spec, resources,
             log) -> None:
    from .experiment.ray_backend import slots
    started = False
    if not ray.is_initialized():
        if spec.address:
            ray.init(address=spec.address, logging_level="warning")
        else:
            ray.init(address="local", include_dashboard=False, logging_level="warning")
        started = True
    pending: dict[Any, tuple[Any, dict]] = {}
    try:
        cluster = ray.cluster_resources()
        k = spec.parallel or slots(cluster, resources, n_trials)
        if k < 1:
            raise ConfigError(
                f"one trial asks for {resources['cpus']:g} CPUs and {resources['gpus']:g} GPUs "
                f"(tune.resources) but the Ray cluster has {cluster.get('CPU', 0):g} CPUs and "
                f"{cluster.get('GPU', 0):g} GPUs in all; ask for less or add nodes")
        log(f"Ray: up to {k} trials at once")
        threads = base.threads or max(1, int(resources["cpus"]))
        remote = ray.remote(_ray_trial).options(num_cpus=resources["cpus"],
                                                num_gpus=resources["gpus"], max_retries=0)
        cwd = os.getcwd()
        done = _completed(study)
        while done < n_trials or pending:
            while len(pending) < k and done + len(pending) < n_trials:
                trial, settings, run_dir = _start(study, base, dims, out, seed, log)
                ref = remote.remote(base, settings, proxy, str(run_dir), threads, cwd)
                pending[ref] = (trial, settings)
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                trial, _settings = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as e:
                    error = getattr(e, "cause", None)
                    error = error if isinstance(error, BaseException) else e
                    _fail(study, trial, error, log)
                    if not isinstance(error, NonFiniteLossError):
                        raise error from None
                    failures.add(error)
                    continue
                if _finish(study, trial, result, proxy, log):
                    failures.ok()
                else:
                    failures.add(ValueError(f"{proxy} is not a number"))
                done = _completed(study)
                _write_outputs(study, base, out, proxy, study.direction.name.lower())
    except BaseException:
        for ref, (trial, _) in pending.items():
            try:
                ray.cancel(ref)
            except Exception:
                pass
            _mark_interrupted(study, trial)
        raise
    finally:
        if started:
            ray.shutdown()


# ---- outputs -----------------------------------------------------------------------------------
def _rows(study: Any) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {"number": t.number, "state": t.state.name,
                               "value": t.value if t.value is not None else ""}
        a = t.user_attrs
        for k, v in (a.get("settings") or {}).items():
            row[k] = v
        row["retry_of"] = a.get("retry_of", "")
        row["seconds"] = a.get("seconds", "")
        for who in ("teacher", "student"):
            for k, v in (a.get(who) or {}).items():
                row[f"{who}_{k}"] = v
        row["error"] = a.get("error", "interrupted" if _interrupted(t) else "")
        rows.append(row)
    return rows


def _csv_text(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns or ["number"], restval="", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _write_outputs(study: Any, base: Config, out: Path, proxy: str,
                   direction: str) -> dict[str, Any]:
    from optuna.trial import TrialState
    rows = _rows(study)
    atomic_write_text(out / "trials.csv", _csv_text(rows))
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    best = None
    if complete:
        t = study.best_trial
        settings = t.user_attrs["settings"]
        overlay = overlay_of(trial_config(base, settings))
        best = {"number": t.number, "value": t.value, "settings": settings, "overlay": overlay,
                "run_dir": str(out / TRIALS_DIR / str(t.number))}
        sets = " ".join(shlex.join(["--set", o]) for o in _overrides(overlay))
        head = (f"# The teacher settings chosen by soteacher tune: trial {t.number}, {proxy} = "
                f"{t.value:.6g} ({direction}), best of {len(complete)} completed trials.\n"
                f"# A config overlay (soteacher.tune.apply_overlay), or as command-line options:\n"
                f"#   {sets}\n")
        atomic_write_text(out / "best.yaml",
                          head + yaml.safe_dump(overlay, sort_keys=False))
        full = config_to_dict(apply_overlay(base, overlay))
        atomic_write_text(out / "best_config.yaml",
                          f"# The tuned config (trial {t.number} of {out / STUDY_FILE}).\n" +
                          yaml.safe_dump(full, sort_keys=False))
    failed = sum(r["state"] == "FAIL" for r in rows)
    names = {k for t in study.get_trials(deepcopy=False)
             for k in (t.user_attrs.get("settings") or {})}
    keys = [k for k in DEFAULT_SPACE_KEYS if k in names] + sorted(names - set(DEFAULT_SPACE_KEYS))
    result = {"proxy": proxy, "direction": direction, "completed": len(complete),
              "failed": failed, "best": best, "settings_keys": keys, "out": str(out)}
    atomic_write_json(out / "tune.json", result)
    return {**result, "rows": rows}


def format_result(result: Mapping[str, Any]) -> str:
    """The completed trials, best first, as a plain-text table, and the best settings."""
    rows = [r for r in result["rows"] if r["state"] == "COMPLETE"]
    rows.sort(key=lambda r: r["value"], reverse=result["direction"] == "maximize")
    keys = list(result.get("settings_keys", []))
    head = ["trial", result["proxy"], *keys]
    table = [[str(r["number"]), f"{r['value']:.4f}",
              *[(f"{r[k]:.3g}" if isinstance(r.get(k), float) else str(r.get(k, "-")))
                for k in keys]] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *table)]
    fmt = lambda r: "  ".join(v.rjust(w) for v, w in zip(r, widths))
    lines = [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, table)]
    best = result.get("best")
    lines.append("")
    if best is None:
        lines.append("no trial completed")
    else:
        lines.append(f"best: trial {best['number']} ({result['proxy']} = {best['value']:.4f}): "
                     f"{_settings_text(best['settings'])}")
    lines.append(f"{result['completed']} completed, {result['failed']} failed; "
                 f"settings: {Path(result['out']) / 'best.yaml'}, trials: "
                 f"{Path(result['out']) / 'trials.csv'}")
    return "\n".join(lines)
