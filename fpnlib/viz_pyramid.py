"""Looking inside the pyramid: per-level feature maps, the Fig. 3 merge, ablation wiring.

Used by ``notebooks/02_top_down_lateral.ipynb``. Plotting functions are pure: they take
tensors and return a ``matplotlib.figure.Figure`` (no pyplot state). The one widget,
:func:`pyramid_widget`, is a thin ``ipywidgets.interactive`` wrapper that displays
:func:`plot_level`'s figure and imports ipywidgets only when called.

:func:`level_dependencies` is the analysis behind the ablation picture: which bottom-up
maps C2..C5 each output level Pk actually reads, measured by autograd, so the answer comes
from the network that runs rather than from a diagram (Sec. 3, Fig. 3; Table 1(c)-(f)).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from fpnlib.modeling.anchors import LEVEL_STRIDES
from fpnlib.modeling.fpn import STRIDES
from fpnlib.viz import figure_to_image, to_numpy_image

IN_LEVELS = ("c2", "c3", "c4", "c5")
OUT_LEVELS = tuple(STRIDES)  # p2..p6


# ------------------------------------------------------------------ analysis


def level_dependencies(fpn: nn.Module, feats: Mapping[str, Tensor]) -> dict[str, dict[str, bool]]:
    """``{out_level: {in_level: depends}}``: does Pk change when Cj changes?

    Pk depends on Cj iff the gradient of ``Pk.sum()`` with respect to Cj is not zero
    everywhere. This is how the ablations of Table 1 differ (Sec. 5.1.1): in the full FPN
    (Fig. 3) P2 reads C2..C5 through the top-down pathway; without top-down additions
    (Table 1(d)) each Pk reads Ck alone; without lateral connections (Table 1(e)) P2..P4
    read C5 alone. With random weights a real connection giving an exactly-zero gradient
    has probability zero, so "non-zero" is a faithful test of wiring.
    """
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in feats.items()}
    with torch.enable_grad():  # the caller may be inside torch.no_grad()
        out = fpn(leaves)
        deps = {}
        for level, y in out.items():
            grads = torch.autograd.grad(y.sum(), list(leaves.values()), allow_unused=True,
                                        retain_graph=True)
            deps[level] = {k: g is not None and bool(g.abs().sum() > 0) for k, g in zip(leaves, grads)}
    return deps


def dependency_table(deps: Mapping[str, Mapping[str, bool]], in_levels: Sequence[str] = IN_LEVELS) -> str:
    """A Markdown table of :func:`level_dependencies`: rows Pk, columns Cj, "x" = depends."""
    head = "| level | " + " | ".join(c.upper() for c in in_levels) + " |"
    rule = "|---|" + "---|" * len(in_levels)
    rows = [f"| {p.upper()} | " + " | ".join("x" if d.get(c) else "." for c in in_levels) + " |"
            for p, d in deps.items()]
    return "\n".join([head, rule, *rows])


# ------------------------------------------------------------------ plotting helpers


def _map2d(x: Tensor, channel: int | None) -> np.ndarray:
    """One 2-D map from ``[N, C, H, W]`` (first image) or ``[C, H, W]``: channel ``channel``,
    or the channel-mean of ``|x|`` when ``channel`` is ``None`` (or negative)."""
    x = x.detach().float().cpu()
    if x.dim() == 4:
        x = x[0]
    if channel is None or channel < 0:
        return x.abs().mean(0).numpy()
    return x[channel].numpy()


def _show_map(ax, m: np.ndarray, stride: int, signed: bool) -> None:
    """Draw a map in input-image pixels: one cell covers ``stride x stride`` pixels, so the
    blockiness of each panel is its true resolution."""
    h, w = m.shape
    if signed:
        lim = float(np.abs(m).max()) or 1.0
        ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest",
                  extent=(0, w * stride, h * stride, 0))
    else:
        ax.imshow(m, cmap="magma", interpolation="nearest", extent=(0, w * stride, h * stride, 0))
    ax.set_xticks([])
    ax.set_yticks([])


def _what(channel: int | None) -> str:
    return "mean |activation|" if channel is None or channel < 0 else f"channel {channel}"


# ------------------------------------------------------------------ figures


def plot_pyramid(image: Tensor, pyramid: Mapping[str, Tensor], channel: int | None = None,
                 ncols: int = 3, size: float = 2.2) -> Figure:
    """The image and every pyramid level (e.g. P2..P6) at its true resolution (Sec. 3).

    Each level is drawn over the image's extent with nearest-neighbour cells of its stride
    (P2: 4 px, ..., P6: 64 px), titled with stride and map size. ``channel=None`` shows the
    channel-mean of |activation|, otherwise that channel with a symmetric colour scale.
    Each panel has its own colour scale: levels are compared by layout, not by magnitude.
    """
    levels = list(pyramid)
    n = 1 + len(levels)
    nrows = -(-n // ncols)
    img = to_numpy_image(image)
    aspect = img.shape[0] / img.shape[1]
    fig = Figure(figsize=(size * ncols, size * aspect * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    axes[0].imshow(img)
    axes[0].set_title(f"image {img.shape[0]}×{img.shape[1]}", fontsize=8)
    axes[0].set_axis_off()
    for ax, level in zip(axes[1:], levels):
        m = _map2d(pyramid[level], channel)
        stride = LEVEL_STRIDES[level]  # c2..c5 or p2..p6
        _show_map(ax, m, stride, signed=channel is not None and channel >= 0)
        ax.set_xlim(0, img.shape[1])
        ax.set_ylim(img.shape[0], 0)
        ax.set_title(f"{level.upper()}: stride {stride}, {m.shape[0]}×{m.shape[1]}", fontsize=8)
    for ax in axes[n:]:
        ax.set_axis_off()
    fig.suptitle(f"{'bottom-up stages' if levels[0].startswith('c') else 'pyramid levels'}, "
                 f"{_what(channel)} (untrained network)", fontsize=9)
    return fig


def plot_level(image: Tensor, pyramid: Mapping[str, Tensor], level: str, channel: int | None = None,
               size: float = 3.2) -> Figure:
    """The image beside one pyramid level at its true resolution (the widget's view)."""
    img = to_numpy_image(image)
    aspect = img.shape[0] / img.shape[1]
    fig = Figure(figsize=(2 * size, size * aspect + 0.4), layout="constrained")
    ax_img, ax = fig.subplots(1, 2)
    ax_img.imshow(img)
    ax_img.set_axis_off()
    m = _map2d(pyramid[level], channel)
    _show_map(ax, m, STRIDES[level], signed=channel is not None and channel >= 0)
    ax.set_xlim(0, img.shape[1])
    ax.set_ylim(img.shape[0], 0)
    ax.set_title(f"{level.upper()}: stride {STRIDES[level]}, {m.shape[0]}×{m.shape[1]}, {_what(channel)}",
                 fontsize=8)
    return fig


def plot_merge_block(coarser: Tensor, lateral: Tensor, output: Tensor, level: str,
                     channel: int = 0, size: float = 2.3) -> Figure:
    """The Fig. 3 building block for one level k, one channel, in five panels:
    M(k+1) (coarser, stride 2s) -> 2x up(M(k+1)) -> + 1x1 conv(Ck) -> Mk -> Pk = 3x3 conv(Mk).

    ``coarser`` is M(k+1), ``lateral`` is 1x1 conv(Ck) and ``output`` is Pk; the upsampled map
    and the sum are recomputed here with :func:`fpnlib.modeling.fpn.top_down_merge`'s own
    pieces so the picture shows exactly what the library adds. All panels share one colour
    scale except Pk (a different conv's output).
    """
    from fpnlib.modeling.fpn import upsample_nearest

    k = int(level[1:])
    s = STRIDES[level]
    up = upsample_nearest(coarser, lateral.shape[-2:])
    merged = up + lateral
    maps = [(coarser, 2 * s, f"M{k + 1} (stride {2 * s})"), (up, s, f"2× up(M{k + 1})"),
            (lateral, s, f"1×1 conv(C{k})"), (merged, s, f"M{k} = sum"), (output, s, f"P{k} = 3×3 conv(M{k})")]
    arrays = [(_map2d(x, channel), st, t) for x, st, t in maps]
    lim = max(float(np.abs(a).max()) for a, _, _ in arrays[:4]) or 1.0
    h, w = arrays[1][0].shape
    fig = Figure(figsize=(size * 5, size * h / w + 0.6), layout="constrained")
    axes = fig.subplots(1, 5)
    for i, (ax, (a, st, title)) in enumerate(zip(axes, arrays)):
        vlim = lim if i < 4 else (float(np.abs(a).max()) or 1.0)
        ax.imshow(a, cmap="RdBu_r", vmin=-vlim, vmax=vlim, interpolation="nearest",
                  extent=(0, a.shape[1] * st, a.shape[0] * st, 0))
        ax.set_xlim(0, w * s)
        ax.set_ylim(h * s, 0)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=8)
    fig.suptitle(f"Fig. 3 merge block at {level.upper()}, channel {channel}", fontsize=9)
    return fig


