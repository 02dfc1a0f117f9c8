"""Activation-boundary distillation (Heo, Lee, Yun & Choi, AAAI 2019, "Knowledge Transfer via
Distillation of Activation Boundaries Formed by Hidden Neurons")."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import Tensor, nn

from .common import (FeatureDistiller, check_positive, check_reduction, check_weight,
                     conv_regressor, match_spatial)

#: RepDistiller divides each AB term by the batch size and then by 1000 / 3.
REFERENCE_SCALE = 3.0 / 1000.0


def ab_loss(student_preact: Tensor, teacher_preact: Tensor, margin: float = 1.0,
            reduction: str = "mean") -> Tensor:
    """Alternative (squared hinge) activation-transfer loss on pre-activations of equal shape.

    Element-wise: ``(s + m)^2`` where the teacher neuron is off (``t <= 0``) but ``s > -m``;
    ``(s - m)^2`` where the teacher neuron is on (``t > 0``) but ``s <= m``; 0 otherwise. Per
    sample the *sum* over elements (the paper's and RepDistiller's form), so ``"mean"`` is the
    sum over everything divided by the batch size.
    """
    if student_preact.shape != teacher_preact.shape:
        raise ValueError(f"shapes differ: student {tuple(student_preact.shape)}, "
                         f"teacher {tuple(teacher_preact.shape)}")
    s, on = student_preact, teacher_preact > 0
    off_violation = (s + margin).pow(2) * ((s > -margin) & ~on)
    on_violation = (s - margin).pow(2) * ((s <= margin) & on)
    return check_reduction((off_violation + on_violation).flatten(1).sum(dim=1), reduction)


def ab_connector(s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> nn.Module:
    """RepDistiller's AB ``Connector`` for one pair: the identity where the student feature has
    the teacher's channels and size, else :func:`~.common.conv_regressor` without ReLU
    (one convolution chosen by the sizes, then batch norm)."""
    if s_shape[0] == t_shape[0] and s_shape[1:2] == t_shape[1:2]:
        return nn.Identity()
    return conv_regressor(s_shape, t_shape, relu=False)


class AB(FeatureDistiller):
    """Activation-boundary transfer on pre-activation features.

    For every stage pair (``feat[1:-1]`` of each network, paired from the shallowest) a
    connector (:func:`ab_connector`: the identity where channels and size agree, else a
    convolution chosen by the sizes plus batch norm, RepDistiller's ``Connector``) maps the
    student's pre-activation to the teacher's; pair ``i`` of ``n`` is weighted ``2^(i - n + 1)``
    (the deepest 1) and every term is scaled by RepDistiller's 3/1000. Sizes the connector cannot
    bridge are matched by average pooling the larger map; AB compares neurons one by one, so it
    needs the same kind of feature on both sides (a CNN/MLP pair raises a ``ValueError``).

    Preliminary stage: in the paper and in RepDistiller the AB loss *initialises* the student:
    the step returns only ``{"ab_init": init_weight * AB}``, which trains the student's feature
    modules (stem and stages, not the classifier) and the connectors. By default
    (``init_stage="separate"``, RepDistiller's ``init``) this takes ``init_epochs`` (default 30)
    extra epochs before the main schedule, with its own SGD optimiser over exactly those modules
    at the constant learning rate ``init_lr`` (default: the main run's initial rate), the rest of
    the student in eval mode; afterwards the connectors stay fixed (eval mode, left out of the
    main optimiser), as in the reference. ``init_stage="in_run"`` uses the first ``init_epochs``
    epochs of the run instead (default: an eighth of it, see :mod:`.common`); ``init_epochs=0``
    skips the stage.

    After the preliminary stage the reference trains with the classification loss alone
    (RepDistiller sets ``loss_kd = 0`` for AB, so its script's ``-b 1`` has no effect): hence
    ``ab_weight`` (the weight of an ``"ab"`` term during distillation) defaults to 0, and the
    term is then left out. ``ab_weight=1`` keeps it, the variant the reference leaves open.

    Defaults: ``init_weight`` 1, ``ab_weight`` 0, ``margin`` 1, ``ce_weight`` 1, ``kd_weight``
    0 (T = 4), ``init_epochs`` None (30), ``init_stage`` "separate", ``init_lr`` None.
    """

    name = "ab"
    preact = True
    has_init_stage = True

    def __init__(self, teacher: nn.Module, student: nn.Module | None = None,
                 init_weight: float = 1.0, ab_weight: float = 0.0, margin: float = 1.0,
                 init_epochs: int | None = None, init_stage: str = "separate",
                 init_lr: float | None = None, ce_weight: float = 1.0,
                 kd_weight: float = 0.0, temperature: float = 4.0,
                 teacher_layers: Sequence[str] | Mapping[str, Any] | None = None,
                 student_layers: Sequence[str] | Mapping[str, Any] | None = None,
                 input_shape: Sequence[int] | None = None) -> None:
        super().__init__(teacher, student, ce_weight=ce_weight, kd_weight=kd_weight,
                         temperature=temperature, teacher_layers=teacher_layers,
                         student_layers=student_layers, input_shape=input_shape,
                         init_epochs=init_epochs, init_stage=init_stage, init_lr=init_lr)
        self.ab_weight = check_weight("ab_weight", ab_weight)
        self.init_weight = check_weight("init_weight", init_weight)
        self.margin = check_positive("margin", margin)
        self.need_stages()
        self.connectors = nn.ModuleList()
        for ti, si in self.pairs:
            t_shape, s_shape = self.t_shapes.stages[ti], self.s_shapes.stages[si]
            self.pair_layout(t_shape, s_shape)
            self.connectors.append(ab_connector(s_shape, t_shape))
        n = len(self.pairs)
        self.pair_weights = [2.0 ** (i - n + 1) for i in range(n)]

    def ab_total(self, s_feats, t_feats) -> Tensor:
        total = 0.0
        for (ti, si), connector, w in zip(self.pairs, self.connectors, self.pair_weights):
            t, s = match_spatial(t_feats["stages"][ti], s_feats["stages"][si])
            total = total + w * REFERENCE_SCALE * ab_loss(connector(s), t, self.margin)
        return total

    def init_terms(self, s_feats, t_feats) -> dict[str, Tensor]:
        return {"ab_init": self.init_weight * self.ab_total(s_feats, t_feats)}

    def init_modules(self, model: nn.Module) -> list[nn.Module]:
        return [self.connectors, *super().init_modules(model)]

    def frozen_after_init(self) -> list[nn.Module]:
        return [self.connectors]

    def uses_teacher(self) -> bool:
        return self.ab_weight > 0

    def distill_terms(self, s_feats, t_feats, y, index) -> dict[str, Tensor]:
        if self.ab_weight == 0:
            return {}
        return {"ab": self.ab_weight * self.ab_total(s_feats, t_feats)}
