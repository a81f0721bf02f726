"""fpnlib.viz_pyramid: the ablation wiring by gradients, and the pyramid figures of notebook 02."""
from __future__ import annotations

import pytest
import torch

from fpnlib.modeling.backbone import ResNetBackbone
from fpnlib.modeling.fpn import FPN, STRIDES
from fpnlib.viz import save_figure
from fpnlib.viz_pyramid import (
    dependency_table,
    level_dependencies,
    plot_dependencies,
    plot_level,
    plot_merge_block,
    plot_pyramid,
    pyramid_widget,
)

HW = (67, 93)  # odd sides: the top-down pathway must upsample to exact sizes
C = ["c2", "c3", "c4", "c5"]


@pytest.fixture(scope="module")
def feats():
    torch.manual_seed(0)
    backbone = ResNetBackbone(depth=18, width=8, norm="gn", freeze_at=0).eval()
    with torch.no_grad():
        return backbone(torch.randn(1, 3, *HW))


def _fpn(feats, **kwargs):
    torch.manual_seed(0)
    return FPN({k: v.shape[1] for k, v in feats.items()}, out_channels=8, **kwargs).eval()


def _reads(deps):
    """{level: [inputs it depends on]}"""
    return {p: [c for c in C if d[c]] for p, d in deps.items()}


# ------------------------------------------------------------------ level_dependencies


def test_full_fpn_is_lower_triangular(feats):
    assert _reads(level_dependencies(_fpn(feats), feats)) == {
        "p2": C, "p3": C[1:], "p4": C[2:], "p5": ["c5"], "p6": ["c5"]}


def test_bottom_up_pyramid_levels_are_independent(feats):  # Table 1(d)
    assert _reads(level_dependencies(_fpn(feats, top_down=False), feats)) == {
        "p2": ["c2"], "p3": ["c3"], "p4": ["c4"], "p5": ["c5"], "p6": ["c5"]}


def test_no_lateral_reads_c5_only(feats):  # Table 1(e)
    deps = level_dependencies(_fpn(feats, lateral=False), feats)
    assert not deps["p2"]["c2"]
    assert _reads(deps) == {p: ["c5"] for p in STRIDES}


def test_finest_only_keeps_the_full_top_down_pathway(feats):  # Table 1(f)
    deps = level_dependencies(_fpn(feats, out_levels=("p2",)), feats)
    assert _reads(deps) == {"p2": C}


def test_dependencies_under_no_grad_leave_inputs_alone(feats):
    with torch.no_grad():
        deps = level_dependencies(_fpn(feats), feats)
    assert deps["p2"]["c5"]
    assert not any(v.requires_grad for v in feats.values())


def test_dependency_table_markdown(feats):
    table = dependency_table(level_dependencies(_fpn(feats, lateral=False), feats))
    lines = table.splitlines()
    assert lines[0] == "| level | C2 | C3 | C4 | C5 |"
    assert len(lines) == 2 + 5
    assert lines[2] == "| P2 | . | . | . | x |"


# ------------------------------------------------------------------ figures


@pytest.fixture(scope="module")
def pyramid(feats):
    with torch.no_grad():
        return _fpn(feats)(feats)


def test_plot_pyramid_one_panel_per_level_at_true_resolution(pyramid):
    image = torch.rand(3, *HW)
    fig = plot_pyramid(image, pyramid)
    axes = fig.get_axes()
    assert len(axes) == 6  # image + P2..P6 on a 2x3 grid
    for ax, level in zip(axes[1:], pyramid):
        h, w = pyramid[level].shape[-2:]
        s = STRIDES[level]
        assert ax.get_title().startswith(f"{level.upper()}: stride {s}, {h}×{w}")
        # one map cell covers stride x stride image pixels
        assert ax.get_images()[0].get_extent() == [0, w * s, h * s, 0]
        assert ax.get_images()[0].get_array().shape == (h, w)
    # a single channel: signed colour scale, symmetric around zero
    fig = plot_pyramid(image, {"p3": pyramid["p3"]}, channel=2, ncols=2)
    assert len(fig.get_axes()) == 2
    lo, hi = fig.get_axes()[1].get_images()[0].get_clim()
    assert lo == -hi and hi > 0


