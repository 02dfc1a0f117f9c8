"""Shared machinery of the feature-based distillers.

:class:`FeatureDistiller` is the base of every method that compares intermediate features. It

* reads features of any model through :func:`soteacher.models.features.get_features`
  (``forward_features`` of registered models, or forward hooks on the modules named by the
  ``teacher_layers`` / ``student_layers`` options);
* infers every feature shape at construction by running teacher and student once, in eval mode
  and without gradients, on a zero dummy batch of ``input_shape`` (an option; by default the
  ``input_shape`` attribute that registered models carry), so that learnable connectors exist
  before the optimiser is built and a mismatch between the two networks fails early;
* returns ``ce_weight * CE + kd_weight * KD(T) + <the method's own weighted terms>``; the KD term
  is left out while ``kd_weight`` is 0, its default for every feature method (RepDistiller runs
  them with ``-r 1 -a 0``);
* runs the preliminary stage of AB, FSP and FT as their reference code does (RepDistiller's
  ``init``): by default (``init_stage="separate"``) ``init_epochs`` (default 30) *extra* epochs
  before the main schedule, which then runs in full; only the method's preliminary loss is
  trained, with its own SGD optimiser at a constant learning rate (``init_lr``; by default the
  main run's, 0.01 for FT with a CIFAR ResNet/WRN student), over the modules the reference
  trains; the student is in eval mode except those modules (the trainer runs the stage that
  :meth:`FeatureDistiller.preliminary_stage` describes). ``init_stage="in_run"`` uses the first
  ``init_epochs`` epochs of the run itself with the run's optimiser and schedule (default
  ``num_epochs // 8``, RepDistiller's 30 of 240, at least 1 in runs of two epochs or more);
  ``init_epochs=0`` skips the stage in both.

Feature positions. A registered model reports ``stem``, ``stages`` and ``pooled``; for the CIFAR
image models ``[stem, *stages, pooled]`` is, position by position, RepDistiller's feature list
``feat``, and each method reads the positions the reference reads: ``stages`` is ``feat[1:-1]``
(AT, NST, VID, AB), ``stages[-1]`` is ``feat[-2]`` (SP, FT), ``[stem, *stages]`` is ``feat[:-1]``
(FSP) and is what FitNet's ``hint_layer`` indexes (``feat[hint_layer]``), ``pooled`` is
``feat[-1]`` (CC, RKD, PKT, CRD). Models whose stem only reshapes the input (MLP, the plain CNNs)
and hooked user modules have no ``stem`` feature.

Stage pairing. When teacher and student report different numbers of stages, they are paired
from the shallowest, as the reference pairs its lists (``zip``): the first
``k = min(n_teacher, n_student)`` stages of each, in order. Pick other stages with
``teacher_layers`` / ``student_layers`` (for registered models too, e.g.
``["stages.0", "stages.2"]``).

Spatial sizes. Features are ``(B, C, *spatial)``: ``(B, C)`` for an MLP, ``(B, C, L)`` for a 1-D
CNN, ``(B, C, H, W)`` for a 2-D CNN. Two paired maps with the same number of spatial axes but
different sizes are compared after adaptive average pooling of the larger to the smaller size
(RepDistiller does the same for AT, VID and NST). Maps with different numbers of spatial axes
(a CNN teacher and an MLP student) are globally average pooled to vectors by FitNet and VID;
AT, NST, AB, FT and FSP cannot pair them and raise a ``ValueError`` at construction. SP, CC,
RKD, PKT and CRD compare batch relations or pooled features and work across architectures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import FeatureNet
from ..models.features import FeatureExtractor, layer_spec, model_device, model_dtype
from ..objective import PreliminaryStage, StepOutput
from .base import Distiller
from .kd import kd_loss

#: Methods that can distil between a CNN teacher and an MLP student (named in error messages).
CROSS_ARCHITECTURE = ("kd", "dkd", "dist", "fitnet", "sp", "cc", "vid", "rkd", "pkt", "crd")


def check_weight(name: str, value: float) -> float:
    """``value`` as a float if it is finite and >= 0, else a ``ValueError``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def check_positive(name: str, value: float) -> float:
    v = check_weight(name, value)
    if v <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return v


