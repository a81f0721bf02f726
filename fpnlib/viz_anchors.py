"""Looking at anchors: where they sit on the pyramid and which ground truths they cover (Sec. 4.1).

Used by ``notebooks/03_anchors.ipynb``. Analysis functions take tensors and return tensors or
NumPy arrays; plotting functions are pure (tensors in, a ``matplotlib.figure.Figure`` out, no
pyplot state), like :mod:`fpnlib.viz`. The only widget, :func:`anchor_grid_widget`, is a thin
``ipywidgets.interact`` wrapper over :func:`plot_anchor_grid`.

Nothing here decides a label: every positive / negative comes from
:func:`fpnlib.modeling.anchor_labels.label_anchors`, on all levels at once, as the RPN's loss
sees them, so the pictures show the library's rule and cannot drift from it.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor
from torchvision.ops import box_iou

from fpnlib.modeling.anchor_labels import POSITIVE, label_anchors
from fpnlib.modeling.anchors import (
    ASPECT_RATIOS,
    LEVEL_STRIDES,
    VARIANTS,
    AnchorGenerator,
    anchor_sizes_for,
    cell_anchors,
    count_anchors,
)
from fpnlib.viz import figure_to_image, log_scale, to_numpy_image

# One colour per anchor size, smallest first: on the pyramid that is one colour per level.
SIZE_COLOURS = ("#d62728", "#ff7f0e", "#2ca02c", "#1f77b4", "#9467bd")
COVERAGE_COLOURS = {"covered": "#2ca02c", "best_only": "#ff7f0e", "poor": "#d62728"}


# ----------------------------------------------------------------------------- anchors


def pyramid_anchors(image_hw: Sequence[int], variant: str = "fpn", scale: float = 1.0,
                    size_divisible: int = 32, offset: float = 0.5) -> dict[str, Tensor]:
    """``{level: [H_l*W_l*A, 4]}`` anchors of ``variant`` for one image, as the RPN tiles them.

    The detector zero-pads its input to a multiple of ``size_divisible`` (32, the coarsest
    backbone stride), so a level's map is ``ceil(padded / stride)`` cells and anchors also sit
    over the padding; ``size_divisible=1`` gives the unpadded maps of ``count_anchors``.
    The tensors are the generator's cached ones: read-only.
    """
    h, w = (int(v) for v in image_hw)
    if size_divisible > 1:
        h, w = (-(-v // size_divisible) * size_divisible for v in (h, w))
    gen = _generator(variant, float(scale), float(offset))
    return {lvl: gen.anchors_for(lvl, (math.ceil(h / s), math.ceil(w / s)))
            for lvl, s in gen.strides.items()}


@lru_cache(maxsize=16)
def _generator(variant: str, scale: float, offset: float) -> AnchorGenerator:
    # one generator per variant: images of the same size then share its cached anchors
    return AnchorGenerator(anchor_sizes_for(variant, scale), offset=offset)


def _concat_levels(anchors_by_level: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """All anchors in the RPN's flattening order, and the level index of each."""
    anchors = torch.cat(list(anchors_by_level.values()))
    level_of = torch.cat([torch.full((len(a),), i, dtype=torch.int64)
                          for i, a in enumerate(anchors_by_level.values())])
    return anchors, level_of


def positive_anchors(anchors_by_level: Mapping[str, Tensor], gt_boxes: Tensor,
                     **label_kwargs) -> dict[str, Tensor]:
    """``{level: [P_l, 4]}`` the positive anchors of each level (Sec. 4.1 rule, all levels
    labelled together). ``label_kwargs`` go to :func:`label_anchors`."""
    anchors, level_of = _concat_levels(anchors_by_level)
    labels, _ = label_anchors(anchors, gt_boxes, **label_kwargs)
    pos = labels == POSITIVE
    return {lvl: anchors[pos & (level_of == i)] for i, lvl in enumerate(anchors_by_level)}


