"""Measures of a teacher that may predict how good its students will be.

SoTeacher's premise: a teacher whose predictions on its training inputs are closer to the true
label distribution p* makes better students. Where p* is known (the known-truth data sets) the
distance itself is measured (``train_tv_true``, ``train_kl_true``); elsewhere only *proxies* that
need no p* can be: they are computed from the teacher's own metrics (see
``soteacher.experiment.runs.teacher_report``: ``<split>_acc``, ``_nll``, ``_ece``, ``_conf``
for the splits train, val and test).

Each proxy has a direction: ``"lower"`` when a smaller value should mean a better student (a
distance, a loss), ``"higher"`` otherwise. Proxies read only training and validation metrics, never
test ones, so that a teacher can be chosen by them (``soteacher tune``) without looking at test
data. :data:`TRUTH` lists the measures that need p* and are for analysis only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

__all__ = ["Proxy", "PROXIES", "TRUTH", "proxy_value"]


@dataclass(frozen=True)
class Proxy:
    name: str
    direction: str                                  # "lower" or "higher" is better
    needs: tuple[str, ...]                          # teacher metrics it reads
    value: Callable[[Mapping[str, float]], float]
    description: str


def _metric(key: str) -> Callable[[Mapping[str, float]], float]:
    return lambda m: float(m[key])


def _difference(a: str, b: str) -> Callable[[Mapping[str, float]], float]:
    return lambda m: float(m[a]) - float(m[b])


#: Measures that need p*: analysis only, never for selection.
TRUTH: dict[str, Proxy] = {p.name: p for p in [
    Proxy("train_tv_true", "lower", ("train_tv_true",), _metric("train_tv_true"),
          "total-variation distance to p* on the training inputs"),
    Proxy("train_kl_true", "lower", ("train_kl_true",), _metric("train_kl_true"),
          "KL(p* || teacher) on the training inputs"),
]}

#: Proxies that need no p* and read no test metric.
PROXIES: dict[str, Proxy] = {p.name: p for p in [
    Proxy("val_nll", "lower", ("val_nll",), _metric("val_nll"),
          "the teacher's NLL on the held-out validation split"),
    Proxy("val_ece", "lower", ("val_ece",), _metric("val_ece"),
          "the teacher's expected calibration error on the validation split"),
    Proxy("val_acc", "higher", ("val_acc",), _metric("val_acc"),
          "the teacher's accuracy on the validation split"),
    Proxy("conf_gap", "lower", ("train_conf", "val_conf"), _difference("train_conf", "val_conf"),
          "mean top-class probability on training inputs minus on validation inputs"),
    Proxy("nll_gap", "lower", ("val_nll", "train_nll"), _difference("val_nll", "train_nll"),
          "validation NLL minus training NLL"),
    Proxy("train_nll", "higher", ("train_nll",), _metric("train_nll"),
          "the teacher's NLL on its training labels (a teacher that fits them less tightly)"),
]}


def proxy_value(name: str, metrics: Mapping[str, Any]) -> float:
    """The proxy (or p*-measure) ``name`` of a teacher with ``metrics`` (keys without the
    ``teacher_`` prefix); NaN when a metric it needs is missing or not a number."""
    proxy = PROXIES.get(name) or TRUTH.get(name)
    if proxy is None:
        raise KeyError(f"unknown proxy {name!r}; available: "
                       f"{', '.join([*PROXIES, *TRUTH])}")
    try:
        value = proxy.value(metrics)
    except (KeyError, TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan
