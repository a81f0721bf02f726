"""Which pyramid level a region of interest is pooled from: Eq. (1) of the paper (Sec. 4.2).

    k = floor(k0 + log2(sqrt(w h) / 224))

Why 224 and k0 = 4: the region head of the ResNet Faster R-CNN baseline pools every RoI from
C4 (k = 4), and that network was pre-trained on 224 x 224 ImageNet crops. So an RoI of the
pre-training size, 224 px, is mapped to P4, the level a single-scale detector would use; an
RoI half as wide (112 px) goes one level finer (P3), one twice as wide (448 px) one level
coarser (P5). The pyramid is thus used like an image pyramid: the RoI always covers about
the same number of cells of the level it is pooled from.

The paper's region head reads P2..P5 only (P6 exists for the RPN's 512^2 anchors), so k is
clamped to [2, 5].
"""
from __future__ import annotations

import torch
from torch import Tensor

CANONICAL_SIZE = 224  # ImageNet pre-training size (Sec. 4.2)
CANONICAL_LEVEL = 4  # k0: the level the C4 baseline pools from (Sec. 4.2)


def assign_fpn_levels(boxes: Tensor, k0: int = CANONICAL_LEVEL, canonical_size: float = CANONICAL_SIZE,
                      k_min: int = 2, k_max: int = 5, eps: float = 1e-6) -> Tensor:
    """Eq. (1): the pyramid level k (int64 ``[N]``) of each xyxy box ``[N, 4]`` (image pixels).

    Boundaries (k0 = 4, clamped to [2, 5]): sqrt(wh) < 112 -> 2, [112, 224) -> 3, [224, 448) -> 4,
    >= 448 -> 5.
    ``eps`` is added to the exponent so that a box exactly on a boundary (e.g. 448 px, where
    float ``log2`` may give 0.99999994) lands on the upper level; zero-area boxes go to ``k_min``.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [N, 4] xyxy, got shape {tuple(boxes.shape)}")
    w = (boxes[:, 2] - boxes[:, 0]).clamp(min=0)
    h = (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    scale = torch.sqrt(w * h)
    k = torch.floor(k0 + torch.log2(scale / canonical_size) + eps)
    return k.clamp(k_min, k_max).to(torch.int64)