def test_plot_level_and_merge_block(pyramid, feats):
    image = torch.rand(3, *HW)
    fig = plot_level(image, pyramid, "p4", channel=-1)
    assert len(fig.get_axes()) == 2 and "P4: stride 16" in fig.get_axes()[1].get_title()
    coarser = torch.randn(1, 8, *pyramid["p4"].shape[-2:])
    lateral = torch.randn(1, 8, *pyramid["p3"].shape[-2:])
    fig = plot_merge_block(coarser, lateral, pyramid["p3"], "p3", channel=1)
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == ["M4 (stride 16)", "2× up(M4)", "1×1 conv(C3)", "M3 = sum",
                                               "P3 = 3×3 conv(M3)"]
    # the sum panel is exactly upsampled coarser + lateral
    up = torch.nn.functional.interpolate(coarser, size=lateral.shape[-2:], mode="nearest")
    assert torch.allclose(torch.as_tensor(axes[3].get_images()[0].get_array()), (up + lateral)[0, 1])


def test_plot_dependencies_marks_absent_levels(feats, tmp_path):
    variants = {"full": level_dependencies(_fpn(feats), feats),
                "p2 only": level_dependencies(_fpn(feats, out_levels=("p2",)), feats)}
    fig = plot_dependencies(variants)
    axes = fig.get_axes()
    assert len(axes) == 2
    grid_full = axes[0].get_images()[0].get_array()
    assert grid_full.shape == (5, 4) and grid_full[0].tolist() == [1, 1, 1, 1] and grid_full[3].tolist() == [0, 0, 0, 1]
    assert [t.get_text() for t in axes[1].texts] == ["absent"] * 4
    path = save_figure(fig, tmp_path / "deps.png")
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size < 300_000


def test_pyramid_widget_draws_a_new_image_on_every_move(pyramid, monkeypatch):
    """The widget shows a picture when created and another when a slider moves: what it hands to
    IPython's display, as the notebook's output area receives it (the browser test,
    tests/test_browser.py, checks the same in JupyterLab)."""
    pytest.importorskip("ipywidgets")
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *objs, **kw: shown.extend(objs))
    w = pyramid_widget(torch.rand(3, *HW), pyramid)
    level, channel = w.kwargs_widgets
    assert list(level.options) == list(pyramid) and channel.min == -1 and channel.max == 7
    assert [type(o).__name__ for o in shown] == ["Image"], "the initial view is displayed as an image"
    level.value = "p4"
    channel.value = 3
    assert len(shown) == 3, "each slider move displays a new view"
    pngs = [o.data for o in shown]
    assert all(p[:4] == b"\x89PNG" for p in pngs)
    assert len(set(pngs)) == 3, "a move changes the picture"


def test_log_axes_draw_their_labels_without_mathtext(monkeypatch):
    """matplotlib's default log-axis labels are mathtext (2^5), which looks up the STIX and
    Computer Modern fonts: where the font cache lacks them every such figure printed "findfont:
    Font family ... not found" in the notebooks. The lessons' log-axis figures draw with mathtext
    switched off, and their labels are the plain numbers."""
    import io

    import matplotlib.mathtext
    import numpy as np

    from fpnlib.modeling.segment_proposals import canonical_slots
    from fpnlib.viz import plot_size_histogram
    from fpnlib.viz_anchors import plot_uncovered_gts
    from fpnlib.viz_roi import plot_level_rule
    from fpnlib.viz_rpn import plot_training_log
    from fpnlib.viz_segments import plot_segment_slots

    def no_mathtext(*args, **kwargs):
        raise AssertionError("a figure label went through mathtext")

    monkeypatch.setattr(matplotlib.mathtext.MathTextParser, "parse", no_mathtext)
    rng = np.random.default_rng(0)
    side = rng.uniform(8, 200, 50)
    log = [{"iteration": i, "loss_objectness": 1 / (i + 1), "loss_rpn_box": 0.5 / (i + 1)} for i in range(20)]
    coverage = {"fpn": {"side": side, "best_iou": rng.uniform(0, 1, 50), "sizes": {"p2": (16.0,), "p3": (32.0,)}}}
    figures = [plot_size_histogram(side ** 2), plot_level_rule(sides=side), plot_training_log({"fpn": log}),
               plot_segment_slots(canonical_slots(("5x5", "7x7")), side), plot_uncovered_gts(coverage)]
    for fig in figures:
        fig.savefig(io.BytesIO(), format="png")
    labels = [t.get_text() for t in figures[0].get_axes()[0].get_xticklabels() if t.get_text()]
    assert labels and all("$" not in t for t in labels) and "32" in labels, labels
