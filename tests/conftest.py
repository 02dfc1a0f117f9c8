"""Shared test fixtures."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module's tests (small models run faster without thread
    hand-offs, and parallel test runs do not oversubscribe the cores); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_grid(teachers, seeds=(0,), distillers=("kd",)) -> dict:
    """A fresh experiment config of the tiniest grid the experiment tests run: known_truth with
    100 training samples, teacher cnn1d 8-16 for 2 epochs, student cnn1d_small for 1."""
    return {
        "seed": 0,
        "data": {"name": "known_truth", "val_fraction": 0.0,
                 "options": {"num_classes": 4, "input_shape": [1, 16], "num_train": 100,
                             "num_test": 60, "seed": 0}},
        "teacher": {"model": {"name": "cnn1d", "options": {"widths": [8, 16]}},
                    "train": {"epochs": 2, "batch_size": 20, "milestones": [],
                              "eval_every": 0}},
        "student": {"model": {"name": "cnn1d_small"},
                    "train": {"epochs": 1, "batch_size": 20, "milestones": [],
                              "eval_every": 0}},
        "experiment": {"teachers": list(teachers), "distillers": list(distillers),
                       "seeds": list(seeds)},
    }


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` as a module (registered as ``<name>_bench``), for
    tests of its functions."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench",
                                                  ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
