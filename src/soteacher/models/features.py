"""Intermediate features of any model, in the shape the feature-based distillers expect.

Registered models (:class:`~soteacher.models.FeatureNet`) expose
``forward_features(x, preact=False) -> (logits, {"stages": [...], "pooled": (B, F)})``. An
arbitrary user ``nn.Module`` does not; for it, features are taken by module name with forward
hooks that live only for the duration of one call, so the model itself is never changed:

* ``layers``: names of submodules (as in ``model.named_modules()``, e.g. ``"layer1"`` or
  ``"features.3"``) whose *outputs* become ``stages``, listed shallow to deep;
* ``pooled``: name of the submodule whose *input* is the pooled feature (typically the final
  classifier); by default the last ``nn.Linear`` of the model. The input is flattened to (B, F).

With hooks, ``preact`` cannot be honoured automatically: to distil pre-activation features (as
activation-boundary distillation does) name the module *before* the activation (e.g. the
batch norm preceding a ReLU). Hooked outputs are cloned, so a later in-place operation (such as
``nn.ReLU(inplace=True)``) cannot change them. A module called several times in one forward
pass reports its last call.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["FeatureExtractor", "get_features", "layer_spec"]


def layer_spec(layers: Sequence[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """Normalise a user ``layers`` option to ``{"layers": [...] | None, "pooled": str | None}``.

    Accepted forms: ``None`` (use ``forward_features`` if the model has it), a list of module
    names (the stages), or a mapping ``{"stages": [...], "pooled": "fc"}`` (both keys optional).
    """
    if layers is None:
        return {"layers": None, "pooled": None}
    if isinstance(layers, str):
        raise ValueError(f"layers must be a list of module names, got the string {layers!r}; "
                         f"write [{layers!r}]")
    if isinstance(layers, Mapping):
        unknown = sorted(set(layers) - {"stages", "pooled"})
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in a layers mapping; use 'stages' and "
                             f"'pooled'")
        stages = layers.get("stages")
        pooled = layers.get("pooled")
        if pooled is not None and not isinstance(pooled, str):
            raise ValueError(f"'pooled' must be a module name, got {pooled!r}")
        return {"layers": None if stages is None else layer_spec(stages)["layers"],
                "pooled": pooled}
    names = list(layers)
    if not all(isinstance(n, str) for n in names):
        raise ValueError(f"layers must be module names (strings), got {names!r}")
    return {"layers": names, "pooled": None}


class FeatureExtractor:
    """Callable ``extractor(x, preact=False) -> (logits, {"stages": [...], "pooled": ...})``.

    Uses ``model.forward_features`` when the model has it and neither ``layers`` nor ``pooled``
    is given; otherwise forward hooks on the named submodules (see the module docstring). Module
    names are checked here, so a typo fails at construction with the list of valid names.
    ``"pooled"`` is ``None`` when the model has no ``nn.Linear`` and no ``pooled`` name is given.
    This is a plain object, not an ``nn.Module``: it adds nothing to any ``state_dict``.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None,
                 pooled: str | None = None) -> None:
        self.model = model
        self.layers = list(layers) if layers is not None else None
        self.pooled = pooled
        self.uses_hooks = (layers is not None or pooled is not None
                           or not callable(getattr(model, "forward_features", None)))
        if not self.uses_hooks:
            return
        modules = dict(model.named_modules())
        wanted = list(self.layers or []) + ([pooled] if pooled is not None else [])
        missing = [n for n in wanted if n not in modules or n == ""]
        if missing:
            valid = [n for n in modules if n]
            shown = ", ".join(valid[:40]) + (", ..." if len(valid) > 40 else "")
            raise KeyError(f"no submodule named {', '.join(map(repr, missing))} in "
                           f"{type(model).__name__}; valid names: {shown or '(none)'}")
        if self.pooled is None:
            linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            self.pooled = linears[-1] if linears else None

    def __call__(self, x: Tensor, preact: bool = False) -> tuple[Tensor, dict[str, Any]]:
        if not self.uses_hooks:
            return self.model.forward_features(x, preact=preact)
        modules = dict(self.model.named_modules())
        outputs: dict[str, Tensor] = {}
        pooled: list[Tensor] = []
        handles = []

        def keep_output(name: str):
            def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
                if isinstance(output, (tuple, list)):
                    output = output[0]
                if not isinstance(output, Tensor):
                    raise TypeError(f"module {name!r} returned {type(output).__name__}, "
                                    f"not a tensor; pick another layer")
                outputs[name] = output.clone()
            return hook

        def keep_input(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            pooled[:] = [inputs[0].flatten(1).clone()]

        try:
            for name in self.layers or []:
                handles.append(modules[name].register_forward_hook(keep_output(name)))
            if self.pooled is not None:
                handles.append(modules[self.pooled].register_forward_pre_hook(keep_input))
            logits = self.model(x)
        finally:
            for h in handles:
                h.remove()
        not_run = [n for n in self.layers or [] if n not in outputs]
        if not_run:
            raise RuntimeError(f"module(s) {', '.join(map(repr, not_run))} did not run during "
                               f"the forward pass of {type(self.model).__name__}")
        if self.pooled is not None and not pooled:
            raise RuntimeError(f"module {self.pooled!r} (whose input is the pooled feature) did "
                               f"not run during the forward pass")
        return logits, {"stages": [outputs[n] for n in self.layers or []],
                        "pooled": pooled[0] if pooled else None}


def get_features(model: nn.Module, x: Tensor, preact: bool = False,
                 layers: Sequence[str] | None = None,
                 pooled: str | None = None) -> tuple[Tensor, dict[str, Any]]:
    """Logits and ``{"stages": [...], "pooled": (B, F)}`` of ``model`` on ``x``.

    One forward pass. See :class:`FeatureExtractor` for ``layers`` and ``pooled``.
    """
    return FeatureExtractor(model, layers, pooled)(x, preact=preact)


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU if it has none)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()
