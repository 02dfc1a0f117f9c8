"""Run configuration: typed dataclasses, YAML files and ``--set key=value`` overrides.

A config is read from YAML into ``Config``; every key must exist in the schema (an unknown key is
an error that lists the valid ones) and every value must have the field's type. The free-form
``options`` dicts are checked against the signature of the builder they feed (a dataset, a model,
a teacher-training method, a distiller) by ``validate``.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .engine.optim import TrainSettings

__all__ = ["ConfigError", "Config", "first_difference", "DataSpec", "ModelSpec", "TeacherSpec", "StudentSpec",
           "DistillSpec", "LoggingSpec", "TrainSettings", "ExperimentSpec", "ExperimentConfig",
           "load_config", "load_experiment_config", "apply_overrides", "config_to_dict",
           "validate", "default_config_path", "RUNTIME_KEYS"]


class ConfigError(ValueError):
    """A config key or value that is wrong; the message says which and what is valid."""


@dataclass
class DataSpec:
    name: str = "known_truth"
    options: dict[str, Any] = field(default_factory=dict)
    augment: bool = True
    num_workers: int = 0
    val_fraction: float = 0.0      # held out of the training set (seeded by the run's seed)


@dataclass
class ModelSpec:
    name: str = "cnn1d"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TeacherSpec:
    method: str = "soteacher"
    options: dict[str, Any] = field(default_factory=dict)
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainSettings = field(default_factory=TrainSettings)


@dataclass
class StudentSpec:
    model: ModelSpec = field(default_factory=lambda: ModelSpec("cnn1d_small"))
    train: TrainSettings = field(default_factory=TrainSettings)


@dataclass
class DistillSpec:
    method: str = "kd"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoggingSpec:
    """Where metrics go besides ``metrics.jsonl``. ``tensorboard``: also TensorBoard event files
    in ``RUN_DIR/tensorboard`` (needs ``pip install 'soteacher[tensorboard]'``)."""

    tensorboard: bool = False


@dataclass
class Config:
    seed: int = 0
    device: str = "cpu"
    data: DataSpec = field(default_factory=DataSpec)
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    student: StudentSpec = field(default_factory=StudentSpec)
    distill: DistillSpec = field(default_factory=DistillSpec)
    # CPU threads for torch; None: OMP_NUM_THREADS, else one per CPU (see engine/threads.py)
    threads: int | None = None
    logging: LoggingSpec = field(default_factory=LoggingSpec)


#: Keys that say how a run is executed, not what it computes: they are left out of the
#: ``config.yaml`` of run directories, so a run may be resumed (or an experiment continued)
#: with other threads or logging, and run directories written before these keys existed still
#: match their config.
RUNTIME_KEYS = ("threads", "logging")


@dataclass
class ExperimentSpec:
    """The grid of ``soteacher experiment``: teacher methods x distillers x seeds (x pairs).

    ``teachers`` / ``distillers``: names, or mappings ``{method, options, name}``; a bare name
    that is the config's ``teacher.method`` (``distill.method``) takes ``teacher.options``
    (``distill.options``), any other bare name the method's defaults. ``pairs``:
    mappings ``{teacher: {name, options}, student: {name, options}, name}`` (default: the
    config's teacher and student models). ``sweep``: ``{option: [values, ...]}``, a grid over
    teacher options; each teacher entry named in ``sweep_teachers`` (default: ``soteacher``)
    becomes one variant per combination, e.g. ``soteacher[lipschitz_weight=2e-6]``; its method
    must take every swept option. ``baseline``: the
    teacher variant the others are compared with, seed by seed. ``name``: the data's label in
    the results (default: ``data.name``).

    How the runs are executed (not stored with the runs, so a grid may be continued on another
    backend): ``backend``: ``local`` (one run after another in this process, the default) or
    ``ray`` (every run a Ray task; see ``soteacher.experiment.ray_backend``). ``address``: the
    Ray cluster to join (default: a local Ray instance sized to the machine). ``resources``:
    what one run asks Ray for, ``{cpus: 1, gpus: 0}`` (fractions allowed, e.g. ``gpus: 0.25``).
    ``retries``: how often Ray starts a failed run again (it resumes from its checkpoint).
    """

    teachers: list[Any] = field(default_factory=lambda: ["standard", "soteacher"])
    distillers: list[Any] = field(default_factory=lambda: ["kd"])
    seeds: list[int] = field(default_factory=lambda: [0])
    pairs: list[dict[str, Any]] = field(default_factory=list)
    sweep: dict[str, Any] = field(default_factory=dict)
    sweep_teachers: list[str] = field(default_factory=lambda: ["soteacher"])
    baseline: str = "standard"
    name: str = ""
    backend: str = "local"
    address: str | None = None
    resources: dict[str, Any] = field(default_factory=lambda: {"cpus": 1, "gpus": 0})
    retries: int = 2


@dataclass
class ExperimentConfig(Config):
    """A run config plus an ``experiment:`` section (see ``ExperimentSpec``)."""

    experiment: ExperimentSpec = field(default_factory=ExperimentSpec)

    def base(self) -> Config:
        """The plain run config, without the experiment section."""
        return Config(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Config)})


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-5`` as a string; here it is a float, as users mean it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def first_difference(a: Any, b: Any, words: tuple[str, str] = ("there", "now"),
                     prefix: str = "") -> str:
    """The first key at which two nested mappings differ, as ``"key.sub: A there, B now"``
    (``words`` names the two sides), for errors about a run resumed with other settings."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if a.get(k) != b.get(k):
                return first_difference(a.get(k), b.get(k), words,
                                        f"{prefix}.{k}" if prefix else str(k))
    return f"{prefix or '(top level)'}: {a!r} {words[0]}, {b!r} {words[1]}"


def default_config_path(name: str = "demo") -> Path:
    return Path(__file__).parent / "configs" / f"{name}.yaml"


# ---- reading ---------------------------------------------------------------------------------
def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        return _build(tp, value, key)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f" under {prefix!r}" if prefix else ""
        raise ConfigError(f"unknown config key {_join(prefix, unknown[0])!r}; valid keys{where}: "
                          f"{', '.join(names)}")
    base = cls()
    for name in names:
        if name in data:
            setattr(base, name, _coerce(data[name], hints[name], _join(prefix, name)))
    return base


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def config_to_dict(cfg: Config, runtime: bool = False) -> dict[str, Any]:
    """The config as plain data; without ``runtime``, the ``RUNTIME_KEYS`` are left out (what
    run directories store)."""
    data = dataclasses.asdict(cfg)
    if not runtime:
        for key in RUNTIME_KEYS:
            data.pop(key, None)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                schema: type = Config, notes: list[str] | None = None) -> Config:
    """Read ``path`` (default: the embedded demo config) and apply ``key=value`` overrides.

    ``schema`` is the dataclass the file must fit (``Config``, or ``ExperimentConfig``).
    ``notes`` collects what the overrides changed beyond the keys they name (see
    ``apply_overrides``)."""
    path = Path(path) if path is not None else default_config_path()
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return apply_overrides(_build(schema, data), overrides or [], notes=notes)


