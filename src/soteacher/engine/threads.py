"""CPU threads that stay fast when the machine is shared.

PyTorch's CPU kernels run on an OpenMP thread pool, one thread per core by default, and GNU
OpenMP's idle workers *spin* for a while before they sleep. On a machine where another program
keeps a core busy (a second training run, a browser, a build), each parallel region then waits
for a worker the OS has descheduled, while the spinning workers take CPU time from the thread
that has the work. Measured on a 2-core machine (``benchmarks/shared_machine.py``, see
BENCHMARKS.md, "Training on a shared machine"), a demo teacher epoch ran many times slower with
the spinning default; with passive waiting (``OMP_WAIT_POLICY=PASSIVE``: idle workers sleep at
once) it kept close to the speed of one thread.

The wait policy is read once, when OpenMP starts with ``import torch``: it has to be in the
environment before that. ``import soteacher`` sets it (:func:`prefer_passive_wait`) unless torch
is already imported or the environment already says ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``;
the ``soteacher`` command therefore always gets it. In your own script, import soteacher before
torch, or start Python with ``OMP_WAIT_POLICY=PASSIVE`` in the environment.

The thread count is :func:`set_threads`: ``--threads N`` on the command line, ``threads: N`` in
a config, ``threads=N`` in the Python API; by default, ``OMP_NUM_THREADS`` if the environment
sets it (torchrun sets 1), else one per CPU this process may run on (when idle threads spin
instead, torch's own count is left alone).
"""

from __future__ import annotations

import os
import sys

__all__ = ["WAIT_ENV", "default_threads", "passive_wait", "prefer_passive_wait", "set_threads"]

#: OpenMP's wait policy variable: PASSIVE (sleep when idle) or ACTIVE (spin).
WAIT_ENV = "OMP_WAIT_POLICY"


def prefer_passive_wait() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` if it can still take effect and nobody chose otherwise.

    Returns True when it set it. It does nothing once torch is imported (OpenMP has read its
    environment by then) or when ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is already set.
    """
    if "torch" in sys.modules or WAIT_ENV in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return False
    os.environ[WAIT_ENV] = "PASSIVE"
    return True


def passive_wait() -> bool:
    """Whether the environment asks OpenMP for passive waiting (it takes effect only if it was
    there when torch was imported)."""
    return os.environ.get(WAIT_ENV, "").strip().upper() == "PASSIVE"


def default_threads() -> int:
    """``OMP_NUM_THREADS`` when set to a number, else the number of CPUs this process may use."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def set_threads(threads: int | None = None) -> int:
    """Give torch ``threads`` CPU threads and return the count.

    None: :func:`default_threads` when idle OpenMP threads sleep (:func:`passive_wait`); when
    they spin (torch was imported before soteacher, or the user asked for it), ``OMP_NUM_THREADS``
    if set, else torch's current count is left as it is, as more spinning threads are what
    makes a shared machine slow. Process-wide, like ``torch.set_num_threads``, which it calls.
    """
    import torch
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        if not passive_wait() and not (env.isdigit() and int(env) > 0):
            return torch.get_num_threads()
        threads = default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a whole number >= 1 (or None for one per CPU), "
                         f"got {threads!r}")
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