def positives_per_gt_per_level(anchors_by_level: Mapping[str, Tensor], gt_boxes: Tensor,
                               **label_kwargs) -> Tensor:
    """int64 ``[num_gt, num_levels]``: positive anchors of each ground truth on each level.

    Labels come from :func:`label_anchors` over the concatenation of all levels, as in the
    RPN's loss (Sec. 4.1): a ground truth is never *assigned* to a level, it reaches a level
    only through the anchors there that overlap it. A positive counts for the gt it is matched
    to (its highest-IoU gt, the one it regresses to), so a gt whose only best anchor is
    matched to another gt gets a zero row.
    """
    anchors, level_of = _concat_levels(anchors_by_level)
    counts = torch.zeros((len(gt_boxes), len(anchors_by_level)), dtype=torch.int64)
    if len(gt_boxes) == 0:
        return counts
    labels, matched = label_anchors(anchors, gt_boxes, **label_kwargs)
    pos = labels == POSITIVE
    counts.index_put_((matched[pos], level_of[pos]), torch.ones(int(pos.sum()), dtype=torch.int64),
                      accumulate=True)
    return counts


def best_anchor_iou(anchors_by_level: Mapping[str, Tensor], gt_boxes: Tensor) -> tuple[Tensor, Tensor]:
    """``(best_iou [G], best_level [G])``: each gt's highest IoU with any anchor, and the
    index of the level that anchor lives on. Below 0.7 a gt is positive only through the
    "highest IoU for a given ground-truth box" half of the rule (Sec. 4.1)."""
    if len(gt_boxes) == 0:
        return torch.zeros(0), torch.zeros(0, dtype=torch.int64)
    anchors, level_of = _concat_levels(anchors_by_level)
    best, idx = box_iou(gt_boxes.to(anchors.dtype), anchors).max(dim=1)
    return best, level_of[idx]


def gather_ground_truth(dataset, max_images: int | None = None) -> list[dict]:
    """Per image ``{"hw", "boxes", "crowd"}`` (xyxy after the dataset's transforms; crowd
    regions apart, as the RPN keeps them out of the ground truth)."""
    out = []
    for i in range(len(dataset) if max_images is None else min(max_images, len(dataset))):
        image, target = dataset[i]
        crowd = target["iscrowd"].bool()
        out.append({"hw": tuple(image.shape[-2:]), "boxes": target["boxes"][~crowd],
                    "crowd": target["boxes"][crowd]})
    return out


