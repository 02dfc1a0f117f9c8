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

Biases never enter: they shift, they do not stretch.

On every model of the zoo but the 1-D CNNs (which the reference cannot evaluate) this equals
the reference's ``lip1Loss`` (shwinshaker/SoTeacher ``helper/lip_util.py``), value and
gradient; ``tests/test_fidelity_relations.py`` holds the constants of sixteen of them. The
reference picks leaf modules by class name ("conv", "batchnorm", "linear") and accepts only 4-D
convolution kernels; layers are picked here by type, so 1-D and 3-D convolutions (the ``cnn1d``
models), a renamed subclass of a layer, and batch norms without affine parameters or running
statistics are covered too, where the reference would stop with an error or skip the layer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

__all__ = ["lipschitz_bound", "layer_bound"]


def layer_bound(module: nn.Module) -> Tensor | None:
    """The Lipschitz upper bound of one layer, or ``None`` for a module that contributes nothing."""
    # The fused norms compute the same values as |W|.sum() and |W|.sum(0).max() without
    # materialising |W|: three times faster, which matters as this runs every step.
    if isinstance(module, _ConvNd):
        return torch.linalg.vector_norm(module.weight, ord=1)
    if isinstance(module, nn.Linear):
        return torch.linalg.matrix_norm(module.weight, ord=1)     # max_j sum_i |W_ij|
    if isinstance(module, _BatchNorm):
        if module.running_var is not None:
            scale = torch.rsqrt(module.running_var.detach() + module.eps)
        else:
            scale = torch.full((module.num_features,), 1.0 / (1.0 + module.eps) ** 0.5,
                               device=_device_of(module))
        if module.weight is None:
            return scale.max()
        return (module.weight.abs() * scale).max()
    return None


def lipschitz_bound(module: nn.Module) -> Tensor:
    """Sum of the per-layer Lipschitz bounds over every layer of ``module`` (a scalar tensor).

    Differentiable: add ``weight * lipschitz_bound(model)`` to the loss. A module with no
    convolution, linear or batch-norm layer gives 0.
    """
    total: Tensor | None = None
    for m in module.modules():
        b = layer_bound(m)
        if b is not None:
            total = b if total is None else total + b
    if total is None:
        return torch.zeros((), device=_device_of(module))
    return total


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")
