"""Pictures for the notebooks: pure plotting functions that return a matplotlib Figure.

The notebooks' widgets are thin wrappers over these functions; run unattended, the same
functions write PNGs to ``figures/``. Figures are built with ``matplotlib.figure.Figure``
(no pyplot state), so they work the same inline, in a widget and in a headless test.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from fpnlib.data.stats import MEDIUM_MAX_AREA, SMALL_MAX_AREA, scale_bucket

BUCKET_COLOURS = {"small": "#d62728", "medium": "#ff7f0e", "large": "#1f77b4"}


def to_numpy_image(image, normalized: bool | None = None) -> np.ndarray:
    """HxWx3 float image in [0, 1] from a CHW tensor, an HWC array or a PIL image.

    ``normalized``: the image went through ``Normalize`` (ImageNet mean/std) and is undone
    here; ``None`` decides by sign (a normalized image has negative values, a raw one never).
    """
    from fpnlib.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    if hasattr(image, "detach"):
        image = image.detach().cpu().float().numpy().transpose(1, 2, 0)
    image = np.asarray(image, dtype=np.float32)
    if normalized is None:
        normalized = bool(image.min() < 0)
    if normalized:
        image = image * np.asarray(IMAGENET_STD, np.float32) + np.asarray(IMAGENET_MEAN, np.float32)
    elif image.max() > 1.5:
        image = image / 255.0
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.clip(image, 0.0, 1.0)


def draw_annotations(ax, image, target: Mapping, label_names: Mapping[int, str] | None = None,
                     show_masks: bool = True) -> None:
    """Draw an image with its boxes (coloured by COCO size bucket) and instance masks."""
    img = to_numpy_image(image)
    ax.imshow(img)
    boxes = np.asarray(target["boxes"], dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(target.get("labels", np.zeros(len(boxes))), dtype=np.int64)
    crowd = np.asarray(target.get("iscrowd", np.zeros(len(boxes))), dtype=bool)
    areas = np.asarray(target.get("area", (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
    if show_masks and "masks" in target and len(boxes):
        masks = np.asarray(target["masks"], dtype=bool)
        overlay = np.zeros((*masks.shape[1:], 4), dtype=np.float32)
        rng = np.random.default_rng(0)  # fixed colours: the same picture every run
        for m in masks:
            overlay[m] = (*rng.uniform(0.2, 1.0, 3), 0.45)
        ax.imshow(overlay)
    for (x1, y1, x2, y2), lab, c, a in zip(boxes, labels, crowd, areas):
        colour = "white" if c else BUCKET_COLOURS[scale_bucket(a)]
        ax.add_patch(_rect(x1, y1, x2, y2, colour, dashed=bool(c)))
        name = (label_names or {}).get(int(lab), str(int(lab)))
        ax.text(x1, y1, name + (" (crowd)" if c else ""), fontsize=6, color="black",
                bbox=dict(facecolor=colour, alpha=0.7, pad=0.5, lw=0))
    ax.set_axis_off()


def _rect(x1, y1, x2, y2, colour, dashed=False):
    from matplotlib.patches import Rectangle

    return Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, lw=1.2,
                     linestyle="--" if dashed else "-")


def plot_samples(samples: Sequence[tuple], label_names: Mapping[int, str] | None = None,
                 ncols: int = 3, size: float = 3.2) -> Figure:
    """A grid of (image, target) pairs with boxes and masks; box colour = COCO size bucket."""
    n = len(samples)
    nrows = max(1, -(-n // ncols))
    fig = Figure(figsize=(size * ncols, size * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (image, target) in zip(axes, samples):
        draw_annotations(ax, image, target, label_names)
        ax.set_title(f"image {int(target['image_id'])}: {len(target['boxes'])} objects", fontsize=8)
    for ax in axes[n:]:
        ax.set_axis_off()
    fig.legend(handles=[_legend_patch(c, b) for b, c in BUCKET_COLOURS.items()],
               loc="outside lower center", ncols=3, fontsize=8)
    return fig


def _legend_patch(colour, label):
    from matplotlib.patches import Patch

    return Patch(facecolor="none", edgecolor=colour, label=f"{label} (COCO)")


def plot_size_histogram(areas: np.ndarray, title: str = "object sizes", bins: int = 40) -> Figure:
    """Histogram of sqrt(area) on a log axis, with COCO's small/medium/large limits (32, 96)."""
    side = np.sqrt(np.asarray(areas, dtype=np.float64))
    fig = Figure(figsize=(6.4, 3.2), layout="constrained")
    ax = fig.subplots()
    if len(side):
        edges = np.geomspace(max(side.min(), 1.0), side.max() * 1.01, bins + 1)
        ax.hist(side, bins=edges, color="#888888")
        log_scale(ax, "x", base=2)
    n = max(len(side), 1)
    for limit, name in ((np.sqrt(SMALL_MAX_AREA), "32"), (np.sqrt(MEDIUM_MAX_AREA), "96")):
        ax.axvline(limit, color="black", ls="--", lw=1)
        ax.text(limit, ax.get_ylim()[1] * 0.95, f" {name}", fontsize=8, va="top")
    shares = {b: np.mean([scale_bucket(a) == b for a in areas]) if len(areas) else 0.0
              for b in BUCKET_COLOURS}
    ax.set_title(f"{title}: {n} objects — small {shares['small']:.0%}, "
                 f"medium {shares['medium']:.0%}, large {shares['large']:.0%}", fontsize=9)
    ax.set_xlabel("sqrt(mask area) [px], log scale")
    ax.set_ylabel("objects")
    return fig


