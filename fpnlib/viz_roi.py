"""Pictures of the region heads (notebooks 05, 06): Eq. (1) as a staircase, which level each
RoI is pooled from, the pooled features themselves, detections, and result tables as bars.
Pure functions returning Figures."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from fpnlib.modeling.roi_levels import CANONICAL_LEVEL, CANONICAL_SIZE, assign_fpn_levels
from fpnlib.viz import _rect, log_scale, to_numpy_image
from fpnlib.viz_rpn import LEVEL_COLOURS


def _sides(boxes) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=float).reshape(-1, 4)
    return np.sqrt(np.clip((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 0, None))


def plot_level_rule(canonical_size: float = CANONICAL_SIZE, k0: int = CANONICAL_LEVEL, k_min: int = 2,
                    k_max: int = 5, sides: Sequence[float] | None = None) -> Figure:
    """Eq. (1) evaluated by ``assign_fpn_levels`` on square RoIs of every side: a staircase with
    steps at canonical_size / 2, canonical_size, 2 canonical_size (112, 224, 448 px in the paper)."""
    lo, hi = canonical_size / 16, canonical_size * 8
    side = torch.logspace(np.log10(lo), np.log10(hi), 600, dtype=torch.float64)
    boxes = torch.stack([torch.zeros_like(side), torch.zeros_like(side), side, side], 1)
    k = assign_fpn_levels(boxes, k0=k0, canonical_size=canonical_size, k_min=k_min, k_max=k_max)
    fig = Figure(figsize=(5.5, 2.8), layout="constrained")
    ax = fig.subplots()
    ax.step(side.numpy(), k.numpy(), where="post", color="#333333")
    for b in (canonical_size / 2, canonical_size, canonical_size * 2):
        ax.axvline(b, color="#999999", ls=":", lw=1)
        ax.text(b * 1.04, k_min - 0.1, f"{b:g} px", fontsize=7, color="#666666")
    if sides is not None:  # e.g. the ground-truth objects of the data set
        s = np.asarray(sides, dtype=float)
        kk = assign_fpn_levels(torch.as_tensor(np.stack([0 * s, 0 * s, s, s], 1)), k0=k0,
                               canonical_size=canonical_size, k_min=k_min, k_max=k_max).numpy()
        ax.scatter(s, kk + np.random.default_rng(0).uniform(-0.2, 0.2, len(s)), s=4, alpha=0.3,
                   c=[LEVEL_COLOURS[(x - 2) % len(LEVEL_COLOURS)] for x in kk])
    log_scale(ax, "x")
    ax.set_yticks(range(k_min, k_max + 1), [f"P{i}" for i in range(k_min, k_max + 1)])
    ax.set_xlabel("RoI side sqrt(w h) [px]", fontsize=8)
    ax.set_title(f"Eq. (1): k = floor({k0} + log2(sqrt(wh) / {canonical_size:g})), clamped to [{k_min}, {k_max}]",
                 fontsize=9)
    return fig


def plot_roi_level_histogram(boxes_by_name: Mapping[str, np.ndarray], canonical_size: float = CANONICAL_SIZE,
                             k_min: int = 2, k_max: int = 5) -> Figure:
    """How many RoIs each level receives (one bar group per set of boxes, e.g. ground truth and
    proposals): a level that gets none is a level the head never learns from."""
    names = list(boxes_by_name)
    levels = list(range(k_min, k_max + 1))
    fig = Figure(figsize=(5.0, 2.6), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        b = torch.as_tensor(np.asarray(boxes_by_name[name], dtype=np.float32).reshape(-1, 4))
        k = assign_fpn_levels(b, canonical_size=canonical_size, k_min=k_min, k_max=k_max).numpy()
        share = [100.0 * float((k == lvl).mean()) if len(k) else 0.0 for lvl in levels]
        ax.bar(np.arange(len(levels)) + (j - (len(names) - 1) / 2) * width, share, width, label=f"{name} ({len(k)})")
    ax.set_xticks(range(len(levels)), [f"P{lvl}" for lvl in levels])
    ax.set_ylabel("% of RoIs", fontsize=8)
    ax.set_title(f"RoIs per level by Eq. (1) (canonical size {canonical_size:g} px)", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def plot_roi_features(image, boxes, features, levels: Sequence[str], max_rois: int = 6) -> Figure:
    """Each RoI on the image (top) and its pooled r x r features (mean |activation| over channels,
    bottom), titled with the level it was pooled from: every RoI becomes the same small grid
    whatever its size, which is what lets one head serve all levels (Sec. 4.2)."""
    boxes = np.asarray(boxes, dtype=float).reshape(-1, 4)[:max_rois]
    feats = torch.as_tensor(features)[:max_rois].abs().mean(1).numpy()
    n = len(boxes)
    fig = Figure(figsize=(1.6 * max(n, 1), 3.4), layout="constrained")
    axes = np.asarray(fig.subplots(2, max(n, 1), squeeze=False))
    img = to_numpy_image(image)
    h, w = img.shape[:2]
    for i in range(n):
        x1, y1, x2, y2 = boxes[i]
        crop = img[int(max(y1, 0)):int(min(np.ceil(y2), h)), int(max(x1, 0)):int(min(np.ceil(x2), w))]
        axes[0, i].imshow(crop if crop.size else np.zeros((2, 2, 3)))
        axes[0, i].set_title(f"{_sides(boxes[i])[0]:.0f} px -> {levels[i]}", fontsize=8)
        axes[1, i].imshow(feats[i], cmap="viridis")
        axes[1, i].set_title(f"{feats.shape[-1]}x{feats.shape[-1]} pooled", fontsize=7)
    for ax in axes.ravel():
        ax.set_axis_off()
    return fig


def plot_detections(image, detections: Mapping, gt_boxes=None, label_names: Mapping[int, str] | None = None,
                    score_min: float = 0.3, top: int = 20) -> Figure:
    """Detections above ``score_min`` (at most ``top``) with class and score; ground truth dashed."""
    fig = Figure(figsize=(4.2, 3.4), layout="constrained")
    ax = fig.subplots()
    ax.imshow(to_numpy_image(image))
    for (x1, y1, x2, y2) in np.asarray(gt_boxes if gt_boxes is not None else [], dtype=float).reshape(-1, 4):
        ax.add_patch(_rect(x1, y1, x2, y2, "white", dashed=True))
    boxes = np.asarray(detections["boxes"], dtype=float).reshape(-1, 4)
    scores, labels = np.asarray(detections["scores"], dtype=float), np.asarray(detections["labels"], dtype=int)
    keep = np.flatnonzero(scores >= score_min)[:top]
    for i in keep:
        colour = LEVEL_COLOURS[labels[i] % len(LEVEL_COLOURS)]
        ax.add_patch(_rect(*boxes[i], colour))
        ax.text(boxes[i, 0], boxes[i, 1], f"{(label_names or {}).get(int(labels[i]), labels[i])} {scores[i]:.2f}",
                fontsize=6, bbox=dict(facecolor=colour, alpha=0.7, pad=0.5, lw=0))
    ax.set_title(f"{len(keep)} detections with score >= {score_min} (dashed: ground truth)", fontsize=9)
    ax.set_axis_off()
    return fig
