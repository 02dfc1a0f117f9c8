"""A second task with exact p*(y|x): labels drawn from a fixed random network's softmax.

``known_truth`` is generative: a class first, then an input from that class's distribution, and
p*(y|x) follows by Bayes' rule. Here the order is the other way round: an input x is drawn first,
and its label is drawn from softmax(f(x)), where f is a random network fixed by the seed. p* is
then f itself, exact by construction, with no Bayes' rule and no mixture to sum over; the class
boundaries are those of a small convolutional network instead of Gaussian clusters.

Inputs
------
x has shape (C, L). Each channel is a stationary smooth Gaussian signal: white noise smoothed by
a circular Gaussian kernel of width ``smoothness`` (in positions), scaled to unit variance per
position, plus ``noise_std`` white noise. The distribution is invariant to circular shifts.

The network f
-------------
Two circular convolutions (``hidden`` channels, ``kernel_size`` taps, ReLU after each), then the
mean *and* the max over positions of every channel (2 * ``hidden`` features), then a linear
layer to ``num_classes`` logits. Circular convolutions commute with circular shifts and both
poolings ignore the order of positions, so f(roll(x)) = f(x), and p*(y|roll(x)) = p*(y|x)
(exactly up to float64 rounding of the mean): ``RandomRoll`` is an augmentation that leaves p*
unchanged. Weights are drawn with He scaling; the last layer is then rescaled so that every
class's logit has mean 0 and standard deviation 1 over a reference sample of 8192 inputs, divided
by ``temperature``, and given class biases that make the class frequencies on that sample equal
(so the class prior is close to uniform).

Difficulty
----------
``temperature`` sets how noisy the labels are: p*(y|x) = softmax(g(x) / temperature) with g the
standardised logits. Small temperatures give nearly deterministic labels, large ones nearly
uniform labels. Expected Bayes accuracy (mean of max_y p*(y|x) over 200k samples, seed 0, the
other options at their defaults: 10 classes, input (1, 32), hidden 16, kernel 5, smoothness 2,
noise 0.1):

============  =====  =====  =====  =====  =====  =====  =====  =====
temperature   0.05   0.1    0.15   0.2    0.3    0.5    1.0    2.0
Bayes acc.    0.911  0.825  0.748  0.680  0.571  0.429  0.272  0.181
============  =====  =====  =====  =====  =====  =====  =====  =====

The default (0.15) is close to ``known_truth``'s default (0.757). Other seeds draw other networks:
seeds 1-7 give 0.69-0.76 at the default temperature. Even at small temperatures some inputs lie
near a boundary between two classes, so the Bayes accuracy approaches 1 slowly.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .augment import RandomRoll
from .base import DATASETS, ArrayDataset, DataBundle
from .known_truth import _derived_generators

__all__ = ["NetOracleTeacher", "NetTruthTask", "known_truth_net", "net_log_prob",
           "oracle_teacher"]

#: Inputs drawn to standardise the logits and balance the classes at construction.
REFERENCE_SAMPLES = 8192
_BALANCE_STEPS = 100
_CHUNK = 4096


def _circular_conv(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Circular 1-D convolution: (B, C_in, L) -> (B, C_out, L), position p reading the window
    around p with wrap-around, so it commutes with ``torch.roll`` along L."""
    k = weight.shape[-1]
    return F.conv1d(F.pad(x, (k // 2, k - 1 - k // 2), mode="circular"), weight, bias)


def _features(x: Tensor, params: dict[str, Tensor]) -> Tensor:
    """The shift-invariant features (B, 2 * hidden): mean and max over positions."""
    h = F.relu(_circular_conv(x, params["w1"], params["b1"]))
    h = F.relu(_circular_conv(h, params["w2"], params["b2"]))
    return torch.cat([h.mean(dim=2), h.amax(dim=2)], dim=1)


def net_log_prob(x: Tensor, params: dict[str, Tensor]) -> Tensor:
    """log p*(y|x) = log_softmax(head(features(x))), shape (B, num_classes), float64.

    ``x`` is (B, C, L); ``params`` holds ``w1`` (H, C, k), ``b1`` (H,), ``w2`` (H, H, k), ``b2``
    (H,), ``w3`` (num_classes, 2H) and ``b3`` (num_classes,), with the temperature already
    folded into ``w3`` and ``b3``. Computed in float64 on ``x``'s device (on the CPU for devices
    without float64), in chunks of the batch.
    """
    c, k = params["w1"].shape[1], params["w1"].shape[-1]
    if x.dim() != 3 or x.shape[1] != c:
        raise ValueError(f"expected inputs of shape (B, {c}, L); got {tuple(x.shape)}")
    if x.shape[2] < k:
        raise ValueError(f"inputs of length {x.shape[2]} are shorter than the network's kernel "
                         f"({k})")
    out_device = x.device
    device = x.device if x.device.type in ("cpu", "cuda") else torch.device("cpu")
    p = {k: v.to(device, torch.float64) for k, v in params.items()}
    out = []
    for start in range(0, len(x), _CHUNK):
        xb = x[start:start + _CHUNK].to(device, torch.float64)
        logits = F.linear(_features(xb, p), p["w3"], p["b3"])
        out.append(torch.log_softmax(logits, dim=1))
    if not out:
        return torch.zeros(0, p["w3"].shape[0], dtype=torch.float64, device=out_device)
    return torch.cat(out).to(out_device)


def _smooth_signals(n: int, shape: tuple[int, int], smoothness: float, noise_std: float,
                    generator: torch.Generator | None) -> Tensor:
    """``n`` stationary smooth signals (n, C, L), float64 (see the module docstring)."""
    c, length = shape
    white = torch.randn(n, c, length, generator=generator, dtype=torch.float64)
    if smoothness > 0:
        pos = torch.arange(length, dtype=torch.float64)
        d = torch.minimum(pos, length - pos)
        kernel = torch.exp(-d ** 2 / (2 * smoothness ** 2))
        kernel = kernel / kernel.square().sum().sqrt()      # unit variance per position
        signal = torch.fft.irfft(torch.fft.rfft(white, dim=2) * torch.fft.rfft(kernel),
                                 n=length, dim=2)
    else:
        signal = white
    noise = torch.randn(n, c, length, generator=generator, dtype=torch.float64)
    return signal + noise_std * noise


class NetTruthTask:
    """Inputs and labels drawn from a fixed random network's softmax (see the module docstring).

    Attributes: ``params`` (float64 weights of f, temperature folded in), ``smoothness``,
    ``noise_std``, ``temperature``; ``num_classes``, ``input_shape`` and ``hidden`` as
    properties. Same interface as :class:`~soteacher.data.known_truth.KnownTruthTask`:
    ``sample``, ``log_prob``, ``prob``, ``bayes_accuracy``, and :meth:`oracle`.
    """

    def __init__(self, params: dict[str, Tensor], length: int, smoothness: float,
                 noise_std: float, temperature: float) -> None:
        need = ("w1", "b1", "w2", "b2", "w3", "b3")
        missing = [k for k in need if k not in params]
        if missing:
            raise ValueError(f"params lack {', '.join(missing)}; need {', '.join(need)}")
        self.params = {k: params[k].detach().to("cpu", torch.float64) for k in need}
        self.length = int(length)
        self.smoothness = float(smoothness)
        self.noise_std = float(noise_std)
        self.temperature = float(temperature)

    @classmethod
    def random(cls, num_classes: int = 10, input_shape: Sequence[int] = (1, 32),
               hidden: int = 16, kernel_size: int = 5, temperature: float = 0.15,
               smoothness: float = 2.0, noise_std: float = 0.1,
               generator: torch.Generator | None = None) -> "NetTruthTask":
        """Draw the network, standardise its logits and balance the classes (module docstring)."""
        c, length = _check_shape(input_shape)
        if generator is None:
            generator = torch.Generator().manual_seed(0)

        def he(*shape: int) -> Tensor:
            fan_in = math.prod(shape[1:])
            return torch.randn(*shape, generator=generator, dtype=torch.float64) * math.sqrt(
                2.0 / fan_in)

        params = {"w1": he(hidden, c, kernel_size),
                  "b1": 0.1 * torch.randn(hidden, generator=generator, dtype=torch.float64),
                  "w2": he(hidden, hidden, kernel_size),
                  "b2": 0.1 * torch.randn(hidden, generator=generator, dtype=torch.float64),
                  "w3": torch.randn(num_classes, 2 * hidden, generator=generator,
                                    dtype=torch.float64) / math.sqrt(2 * hidden),
                  "b3": torch.zeros(num_classes, dtype=torch.float64)}
        ref = _smooth_signals(REFERENCE_SAMPLES, (c, length), smoothness, noise_std, generator)
        ref = ref.to(torch.float32).to(torch.float64)       # the precision inputs are stored in
        logits = F.linear(_features(ref, params), params["w3"])       # (N, Y)
        mean, std = logits.mean(0), logits.std(0).clamp_min(1e-12)
        scaled = (logits - mean) / std / temperature
        bias = torch.zeros(num_classes, dtype=torch.float64)
        for _ in range(_BALANCE_STEPS):
            # log of each class's frequency under p*, pushed towards log(1/Y)
            freq = torch.softmax(scaled + bias, dim=1).mean(0)
            bias = bias - torch.log(freq * num_classes)
        params["w3"] = params["w3"] / std[:, None] / temperature
        params["b3"] = bias - mean / std / temperature
        return cls(params, length, smoothness, noise_std, temperature)

    @property
    def num_classes(self) -> int:
        return self.params["w3"].shape[0]

    @property
    def hidden(self) -> int:
        return self.params["w1"].shape[0]

    @property
    def input_shape(self) -> tuple[int, int]:
        return (self.params["w1"].shape[1], self.length)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` draws: x float32 (n, C, L), y int64 (n,) ~ p*(y|x) of the stored float32 x."""
        x = _smooth_signals(n, self.input_shape, self.smoothness, self.noise_std,
                            generator).to(torch.float32)
        p = net_log_prob(x, self.params).exp()
        u = torch.rand(n, 1, generator=generator, dtype=torch.float64)
        # inverse CDF: the first class whose cumulative probability exceeds u
        y = (p.cumsum(dim=1) <= u).sum(dim=1).clamp_max(self.num_classes - 1)
        return x, y

    def log_prob(self, x: Tensor) -> Tensor:
        """log p*(y|x), shape (B, num_classes), on ``x``'s device; float64 for float64 input,
        float32 otherwise."""
        out = net_log_prob(x, self.params)
        return out if x.dtype == torch.float64 else out.to(torch.float32)

    def prob(self, x: Tensor) -> Tensor:
        """p*(y|x), shape (B, num_classes)."""
        return self.log_prob(x).exp()

    def bayes_accuracy(self, x: Tensor) -> float:
        """Mean over ``x`` of max_y p*(y|x): the expected accuracy of the Bayes classifier."""
        return float(net_log_prob(x, self.params).max(1).values.exp().mean())

    def oracle(self) -> "NetOracleTeacher":
        """A teacher whose logits are log p*(y|x)."""
        return NetOracleTeacher(self)

    def __repr__(self) -> str:
        return (f"NetTruthTask(num_classes={self.num_classes}, input_shape={self.input_shape}, "
                f"hidden={self.hidden}, temperature={self.temperature}, "
                f"smoothness={self.smoothness}, noise_std={self.noise_std})")


class NetOracleTeacher(nn.Module):
    """A perfect teacher for :class:`NetTruthTask`: logits log p*(y|x) (float32) for any input
    of the task's shape, shifted or not. No trainable parameters; the network's weights are
    float64 buffers, so ``.to(device)`` moves them."""

    def __init__(self, task: NetTruthTask) -> None:
        super().__init__()
        for k, v in task.params.items():
            self.register_buffer(k, v.clone())

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, L) -> logits (B, num_classes) = log p*(y|x), float32."""
        params = {k: getattr(self, k) for k in ("w1", "b1", "w2", "b2", "w3", "b3")}
        return net_log_prob(x, params).to(torch.float32)


def oracle_teacher(truth: Any) -> nn.Module:
    """The teacher whose logits are log p*(y|x) for the known truth ``truth`` of a data set
    (``DataBundle.truth``): the task's own ``oracle()`` (:class:`OracleTeacher` for
    ``known_truth``, :class:`NetOracleTeacher` for ``known_truth_net``)."""
    make = getattr(truth, "oracle", None)
    if callable(make):
        return make()
    raise ValueError("the oracle teacher needs data whose p* is known, e.g. "
                     "data.name=known_truth or known_truth_net")


def _check_shape(input_shape: Sequence[int]) -> tuple[int, int]:
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = ()
    if (len(shape) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1
                                   for n in shape)):
        raise ValueError(f"known_truth_net: input_shape must be (C, L), two positive whole "
                         f"numbers such as [1, 32] (1-D signals; for images use known_truth); "
                         f"got {input_shape!r}")
    return shape


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (
            high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"known_truth_net: {name} must be a whole number {bound}; got {value!r}")


def _check_float(name: str, value: Any, positive: bool, hint: str) -> None:
    ok = (not isinstance(value, bool) and isinstance(value, (int, float))
          and math.isfinite(value) and (value > 0 if positive else value >= 0))
    if not ok:
        raise ValueError(f"known_truth_net: {name} must be a number {'> 0' if positive else '>= 0'}"
                         f" ({hint}); got {value!r}")


@DATASETS.register("known_truth_net")
def known_truth_net(num_classes: int = 10, input_shape: Sequence[int] = (1, 32),
                    hidden: int = 16, kernel_size: int = 5, temperature: float = 0.15,
                    smoothness: float = 2.0, noise_std: float = 0.1, num_train: int = 2000,
                    num_test: int = 2000, seed: int = 0) -> DataBundle:
    """Synthetic 1-D signals labelled by a fixed random network's softmax (module docstring).

    The network is drawn from ``seed``; the train and test sets are sampled with independent
    generators derived from it. ``temperature`` sets the Bayes accuracy (for the defaults
    0.05: 0.91, 0.15: 0.75, 0.3: 0.57, 1.0: 0.27). The augmentation is a random circular shift,
    which leaves p* unchanged.
    """
    _check_int("num_classes", num_classes, 2)
    _, length = _check_shape(input_shape)
    _check_int("hidden", hidden, 1)
    _check_int("kernel_size", kernel_size, 1, length)
    _check_float("temperature", temperature, True,
                 "smaller is less label noise; 0.15 gives a Bayes accuracy of about 0.75")
    _check_float("smoothness", smoothness, False, "the width of the smoothing kernel in positions")
    _check_float("noise_std", noise_std, False, "the white noise added to the signals")
    _check_int("num_train", num_train, 1)
    _check_int("num_test", num_test, 1)
    _check_int("seed", seed, 0)
    g_task, g_train, g_test = _derived_generators(seed, 3)
    task = NetTruthTask.random(num_classes, input_shape, hidden, kernel_size, temperature,
                               smoothness, noise_std, generator=g_task)
    return DataBundle(
        name="known_truth_net",
        train=ArrayDataset(*task.sample(num_train, g_train)),
        test=ArrayDataset(*task.sample(num_test, g_test)),
        num_classes=num_classes,
        input_shape=task.input_shape,
        augment=RandomRoll(),
        truth=task,
    )