def plot_category_counts(counts: Mapping[str, int], title: str = "objects per category") -> Figure:
    """Bar chart of objects per category."""
    fig = Figure(figsize=(6.4, 2.8), layout="constrained")
    ax = fig.subplots()
    names = list(counts)
    ax.bar(names, [counts[k] for k in names], color="#4c72b0")
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelsize=8, rotation=30)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 90) -> Path:
    """Write a small PNG (dpi kept low so committed figures stay light)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def log_scale(ax, which: str = "x", base: float = 10) -> None:
    """A log axis whose tick labels are plain text (32, 64, 0.1) in the figure's font, which ships
    with matplotlib: matplotlib's own log labels are mathtext (2^5), which loads the STIX and
    Computer Modern fonts too, and a machine whose font cache lacks them prints "findfont: Font
    family ... not found" under every such figure."""
    from matplotlib.ticker import LogFormatter

    getattr(ax, f"set_{which}scale")("log", base=base)
    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_major_formatter(LogFormatter(base=base))
    axis.set_minor_formatter(LogFormatter(base=base, labelOnlyBase=False))


def figure_to_image(fig: Figure, dpi: int = 72, format: str = "png"):
    """An ``IPython.display.Image`` of ``fig``: a pyplot-free Figure has no rich display of
    its own (a notebook would print ``<Figure ...>``). A lower dpi than the saved PNG's and
    ``format="jpeg"`` for figures over photographs (which compress badly as PNG) keep a
    committed notebook light."""
    from IPython.display import Image

    buf = io.BytesIO()
    fig.savefig(buf, format=format, dpi=dpi, **({"pil_kwargs": {"quality": 85}} if format == "jpeg" else {}))
    return Image(data=buf.getvalue(), format=format)


def plot_table_bars(record: dict, paper: dict[str, dict], paper_keys: dict[str, str], metrics: Sequence[str],
                    ylabel: str) -> Figure:
    """A results table as bars: ours (filled) beside the paper's (hatched), one panel per metric."""
    rows = list(record["rows"])
    fig = Figure(figsize=(2.6 * len(metrics), 2.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(metrics), sharey=True))
    x = np.arange(len(rows))
    for ax, m in zip(axes, metrics):
        ax.bar(x - 0.2, [record["rows"][r]["metrics"][m] for r in rows], 0.4, label="ours", color="#4c72b0")
        ax.bar(x + 0.2, [paper[paper_keys[r]][m] for r in rows], 0.4, label="paper", color="white",
               edgecolor="#999999", hatch="//")
        ax.set_xticks(x, rows, rotation=60, fontsize=7, ha="right")
        ax.set_title(m, fontsize=9)
    axes[0].set_ylabel(ylabel)
    axes[0].legend(fontsize=7)
    return fig


VERDICT_COLOURS = {"reproduced": "#2ca02c", "NOT reproduced": "#d62728", "inconclusive": "#999999",
                   "seed-dependent": "#ff7f0e"}


def plot_claims(claims: Mapping[int, Sequence | None]) -> Figure:
    """Each checked claim as two bars: our difference (coloured by verdict) and the paper's
    (hatched), in points of the claim's metric; claims grouped by table, top to bottom."""
    items = [(n, c) for n, found in claims.items() if found for c in found]
    fig = Figure(figsize=(7.5, 0.9 + 0.38 * max(len(items), 1)), layout="constrained")
    ax = fig.subplots()
    if not items:
        ax.text(0.5, 0.5, "no table run yet", ha="center", va="center")
        ax.set_axis_off()
        return fig
    y = np.arange(len(items))[::-1]
    ours = [c.ours[0] - c.ours[1] for _, c in items]
    paper = [c.paper[0] - c.paper[1] for _, c in items]
    ax.barh(y + 0.2, ours, 0.4, color=[VERDICT_COLOURS[c.verdict] for _, c in items], label="ours")
    ax.barh(y - 0.2, paper, 0.4, color="white", edgecolor="#777777", hatch="//", label="paper")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, [f"T{n}: {c.rows[0]} vs {c.rows[1]} ({c.metric})" for n, c in items], fontsize=7)
    ax.set_xlabel("difference (points): first row minus second", fontsize=8)
    ax.set_title("the paper's claims: our difference (green reproduced, red not, orange seed-dependent, grey inconclusive) vs the paper's",
                 fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    return fig
