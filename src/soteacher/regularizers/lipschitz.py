"""Lipschitz regularisation of SoTeacher (Dong, Liu & Shang, ICLR 2024).

The teacher's loss gains ``lambda_LR * lipschitz_bound(model)``: a *sum* over layers of simple
per-layer upper bounds on their Lipschitz constants, recomputed every step so that its gradient
shrinks the weights that make the network steep. The per-layer terms follow the paper's public
reference code exactly:

* convolution (1d/2d/3d, also transposed): the entry-wise L1 norm of the whole kernel,
  ``sum |W|`` over out x in x kernel;
* linear, ``W`` of shape (out, in): the l1 -> l1 operator norm, the largest absolute column sum
  ``max_j sum_i |W_ij|``;
* batch norm (1d/2d/3d): ``max_c |gamma_c| / sqrt(running_var_c + eps)``. Gradient flows through
  gamma only; the running variance is a buffer and is treated as a constant. A batch norm without
  affine parameters uses gamma = 1; one without running statistics uses variance 1 (its true
  scale is batch dependent, so no static bound exists);
* every other module (activations, pooling, shortcuts, other normalisations) adds nothing.

Biases never enter: they shift, they do not stretch. Where several entries share the maximum
(a linear layer's columns, a batch norm's channels: at initialisation every gamma is 1 and every
running variance 1), the gradient is split evenly among them, as autograd's ``max`` does.

On every model of the zoo but the 1-D CNNs (which the reference cannot evaluate) this equals
the reference's ``lip1Loss`` (shwinshaker/SoTeacher ``helper/lip_util.py``), value and
gradient; ``tests/test_fidelity_relations.py`` holds the constants of sixteen of them. The
reference picks leaf modules by class name ("conv", "batchnorm", "linear") and accepts only 4-D
convolution kernels; layers are picked here by type, so 1-D and 3-D convolutions (the ``cnn1d``
models), a renamed subclass of a layer, and batch norms without affine parameters or running
statistics are covered too, where the reference would stop with an error or skip the layer.

Two implementations, one value
------------------------------
* ``impl="fused"`` (default): a constant number of multi-tensor operations whatever the depth
  (``torch._foreach_*`` over all kernels at once, one segmented max over every batch-norm
  channel and linear column), about 11 operations forward and 7 backward; its gradient is
  written by one ``_foreach_add_`` into the parameters' ``.grad`` when the backward pass ends.
  The per-layer form launches about ten small operations per layer and per term, forward and
  backward (240 per step for resnet8x4, 2,563 for resnet110), more than the model's own step.
  The lists and index tensors are built once per model and rebuilt when its layers change.
* ``impl="per_layer"``: one term per layer, summed in module order, with autograd's gradient
  (the reference code's structure); the test oracle of the fused form, which equals it to
  float rounding, value and gradient (``tests/test_gpu_step.py``, on every zoo model).

Gradients of the fused form. Under ``loss.backward()`` in a single process the bound's gradient
does not go through autograd's per-parameter accumulation (which would add one operation per
layer again): it is added to ``.grad`` by one ``_foreach_add_`` when the backward pass has
finished. Under ``torch.autograd.grad`` (or ``backward(inputs=...)`` for the parameters left
out), and in a process group of several processes (so that DistributedDataParallel averages it
with the model's gradients: each process may scale its loss differently), it is returned
through autograd as usual. The fused form is not twice differentiable (``create_graph=True``):
use the per-layer form for that.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import Variable
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from ..engine.distributed import is_distributed

__all__ = ["IMPLEMENTATIONS", "lipschitz_bound", "layer_bound"]

#: The implementations of :func:`lipschitz_bound`; the first is the default.
IMPLEMENTATIONS = ("fused", "per_layer")


def layer_bound(module: nn.Module) -> Tensor | None:
    """The Lipschitz upper bound of one layer, or ``None`` for a module that contributes nothing."""
    # The fused norms compute the same values as |W|.sum() and |W|.sum(0).max() without
    # materialising |W|: three times faster.
    if isinstance(module, _ConvNd):
        return torch.linalg.vector_norm(module.weight, ord=1)
    if isinstance(module, nn.Linear):
        return torch.linalg.matrix_norm(module.weight, ord=1)     # max_j sum_i |W_ij|
    if isinstance(module, _BatchNorm):
        if module.running_var is not None:
            scale = torch.rsqrt(module.running_var.detach() + module.eps)
        else:
            scale = torch.full((module.num_features,), _untracked_scale(module),
                               device=_device_of(module))
        if module.weight is None:
            return scale.max()
        return (module.weight.abs() * scale).max()
    return None


def lipschitz_bound(module: nn.Module, *, impl: str = "fused") -> Tensor:
    """Sum of the per-layer Lipschitz bounds over every layer of ``module`` (a scalar tensor).

    Differentiable: add ``weight * lipschitz_bound(model)`` to the loss. A module with no
    convolution, linear or batch-norm layer gives 0. ``impl`` chooses the implementation (see
    the module docstring): ``"fused"`` (default, a constant number of operations) or
    ``"per_layer"``; both give the same value and gradient to float rounding. The fused form
    needs every weight, gamma and running variance on one device in one dtype; a model that
    mixes them is computed per layer.
    """
    if impl == "per_layer":
        return _per_layer_bound(module)
    if impl != "fused":
        raise ValueError(f"unknown Lipschitz bound implementation {impl!r}; available: "
                         f"{', '.join(IMPLEMENTATIONS)}")
    plan = _plan_of(module)
    if plan is None:
        return _per_layer_bound(module)
    return plan.bound()


def _per_layer_bound(module: nn.Module) -> Tensor:
    total: Tensor | None = None
    for m in module.modules():
        b = layer_bound(m)
        if b is not None:
            total = b if total is None else total + b
    if total is None:
        return torch.zeros((), device=_device_of(module))
    return total


def _untracked_scale(bn: _BatchNorm) -> float:
    return 1.0 / (1.0 + bn.eps) ** 0.5


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


# ---- the fused form ------------------------------------------------------------------------------
_PLANS: "weakref.WeakKeyDictionary[Any, _Plan]" = weakref.WeakKeyDictionary()


def _layers(module: nn.Module) -> tuple[list, list, list]:
    convs, bns, lins = [], [], []
    for m in module.modules():
        if isinstance(m, _ConvNd):
            convs.append(m)
        elif isinstance(m, nn.Linear):
            lins.append(m)
        elif isinstance(m, _BatchNorm):
            bns.append(m)
    return convs, bns, lins


def _key(convs: list, bns: list, lins: list) -> tuple:
    """What the plan depends on: which layers, which tensors they hold, which need gradients,
    and where those live."""
    key: list[Any] = []
    for m in convs + lins:
        key += [id(m), id(m.weight), m.weight.requires_grad]
    for m in bns:
        w = m.weight
        key += [id(m), id(w), w is not None and w.requires_grad, id(m.running_var), m.eps]
    first = next((t for t in [m.weight for m in convs + lins]
                  + [t for m in bns for t in (m.weight, m.running_var)] if t is not None), None)
    if first is not None:
        key += [first.device, first.dtype]
    return tuple(key)


def _plan_of(module: Any) -> "_Plan | None":
    convs, bns, lins = _layers(module)
    key = _key(convs, bns, lins)
    try:
        plan = _PLANS.get(module)
    except TypeError:           # not weak-referenceable: no cache
        plan = None
    if plan is not None and plan.key == key:
        return plan
    plan = _Plan.build(convs, bns, lins, key, _device_of(module))
    try:
        _PLANS[module] = plan
    except TypeError:
        pass
    return plan if plan.usable else None


class _Plan:
    """The lists, constants and index tensors of one model's fused bound, built once."""

    usable: bool

    @classmethod
    def build(cls, convs: list, bns: list, lins: list, key: tuple,
              device: torch.device) -> "_Plan":
        self = cls()
        self.key = key
        tensors = [m.weight for m in convs + lins] + [t for m in bns
                                                      for t in (m.weight, m.running_var)
                                                      if t is not None]
        places = {(t.device, t.dtype) for t in tensors}
        self.usable = len(places) <= 1 and all(t.is_floating_point() for t in tensors)
        if not self.usable:
            return self
        self.device, self.dtype = places.pop() if places else (device, torch.float32)
        opts = {"device": self.device, "dtype": self.dtype}
        self.conv_w = [m.weight for m in convs]
        self.lin_w = [m.weight for m in lins]
        # Batch norms: gammas (or a constant 1), running variances (or a constant scale).
        self.bn_gamma: list[Tensor | None] = [m.weight for m in bns]
        self.bn_ones = [torch.ones(m.num_features, **opts) if m.weight is None else None
                        for m in bns]
        self.tracked = [i for i, m in enumerate(bns) if m.running_var is not None]
        self.tracked_var = [bns[i].running_var for i in self.tracked]
        self.tracked_eps = [float(bns[i].eps) for i in self.tracked]
        self.bn_const_scale = [None if m.running_var is not None
                               else torch.full((m.num_features,), _untracked_scale(m), **opts)
                               for m in bns]
        self.bn_sizes = [m.num_features for m in bns]
        self.lin_rows = [torch.ones(1, m.weight.shape[0], **opts) for m in lins]
        self.lin_sizes = [m.weight.shape[1] for m in lins]
        sizes = self.bn_sizes + self.lin_sizes
        self.n_bn = sum(self.bn_sizes)
        # One segment per batch norm (its channels) and per linear layer (its columns).
        self.offsets = torch.tensor([0] + sizes, device=self.device).cumsum(0) if sizes else None
        self.unit = torch.ones(len(sizes), **opts) if sizes else None
        # What receives a gradient, in the order of the autograd function's inputs.
        self.g_conv = [i for i, w in enumerate(self.conv_w) if w.requires_grad]
        self.g_bn = [i for i, g in enumerate(self.bn_gamma) if g is not None and g.requires_grad]
        self.g_lin = [i for i, w in enumerate(self.lin_w) if w.requires_grad]
        self.inputs = ([self.conv_w[i] for i in self.g_conv] + [self.bn_gamma[i] for i in self.g_bn]
                       + [self.lin_w[i] for i in self.g_lin])
        # The parameters' gradient accumulators, to learn in the backward pass whether autograd
        # is about to write their .grad (loss.backward()) or hands the gradient back
        # (torch.autograd.grad).
        with torch.enable_grad():
            self.accumulators = [p.view_as(p).grad_fn.next_functions[0][0]
                                 for p in self.inputs]
        self.mm_ok = True
        return self

    def bound(self) -> Tensor:
        if not (self.conv_w or self.bn_sizes or self.lin_w):
            return torch.zeros((), device=self.device)
        return _FusedBound.apply(self, *self.inputs)

    # -- forward ---------------------------------------------------------------------------------
    def forward(self) -> tuple[Tensor, dict[str, Any]]:
        saved: dict[str, Any] = {}
        parts = []
        if self.conv_w:
            parts.append(torch.stack(torch._foreach_norm(self.conv_w, 1)))
        if self.offsets is not None:
            absolute = torch._foreach_abs([g for g in self.bn_gamma if g is not None]
                                          + self.lin_w)
            n_affine = len(absolute) - len(self.lin_w)
            it = iter(absolute[:n_affine])
            gammas = [next(it) if g is not None else ones
                      for g, ones in zip(self.bn_gamma, self.bn_ones)]
            values = []
            if self.bn_sizes:
                scales = list(self.bn_const_scale)
                if self.tracked:
                    computed = torch._foreach_add(self.tracked_var, self.tracked_eps)
                    torch._foreach_rsqrt_(computed)
                    for i, s in zip(self.tracked, computed):
                        scales[i] = s
                values += torch._foreach_mul(gammas, scales)
                saved["scales"] = scales
            if self.lin_w:
                values += [c.view(-1) for c in self._column_sums(absolute[n_affine:])]
            flat = torch.cat(values)
            peaks = torch.segment_reduce(flat, "max", offsets=self.offsets, unsafe=True)
            saved["flat"], saved["peaks"] = flat, peaks
            parts.append(peaks)
        total = (torch.cat(parts) if len(parts) > 1 else parts[0]).sum()
        return total, saved

    def _column_sums(self, absolute: list[Tensor]) -> list[Tensor]:
        """``|W|.sum(0)`` of every linear layer as a (1, in) row: one grouped matmul."""
        if self.mm_ok:
            try:
                return torch._foreach_mm(self.lin_rows, absolute)
            except (NotImplementedError, RuntimeError):
                self.mm_ok = False      # a backend without it: one reduction per layer
        return [a.sum(0, keepdim=True) for a in absolute]

    # -- backward --------------------------------------------------------------------------------
    def gradients(self, saved: dict[str, Any], grad: Tensor) -> list[Tensor]:
        """``grad`` times the bound's gradient, for ``self.inputs`` in their order."""
        conv = [self.conv_w[i] for i in self.g_conv]
        gam = [self.bn_gamma[i] for i in self.g_bn]
        lin = [self.lin_w[i] for i in self.g_lin]
        signs = torch._foreach_sign(conv + gam + lin)
        out = signs[:len(conv)]
        if gam or lin:
            # d max / d value: 1 / (number of ties) at every maximum of a segment, 0 elsewhere
            share = torch.ops.aten._segment_reduce_backward(
                self.unit, saved["peaks"], saved["flat"], "max", offsets=self.offsets)
            if gam:
                per_bn = share[:self.n_bn].split(self.bn_sizes)
                g_bn = torch._foreach_mul([saved["scales"][i] for i in self.g_bn],
                                          [per_bn[i] for i in self.g_bn])
                torch._foreach_mul_(g_bn, signs[len(conv):len(conv) + len(gam)])
                out += g_bn
            if lin:
                per_lin = share[self.n_bn:].split(self.lin_sizes)
                out += torch._foreach_mul(signs[len(conv) + len(gam):],
                                          [per_lin[i].view(1, -1) for i in self.g_lin])
        torch._foreach_mul_(out, grad)
        return out


