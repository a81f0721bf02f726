"""Pictures of the segment proposals of Sec. 6 / Appendix A (notebook 07): which slot (level and
MLP) serves which object size, which locations are positive for which object, and the masks the
model proposes. Pure functions returning Figures."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from fpnlib.modeling.fpn import STRIDES
from fpnlib.modeling.segment_proposals import LocationGrid, Slot, assign_segment_levels, label_locations
from fpnlib.viz import _rect, log_scale, to_numpy_image
from fpnlib.viz_rpn import LEVEL_COLOURS


def _slot_colour(slot: Slot) -> str:
    return LEVEL_COLOURS[(int(slot.level[1:]) - 2) % len(LEVEL_COLOURS)]


def plot_segment_slots(slots: Sequence[Slot], object_scales: Sequence[float] | None = None) -> Figure:
    """Each slot's canonical scale (dot) and the range of object scales it serves (bar; nearest
    in log space); the 7x7 MLP's slots are the half octaves. Dots below: the objects of a data set."""
    slots = tuple(slots)
    scales = np.array([s.scale for s in slots])
    edges = np.sqrt(scales[:-1] * scales[1:])  # geometric midpoints: the log-space boundaries
    lo = np.concatenate([[scales[0] / 2], edges])
    hi = np.concatenate([edges, [scales[-1] * 2]])
    fig = Figure(figsize=(6.0, 2.2 + 0.18 * len(slots)), layout="constrained")
    ax = fig.subplots()
    for i, s in enumerate(slots):
        ax.plot([lo[i], hi[i]], [i, i], color=_slot_colour(s), lw=6, alpha=0.35, solid_capstyle="butt")
        ax.plot([s.scale], [i], "o", color=_slot_colour(s))
        ax.text(hi[i] * 1.05, i, f"{s.mlp} MLP on {s.level.upper()}, window {s.window:.0f} px", va="center", fontsize=7)
    if object_scales is not None and len(object_scales):
        sc = torch.as_tensor(np.asarray(object_scales, dtype=np.float32))
        idx = assign_segment_levels(sc, slots).numpy()
        jitter = np.random.default_rng(0).uniform(-0.25, 0.25, len(idx))
        ax.scatter(sc.numpy(), idx + jitter, s=4, c="black", alpha=0.25)
    log_scale(ax, "x")
    ax.set_yticks(range(len(slots)), [f"{s.scale:.0f} px" for s in slots], fontsize=7)
    ax.set_xlim(lo[0], hi[-1] * 8)  # room for the labels
    ax.set_xlabel("object scale max(w, h) [px]", fontsize=8)
    ax.set_title("which MLP on which level predicts an object of each scale (Appendix A)", fontsize=9)
    return fig


def plot_positive_locations(image, boxes, slots: Sequence[Slot], image_hw: tuple[int, int]) -> Figure:
    """The positive locations of every object (``label_locations``), one small panel per level:
    each positive cell is coloured like its object's box; negatives are left blank."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    h, w = image_hw
    shapes = [(-(-h // STRIDES[s.level]), -(-w // STRIDES[s.level])) for s in slots]
    grid = LocationGrid(tuple(slots), shapes)
    labels, matched = label_locations(boxes, grid, image_hw)
    levels = sorted({s.level for s in slots}, key=lambda lv: int(lv[1:]))
    fig = Figure(figsize=(2.3 * (len(levels) + 1), 2.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(levels) + 1))
    colours = [LEVEL_COLOURS[i % len(LEVEL_COLOURS)] for i in range(len(boxes))]
    axes[0].imshow(to_numpy_image(image))
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        axes[0].add_patch(_rect(x1, y1, x2, y2, colours[i]))
    axes[0].set_title("objects", fontsize=8)
    for ax, level in zip(axes[1:], levels):
        ax.imshow(to_numpy_image(image), alpha=0.35)
        for s, slot in enumerate(slots):
            if slot.level != level:
                continue
            part = grid.range(s)
            pos = torch.nonzero(labels[part] == 1).flatten()
            _, ys, xs = grid.decode(pos + part.start)
            stride = slot.stride
            for y, x, g in zip(ys.tolist(), xs.tolist(), matched[part][pos].tolist()):
                ax.add_patch(_rect(x * stride, y * stride, (x + 1) * stride, (y + 1) * stride, colours[g],
                                   dashed=slot.mlp == "7x7"))
        ax.set_title(f"{level.upper()} (stride {STRIDES[level]}); dashed: 7x7 MLP", fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    return fig


def plot_segment_proposals(image, masks, scores, gt_masks=None, top: int = 8) -> Figure:
    """The ``top`` best-scoring mask proposals, each in its own panel over the image, with the
    ground-truth masks (first panel) for comparison. No NMS: neighbours propose similar masks."""
    masks = np.asarray(masks, dtype=bool)[:top]
    scores = np.asarray(scores, dtype=float)[:top]
    n = len(masks) + 1
    fig = Figure(figsize=(1.9 * n, 2.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, n))
    img = to_numpy_image(image)
    axes[0].imshow(img)
    if gt_masks is not None and len(gt_masks):
        overlay = np.zeros((*img.shape[:2], 4), dtype=np.float32)
        for i, m in enumerate(np.asarray(gt_masks, dtype=bool)):
            overlay[m[: img.shape[0], : img.shape[1]]] = (*np.random.default_rng(i).uniform(0.2, 1, 3), 0.55)
        axes[0].imshow(overlay)
    axes[0].set_title("ground truth", fontsize=8)
    for ax, m, s in zip(axes[1:], masks, scores):
        ax.imshow(img * 0.45)
        overlay = np.zeros((*m.shape, 4), dtype=np.float32)
        overlay[m] = (1.0, 0.85, 0.1, 0.8)
        ax.imshow(overlay)
        ax.set_title(f"score {s:.2f}", fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    return fig
