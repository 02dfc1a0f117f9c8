"""Names and files of an experiment directory, shared by the grid, its runs and its report.

Layout of an experiment directory ``OUT``::

    OUT/<data>/experiment.yaml                                   the resolved experiment config
    OUT/<data>/status.json                                       progress of the last start
    OUT/<data>/<pair>/seed<s>/teachers/<variant>/                 one teacher run
    OUT/<data>/<pair>/seed<s>/students/<variant>/<distiller>/     one student of that teacher

``<data>`` is ``experiment.name`` (default: ``data.name``); directory names are the variant and
distiller names with characters other than letters, digits and ``._=+-`` replaced by ``_``.
Every run directory is a normal run (``config.yaml``, ``metrics.jsonl``, ``checkpoint.pt``,
``model.pt``) plus ``summary.json``, written last (a run with one is finished), ``.lock`` while
a process trains it, for a teacher ``predictions.pt`` (its test-input probabilities) and for a
student ``teacher.json``, the teacher run it distils.
"""

from __future__ import annotations

import re

from ..config import ConfigError

__all__ = ["LOCK", "ORIGIN", "PREDICTIONS", "RUN_FORMAT", "STATUS", "SUMMARY", "slug"]

#: ``format`` of every run's ``summary.json``; the report reads only files of this format.
RUN_FORMAT = "soteacher-experiment-run/1"
SUMMARY = "summary.json"
STATUS = "status.json"
LOCK = ".lock"
ORIGIN = "teacher.json"
#: A teacher run's test-input probabilities (float16), for the agreement between seeds.
PREDICTIONS = "predictions.pt"


def slug(name: str) -> str:
    """A directory name for ``name``."""
    s = re.sub(r"[^A-Za-z0-9._=+-]+", "_", name).strip("_")
    if not s or s in (".", ".."):
        raise ConfigError(f"{name!r} does not make a usable directory name; choose another name")
    return s
