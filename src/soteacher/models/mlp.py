"""Multi-layer perceptron on flattened inputs: ``mlp`` and its presets."""

from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor, nn

from . import MODELS, FeatureNet, Stage, as_shape, as_widths, check_num_classes


class MLP(FeatureNet):
    """Flatten -> [Linear -> BN1d -> ReLU (-> Dropout)] per hidden width -> Linear head.

    Each hidden layer is one stage; its reported feature is the (B, width) activation before
    dropout, so features are deterministic in eval mode and comparable across models.
    """

    has_stem = False

    def __init__(self, num_classes: int, input_shape: tuple[int, ...],
                 widths: Sequence[int] = (256, 256), batch_norm: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__(num_classes, input_shape)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        stages = []
        d_in = math.prod(input_shape)
        for w in widths:
            # The linear bias is redundant before batch norm (BN has its own shift).
            layers: list[nn.Module] = [nn.Linear(d_in, w, bias=not batch_norm)]
            if batch_norm:
                layers.append(nn.BatchNorm1d(w))
            post = nn.Dropout(dropout) if dropout > 0 else None
            stages.append(Stage(nn.Sequential(*layers), post))
            d_in = w
        self.stages = nn.ModuleList(stages)
        self.stage_dims = list(widths)
        self.head = nn.Linear(d_in, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # Kaiming for layers followed by ReLU; the head keeps PyTorch's default init.
        for stage in self.stages:
            for m in stage.modules():
                if isinstance(m, nn.Linear):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.BatchNorm1d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    def stem(self, x: Tensor) -> Tensor:
        return x.flatten(1)


def _build(num_classes: int, input_shape: Sequence[int], widths: Sequence[int],
           batch_norm: bool, dropout: float) -> MLP:
    return MLP(check_num_classes(num_classes), as_shape(input_shape), as_widths(widths),
               bool(batch_norm), float(dropout))


@MODELS.register("mlp")
def mlp(num_classes: int, input_shape: tuple[int, ...], widths: Sequence[int] = (256, 256),
        batch_norm: bool = True, dropout: float = 0.0) -> MLP:
    """MLP on flattened inputs of any shape; one stage per entry of ``widths``."""
    return _build(num_classes, input_shape, widths, batch_norm, dropout)


@MODELS.register("mlp_small")
def mlp_small(num_classes: int, input_shape: tuple[int, ...], batch_norm: bool = True,
              dropout: float = 0.0) -> MLP:
    """``mlp`` with one hidden layer of 64 units."""
    return _build(num_classes, input_shape, (64,), batch_norm, dropout)


@MODELS.register("mlp_large")
def mlp_large(num_classes: int, input_shape: tuple[int, ...], batch_norm: bool = True,
              dropout: float = 0.0) -> MLP:
    """``mlp`` with hidden widths (512, 512)."""
    return _build(num_classes, input_shape, (512, 512), batch_norm, dropout)
