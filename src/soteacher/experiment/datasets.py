"""The data sets of a grid's runs, built once per process and shared by its steps (planning
checks, runs; a Ray worker keeps the last one for the next run of the same data)."""

from __future__ import annotations

from typing import Any

import yaml

from ..config import DataSpec

__all__ = ["raw_data"]

_RAW: dict[str, Any] = {}


def raw_data(spec: DataSpec) -> Any:
    """The data set ``spec`` names, built once per process (a Ray worker keeps it for the next
    run of the same data)."""
    from ..data import build_dataset
    key = yaml.safe_dump({"name": spec.name, "options": spec.options}, sort_keys=True)
    if key not in _RAW:
        _RAW.clear()                # one data set at a time
        _RAW[key] = build_dataset(spec.name, **spec.options)
    return _RAW[key]


