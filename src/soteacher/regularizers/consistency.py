"""Consistency regularisation of SoTeacher (Dong, Liu & Shang, ICLR 2024).

No second view and no extra forward pass: each training sample's current prediction (on this
epoch's random augmentation) is pulled toward the average of its own past predictions, kept in a
per-sample bank of shape (N, C) addressed by the sample's dataset index.

For a batch with softmax predictions ``p`` (B, C) and bank rows ``b`` (B, C), read *before* the
bank is updated, the loss is ``mean_i sum_c (p_ic - b_ic)^2`` (temperature 1). It is zero during
the first epoch, when the bank holds nothing yet. After the loss, the bank takes the detached
prediction: ``b_i <- (1 - tau) * b_i + tau * p_i``, where ``tau`` depends on the bank's update rule:

* ``"reference"`` (default, the reference code's rule): ``tau = 1`` in epoch 1 and ``1/(k+1)`` in
  epoch ``k >= 2``. The bank is a running mean of past epochs' predictions in which epoch 1
  counts twice.
* ``"mean"``: ``tau = 1/(m+1)`` for a sample updated ``m`` times before: a clean running mean of
  all its past predictions.
* ``"ema"``: ``tau = 1 - ema_decay``: an exponential moving average.

A sample's first update always takes its prediction whole (``tau = 1``), and a sample with no
past prediction adds no consistency loss. When every sample is visited in epoch 1, the normal
case, this is exactly the reference behaviour; it also keeps every bank row a probability vector
when some sample is first seen later (the reference would pull it toward a zero or a shrunken
vector).

Storage. The bank may be kept in float16 or bfloat16 (``bank_dtype``; the arithmetic is float32,
only the stored rows are rounded) and on the CPU (``bank_device="cpu"``, in pinned memory when
CUDA is available; it then stays there when the objective is moved to the GPU), so that
ImageNet-sized banks fit: 1,281,167 x 1000 is 5.1 GB in float32, 2.6 GB in 16 bits.

Several processes (DDP). The bank is replicated, not sharded: each process reads the rows of its
own samples, and ``ConsistencyRegularizer`` all-gathers ``(index, probs)`` from every process
before the update, so every replica applies the same update of the whole global batch and stays
identical to a single-process bank (see ``soteacher.engine.distributed``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.distributed import all_gather_rows, is_distributed
from .schedules import SCHEDULES, STEP_START, schedule_weight

__all__ = ["BANK_UPDATES", "BANK_DTYPES", "BANK_DEVICES", "consistency_loss", "ConsistencyBank",
           "ConsistencyRegularizer", "bank_dtype"]

BANK_UPDATES = ("reference", "mean", "ema")
BANK_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BANK_DEVICES = ("auto", "cpu")


def bank_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The storage dtype named ``dtype`` (float32 | float16 | bfloat16, or a ``torch.dtype``)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in BANK_DTYPES.values():
            raise ValueError(f"bank dtype must be one of {', '.join(BANK_DTYPES)}, got {dtype}")
        return dtype
    if dtype not in BANK_DTYPES:
        raise ValueError(f"unknown bank_dtype {dtype!r}; available: {', '.join(BANK_DTYPES)}")
    return BANK_DTYPES[dtype]


def consistency_loss(probs: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Squared L2 distance between predicted and target distributions.

    ``probs`` and ``target`` are (B, C). Returns the per-sample ``sum_c (probs - target)^2`` (B,)
    with ``reduction="none"``, or its batch mean.
    """
    per_sample = (probs - target).pow(2).sum(dim=1)
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"unknown reduction {reduction!r}; use 'mean' or 'none'")