def load_experiment_config(path: str | Path, overrides: list[str] | None = None,
                           notes: list[str] | None = None) -> ExperimentConfig:
    """An experiment config: the run keys plus an ``experiment:`` section."""
    return load_config(path, overrides, schema=ExperimentConfig, notes=notes)


#: (name key, options key) pairs: options written for one named builder (a dataset, a model, a
#: teacher method, a distiller) that ``apply_overrides`` reconciles when an override switches the
#: name.
SWITCHABLE = (("data.name", "data.options"), ("teacher.method", "teacher.options"),
              ("teacher.model.name", "teacher.model.options"),
              ("student.model.name", "student.model.options"),
              ("distill.method", "distill.options"))


def apply_overrides(cfg: Config, overrides: list[str], notes: list[str] | None = None) -> Config:
    """Apply ``key.sub=value`` strings (values parsed as YAML) and return a new config.

    Switching a name (``teacher.method``, ``distill.method``, ``data.name``,
    ``teacher.model.name``, ``student.model.name``) keeps the options the new choice accepts and
    drops the others that came from ``cfg`` (they were written for the old choice); each drop is
    reported as one line in ``notes`` (a ``UserWarning`` when ``notes`` is None), never silently.
    Options set by the overrides themselves are kept as given, so one the new choice rejects is
    still an error in ``validate``.
    """
    data = config_to_dict(cfg, runtime=True)
    set_keys: list[str] = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, "
                              f"e.g. teacher.train.epochs=10")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = parse_yaml(raw)
        except yaml.YAMLError:
            value = raw
        parts = key.split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            # A missing part becomes a mapping: _build then reports it as an unknown key.
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set {key!r}: {'.'.join(parts[:i + 1])!r} is not a mapping")
        node[parts[-1]] = value
        set_keys.append(key)
    new = _build(type(cfg), data)
    for name_key, options_key in SWITCHABLE:
        _reconcile_options(cfg, new, name_key, options_key, set_keys, notes)
    return new


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _reconcile_options(old: Config, new: Config, name_key: str, options_key: str,
                       set_keys: list[str], notes: list[str] | None) -> None:
    """Drop the options of ``options_key`` that the switched-to builder does not accept and that
    no override named (see ``apply_overrides``)."""
    before, after = _get(old, name_key), _get(new, name_key)
    if before == after:
        return
    # An override of the options mapping itself, or of a section holding it, sets all of them.
    if any(options_key == k or options_key.startswith(k + ".") for k in set_keys):
        return
    explicit = {k[len(options_key) + 1:] for k in set_keys if k.startswith(options_key + ".")}
    registry, context = _builder_registry(name_key)
    if after not in registry:
        return                              # validate reports the unknown name
    accepted = _accepted_options(registry.get(after), context)
    options = _get(new, options_key)
    dropped = [k for k in options if k not in explicit and k not in accepted]
    kept = [k for k in options if k not in explicit and k in accepted]
    if not dropped and not kept:
        return
    for k in dropped:
        del options[k]
    parts = []
    if dropped:
        parts.append(f"dropped {options_key} {', '.join(dropped)}, which it does not take")
    if kept:
        parts.append(f"kept {', '.join(f'{k}={options[k]!r}' for k in kept)}, which it takes "
                     f"(--set {options_key}={{}} for its defaults)")
    msg = f"{name_key} is now {after!r} (was {before!r}): {'; '.join(parts)}"
    if notes is None:
        warnings.warn(msg, stacklevel=3)
    else:
        notes.append(msg)