def plot_dependencies(variants: Mapping[str, Mapping[str, Mapping[str, bool]]],
                      in_levels: Sequence[str] = IN_LEVELS, out_levels: Sequence[str] = OUT_LEVELS,
                      size: float = 2.2) -> Figure:
    """One small heat-map per FPN variant: rows P2..P6, columns C2..C5.

    ``variants`` maps a name to :func:`level_dependencies`' result. Dark = the level depends
    on that input, light = it does not, grey "absent" = the variant does not output the level.
    """
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(["#f0f0f0", "#2b5d8a", "#bdbdbd"])  # 0 no, 1 yes, 2 absent
    fig = Figure(figsize=(size * len(variants), size * 1.25 + 0.3), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(variants)))
    for ax, (name, deps) in zip(axes, variants.items()):
        grid = np.array([[2 if p not in deps else int(bool(deps[p].get(c))) for c in in_levels]
                         for p in out_levels])
        ax.imshow(grid, cmap=cmap, vmin=0, vmax=2)
        for i, p in enumerate(out_levels):
            if p not in deps:
                ax.text(len(in_levels) / 2 - 0.5, i, "absent", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(in_levels)), [c.upper() for c in in_levels], fontsize=7)
        ax.set_yticks(range(len(out_levels)), [p.upper() for p in out_levels], fontsize=7)
        ax.set_xticks(np.arange(len(in_levels) + 1) - 0.5, minor=True)
        ax.set_yticks(np.arange(len(out_levels) + 1) - 0.5, minor=True)
        ax.grid(which="minor", color="white", lw=1)
        ax.tick_params(which="minor", length=0)
        ax.set_title(name, fontsize=8)
    fig.suptitle("which bottom-up maps each level reads (dark = non-zero gradient)", fontsize=9)
    return fig


# ------------------------------------------------------------------ widget


def pyramid_widget(image: Tensor, pyramid: Mapping[str, Tensor]):
    """Level and channel sliders over :func:`plot_level` (channel -1 = mean |activation|).

    Returns the ``ipywidgets.interactive`` box; create it only in a live notebook. Each move
    displays the view as a PNG in the box's output area: ``interactive`` does not display what
    its function returns, and a pyplot-free Figure has no rich display of its own.
    """
    import ipywidgets as widgets
    from IPython.display import display

    levels = list(pyramid)
    channels = int(next(iter(pyramid.values())).shape[-3])

    def show(level: str, channel: int) -> None:
        display(figure_to_image(plot_level(image, pyramid, level, channel)))

    return widgets.interactive(
        show,
        level=widgets.SelectionSlider(options=levels, value=levels[0], description="level"),
        channel=widgets.IntSlider(value=-1, min=-1, max=channels - 1, description="channel"),
    )


def plot_figure1_costs(results: Mapping[str, Mapping]) -> Figure:
    """Fig. 1 (a)-(d) measured: forward time and activation memory of each architecture."""
    archs = list(results)
    fig = Figure(figsize=(7.5, 2.6), layout="constrained")
    ax_t, ax_m = fig.subplots(1, 2)
    colours = ["#c44e52", "#8c8c8c", "#dd8452", "#4c72b0"]
    labels = [f"({a}) {results[a]['name']}" for a in archs]
    for ax, key, unit in ((ax_t, "time_s", "ms"), (ax_m, "memory_mb", "MB")):
        values = [results[a][key] * (1000 if key == "time_s" else 1) for a in archs]
        ax.barh(range(len(archs)), values, color=colours[: len(archs)])
        ax.set_yticks(range(len(archs)), labels if ax is ax_t else [f"({a})" for a in archs], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(unit, fontsize=8)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.0f}", va="center", fontsize=7)
    ax_t.set_title("one forward pass (median)", fontsize=9)
    ax_m.set_title(f"activations ({next(iter(results.values()))['memory_kind']})", fontsize=9)
    return fig
