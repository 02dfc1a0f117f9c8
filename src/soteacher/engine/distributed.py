"""Multi-process training with DistributedDataParallel, and per-sample state that stays right.

Launch::

    torchrun --nproc_per_node 4 -m soteacher train-teacher --config cfg.yaml --device cuda \\
             --out runs/t
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500 \\
             --nproc_per_node 8 -m soteacher distill ...

The command line calls :func:`init_process_group` when torchrun's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) says there is more than one
process: NCCL for CUDA tensors and gloo for CPU tensors (one backend per device type), and each
process on the GPU ``cuda:LOCAL_RANK``. The :class:`~soteacher.engine.trainer.Trainer` then runs
distributed on its own whenever a process group of more than one process is initialised.

How a distributed run equals a single-process run
-------------------------------------------------

* ``batch_size`` is the *global* batch. Every process draws the same permutation from the
  generator seeded by ``(seed, epoch)`` (as a single process does), cuts it into the same global
  batches, and takes its contiguous slice of each (:func:`batch_slice`: process ``r`` of ``W``
  takes rows ``[n*r//W, n*(r+1)//W)`` of an ``n``-sample batch). The slices of a step, in rank
  order, are exactly the single-process batch of that step. (``DistributedSampler`` interleaves
  samples by rank and would break this.)
* Each process's loss is the mean over its slice, scaled by ``W * n_r / n`` (exactly 1 when the
  slices are equal), so DDP's average of the gradients is the gradient of the global batch mean.
* Per-sample state (the SoTeacher consistency bank, CRD's memories) is *replicated*: every
  process holds the whole bank, reads the rows of its own slice, and before every update the
  ``(index, value)`` rows of all processes are all-gathered (:func:`all_gather_rows`), so every
  process applies the identical update of the whole global batch, in the single-process order.
  We replicate rather than shard by sample index because every read is then local (no second
  collective in the forward pass, none in evaluation), a checkpoint is just rank 0's copy of
  the whole bank (so a run written by N processes resumes on M), and the size problem that
  sharding would solve is solved more simply by keeping the bank in float16/bfloat16 and in
  (pinned) CPU memory (``bank_dtype`` / ``bank_device`` of the ``soteacher`` method). The
  all-gather moves only ``B x (C + 1)`` numbers per step.
* Random numbers: the global RNG is seeded identically on every process, as in a single
  process. Augmentation draws from a generator forked per ``(seed, epoch, step, rank)`` so that
  processes augment independently and the shared stream is left untouched; objectives draw their
  per-sample randomness for the whole global batch and keep their slice (CRD's negatives), so
  without augmentation (and without dropout) a run on W processes follows a single-process run
  to float rounding. With augmentation the draws differ from a single process's (they cannot
  match without every process augmenting the whole global batch).
* Metrics are summed over processes; evaluation, progress, logging and every file write happen
  on rank 0 only (evaluation results are broadcast so callbacks see the same record everywhere).

Gradients of the objective's own trainable parameters (CRD's embeddings, feature connectors)
are averaged by the trainer after the backward pass; the model's by DDP. Objectives whose loss
is a batch statistic (relation-based distillers such as SP, CC, RKD) see each process's slice.
A last global batch smaller than ``2 * W`` samples is dropped (a single process drops only a last
batch of one sample), so that every process has at least two samples for batch norm.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import pickle
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["launched", "is_distributed", "world_size", "rank", "is_main", "local_rank",
           "init_process_group", "destroy_process_group", "process_group", "barrier",
           "batch_slice", "batch_layout", "step_layout", "all_gather_rows", "all_reduce_sum",
           "all_reduce_min", "all_true", "all_true_on_device", "broadcast_object", "run_on_main", "DistributedModel", "wrap_model",
           "mix_seed"]


# ---- who am I --------------------------------------------------------------------------------
def launched() -> bool:
    """Whether the environment (torchrun's ``WORLD_SIZE``) asks for more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def is_distributed() -> bool:
    """Whether a process group of more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """True on rank 0, and in a single process."""
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


# ---- setup -----------------------------------------------------------------------------------
def init_process_group(backend: str | None = None,
                       timeout: datetime.timedelta | None = None) -> bool:
    """Join the process group described by torchrun's environment variables.

    Does nothing (and returns False) when the environment asks for one process or a group is
    already initialised. ``backend`` defaults to NCCL for CUDA tensors and gloo for CPU tensors
    when CUDA is available, else gloo; with CUDA each process uses the GPU ``LOCAL_RANK``.
    """
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; run on one process")
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE > 1 but {', '.join(missing)} not set; launch with torchrun")
    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    kwargs: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
    dist.init_process_group(backend, init_method="env://", **kwargs)
    return True


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        gc.collect()        # DDP modules no longer referenced go before their process group
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(command: str = "this command", supported: bool = True,
                  timeout: datetime.timedelta | None = None) -> Iterator[None]:
    """Initialise the process group for the duration of the block if torchrun asks for several
    processes, and tear it down afterwards. ``supported=False`` refuses to run ``command`` on
    several processes (a ``ValueError``)."""
    if launched() and not supported:
        raise ValueError(f"{command} runs in one process; start it without torchrun (or with "
                         f"--nproc_per_node 1)")
    started = init_process_group(timeout=timeout)
    try:
        yield
    finally:
        if started:
            destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def mix_seed(*values: int) -> int:
    """A 63-bit seed from several integers (splitmix64 steps): different for every tuple."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return h >> 1


# ---- batch layout ------------------------------------------------------------------------------
def batch_slice(n: int, rank_: int, world: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of an ``n``-sample global batch that process ``rank_`` of ``world``
    takes: contiguous, in rank order, sizes differing by at most one."""
    return n * rank_ // world, n * (rank_ + 1) // world


_LAYOUT: tuple[int, ...] | None = None     # per-rank slice sizes of the current step


@contextlib.contextmanager
def step_layout(sizes: Sequence[int] | None) -> Iterator[None]:
    """Within the block, the current step's global batch is split into slices of ``sizes`` (one
    per rank, in rank order). The trainer sets it so that objectives need no collective to learn
    where their slice lies (:func:`batch_layout`, :func:`all_gather_rows`)."""
    global _LAYOUT
    old, _LAYOUT = _LAYOUT, tuple(int(s) for s in sizes) if sizes is not None else None
    try:
        yield
    finally:
        _LAYOUT = old


def _sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's number of rows, from the step layout if it fits, else by an all-gather."""
    if _LAYOUT is not None and len(_LAYOUT) == world_size() and _LAYOUT[rank()] == n:
        return list(_LAYOUT)
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    got = [torch.zeros_like(mine) for _ in range(world_size())]
    dist.all_gather(got, mine)
    return [int(t) for t in got]


def batch_layout(n: int, device: torch.device | str = "cpu") -> tuple[int, int, int]:
    """``(lo, hi, total)``: this process's ``n`` rows are rows ``[lo, hi)`` of the step's global
    batch of ``total`` rows; ``(0, n, n)`` in a single process. Draw per-sample random numbers
    for ``total`` rows and keep ``[lo:hi]`` to draw exactly what a single process would."""
    if not is_distributed():
        return 0, n, n
    sizes = _sizes(n, torch.device(device))
    lo = sum(sizes[:rank()])
    return lo, lo + n, sum(sizes)


# ---- collectives ---------------------------------------------------------------------------------
def all_gather_rows(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Every process's rows of each tensor, concatenated in rank order.

    The tensors share their first dimension (this process's rows), which may differ between
    processes, and live on one device (with NCCL: this process's GPU). In a single process the
    tensors are returned as they are. All tensors travel in one collective, packed as float64
    columns: exact for floating point tensors of up to 64 bits and for integers below 2**53
    (sample indices); each comes back in its own dtype.
    """
    if not is_distributed() or not tensors:
        return tensors
    n = tensors[0].shape[0]
    if any(t.shape[0] != n for t in tensors):
        raise ValueError("all_gather_rows: the tensors must have the same number of rows")
    if any(t.is_complex() or t.element_size() > 8 for t in tensors):
        raise TypeError("all_gather_rows: complex tensors are not supported")
    sizes = _sizes(n, tensors[0].device)
    longest = max(sizes)
    cols = [t.detach().reshape(n, -1) for t in tensors]
    widths = [c.shape[1] for c in cols]
    packed = torch.zeros((longest, sum(widths)), dtype=torch.float64, device=tensors[0].device)
    if n:
        packed[:n] = torch.cat([c.to(torch.float64) for c in cols], dim=1)
    parts = [torch.empty_like(packed) for _ in sizes]
    dist.all_gather(parts, packed)
    rows = torch.cat([p[:s] for p, s in zip(parts, sizes)])
    out, start = [], 0
    for t, w in zip(tensors, widths):
        out.append(rows[:, start:start + w].to(t.dtype).reshape(-1, *t.shape[1:]))
        start += w
    return tuple(out)


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of ``t`` over processes (in place, and returned); ``t`` itself in a single process."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_min(t: Tensor) -> Tensor:
    """Element-wise minimum of ``t`` over processes (in place, and returned); ``t`` itself in a
    single process."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def all_true(flag: bool | Tensor, device: torch.device | str = "cpu") -> bool:
    """Whether ``flag`` holds on every process (so that all take the same branch). Reads the
    result on the host: inside a training step use :func:`all_true_on_device`."""
    if not is_distributed():
        return bool(flag)
    t = torch.as_tensor(flag, device=device).to(torch.int32).reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def all_true_on_device(flag: Tensor) -> Tensor:
    """Whether the bool tensor ``flag`` holds on every process, as a bool tensor on its device:
    one all-reduce and no host read (``flag`` itself in a single process)."""
    if not is_distributed():
        return flag
    t = flag.to(torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t.bool()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every process (picklable objects)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling, else a ``RuntimeError`` with its message."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def run_on_main(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` on rank 0 only and return its result on every process; an exception raised
    there is raised on every process (so no process waits forever for the others)."""
    if not is_distributed():
        return fn(*args, **kwargs)
    result: Any = None
    error: BaseException | None = None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except Exception as e:          # re-raised below, on every process
            error = e
    ok, payload = broadcast_object((error is None, result if error is None else _portable(error))
                                   if is_main() else None)
    if error is not None:
        raise error
    if not ok:
        raise payload
    return payload


# ---- the model ---------------------------------------------------------------------------------
class _Entry(nn.Module):
    """What DDP wraps: one forward that is either the model's own or its ``forward_features``,
    so that feature distillers also go through DDP (and get their gradients averaged)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, features: bool = False, preact: bool = False) -> Any:
        if features:
            return self.model.forward_features(x, preact=preact)
        return self.model(x)


class DistributedModel:
    """Stands in for the model inside the objective during distributed training.

    Calls (``model(x)``, and ``model.forward_features(x, preact=...)`` when the model has it)
    run through DistributedDataParallel, so gradients are averaged over processes; every other
    attribute (``modules()``, ``named_modules()``, ``parameters()``, ``input_shape``...) is the
    model's own, so objectives that inspect the model (the Lipschitz bound, feature hooks by
    module name) work unchanged.
    """

    def __init__(self, model: nn.Module, ddp: nn.Module, call: Callable[..., Any] | None = None):
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_ddp", ddp)
        object.__setattr__(self, "_call", call if call is not None else ddp)

    def __call__(self, x: Tensor) -> Any:
        return self._call(x)

    def _forward_features(self, x: Tensor, preact: bool = False) -> Any:
        return self._ddp(x, features=True, preact=preact)

    def __getattr__(self, name: str) -> Any:
        model = object.__getattribute__(self, "_model")
        if name == "forward_features":
            if callable(getattr(model, "forward_features", None)):
                return object.__getattribute__(self, "_forward_features")
            raise AttributeError(name)
        return getattr(model, name)

    def __repr__(self) -> str:
        return f"DistributedModel({self._model!r})"


def wrap_model(model: nn.Module, device: torch.device, *, find_unused_parameters: bool = False,
               compile: bool = False) -> tuple[nn.Module, DistributedModel]:
    """``(ddp, stand_in)``: ``model`` wrapped in DistributedDataParallel, and the
    :class:`DistributedModel` the objective is called with."""
    from torch.nn.parallel import DistributedDataParallel
    device_ids = [device.index] if device.type == "cuda" else None
    ddp = DistributedDataParallel(_Entry(model), device_ids=device_ids,
                                  find_unused_parameters=find_unused_parameters)
    call = torch.compile(ddp) if compile else ddp
    return ddp, DistributedModel(model, ddp, call)
