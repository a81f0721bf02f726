"""Pictures of a trained RPN (notebook 04): its training curve, its proposals coloured by the
pyramid level that made them, and Table 1 beside the paper. Pure functions returning Figures."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from fpnlib.viz import _rect, log_scale, plot_table_bars, to_numpy_image

LEVEL_COLOURS = ["#e41a1c", "#ff7f00", "#4daf4a", "#377eb8", "#984ea3"]  # finest -> coarsest


def read_log(path: str | Path) -> list[dict]:
    """The JSON lines of a training log (``fpnlib.engine.train``)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_training_log(logs: dict[str, list[dict]], keys: Sequence[str] = ("loss_objectness", "loss_rpn_box")) -> Figure:
    """One panel per loss term, one line per run (e.g. per Table 1 row) that logs it."""
    fig = Figure(figsize=(3.2 * len(keys), 2.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(keys)))
    for ax, key in zip(axes, keys):
        for name, log in logs.items():
            if log and key in log[0]:  # an RPN logs no head losses, a Fast R-CNN no RPN losses
                ax.plot([r["iteration"] for r in log], [r[key] for r in log], label=name, lw=1)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        log_scale(ax, "y")
        ax.legend(fontsize=6)
    return fig


def plot_proposals_by_level(image, boxes, levels, level_names: Sequence[str], gt_boxes=None, top: int = 50) -> Figure:
    """The ``top`` proposals on the image coloured by level, and the size of all proposals per
    level: each level should propose boxes near its own anchor size (Sec. 4.1)."""
    boxes, levels = np.asarray(boxes, dtype=float).reshape(-1, 4), np.asarray(levels, dtype=int)
    fig = Figure(figsize=(8.0, 3.4), layout="constrained")
    ax_img, ax_hist = fig.subplots(1, 2, width_ratios=[1.2, 1])
    ax_img.imshow(to_numpy_image(image))
    for (x1, y1, x2, y2) in np.asarray(gt_boxes if gt_boxes is not None else [], dtype=float).reshape(-1, 4):
        ax_img.add_patch(_rect(x1, y1, x2, y2, "white", dashed=True))
    for (x1, y1, x2, y2), lvl in zip(boxes[:top], levels[:top]):
        ax_img.add_patch(_rect(x1, y1, x2, y2, LEVEL_COLOURS[lvl % len(LEVEL_COLOURS)]))
    ax_img.set_title(f"top {min(top, len(boxes))} proposals (dashed: ground truth)", fontsize=9)
    ax_img.set_axis_off()
    side = np.sqrt(np.clip((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1e-6, None))
    bins = np.logspace(0, np.log10(max(side.max(initial=2.0), 2.0)), 30)
    for i, name in enumerate(level_names):
        sel = levels == i
        ax_hist.hist(side[sel], bins=bins, histtype="step", lw=1.5, color=LEVEL_COLOURS[i % len(LEVEL_COLOURS)],
                     label=f"{name}: {int(sel.sum())}")
    log_scale(ax_hist, "x")
    ax_hist.set_xlabel("proposal sqrt(area) [px]", fontsize=8)
    ax_hist.set_ylabel("proposals", fontsize=8)
    ax_hist.set_title("all proposals of the image, by level", fontsize=9)
    ax_hist.legend(fontsize=7)
    return fig


def plot_table1(record: dict, paper: dict[str, dict], paper_keys: dict[str, str],
                metrics: Sequence[str] = ("AR1k", "AR1k_s", "AR1k_m", "AR1k_l")) -> Figure:
    """Table 1 as bars: ours (filled) beside the paper's (hatched), one panel per metric."""
    return plot_table_bars(record, paper, paper_keys, metrics, "AR (%)")
