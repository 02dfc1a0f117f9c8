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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .engine.optim import TrainSettings

__all__ = ["ConfigError", "Config", "DataSpec", "ModelSpec", "TeacherSpec", "StudentSpec",
           "DistillSpec", "TrainSettings", "ExperimentSpec", "ExperimentConfig", "load_config",
           "load_experiment_config", "apply_overrides", "config_to_dict", "validate",
           "default_config_path"]


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
class Config:
    seed: int = 0
    device: str = "cpu"
    data: DataSpec = field(default_factory=DataSpec)
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    student: StudentSpec = field(default_factory=StudentSpec)
    distill: DistillSpec = field(default_factory=DistillSpec)


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
    """

    teachers: list[Any] = field(default_factory=lambda: ["standard", "soteacher"])
    distillers: list[Any] = field(default_factory=lambda: ["kd"])
    seeds: list[int] = field(default_factory=lambda: [0])
    pairs: list[dict[str, Any]] = field(default_factory=list)
    sweep: dict[str, Any] = field(default_factory=dict)
    sweep_teachers: list[str] = field(default_factory=lambda: ["soteacher"])
    baseline: str = "standard"
    name: str = ""


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


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                schema: type = Config) -> Config:
    """Read ``path`` (default: the embedded demo config) and apply ``key=value`` overrides.

    ``schema`` is the dataclass the file must fit (``Config``, or ``ExperimentConfig``)."""
    path = Path(path) if path is not None else default_config_path()
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return apply_overrides(_build(schema, data), overrides or [])


def load_experiment_config(path: str | Path, overrides: list[str] | None = None
                           ) -> ExperimentConfig:
    """An experiment config: the run keys plus an ``experiment:`` section."""
    return load_config(path, overrides, schema=ExperimentConfig)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``key.sub=value`` strings (values parsed as YAML) and return a new config."""
    data = config_to_dict(cfg)
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
    return _build(type(cfg), data)


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

    model_ctx = ("num_classes", "input_shape")
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
              ("teacher", "student", "num_samples", "num_classes"))


def _check_train(s: TrainSettings, key: str) -> None:
    try:
        s.validate()
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None