def _builder_registry(name_key: str):
    from .data import DATASETS
    from .distillers import DISTILLERS
    from .models import MODELS
    from .teachers import TEACHER_CONTEXT, TEACHERS
    return {"data.name": (DATASETS, ()),
            "teacher.method": (TEACHERS, TEACHER_CONTEXT),
            "teacher.model.name": (MODELS, MODEL_CONTEXT),
            "student.model.name": (MODELS, MODEL_CONTEXT),
            "distill.method": (DISTILLERS, DISTILL_CONTEXT)}[name_key]


def _accepted_options(fn: Any, context: tuple[str, ...]) -> set[str]:
    """The option names ``objective.check_options`` lets through for builder ``fn``."""
    params = inspect.signature(fn).parameters
    return {n for n, p in params.items() if n not in context and n != "self"
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


MODEL_CONTEXT = ("num_classes", "input_shape")
DISTILL_CONTEXT = ("teacher", "student", "num_samples", "num_classes")


# ---- checking options against the builders they feed -----------------------------------------
def validate(cfg: Config, phases: tuple[str, ...] = ("teacher", "student", "distill")) -> None:
    """Check names and options against the registries; raise ``ConfigError`` with the fix."""
    from .data import DATASETS
    from .distillers import DISTILLERS
    from .models import MODELS
    from .objective import check_options
    from .teachers import TEACHER_CONTEXT, TEACHERS

    def check(registry, name: str, options: dict, key: str, name_field: str,
              context: tuple[str, ...]) -> None:
        try:
            fn = registry.get(name)
        except KeyError as e:
            raise ConfigError(f"{key}.{name_field}: {e.args[0]}") from None
        try:
            check_options(fn, options, f"{registry.kind} {name!r} ({key}.options)", context)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    model_ctx = MODEL_CONTEXT
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"threads must be >= 1 (or null: as many as the machine gives), "
                          f"got {cfg.threads}")
    check(DATASETS, cfg.data.name, cfg.data.options, "data", "name", ())
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction}")
    if "teacher" in phases:
        check(MODELS, cfg.teacher.model.name, cfg.teacher.model.options, "teacher.model", "name",
              model_ctx)
        check(TEACHERS, cfg.teacher.method, cfg.teacher.options, "teacher", "method",
              TEACHER_CONTEXT)
        if (cfg.data.val_fraction == 0 and "val_set" in
                inspect.signature(TEACHERS.get(cfg.teacher.method)).parameters):
            raise ConfigError(f"teacher method {cfg.teacher.method!r} needs a validation split "
                              f"of the training set; set data.val_fraction=0.1")
        _check_train(cfg.teacher.train, "teacher.train")
    if "student" in phases:
        check(MODELS, cfg.student.model.name, cfg.student.model.options, "student.model", "name",
              model_ctx)
        _check_train(cfg.student.train, "student.train")
    if "distill" in phases:
        check(DISTILLERS, cfg.distill.method, cfg.distill.options, "distill", "method",
              DISTILL_CONTEXT)


def _check_train(s: TrainSettings, key: str) -> None:
    try:
        s.validate()
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None
