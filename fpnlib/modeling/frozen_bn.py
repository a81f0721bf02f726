"""Frozen BatchNorm, the paper's backbone normalisation, with its affine map kept between steps.

The ResNets are fine-tuned from ImageNet with their BatchNorm statistics fixed (Sec. 5.1 and
Detectron's practice): each BN layer is the per-channel affine map ``y = x * s + b`` with
``s = w / sqrt(var + eps)`` and ``b = bias - mean * s``. torchvision's ``FrozenBatchNorm2d``
computes ``s`` and ``b`` again at every forward: nine small operators per layer (five of them
kernels), 53 layers in a ResNet-50, each dispatched from Python and, on a GPU, launched one by one
(an H100 profile found fpnlib's training step bound by its host; ``fpnlib.host_work`` counts the
operators). Nothing changes ``s`` and ``b`` while training, so this subclass keeps them and
computes them again only when a buffer or ``eps`` changes (``load_state_dict``, ``.to()``, an
in-place edit: seen through each buffer's storage and version counter).

The forward is torchvision's operators on the same values, so the outputs and gradients are
equal bit for bit (``tests/test_backbone_fpn.py``). State dicts and ``isinstance`` checks are
torchvision's.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import FrozenBatchNorm2d as _TorchvisionFrozenBN


class FrozenBatchNorm2d(_TorchvisionFrozenBN):
    """torchvision's ``FrozenBatchNorm2d`` whose scale and shift are computed once per buffer change."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps)
        self._affine_key = None
        self._affine = None

    def _buffers_key(self) -> tuple:
        bufs = (self.weight, self.bias, self.running_mean, self.running_var)
        return (self.eps, *((t.data_ptr(), t._version, t.dtype, t.device) for t in bufs))

    def scale_and_shift(self) -> tuple[Tensor, Tensor]:
        """``(s, b)``, each ``[1, C, 1, 1]``, as torchvision computes them."""
        # no cache in a compiled graph (the key cannot be traced; the graph computes s and b in its
        # kernels) nor for inference tensors (they have no version counter)
        key = None if torch.compiler.is_compiling() or self.weight.is_inference() else self._buffers_key()
        if key is not None and key == self._affine_key:
            return self._affine
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        shift = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        if key is not None and not torch.is_inference_mode_enabled():  # an inference tensor cannot serve training later
            self._affine_key, self._affine = key, (scale, shift)
        return scale, shift

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self.scale_and_shift()
        return x * scale + shift