def coverage_over_split(ground_truth: Sequence[dict], variant: str = "fpn", scale: float = 1.0,
                        pos_iou: float = 0.7, neg_iou: float = 0.3) -> dict:
    """Every non-crowd gt of a split against ``variant``'s anchors (Sec. 4.1).

    Returns NumPy arrays over the split's gts: ``side`` (sqrt of box area), ``best_iou``,
    ``best_level`` (index into ``levels``), ``positives`` ``[N, L]`` (as
    :func:`positives_per_gt_per_level`, crowd regions passed as ignore boxes like the RPN
    does), plus ``levels`` and ``sizes`` (anchor sizes per level).
    """
    sizes = anchor_sizes_for(variant, scale)
    side, best, best_lvl, pos = [], [], [], []
    for gt in ground_truth:
        boxes = gt["boxes"]
        if len(boxes) == 0:
            continue
        anchors = pyramid_anchors(gt["hw"], variant, scale)
        b, lvl = best_anchor_iou(anchors, boxes)
        side.append(((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt())
        best.append(b)
        best_lvl.append(lvl)
        pos.append(positives_per_gt_per_level(anchors, boxes, pos_iou=pos_iou, neg_iou=neg_iou,
                                              ignore_boxes=gt.get("crowd")))
    cat = (lambda xs, empty: torch.cat(xs).numpy() if xs else empty)
    return {"side": cat(side, np.zeros(0)), "best_iou": cat(best, np.zeros(0)),
            "best_level": cat(best_lvl, np.zeros(0, np.int64)),
            "positives": cat(pos, np.zeros((0, len(sizes)), np.int64)),
            "levels": list(sizes), "sizes": sizes, "variant": variant}


def coverage_shares(best_iou, pos_iou: float = 0.7, neg_iou: float = 0.3) -> dict[str, float]:
    """Shares of gts whose best anchor is over ``pos_iou`` ("covered": the IoU rule alone makes
    positives), between the thresholds ("best_only": only the best-anchor rule does), below
    ``neg_iou`` ("poor": the one positive overlaps the object less than a negative may)."""
    iou = np.asarray(best_iou, dtype=np.float64)
    n = max(len(iou), 1)
    return {"covered": float((iou > pos_iou).sum() / n),
            "best_only": float(((iou <= pos_iou) & (iou >= neg_iou)).sum() / n),
            "poor": float((iou < neg_iou).sum() / n)}


def anchor_counts_vs_paper(image_hw: Sequence[int] = (800, 1000)) -> list[dict]:
    """Table 1's "# anchors" column: ``count_anchors(image_hw, v)`` beside the paper's value
    for each row (the paper's image: shorter side 800, about 1000 px wide on COCO)."""
    from fpnlib.experiments.table1 import PAPER_KEYS, ROWS
    from fpnlib.reference import paper_rows

    paper = paper_rows("table1_rpn")
    letters = {v: k for k, v in ROWS.items()}
    rows = []
    for v in VARIANTS:
        p = paper[PAPER_KEYS[v]]
        rows.append({"row": letters[v], "variant": v, "feature": p["feature"],
                     "ours": count_anchors(tuple(image_hw), v), "paper": p["anchors"],
                     "paper_value": parse_count(p["anchors"])})
    return rows


def parse_count(text: str) -> int:
    """``"47k"`` -> 47000 (the paper writes anchor counts in thousands)."""
    text = text.strip().lower()
    return int(round(float(text[:-1]) * 1000)) if text.endswith("k") else int(text)


# ----------------------------------------------------------------------------- pictures


def _rect(x1, y1, x2, y2, colour, dashed=False, lw=1.0):
    from matplotlib.patches import Rectangle

    return Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, lw=lw,
                     linestyle="--" if dashed else "-")


def _size_colour(sizes_sorted: Sequence[float], size: float) -> str:
    return SIZE_COLOURS[list(sizes_sorted).index(size) % len(SIZE_COLOURS)]


def plot_cell_anchors(sizes_by_level: Mapping[str, Sequence[float]], ratios: Sequence[float] = ASPECT_RATIOS,
                      image_hw: Sequence[int] | None = None, title: str | None = None) -> Figure:
    """The anchors of one location of every level, centred on one point (Sec. 4.1): sizes x
    ratios boxes, one colour per size (= per level on the pyramid). ``image_hw`` draws an
    image of that size around them for scale."""
    all_sizes = sorted({s for sz in sizes_by_level.values() for s in sz})
    fig = Figure(figsize=(4.6, 4.2), layout="constrained")
    ax = fig.subplots()
    n = 0
    for lvl, sizes in sizes_by_level.items():
        for s in sizes:
            cell = cell_anchors([s], ratios)
            colour = _size_colour(all_sizes, s)
            for x1, y1, x2, y2 in cell.tolist():
                ax.add_patch(_rect(x1, y1, x2, y2, colour))
                n += 1
            ax.plot([], [], color=colour, label=f"{lvl}: {s:g} px (stride {LEVEL_STRIDES.get(lvl, '?')})")
    extent = max(float(cell_anchors(all_sizes, ratios).abs().max()), 1.0)
    if image_hw is not None:
        h, w = image_hw
        ax.add_patch(_rect(-w / 2, -h / 2, w / 2, h / 2, "black", dashed=True))
        ax.text(-w / 2, -h / 2, f" a {w}x{h} image", fontsize=7, va="bottom")
        extent = max(extent, w / 2, h / 2)
    ax.set_xlim(-extent * 1.05, extent * 1.05)
    ax.set_ylim(extent * 1.05, -extent * 1.05)  # y down, as on an image
    ax.set_aspect("equal")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(title or f"{n} anchors: {len(all_sizes)} sizes x {len(ratios)} ratios "
                 f"(h/w = {', '.join(f'{r:g}' for r in ratios)})", fontsize=9)
    ax.tick_params(labelsize=7)
    return fig


def _faded(image) -> np.ndarray:
    # grey and light: the coloured anchors stand out, and the PNG stays small
    grey = to_numpy_image(image).mean(axis=2, keepdims=True)
    return np.repeat(0.6 + 0.4 * grey, 3, axis=2)


def draw_anchor_grid(ax, image, anchors: Tensor, stride: int, level: str = "",
                     gt_boxes: Tensor | None = None, positives: Tensor | None = None,
                     colour: str = "#1f77b4") -> None:
    """One level on ``ax``: the (faded) image, a dot per anchor location (one every ``stride``
    px), the anchors of the location nearest the image centre (thin), the gts (black) and
    this level's positive anchors (thick, dashed). Anchors over the padding and across the
    border are kept, as in training (Sec. 5.1), so the axes extend to show them."""
    img = _faded(image)
    h, w = img.shape[:2]
    ax.imshow(img, extent=(0, w, h, 0), vmin=0, vmax=1)
    centres = torch.stack([(anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2], 1)
    locations = torch.unique(centres, dim=0)  # the A anchors of a location share a centre
    ax.scatter(locations[:, 0], locations[:, 1], s=1.0 if stride < 8 else 3, c=colour, lw=0, alpha=1.0)
    mid = torch.tensor([w / 2, h / 2])
    nearest = ((centres - mid) ** 2).sum(1)
    shown = anchors[nearest == nearest.min()]
    for x1, y1, x2, y2 in shown.tolist():
        ax.add_patch(_rect(x1, y1, x2, y2, colour, lw=0.8))
    for x1, y1, x2, y2 in ([] if gt_boxes is None else gt_boxes.tolist()):
        ax.add_patch(_rect(x1, y1, x2, y2, "black", lw=1.2))
    for x1, y1, x2, y2 in ([] if positives is None else positives.tolist()):
        ax.add_patch(_rect(x1, y1, x2, y2, colour, dashed=True, lw=1.6))
    box = torch.cat([shown] + ([positives] if positives is not None and len(positives) else []))
    ax.set_xlim(min(0.0, float(box[:, 0].min())) - 2, max(float(w), float(box[:, 2].max())) + 2)
    ax.set_ylim(max(float(h), float(box[:, 3].max())) + 2, min(0.0, float(box[:, 1].min())) - 2)
    npos = 0 if positives is None else len(positives)
    ax.set_title(f"{level}: stride {stride}, {len(locations)} locations, {npos} positive"
                 + ("" if npos == 1 else "s"), fontsize=8)
    ax.tick_params(labelsize=6)


def plot_anchor_grid(image, anchors: Tensor, stride: int, level: str = "",
                     gt_boxes: Tensor | None = None, positives: Tensor | None = None,
                     colour: str = "#1f77b4") -> Figure:
    """:func:`draw_anchor_grid` for one level, as a Figure."""
    fig = Figure(figsize=(5.0, 4.0), layout="constrained")
    draw_anchor_grid(fig.subplots(), image, anchors, stride, level, gt_boxes, positives, colour)
    return fig


def plot_anchor_grids(image, anchors_by_level: Mapping[str, Tensor], strides: Mapping[str, int] = LEVEL_STRIDES,
                      gt_boxes: Tensor | None = None, positives_by_level: Mapping[str, Tensor] | None = None,
                      ncols: int = 3, size: float = 2.8) -> Figure:
    """Every level's anchor grid on the same image, one panel per level (Sec. 4.1): dense
    small anchors on P2, sparse large ones on P6. Thick dashed boxes: the positives the
    labeling rule finds on that level for the black ground truths."""
    levels = list(anchors_by_level)
    nrows = -(-len(levels) // ncols)
    fig = Figure(figsize=(size * ncols, size * 0.85 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for i, (ax, lvl) in enumerate(zip(axes, levels)):
        draw_anchor_grid(ax, image, anchors_by_level[lvl], strides[lvl], lvl, gt_boxes,
                         None if positives_by_level is None else positives_by_level[lvl],
                         SIZE_COLOURS[i % len(SIZE_COLOURS)])
    for ax in axes[len(levels):]:
        ax.set_axis_off()
    if len(axes) > len(levels):
        axes[-1].text(0.0, 0.5, "dots: anchor locations\nthin: the anchors of the central location\n"
                      "black: ground truth\nthick dashed: positive anchors on this level",
                      fontsize=8, va="center", transform=axes[-1].transAxes)
    return fig


def _log2_bins(side: np.ndarray, num_bins: int) -> np.ndarray:
    lo, hi = np.log2(max(float(side.min()), 1.0)), np.log2(float(side.max()) * 1.001)
    return np.exp2(np.linspace(lo, hi, num_bins + 1))


def plot_positives_per_level(positives, side, levels: Sequence[str],
                             anchor_sizes: Mapping[str, Sequence[float]] | None = None,
                             num_bins: int = 10, title: str = "") -> Figure:
    """Where a split's gts find their positives (Sec. 4.1). Left: mean positives per gt on
    each level (rows) by object size (columns, sqrt of box area on a log axis). Right: all
    levels together, mean and range per size bin.

    ``positives`` ``[N, L]`` and ``side`` ``[N]`` as returned by :func:`coverage_over_split`.
    """
    positives = np.asarray(positives, dtype=np.float64).reshape(-1, len(levels))
    side = np.asarray(side, dtype=np.float64)
    fig = Figure(figsize=(9.0, 3.4), layout="constrained")
    ax, ax2 = fig.subplots(1, 2, width_ratios=(1.6, 1))
    if len(side) == 0:
        ax.set_title("no ground truth", fontsize=9)
        return fig
    edges = _log2_bins(side, num_bins)
    which = np.clip(np.digitize(side, edges) - 1, 0, num_bins - 1)
    mean = np.full((len(levels), num_bins), np.nan)
    total = positives.sum(1)
    stats = []
    for b in range(num_bins):
        sel = which == b
        if sel.any():
            mean[:, b] = positives[sel].mean(0)
            stats.append((np.sqrt(edges[b] * edges[b + 1]), total[sel].mean(), total[sel].min(), total[sel].max()))
    im = ax.imshow(mean, aspect="auto", cmap="viridis", origin="upper",
                   extent=(np.log2(edges[0]), np.log2(edges[-1]), len(levels) - 0.5, -0.5))
    for b in range(num_bins):
        for li in range(len(levels)):
            if not np.isnan(mean[li, b]) and mean[li, b] >= 0.05:
                x = np.log2(np.sqrt(edges[b] * edges[b + 1]))
                ax.text(x, li, f"{mean[li, b]:.1f}", ha="center", va="center", fontsize=6,
                        color="white" if mean[li, b] < np.nanmax(mean) * 0.6 else "black")
    labels = [f"{lvl} ({anchor_sizes[lvl][0]:g} px)" if anchor_sizes and len(anchor_sizes[lvl]) == 1 else lvl
              for lvl in levels]
    ax.set_yticks(range(len(levels)), labels, fontsize=7)
    ticks = [t for t in range(int(np.ceil(np.log2(edges[0]))), int(np.log2(edges[-1])) + 1)]
    ax.set_xticks(ticks, [f"{2 ** t}" for t in ticks], fontsize=7)
    ax.set_xlabel("object size: sqrt(box area) [px]", fontsize=8)
    ax.set_title(title or "mean positive anchors per ground truth, by level", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8).ax.tick_params(labelsize=7)
    xs, m, lo, hi = (np.array(v) for v in zip(*stats))
    ax2.fill_between(xs, lo, hi, color="#bbbbbb", label="min..max")
    ax2.plot(xs, m, "o-", color="black", ms=3, label="mean")
    log_scale(ax2, "x", base=2)
    ax2.set_xlabel("object size: sqrt(box area) [px]", fontsize=8)
    ax2.set_ylabel("positives per ground truth", fontsize=8)
    ax2.set_title("all levels together", fontsize=9)
    ax2.legend(fontsize=7)
    ax2.tick_params(labelsize=7)
    return fig


def plot_uncovered_gts(coverage_by_variant: Mapping[str, Mapping], pos_iou: float = 0.7,
                       neg_iou: float = 0.3) -> Figure:
    """Best-anchor IoU of every gt against its size, one panel per variant (Sec. 4.1).

    Green: some anchor overlaps the gt by more than ``pos_iou``. Orange: none does; the gt's
    only positives are its best anchors ("the highest IoU for a given ground-truth box").
    Red: even the best anchor is below ``neg_iou``, an overlap that would make any other
    anchor a negative: the gt is effectively not covered. Dotted lines: the anchor sizes.
    ``coverage_by_variant``: ``{name: coverage_over_split(...)}``.
    """
    n = len(coverage_by_variant)
    fig = Figure(figsize=(3.3 * n, 3.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, n, sharey=True))
    for ax, (name, cov) in zip(axes, coverage_by_variant.items()):
        side, iou = np.asarray(cov["side"]), np.asarray(cov["best_iou"])
        kind = np.where(iou > pos_iou, "covered", np.where(iou >= neg_iou, "best_only", "poor"))
        for k, colour in COVERAGE_COLOURS.items():
            sel = kind == k
            ax.scatter(side[sel], iou[sel], s=4, c=colour, lw=0, alpha=0.7)
        for t in (pos_iou, neg_iou):
            ax.axhline(t, color="black", ls="--", lw=0.8)
        for s in sorted({s for sz in cov.get("sizes", {}).values() for s in sz}):
            ax.axvline(s, color="#888888", ls=":", lw=0.8)
        log_scale(ax, "x", base=2)
        ax.set_ylim(0, 1)
        sh = coverage_shares(iou, pos_iou, neg_iou)
        ax.set_title(f"{name}: {len(iou)} gts\n> {pos_iou:g}: {sh['covered']:.0%}, best-anchor only: "
                     f"{sh['best_only']:.0%}, < {neg_iou:g}: {sh['poor']:.0%}", fontsize=8)
        ax.set_xlabel("sqrt(box area) [px]", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("IoU of the best anchor", fontsize=8)
    return fig


def anchor_grid_widget(dataset, variant: str = "fpn", scale: float = 1.0, **label_kwargs):
    """Sliders for the image and a dropdown for the level over :func:`plot_anchor_grid`
    (``interactive=True`` in the notebook). ``dataset`` yields un-normalised images."""
    import ipywidgets as widgets
    from IPython.display import display

    levels = list(anchor_sizes_for(variant, scale))

    def show(image_index: int, level: str):
        image, target = dataset[image_index]
        gt = target["boxes"][~target["iscrowd"].bool()]
        anchors = pyramid_anchors(image.shape[-2:], variant, scale)
        pos = positive_anchors(anchors, gt, **label_kwargs)
        display(figure_to_image(plot_anchor_grid(image, anchors[level], LEVEL_STRIDES[level], level, gt, pos[level],
                                                 SIZE_COLOURS[levels.index(level) % len(SIZE_COLOURS)])))

    return widgets.interact(show, image_index=widgets.IntSlider(0, 0, len(dataset) - 1, description="image"),
                            level=widgets.Dropdown(options=levels, description="level"))
