"""The CPU allocator settings: applied where glibc is, skipped on request, and they do what they
are for (a training step stops page-faulting its memory back in every time)."""

import os
import subprocess
import sys

import pytest

from soteacher.engine.allocator import ALLOCATOR_ENV, _glibc_mallopt, tune_cpu_allocator

needs_glibc = pytest.mark.skipif(_glibc_mallopt() is None, reason="needs glibc (Linux)")

# Page faults per training step of a small CIFAR ResNet, with or without the settings.
CHILD = """
import resource, sys, torch
torch.set_num_threads(1)
if sys.argv[1] == "tuned":
    from soteacher.engine.allocator import tune_cpu_allocator
    assert tune_cpu_allocator()
from soteacher.models import create_model
torch.manual_seed(0)
m = create_model("resnet8", num_classes=10, input_shape=(3, 32, 32))
x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
def step():
    m.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(m(x), y).backward()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def _faults_per_step(mode: str) -> float:
    env = {k: v for k, v in os.environ.items()
           if k != ALLOCATOR_ENV and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", CHILD, mode], env=env, capture_output=True,
                         text=True, timeout=300, check=True).stdout
    return float(out.strip().splitlines()[-1])


@needs_glibc
def test_settings_stop_the_page_faults_of_each_step():
    default, tuned = _faults_per_step("default"), _faults_per_step("tuned")
    assert default > 1000, "the defaults were expected to fault the step's memory back in"
    assert tuned < default / 4


def test_environment_leaves_the_defaults(monkeypatch):
    monkeypatch.setenv(ALLOCATOR_ENV, "default")
    assert tune_cpu_allocator() is False


@needs_glibc
def test_applied_on_glibc(monkeypatch):
    monkeypatch.delenv(ALLOCATOR_ENV, raising=False)
    assert tune_cpu_allocator() is True


@pytest.mark.parametrize("kw", [{"trim_threshold_mb": 0}, {"top_pad_mb": 4096},
                                {"mmap_threshold_mb": 1.5}, {"trim_threshold_mb": True}])
def test_bad_values_are_refused(kw, monkeypatch):
    monkeypatch.delenv(ALLOCATOR_ENV, raising=False)
    with pytest.raises(ValueError, match="whole number of MB"):
        tune_cpu_allocator(**kw)