class _FusedBound(torch.autograd.Function):
    """The fused bound; inputs: the plan and the parameters that receive its gradient."""

    @staticmethod
    def forward(ctx, plan: _Plan, *params: Tensor) -> Tensor:
        with torch.autocast(plan.device.type, enabled=False):
            total, saved = plan.forward()
        ctx.plan, ctx.saved = plan, saved
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        plan, saved = ctx.plan, ctx.saved
        ctx.saved = None
        grads = plan.gradients(saved, grad)
        # Under DDP the gradient goes through autograd, so that DDP averages it with the rest:
        # each process's loss may be scaled differently (unequal slices of the batch).
        later = ([False] * len(grads) if is_distributed()
                 else _written_by_backward(plan.accumulators))
        if any(later):
            _add_to_grad_at_end([p for p, w in zip(plan.inputs, later) if w],
                                [g for g, w in zip(grads, later) if w])
        return (None, *[None if w else g for g, w in zip(grads, later)])


def _written_by_backward(accumulators: list) -> list[bool]:
    """For each parameter, whether this backward pass is about to accumulate into its ``.grad``
    (``loss.backward()``) rather than hand its gradient back (``torch.autograd.grad``)."""
    try:
        return [bool(torch._C._will_engine_execute_node(a)) for a in accumulators]
    except RuntimeError:        # raised for leaves while torch.autograd.grad runs
        return [False] * len(accumulators)


def _add_to_grad_at_end(params: list[Tensor], grads: list[Tensor]) -> None:
    """Add ``grads`` to the ``params``' ``.grad`` once the backward pass is over, when autograd
    has written the rest of their gradients (one ``_foreach_add_``)."""

    def add() -> None:
        have = [(p.grad, g) for p, g in zip(params, grads) if p.grad is not None]
        if have:
            torch._foreach_add_([a for a, _ in have], [g for _, g in have])
        for p, g in zip(params, grads):
            if p.grad is None:
                p.grad = g

    Variable._execution_engine.queue_callback(add)