class ConsistencyBank(nn.Module):
    """Per-sample bank of past predictions, (num_samples, num_classes), zero-initialised, with a
    per-sample update count.

    Both are buffers and part of ``state_dict()``: a resumed run restores them (a checkpoint
    loads into a bank of another dtype, converted). ``dtype`` is the storage type of the rows
    (float32 | float16 | bfloat16). With ``device="auto"`` the buffers travel with
    ``.to(device)``; with ``device="cpu"`` they stay on the CPU (pinned when CUDA is available)
    whatever the module is moved to, and rows cross to the compute device when read.
    """

    def __init__(self, num_samples: int, num_classes: int, update: str = "reference",
                 ema_decay: float = 0.9, dtype: str | torch.dtype = torch.float32,
                 device: str = "auto") -> None:
        super().__init__()
        if update not in BANK_UPDATES:
            raise ValueError(f"unknown bank update {update!r}; available: {', '.join(BANK_UPDATES)}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if num_samples < 1 or num_classes < 1:
            raise ValueError("the bank needs num_samples >= 1 and num_classes >= 1")
        if device not in BANK_DEVICES:
            raise ValueError(f"unknown bank_device {device!r}; available: "
                             f"{', '.join(BANK_DEVICES)}")
        dtype = bank_dtype(dtype)
        self.update_rule = update
        self.ema_decay = ema_decay
        self.keep_on_cpu = device == "cpu"
        pin = self.keep_on_cpu and torch.cuda.is_available()
        self.register_buffer("bank", torch.zeros(num_samples, num_classes, dtype=dtype,
                                                 pin_memory=pin))
        self.register_buffer("count", torch.zeros(num_samples, dtype=torch.int32,
                                                  pin_memory=pin))

    def _apply(self, fn, recurse=True):
        # A CPU bank ignores .to(device) / .cuda() / .half(): it stays where and as it is.
        if self.keep_on_cpu:
            return self
        return super()._apply(fn, recurse)

    @property
    def nbytes(self) -> int:
        """Bytes held by the bank's rows and counts."""
        return (self.bank.numel() * self.bank.element_size()
                + self.count.numel() * self.count.element_size())

    def tau(self, epoch: int, count: Tensor | int = 1) -> Tensor | float:
        """Weight of the new prediction in 1-based ``epoch`` for samples updated ``count`` times
        before (a tensor of counts gives a tensor of weights)."""
        if epoch < 1:
            raise ValueError(f"epochs are counted from 1, got {epoch}")
        if self.update_rule == "reference":
            rule = 1.0 if epoch == 1 else 1.0 / (epoch + 1)
        elif self.update_rule == "ema":
            rule = 1.0 - self.ema_decay
        else:
            rule = 1.0 / (torch.as_tensor(count) + 1.0)
        first = torch.as_tensor(count) == 0
        out = torch.where(first, torch.ones_like(first, dtype=torch.float32),
                          torch.as_tensor(rule, dtype=torch.float32))
        return out if isinstance(count, Tensor) else float(out)

    def read(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Bank rows of the samples ``index`` (B,) as a float32 copy (B, C), and a (B,) bool mask
        of the rows that hold at least one past prediction."""
        return self.bank[index].float(), self.count[index] > 0

    def _step_tau(self, epoch: int, count: Tensor, seen: Tensor) -> Tensor:
        """``tau(epoch, count)`` as a (B,) tensor in one or two operations, no host reads: the
        rule's constant and 1 are tensors made once per epoch and device."""
        if epoch < 1:
            raise ValueError(f"epochs are counted from 1, got {epoch}")
        if self.update_rule == "mean":
            return torch.reciprocal(count + 1.0)            # 1 for an unseen row
        rule = (1.0 - self.ema_decay if self.update_rule == "ema"
                else 1.0 if epoch == 1 else 1.0 / (epoch + 1))
        key = (rule, seen.device)
        if getattr(self, "_tau_consts", (None,))[0] != key:
            self._tau_consts = (key, torch.tensor(rule, device=seen.device),
                                torch.tensor(1.0, device=seen.device))
        _, rule_t, one = self._tau_consts
        return torch.where(seen, rule_t, one)

    @torch.no_grad()
    def update(self, index: Tensor, probs: Tensor, epoch: int) -> None:
        """Blend detached predictions ``probs`` (B, C) into the rows ``index`` (B,)."""
        count = self.count[index]
        self._blend(index, probs, epoch, self.bank[index].float(), count, count > 0)

    @torch.no_grad()
    def _blend(self, index: Tensor, probs: Tensor, epoch: int, old: Tensor, count: Tensor,
               seen: Tensor) -> None:
        """``update`` given the rows ``old = bank[index].float()``, ``count = count[index]`` and
        ``seen = count > 0``, already read (the regulariser reads them once per step)."""
        tau = self._step_tau(epoch, count, seen)[:, None]
        probs = probs.detach().float()
        # A row with NaN/inf (a step the trainer will skip) must not poison the bank. A row of
        # probabilities is finite exactly when its sum is (a NaN or inf anywhere reaches the sum;
        # a softmax of finite logits never overflows), and a sum is finite when it equals itself
        # and is not inf; both checks in two operations: s - s is 0 only for a finite s.
        total = probs.sum(dim=1)
        finite = (total - total) == 0
        new = torch.where(finite[:, None], torch.lerp(old, probs, tau), old)
        self.bank[index] = new.to(self.bank.dtype)
        self.count[index] = count + finite


class ConsistencyRegularizer(nn.Module):
    """The weighted consistency term, ready to add to a teacher's loss.

    Call it once per training step with the step's logits (B, C) and the samples' dataset indices
    (B,); it returns ``weight(epoch) * consistency_loss`` and then updates the bank::

        reg = ConsistencyRegularizer(len(train_set), num_classes, weight=1.0, num_epochs=E)
        loss = F.cross_entropy(logits, y) + reg(logits, index, epoch)

    ``epoch`` is 1-based; the weight follows ``schedule`` (see ``schedules.py``; ``start_epoch``,
    used by ``step`` only, is the number of epochs at weight 0, default 50 as in the reference
    code, so the term switches on in epoch ``start_epoch + 1``). ``bank_dtype``
    and ``bank_device`` choose the bank's storage (see ``ConsistencyBank``). Under DDP the
    batch's ``(index, probs)`` are all-gathered from every process before the bank update.
    """

    def __init__(self, num_samples: int, num_classes: int, weight: float = 1.0,
                 num_epochs: int = 1, schedule: str = "linear", start_epoch: int = STEP_START,
                 update: str = "reference", ema_decay: float = 0.9,
                 bank_dtype: str | torch.dtype = torch.float32,
                 bank_device: str = "auto") -> None:
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; available: {', '.join(SCHEDULES)}")
        self.weight = weight
        self.num_epochs = num_epochs
        self.schedule = schedule
        self.start_epoch = start_epoch
        self.bank = ConsistencyBank(num_samples, num_classes, update, ema_decay, bank_dtype,
                                    bank_device)

    def weight_at(self, epoch: int) -> float:
        return schedule_weight(self.schedule, self.weight, epoch, self.num_epochs, self.start_epoch)

    def forward(self, logits: Tensor, index: Tensor, epoch: int) -> Tensor:
        probs = F.softmax(logits.float(), dim=1)
        where = self.bank.bank.device
        local = index.to(where)
        # The batch's rows and counts are read once, for the loss and for the update.
        old = self.bank.bank[local].float()
        count = self.bank.count[local]
        seen = count > 0
        if epoch == 1:
            loss = logits.new_zeros(())
        else:
            # A row with no past prediction is its own target: zero loss and zero gradient,
            # the same as masking it out, without a mask multiplication.
            target = torch.where(seen.to(probs.device)[:, None], old.to(probs.device),
                                 probs.detach())
            loss = F.mse_loss(probs, target, reduction="sum") * (self.weight_at(epoch)
                                                                 / probs.shape[0])
        if is_distributed():
            # Every process's rows, in rank order; each replica applies the whole global batch.
            index, new = all_gather_rows(index, probs.detach())
            self.bank.update(index.to(where), new.to(where), epoch)
        else:
            self.bank._blend(local, probs.detach().to(where), epoch, old, count, seen)
        return loss
