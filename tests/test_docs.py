"""docs/fidelity.md names, for every method, the tests that prove it equals its reference: each
named test must exist, and every registered distiller and teacher method must have a row."""

from __future__ import annotations

import re
from pathlib import Path

import soteacher

ROOT = Path(__file__).resolve().parent.parent
FIDELITY = ROOT / "docs" / "fidelity.md"


def _rows() -> list[str]:
    return [line for line in FIDELITY.read_text().splitlines() if line.startswith("| `")]


def test_every_test_named_in_fidelity_md_exists():
    text = FIDELITY.read_text()
    named = re.findall(r"`(test_\w+\.py)::(\w+)", text)
    assert len(named) > 30
    for file, name in named:
        path = ROOT / "tests" / file
        assert path.is_file(), f"docs/fidelity.md names {file}, which does not exist"
        assert re.search(rf"def {name}\b", path.read_text()), f"no test {file}::{name}"
    # bare '::name' after a file in the same cell refer to that file
    for cell in re.findall(r"\|([^|]*test_\w+\.py::[^|]*)\|", text):
        current = None
        for token in re.findall(r"`(?:(test_\w+\.py))?::(\w+)", cell):
            file, name = token
            current = file or current
            assert current is not None
            assert re.search(rf"def {name}\b", (ROOT / "tests" / current).read_text()), \
                f"no test {current}::{name}"


def test_every_distiller_and_teacher_method_has_a_row():
    cells = " ".join(row.split("|")[1] for row in _rows())
    for name in soteacher.list_distillers() + soteacher.list_teachers():
        assert f"`{name}`" in cells, f"docs/fidelity.md has no row for {name!r}"


def test_the_public_listing_functions_say_what_they_return():
    for fn in (soteacher.list_models, soteacher.list_distillers, soteacher.list_teachers):
        assert fn.__doc__ and "Names of every registered" in fn.__doc__
        assert fn() == sorted(fn())
