"""RoI features from the pyramid: each RoI is pooled from the level Eq. (1) assigns it (Sec. 4.2).

The paper uses RoI pooling (Fast R-CNN) to extract 7x7 features; modern libraries use RoIAlign
(Mask R-CNN), which samples the map bilinearly instead of snapping the RoI to the grid. Both
come from ``torchvision.ops`` (on CUDA, RoIAlign runs as one kernel for all levels with
torchvision's arithmetic, ``pyramid_roi_align``); what is the paper's here is the choice of level.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import accumulate

import torch
from torch import Tensor
from torchvision.ops import roi_align, roi_pool

from .parallel_pieces import threaded_roi_align
from .pyramid_roi_align import pyramid_roi_align
from .roi_levels import assign_fpn_levels

ROI_LEVELS = ("p2", "p3", "p4", "p5")  # the region head never reads P6 (Sec. 4.2)


def rois_with_batch_index(boxes: Sequence[Tensor]) -> Tensor:
    """``[K, 5]`` rows ``(image index, x1, y1, x2, y2)``, the format of ``torchvision.ops``."""
    if len(boxes) == 0:
        raise ValueError("no images: pass one [K_i, 4] tensor per image (an image without RoIs: [0, 4])")
    return torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])


def pyramid_roi_features(
    features: Mapping[str, Tensor],
    boxes: Sequence[Tensor],
    strides: Mapping[str, int],
    output_size: int = 7,
    mode: str = "align",
    sampling_ratio: int = 2,
    aligned: bool = False,
    levels: Sequence[str] = ROI_LEVELS,
    canonical_size: float = 224,
    canonical_level: int = 4,
) -> Tensor:
    """``[K, C, output_size, output_size]`` features of all images' RoIs, in the order of ``boxes``.

    ``boxes``: one ``[K_i, 4]`` xyxy tensor per image (image pixels). ``mode``: ``"pool"`` (RoI
    pooling, as the paper) or ``"align"`` (RoIAlign; ``sampling_ratio`` points per bin side,
    ``aligned`` the half-pixel correction of Detectron2, off in torchvision's Faster R-CNN).
    Level names must end in their k (``"p2"`` -> 2); each RoI goes to the level of Eq. (1).
    """
    if mode not in ("align", "pool"):
        raise ValueError(f"mode must be 'align' or 'pool', got {mode!r}")
    ks = [int(name[1:]) for name in levels]
    rois = rois_with_batch_index(boxes)
    target = assign_fpn_levels(rois[:, 1:], k0=canonical_level, canonical_size=canonical_size,
                               k_min=min(ks), k_max=max(ks))
    if mode == "align":
        # on CUDA, all levels in one kernel on the maps' own layout and dtype; on a CPU, the
        # (level, image) pieces on all cores: the same numbers as the loop below
        maps, scales = [features[name] for name in levels], [1.0 / strides[name] for name in levels]
        for pieces in (pyramid_roi_align, threaded_roi_align):
            pooled = pieces(maps, rois, target, ks, scales, output_size, sampling_ratio, aligned)
            if pooled is not None:
                return pooled
    first = features[levels[0]]
    out = first.new_zeros((rois.shape[0], first.shape[1], output_size, output_size))
    # the RoIs of each level in their order: one sort and one read of the counts (on CUDA, one
    # wait for the GPU instead of one per level)
    k_min = min(ks)
    by_level = torch.argsort(target, stable=True)
    starts = [0, *accumulate(torch.bincount(target - k_min, minlength=max(ks) - k_min + 1).tolist())]
    for name, k in zip(levels, ks):
        idx = by_level[starts[k - k_min]:starts[k - k_min + 1]]
        if idx.numel() == 0:
            continue
        scale = 1.0 / strides[name]
        if mode == "align":
            pooled = roi_align(features[name], rois[idx], output_size, scale, sampling_ratio, aligned)
        else:
            pooled = roi_pool(features[name], rois[idx], output_size, scale)
        out[idx] = pooled.to(out.dtype)
    return out
