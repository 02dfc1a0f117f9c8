"""Temperature scaling of a trained teacher (Guo et al., ICML 2017).

One scalar ``T`` is fitted after training by minimising the negative log-likelihood of held-out
labels under ``softmax(logits / T)``; the teacher's logits are then divided by ``T`` wherever it
is used. The fitted value travels in the weights file's spec (``spec["temperature"]``, a plain
float, so the file stays loadable with ``weights_only=True``); the weights themselves are those
of the plain model, and ``load_model`` wraps it in :class:`TemperatureScaled`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["TemperatureScaled", "fit_temperature", "separates", "wrap_for_spec"]


def _nll_slope(logits: Tensor, y: Tensor, beta: float) -> float:
    """d/d beta of mean NLL(softmax(beta * logits)): mean_i (E_p[z_i] - z_i,y), increasing in
    beta because the NLL is convex in beta."""
    p = (beta * logits).softmax(dim=1)
    return float(((p * logits).sum(dim=1) - logits.gather(1, y[:, None])[:, 0]).mean())


def fit_temperature(logits: Tensor, y: Tensor, lo: float = 1e-3, hi: float = 1e3,
                    iters: int = 200) -> float:
    """The temperature ``T`` in ``[lo, hi]`` minimising the mean NLL of labels ``y`` (N,) under
    ``softmax(logits / T)`` (N, C).

    The NLL is convex in ``beta = 1 / T``, so the minimiser is the root of its (increasing)
    derivative, found by bisection on ``log beta``; deterministic, float64. A root outside the
    bracket gives the nearer end. When every label already has its sample's largest logit, the
    NLL falls all the way to ``T -> 0`` and there is no minimiser: that gives ``lo``, a value that
    says nothing about calibration (:func:`separates` tells this case apart).
    """
    z = torch.as_tensor(logits).detach().to(torch.float64).cpu()
    y = torch.as_tensor(y).detach().long().cpu()
    if z.dim() != 2 or len(z) == 0 or y.shape != (len(z),):
        raise ValueError(f"expected logits (N, C) and labels (N,), got {tuple(z.shape)} and "
                         f"{tuple(y.shape)}")
    if not bool(torch.isfinite(z).all()):
        raise ValueError("cannot fit a temperature to non-finite logits")
    a, b = math.log(1.0 / hi), math.log(1.0 / lo)        # log beta bracket
    if _nll_slope(z, y, math.exp(a)) >= 0:
        return hi
    if _nll_slope(z, y, math.exp(b)) <= 0:
        return lo
    for _ in range(iters):
        mid = 0.5 * (a + b)
        if _nll_slope(z, y, math.exp(mid)) < 0:
            a = mid
        else:
            b = mid
        if b - a < 1e-12:
            break
    return 1.0 / math.exp(0.5 * (a + b))


def separates(logits: Tensor, y: Tensor) -> bool:
    """True when every sample's label has its strictly largest logit: the mean NLL then keeps
    falling as the temperature goes to 0, and temperature scaling has nothing to fit."""
    z = torch.as_tensor(logits).detach().to(torch.float64).cpu()
    y = torch.as_tensor(y).detach().long().cpu()
    zy = z.gather(1, y[:, None])
    others = z.scatter(1, y[:, None], float("-inf"))
    return bool((zy[:, 0] > others.max(dim=1).values).all())


class TemperatureScaled(nn.Module):
    """``model`` with its logits divided by a fixed ``temperature`` (a buffer).

    ``forward_features`` (when the inner model has it) scales the logits and leaves the features
    alone; any other attribute not found here (``stages``, ``head``, ``input_shape``, ...) is the
    inner model's.
    """

    def __init__(self, model: nn.Module, temperature: float) -> None:
        super().__init__()
        t = float(temperature)
        if not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.model = model
        self.register_buffer("temperature", torch.tensor(t))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x) / self.temperature

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        inner = self.__dict__.get("_modules", {}).get("model")
        if inner is None:
            raise AttributeError(name)
        if name == "forward_features":
            inner_ff = getattr(inner, "forward_features")   # AttributeError if it has none

            def forward_features(x: Tensor, preact: bool = False):
                logits, feats = inner_ff(x, preact=preact)
                return logits / self.temperature, feats

            return forward_features
        return getattr(inner, name)

    def extra_repr(self) -> str:
        return f"temperature={float(self.temperature):.4g}"


def wrap_for_spec(model: nn.Module, spec: dict[str, Any] | None) -> nn.Module:
    """``model`` wrapped as its weights file's spec says (a fitted temperature), else itself."""
    t = (spec or {}).get("temperature")
    return TemperatureScaled(model, t) if t is not None else model