def check_reduction(per_sample: Tensor, reduction: str) -> Tensor:
    """Reduce a per-sample loss (B,): ``"mean"`` -> scalar, ``"sum"`` -> scalar, ``"none"``."""
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise ValueError(f"unknown reduction {reduction!r}; use 'mean', 'sum' or 'none'")


# ---- shapes ------------------------------------------------------------------------------------
def spatial_rank(shape: Sequence[int]) -> int:
    """Number of spatial axes of a per-sample feature shape ``(C, *spatial)``."""
    return len(shape) - 1


def global_pool(x: Tensor) -> Tensor:
    """(B, C, *spatial) -> (B, C) by averaging over the spatial axes; (B, C) is returned as is."""
    return x.flatten(2).mean(dim=2) if x.dim() > 2 else x


def adaptive_pool(x: Tensor, size: Sequence[int]) -> Tensor:
    """Adaptive average pooling of (B, C, *spatial) to ``size`` (1 to 3 spatial axes)."""
    size = tuple(size)
    if tuple(x.shape[2:]) == size:
        return x
    fn = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}.get(len(size))
    if fn is None:
        raise ValueError(f"cannot pool a feature with {len(size)} spatial axes")
    return fn(x, size if len(size) > 1 else size[0])


def match_spatial(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Pool the larger of two maps with the same number of spatial axes to the common size."""
    common = tuple(min(p, q) for p, q in zip(a.shape[2:], b.shape[2:]))
    return adaptive_pool(a, common), adaptive_pool(b, common)


@dataclass
class FeatureShapes:
    """Per-sample shapes of one model's features: each stage ``(C, *spatial)``, pooled ``F``,
    and the stem's output (None for models without a stem feature)."""

    stages: list[tuple[int, ...]]
    pooled: int | None
    num_classes: int
    stem: tuple[int, ...] | None = None

    @property
    def hint_list(self) -> list[tuple[int, ...]]:
        """``[stem, *stages]`` (RepDistiller's ``feat[:-1]``), or the stages without a stem."""
        return ([self.stem] if self.stem is not None else []) + list(self.stages)


def resolve_input_shape(input_shape: Sequence[int] | None, *models: nn.Module | None,
                        method: str = "this distiller") -> tuple[int, ...]:
    if input_shape is None:
        for m in models:
            found = getattr(m, "input_shape", None)
            if found is not None:
                input_shape = found
                break
    if input_shape is None:
        raise ValueError(f"{method} must know the shape of one input sample to build its "
                         f"learnable parts; pass the option input_shape (e.g. [1, 40])")
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise ValueError(f"input_shape must be a sequence of ints, got {input_shape!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"input_shape must be non-empty with positive sizes, got {shape}")
    return shape


@torch.no_grad()
def probe_shapes(extractor: FeatureExtractor, input_shape: tuple[int, ...],
                 preact: bool) -> FeatureShapes:
    """Run the model once in eval mode on two zero samples and record its feature shapes.

    Eval mode and ``no_grad`` leave batch-norm statistics and parameters untouched; the model's
    train/eval mode is restored afterwards.
    """
    model = extractor.model
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(2, *input_shape, device=model_device(model), dtype=model_dtype(model))
        logits, feats = extractor(x, preact=preact)
    finally:
        model.train(was_training)
    pooled, stem = feats.get("pooled"), feats.get("stem")
    return FeatureShapes([tuple(f.shape[1:]) for f in feats["stages"]],
                         None if pooled is None else int(pooled.shape[1]),
                         int(logits.shape[-1]),
                         None if stem is None else tuple(stem.shape[1:]))


def hint_list(feats: Mapping[str, Any]) -> list[Tensor]:
    """``[stem, *stages]`` of a feature dict (RepDistiller's ``feat[:-1]``); the stages alone
    when the model reports no stem."""
    stem = feats.get("stem")
    return ([stem] if stem is not None else []) + list(feats["stages"])


def aligned_pairs(n_teacher: int, n_student: int) -> list[tuple[int, int]]:
    """Stage index pairs ``(teacher, student)``: the first ``min(n_t, n_s)`` of each, in order
    (the reference's ``zip`` of its two feature lists)."""
    return [(j, j) for j in range(min(n_teacher, n_student))]


# ---- connectors --------------------------------------------------------------------------------
def conv(rank: int, c_in: int, c_out: int, kernel_size: int = 1) -> nn.Module:
    """A 'same'-padded convolution over ``rank`` spatial axes (``nn.Linear`` for rank 0)."""
    if rank == 0:
        return nn.Linear(c_in, c_out)
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}.get(rank)
    if cls is None:
        raise ValueError(f"features with {rank} spatial axes are not supported")
    return cls(c_in, c_out, kernel_size, padding=kernel_size // 2)


def conv_regressor(s_shape: tuple[int, ...], t_shape: tuple[int, ...],
                   relu: bool = True) -> nn.Module:
    """The learnable map from a student feature ``(C_s, *spatial)`` to a teacher feature's
    ``(C_t, *spatial)``: one convolution chosen by the spatial sizes, then batch norm (and ReLU
    when ``relu``), RepDistiller's ``ConvReg`` (FitNet; AB's connectors without the ReLU):

    * student map twice the teacher's size: 3x3 convolution with stride 2, padding 1;
    * student map half the teacher's size: 4x4 transposed convolution with stride 2, padding 1;
    * otherwise (student at least the teacher's size): a ``(1 + H_s - H_t) x (1 + W_s - W_t)``
      convolution without padding, so ``1x1`` when the sizes agree.

    All convolutions have a bias. Cases the reference cannot build get a named fallback: vectors
    (rank 0) a linear layer; a student map smaller than the teacher's (but not half of it) a
    1-wide convolution after the *teacher* map is pooled to the student's size by
    :meth:`FeatureDistiller.align`. The size rule is taken on the first spatial axis (the
    reference's ``H``); 1-D maps use 1-D convolutions.
    """
    rank = spatial_rank(s_shape)
    c_s, c_t = s_shape[0], t_shape[0]
    layers: list[nn.Module]
    if rank == 0 or spatial_rank(t_shape) != rank:
        layers = [nn.Linear(c_s, c_t)]
        rank = 0
    else:
        cls = {1: nn.Conv1d, 2: nn.Conv2d}.get(rank)
        tcls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d}.get(rank)
        if cls is None or tcls is None:
            raise ValueError(f"features with {rank} spatial axes are not supported")
        hs, ht = s_shape[1], t_shape[1]
        if hs == 2 * ht:
            layers = [cls(c_s, c_t, 3, stride=2, padding=1)]
        elif 2 * hs == ht:
            layers = [tcls(c_s, c_t, 4, stride=2, padding=1)]
        elif hs >= ht:
            kernel = tuple(1 + a - b for a, b in zip(s_shape[1:], t_shape[1:]))
            layers = [cls(c_s, c_t, kernel if all(k > 0 for k in kernel) else 1)]
        else:
            layers = [cls(c_s, c_t, 1)]
    layers.append(batch_norm(rank, c_t))
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def regressed_size(s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> bool:
    """Whether :func:`conv_regressor` brings the student map to the teacher map's spatial size
    (else the teacher map is pooled to the student's size before comparing)."""
    if spatial_rank(s_shape) != spatial_rank(t_shape) or spatial_rank(s_shape) == 0:
        return False
    hs, ht = s_shape[1], t_shape[1]
    return hs == 2 * ht or 2 * hs == ht or all(a >= b for a, b in zip(s_shape[1:], t_shape[1:]))


def batch_norm(rank: int, channels: int) -> nn.Module:
    return {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[rank](channels)


def channel_view(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-channel vector (C,) to broadcast against ``like`` (B, C, *spatial)."""
    return v.view(1, -1, *([1] * (like.dim() - 2)))


# ---- the preliminary stage ----------------------------------------------------------------------
#: how the preliminary stage of AB, FSP and FT runs (see the module docstring)
INIT_STAGES = ("separate", "in_run")


def feature_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that compute its features: for a registered model
    (:class:`~soteacher.models.FeatureNet`) its children up to and including ``stages`` (stem
    and stages; not what follows the last stage, such as WRN's final batch norm, MobileNetV2's
    last convolution, or the ``head``), the modules RepDistiller's ``get_feat_modules`` lists;
    for any other model the whole model (the preliminary losses give no gradient to its
    classifier, so its weights stay unchanged).
    """
    if isinstance(model, FeatureNet):
        children = list(model.named_children())
        names = [n for n, _ in children]
        if "stages" in names:
            return [m for _, m in children[:names.index("stages") + 1]]
    return [model]


# ---- the base class ------------------------------------------------------------------------------
class FeatureDistiller(Distiller):
    """Base class of the feature-based distillers (see the module docstring).

    Subclasses set ``name`` (the registry name, for messages), optionally ``preact = True`` and
    ``has_init_stage = True``, build their learnable parts from ``self.t_shapes`` /
    ``self.s_shapes`` (and ``self.pairs``) in ``__init__``, and implement :meth:`distill_terms`
    (and :meth:`init_terms` when they have a preliminary stage).
    """

    name = "feature"
    preact = False
    has_init_stage = False
    #: RepDistiller's ``--init_epochs``: preliminary epochs before the main schedule.
    reference_init_epochs = 30
    #: fraction of the run used by an ``in_run`` preliminary stage when ``init_epochs`` is None:
    #: RepDistiller runs 30 preliminary epochs before a 240-epoch distillation.
    init_fraction = 30 / 240

    def __init__(self, teacher: nn.Module, student: nn.Module | None, *, ce_weight: float,
                 kd_weight: float, temperature: float,
                 teacher_layers: Sequence[str] | Mapping[str, Any] | None,
                 student_layers: Sequence[str] | Mapping[str, Any] | None,
                 input_shape: Sequence[int] | None, init_epochs: int | None = None,
                 init_stage: str = "separate", init_lr: float | None = None) -> None:
        super().__init__(teacher)
        self.ce_weight = check_weight("ce_weight", ce_weight)
        self.kd_weight = check_weight("kd_weight", kd_weight)
        self.temperature = check_positive("temperature", temperature)
        self.set_init_stage_options(init_epochs, init_stage, init_lr)
        if student is None:
            raise ValueError(f"distiller {self.name!r} needs the student model to infer feature "
                             f"shapes; pass student= to build_distiller")
        self.teacher_spec = layer_spec(teacher_layers)
        self.student_spec = layer_spec(student_layers)
        t_ext = FeatureExtractor(teacher, **self.teacher_spec)
        s_ext = FeatureExtractor(student, **self.student_spec)
        shape = resolve_input_shape(input_shape, student, teacher, method=f"distiller {self.name!r}")
        self.t_shapes = probe_shapes(t_ext, shape, self.preact)
        self.s_shapes = probe_shapes(s_ext, shape, self.preact)
        self.pairs = aligned_pairs(len(self.t_shapes.stages), len(self.s_shapes.stages))

    # ---- helpers for subclasses --------------------------------------------------------------
    def need_stages(self, minimum: int = 1) -> None:
        """Raise unless both models report at least ``minimum`` stages."""
        for who, shapes, opt in (("teacher", self.t_shapes, "teacher_layers"),
                                 ("student", self.s_shapes, "student_layers")):
            if len(shapes.stages) < minimum:
                raise ValueError(f"distiller {self.name!r} needs at least {minimum} intermediate "
                                 f"feature(s) of the {who}, which reports {len(shapes.stages)}; "
                                 f"name them with the option {opt} (module names)")

    def need_pooled(self) -> None:
        for who, shapes, opt in (("teacher", self.t_shapes, "teacher_layers"),
                                 ("student", self.s_shapes, "student_layers")):
            if shapes.pooled is None:
                raise ValueError(f"distiller {self.name!r} needs the pooled feature of the {who}, "
                                 f"which has no nn.Linear; name the classifier with "
                                 f"{opt}={{'pooled': '<module name>'}}")

    def pair_layout(self, t_shape: tuple[int, ...], s_shape: tuple[int, ...],
                    allow_global_pool: bool = False,
                    min_rank: int = 0) -> tuple[int, tuple[int, ...]]:
        """Spatial rank and common spatial size at which a teacher/student pair is compared.

        Raises a ``ValueError`` naming the fix when the pair cannot be compared.
        """
        rt, rs = spatial_rank(t_shape), spatial_rank(s_shape)
        if rt != rs:
            if allow_global_pool:
                return 0, ()
            raise ValueError(
                f"distiller {self.name!r} compares feature maps position by position and cannot "
                f"pair the teacher feature of shape {t_shape} with the student feature of shape "
                f"{s_shape} (different numbers of spatial axes, e.g. a CNN teacher and an MLP "
                f"student); use a method that works across architectures "
                f"({', '.join(CROSS_ARCHITECTURE)}) or pick comparable layers with "
                f"teacher_layers / student_layers")
        if rt < min_rank:
            raise ValueError(f"distiller {self.name!r} needs feature maps with spatial axes "
                             f"(CNN features), got teacher {t_shape} and student {s_shape}; use a "
                             f"method that works on vectors ({', '.join(CROSS_ARCHITECTURE)})")
        return rt, tuple(min(p, q) for p, q in zip(t_shape[1:], s_shape[1:]))

    @staticmethod
    def align(t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """Bring a teacher/student feature pair to a common layout (see :meth:`pair_layout`)."""
        if t.dim() != s.dim():
            return global_pool(t), global_pool(s)
        return match_spatial(t, s)

    # ---- the preliminary stage -----------------------------------------------------------------
    def set_init_stage_options(self, init_epochs: int | None, init_stage: str,
                               init_lr: float | None) -> None:
        """Check and store the preliminary-stage options (see the module docstring)."""
        if init_epochs is not None and (isinstance(init_epochs, bool) or
                                        not isinstance(init_epochs, (int, float)) or
                                        int(init_epochs) != init_epochs or init_epochs < 0):
            raise ValueError(f"init_epochs must be an int >= 0 or None, got {init_epochs!r}")
        if init_stage not in INIT_STAGES:
            raise ValueError(f"unknown init_stage {init_stage!r}; use 'separate' (the reference: "
                             f"extra epochs before the main schedule) or 'in_run' (the first "
                             f"epochs of the run)")
        if init_lr is not None:
            init_lr = check_positive("init_lr", init_lr)
            if init_stage == "in_run":
                raise ValueError("init_lr applies to init_stage='separate' only (an in-run "
                                 "preliminary stage uses the run's learning rate); drop init_lr")
        self.init_epochs = None if init_epochs is None else int(init_epochs)
        self.init_stage = init_stage
        self.init_lr = init_lr

    def init_stage_epochs(self) -> int:
        """Number of preliminary epochs (0 for methods without a preliminary stage): with
        ``init_stage="separate"`` extra epochs before the main schedule (default 30), with
        ``"in_run"`` the first epochs of the ``num_epochs`` of the run (default
        ``num_epochs // 8``, at least 1 in runs of two epochs or more)."""
        if not self.has_init_stage:
            return 0
        if self.init_epochs is not None:
            return self.init_epochs
        if self.init_stage == "separate":
            return self.reference_init_epochs
        if self.num_epochs < 2:
            return 0
        # At least one preliminary epoch, and at least one epoch of distillation.
        return max(1, int(self.num_epochs * self.init_fraction))

    @property
    def in_init_stage(self) -> bool:
        return self.stage == "init"

    def set_epoch(self, epoch: int, num_epochs: int) -> None:
        super().set_epoch(epoch, num_epochs)
        if not self.has_init_stage or self.init_stage != "in_run":
            return    # a separate stage is switched by the trainer (set_stage)
        if self.init_epochs is not None and self.init_epochs >= num_epochs:
            raise ValueError(f"init_epochs={self.init_epochs} leaves no epoch for distillation in "
                             f"a {num_epochs}-epoch run; lower init_epochs")
        self.stage = "init" if epoch <= self.init_stage_epochs() else "main"

    def preliminary_stage(self, model: nn.Module, lr: float) -> PreliminaryStage | None:
        """The separate preliminary stage for the student ``model`` when the main run starts at
        learning rate ``lr`` (``None`` without one, or with ``init_stage="in_run"``):
        :meth:`init_stage_epochs` epochs training :meth:`init_modules` at :meth:`init_stage_lr`,
        after which :meth:`frozen_after_init` stay fixed."""
        if not self.has_init_stage or self.init_stage != "separate":
            return None
        epochs = self.init_stage_epochs()
        if epochs == 0:
            return None
        return PreliminaryStage(epochs=epochs, lr=self.init_stage_lr(model, lr),
                                modules=self.init_modules(model),
                                frozen=self.frozen_after_init())

    def init_stage_lr(self, model: nn.Module, lr: float) -> float:
        """Learning rate of the separate preliminary stage: ``init_lr`` if given, else the main
        run's initial ``lr`` (RepDistiller's rule for AB and FSP)."""
        return self.init_lr if self.init_lr is not None else lr

    def init_modules(self, model: nn.Module) -> list[nn.Module]:
        """Modules trained (and in train mode) in the separate preliminary stage; by default the
        student's feature modules (:func:`feature_modules`)."""
        return feature_modules(model)

    def frozen_after_init(self) -> list[nn.Module]:
        """The distiller's modules that the main stage keeps fixed after a separate preliminary
        stage (none by default)."""
        return []

    # ---- the step -------------------------------------------------------------------------------
    def student_features(self, model: nn.Module, x: Tensor) -> tuple[Tensor, dict[str, Any]]:
        return FeatureExtractor(model, **self.student_spec)(x, preact=self.preact)

    def teacher_features(self, x: Tensor) -> tuple[Tensor, dict[str, Any]]:
        with torch.no_grad():
            return FeatureExtractor(self.teacher, **self.teacher_spec)(x, preact=self.preact)

    def forward(self, model: nn.Module, x: Tensor, y: Tensor, index: Tensor) -> StepOutput:
        if self.in_init_stage:
            return self.init_step(model, x, y, index)
        s_logits, s_feats = self.student_features(model, x)
        # A main-stage step that uses neither the teacher's logits nor its features (AB and FSP
        # by default) skips its forward pass: in eval mode without gradients it changes nothing.
        t_logits, t_feats = (self.teacher_features(x)
                             if self.kd_weight > 0 or self.uses_teacher() else (None, None))
        losses = {"ce": self.ce_weight * F.cross_entropy(s_logits, y)}
        if self.kd_weight > 0:
            losses["kd"] = self.kd_weight * kd_loss(s_logits, t_logits, self.temperature)
        losses.update(self.distill_terms(s_feats, t_feats, y, index))
        return StepOutput(s_logits, losses)

    def init_step(self, model: nn.Module, x: Tensor, y: Tensor, index: Tensor) -> StepOutput:
        """A step of the preliminary stage: by default only :meth:`init_terms`."""
        s_logits, s_feats = self.student_features(model, x)
        _, t_feats = self.teacher_features(x)
        return StepOutput(s_logits, self.init_terms(s_feats, t_feats))

    def uses_teacher(self) -> bool:
        """Whether :meth:`distill_terms` reads the teacher's features (when it does not, and the
        KD term is off, a main-stage step skips the teacher's forward pass)."""
        return True

    def distill_terms(self, s_feats: dict[str, Any], t_feats: dict[str, Any] | None, y: Tensor,
                      index: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def init_terms(self, s_feats: dict[str, Any], t_feats: dict[str, Any]) -> dict[str, Tensor]:
        raise NotImplementedError
