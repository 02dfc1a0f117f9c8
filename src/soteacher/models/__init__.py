"""Model zoo: small MLPs and 1-D / 2-D CNNs that expose intermediate features.

Every registered factory has the signature
``factory(num_classes, input_shape, <keyword options with defaults>) -> nn.Module``
with no ``**kwargs``, so the config layer can check option names with ``inspect.signature``.
``input_shape`` is per sample: ``(D,)`` or anything for the MLP, ``(C, L)`` for ``cnn1d``,
``(C, H, W)`` for ``cnn2d``.

Every model here is a :class:`FeatureNet` and honours the feature contract used by the
feature-based distillers:

* ``forward(x) -> logits`` of shape ``(B, num_classes)``, with no feature bookkeeping;
* ``forward_features(x, preact=False) -> (logits, {"stem": ..., "stages": [...], "pooled": (B, F)})``
  where ``stem`` is the stem's output, ``stages`` lists each stage's output from shallow to deep
  (taken before the stage's final ReLU when ``preact=True``) and ``head(pooled) == logits``. For
  the CIFAR image models ``[stem, *stages, pooled]`` is, position by position, the feature list
  ``feat`` of RepDistiller's models (``model(x, is_feat=True)``), which the feature distillers
  index as the reference does (``feat[1:-1]``, ``feat[-2]``, ``feat[2]``, ...);
* ``model.stages`` is an ``nn.ModuleList`` of :class:`Stage` and ``model.head`` an ``nn.Linear``.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

from torch import Tensor, nn

from ..registry import Registry

MODELS = Registry("model")


class Stage(nn.Module):
    """One stage: ``body -> ReLU -> post``.

    ``body`` ends right before the stage's final ReLU, so the pre-activation feature (needed by
    activation-boundary distillation) is available without a second pass. ``post`` holds
    whatever follows the activation but should not be part of the reported feature (dropout).
    """

    def __init__(self, body: nn.Module, post: nn.Module | None = None, act: bool = True) -> None:
        super().__init__()
        self.body = body
        # Not in place: forward_features keeps the pre-activation tensor alive. A stage whose
        # output is not activated (pre-activation and linear-bottleneck networks) has no ReLU.
        self.act: nn.Module = nn.ReLU() if act else nn.Identity()
        self.post = post if post is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.post(self.act(self.body(x)))


class FeatureNet(nn.Module):
    """Base class: a stem, a stack of :class:`Stage`, a pooling step and a linear ``head``.

    Subclasses set ``stages``, ``head`` and override ``stem`` / ``pool``. Attributes useful to
    distillers: ``stage_dims`` (channels / width of each stage output), ``feature_dim`` (F),
    ``num_classes`` and ``input_shape``.
    """

    stages: nn.ModuleList
    head: nn.Linear
    #: False where ``stem`` only reshapes the input (MLP, the plain CNNs): ``"stem"`` is then None.
    has_stem = True

    def __init__(self, num_classes: int, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.input_shape = input_shape
        self.stage_dims: list[int] = []

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def stem(self, x: Tensor) -> Tensor:
        return x

    def after_stem(self, h: Tensor) -> Tensor:
        """What follows the reported stem feature before the first stage (e.g. a max-pool)."""
        return h

    def pool(self, h: Tensor) -> Tensor:
        """Last stage output -> (B, F)."""
        return h

    def forward(self, x: Tensor) -> Tensor:
        """(B, *input_shape) -> logits (B, num_classes)."""
        h = self.after_stem(self.stem(x))
        for stage in self.stages:
            h = stage(h)
        return self.head(self.pool(h))

    def forward_features(self, x: Tensor, preact: bool = False) -> tuple[Tensor, dict[str, Any]]:
        """Logits (B, num_classes) and ``{"stem": ..., "stages": [...], "pooled": (B, F)}``.

        Stage outputs are listed shallow to deep; with ``preact=True`` each is taken before the
        stage's final ReLU. Computes exactly what ``forward`` computes.
        """
        stem = self.stem(x)
        h = self.after_stem(stem)
        feats: list[Tensor] = []
        for stage in self.stages:
            pre = stage.body(h)
            post = stage.act(pre)
            feats.append(pre if preact else post)
            h = stage.post(post)
        pooled = self.pool(h)
        return self.head(pooled), {"stem": stem if self.has_stem else None, "stages": feats,
                                   "pooled": pooled}


# ---- argument checks shared by the factories --------------------------------------------------
def as_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """Normalise ``input_shape`` (tuple or list, e.g. from YAML) and check it is positive ints."""
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise ValueError(f"input_shape must be a sequence of ints, got {input_shape!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"input_shape must be non-empty with positive sizes, got {shape}")
    return shape


def check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return int(num_classes)


def as_widths(widths: Sequence[int], what: str = "widths") -> tuple[int, ...]:
    try:
        out = tuple(int(w) for w in widths)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a sequence of positive ints, got {widths!r}") from None
    if not out or any(w <= 0 for w in out):
        raise ValueError(f"{what} must be a non-empty sequence of positive ints, got {widths!r}")
    return out


def create_model(name: str, num_classes: int, input_shape: Sequence[int] | None = None,
                 **options: Any) -> nn.Module:
    """Build a registered model; unknown names raise ``KeyError`` listing the available ones.

    ``input_shape=None`` uses the factory's default (e.g. ``(3, 32, 32)`` for the CIFAR models);
    a factory without one (``mlp``, ``cnn1d``, ...) then raises ``ValueError``.
    """
    factory = MODELS.get(name)
    if input_shape is None:
        param = inspect.signature(factory).parameters.get("input_shape")
        if param is None or param.default is inspect.Parameter.empty:
            raise ValueError(f"model {name!r} has no default input_shape; pass one, e.g. "
                             f"input_shape=(1, 40)")
        input_shape = param.default
    return factory(num_classes=num_classes, input_shape=as_shape(input_shape), **options)


def list_models() -> list[str]:
    """Names of every registered model, sorted; pass one to :func:`create_model`."""
    return MODELS.names()


# Imported last: the submodules register themselves into MODELS defined above.
from . import mobilenetv2, resnet_cifar, resnet_imagenet, shufflenet, vgg, wrn  # noqa: E402,F401
from .cnn import ConvNet, cnn1d, cnn2d  # noqa: E402
from .mlp import MLP, mlp  # noqa: E402

__all__ = ["MODELS", "ConvNet", "FeatureNet", "MLP", "Stage", "cnn1d", "cnn2d", "create_model",
           "list_models", "mlp"]
