"""Anchor analysis and pictures of notebook 03 (Sec. 4.1): what they count, what they draw."""

import numpy as np
import pytest
import torch
from matplotlib.patches import Rectangle

from fpnlib import viz_anchors as va
from fpnlib.modeling.anchors import LEVEL_STRIDES, PAPER_ANCHOR_SIZES, VARIANTS, anchor_sizes_for, count_anchors

LEVELS = list(PAPER_ANCHOR_SIZES)


def centred_box(cx, cy, side):
    return torch.tensor([[cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]])


# ----------------------------------------------------------------------------- anchors


@pytest.mark.parametrize("hw", [(256, 256), (160, 214), (333, 500)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_pyramid_anchors_tile_the_padded_maps(hw, variant):
    anchors = va.pyramid_anchors(hw, variant, scale=0.5)
    assert list(anchors) == list(anchor_sizes_for(variant))
    padded = tuple(-(-v // 32) * 32 for v in hw)
    assert sum(len(a) for a in anchors.values()) == count_anchors(padded, variant)
    unpadded = va.pyramid_anchors(hw, variant, scale=0.5, size_divisible=1)
    assert sum(len(a) for a in unpadded.values()) == count_anchors(hw, variant)


def test_pyramid_anchors_have_the_scaled_sizes():
    anchors = va.pyramid_anchors((128, 128), "fpn", scale=0.5)
    for lvl, a in anchors.items():
        areas = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
        torch.testing.assert_close(areas, torch.full_like(areas, (PAPER_ANCHOR_SIZES[lvl] * 0.5) ** 2))


@pytest.mark.parametrize("scale, side, level", [(1.0, 64, "p3"), (0.5, 32, "p3"), (1.0, 128, "p4"), (0.25, 8, "p2")])
def test_square_box_of_an_anchor_size_is_positive_only_on_that_level(scale, side, level):
    stride = LEVEL_STRIDES[level]
    c = (12 + 0.5) * stride  # an anchor location of that level (offset 0.5)
    anchors = va.pyramid_anchors((512, 512), "fpn", scale)
    counts = va.positives_per_gt_per_level(anchors, centred_box(c, c, side))
    assert counts.shape == (1, 5) and counts.dtype == torch.int64
    assert counts[0, LEVELS.index(level)] >= 1
    assert counts[0].sum() == counts[0, LEVELS.index(level)]
    best, best_level = va.best_anchor_iou(anchors, centred_box(c, c, side))
    assert best.item() == pytest.approx(1.0) and LEVELS[best_level.item()] == level


def test_box_identical_to_an_anchor_gets_that_anchor():
    anchors = va.pyramid_anchors((200, 300), "fpn", 1.0)
    for i, lvl in enumerate(LEVELS):
        a = anchors[lvl][len(anchors[lvl]) // 3]
        counts = va.positives_per_gt_per_level(anchors, a[None])
        assert counts[0, i] >= 1
        pos = va.positive_anchors(anchors, a[None])
        assert (pos[lvl] == a).all(dim=1).any()
        assert sum(len(p) for p in pos.values()) == counts.sum()


def test_counts_follow_the_matched_gt_so_a_gt_can_lose_its_best_anchor():
    # gt 1's best anchor (IoU 0.81) is gt 0's exact match: it regresses to gt 0, gt 1 gets none.
    anchors = {"p2": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "p3": torch.tensor([[100.0, 100.0, 110.0, 110.0]])}
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 9.0, 9.0]])
    counts = va.positives_per_gt_per_level(anchors, gts)
    assert counts.tolist() == [[1, 0], [0, 0]]


def test_no_ground_truth_gives_empty_counts():
    anchors = va.pyramid_anchors((64, 64), "fpn", 0.25)
    assert va.positives_per_gt_per_level(anchors, torch.zeros(0, 4)).shape == (0, 5)
    best, lvl = va.best_anchor_iou(anchors, torch.zeros(0, 4))
    assert best.shape == (0,) and lvl.shape == (0,)
    assert all(len(p) == 0 for p in va.positive_anchors(anchors, torch.zeros(0, 4)).values())


def test_coverage_over_split_skips_crowd_regions_and_empty_images():
    crowd_box = torch.tensor([[0.0, 0.0, 60.0, 60.0]])
    gt = [{"hw": (128, 128), "boxes": centred_box(90, 90, 16), "crowd": crowd_box},
          {"hw": (128, 128), "boxes": torch.zeros(0, 4), "crowd": torch.zeros(0, 4)}]
    cov = va.coverage_over_split(gt, "fpn", 0.5)
    assert cov["side"].shape == (1,) and cov["side"][0] == pytest.approx(16.0)
    assert cov["positives"].shape == (1, 5) and cov["positives"].sum() >= 1
    assert cov["best_iou"][0] == pytest.approx(1.0, abs=1e-6)  # 16 px at (90, 90): a p2 anchor at x0.5
    assert cov["levels"] == LEVELS and cov["sizes"]["p2"] == (16.0,)


def test_gather_ground_truth_splits_off_crowd():
    target = {"boxes": torch.tensor([[0.0, 0, 10, 10], [5, 5, 50, 50]]), "iscrowd": torch.tensor([0, 1])}
    data = [(torch.zeros(3, 40, 60), target)] * 3
    out = va.gather_ground_truth(data, max_images=2)
    assert len(out) == 2 and out[0]["hw"] == (40, 60)
    assert out[0]["boxes"].tolist() == [[0.0, 0, 10, 10]] and out[0]["crowd"].tolist() == [[5.0, 5, 50, 50]]


def test_coverage_shares_thresholds_are_the_papers():
    sh = va.coverage_shares([0.9, 0.7, 0.5, 0.3, 0.1])
    # "over 0.7" is strict, "lower than 0.3" is strict: 0.7 and 0.3 are best-anchor-only
    assert sh == pytest.approx({"covered": 0.2, "best_only": 0.6, "poor": 0.2})
    assert va.coverage_shares([]) == {"covered": 0.0, "best_only": 0.0, "poor": 0.0}


def test_anchor_counts_round_to_the_papers_column():
    rows = va.anchor_counts_vs_paper((800, 1000))
    assert [r["variant"] for r in rows] == list(VARIANTS)
    assert {r["variant"]: r["paper"] for r in rows} == {
        "c4": "47k", "c5": "12k", "fpn": "200k", "bottom_up": "200k", "top_down_no_lateral": "200k", "p2_only": "750k"}
    for r in rows:
        assert round(r["ours"] / 1000) == r["paper_value"] // 1000
    assert va.parse_count("47k") == 47000 and va.parse_count("12") == 12


# ----------------------------------------------------------------------------- pictures


def _rects(ax):
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def test_plot_cell_anchors_draws_15_anchors_one_colour_per_level():
    fig = va.plot_cell_anchors(anchor_sizes_for("fpn", 0.5), image_hw=(320, 400))
    (ax,) = fig.axes
    rects = _rects(ax)
    assert len(rects) == 15 + 1  # + the image outline
    colours = {tuple(r.get_edgecolor()) for r in rects[:15]}
    assert len(colours) == 5
    assert "15 anchors" in ax.get_title()
    assert ax.get_ylim()[0] > ax.get_ylim()[1]  # y points down, as on an image
    fig = va.plot_cell_anchors(anchor_sizes_for("c4"))
    assert len(_rects(fig.axes[0])) == 15


def test_plot_anchor_grids_one_panel_per_level():
    image = torch.rand(3, 96, 128)
    anchors = va.pyramid_anchors((96, 128), "fpn", 0.25)
    gt = torch.tensor([[10.0, 10.0, 30.0, 30.0], [40.0, 20.0, 100.0, 90.0]])
    pos = va.positive_anchors(anchors, gt)
    fig = va.plot_anchor_grids(image, anchors, gt_boxes=gt, positives_by_level=pos)
    assert len(fig.axes) == 6
    for ax, lvl in zip(fig.axes, LEVELS):
        assert ax.get_title().startswith(f"{lvl}: stride {LEVEL_STRIDES[lvl]}")
        # 3 anchors of the central location (ties: up to 4 locations), the 2 gts, the positives
        assert len(_rects(ax)) >= 3 + 2 + len(pos[lvl])
    assert not fig.axes[5].axison
    one = va.plot_anchor_grid(image, anchors["p3"], 8, "p3", gt, pos["p3"])
    assert len(one.axes) == 1 and one.axes[0].get_title().startswith("p3: stride 8")


def test_plot_positives_per_level_axes():
    pos = np.array([[2, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 0]])
    fig = va.plot_positives_per_level(pos, np.array([16.0, 45.0, 128.0]), LEVELS, anchor_sizes_for("fpn", 0.5))
    assert len(fig.axes) == 3  # heat map, colour bar, totals
    heat = fig.axes[0]
    assert [t.get_text() for t in heat.get_yticklabels()][0] == "p2 (16 px)"
    assert "sqrt(box area)" in heat.get_xlabel()
    empty = va.plot_positives_per_level(np.zeros((0, 5)), np.zeros(0), LEVELS)
    assert empty.axes[0].get_title() == "no ground truth"


def test_plot_uncovered_gts_one_panel_per_variant_with_shares():
    cov = {"fpn": {"side": np.array([8.0, 16.0, 64.0]), "best_iou": np.array([0.1, 0.5, 0.9]),
                   "sizes": anchor_sizes_for("fpn", 0.5)},
           "c5": {"side": np.array([8.0]), "best_iou": np.array([0.2])}}
    fig = va.plot_uncovered_gts(cov)
    assert len(fig.axes) == 2
    assert "33%" in fig.axes[0].get_title() and fig.axes[0].get_title().startswith("fpn: 3 gts")
    assert fig.axes[0].get_xscale() == "log"
    assert len(fig.axes[0].lines) == 2 + 5  # the two thresholds and the five anchor sizes


@pytest.mark.parametrize("fmt, magic", [("png", b"\x89PNG"), ("jpeg", b"\xff\xd8")])
def test_figure_to_image(fmt, magic):
    fig = va.plot_cell_anchors({"p2": (8.0,)})
    img = va.figure_to_image(fig, format=fmt)
    assert img.data[:len(magic)] == magic


def test_anchor_grid_widget_builds(capsys):
    pytest.importorskip("ipywidgets")
    target = {"boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0]]), "iscrowd": torch.tensor([0])}
    shown = va.anchor_grid_widget([(torch.rand(3, 64, 64), target)] * 2, "fpn", 0.25)
    image, level = shown.widget.children[:2]
    assert (image.description, image.max, level.description) == ("image", 1, "level")
    assert level.options == ("p2", "p3", "p4", "p5", "p6")
    # outside a kernel, display() prints reprs: the first image was drawn when the widget was built
    assert "IPython.core.display.Image" in capsys.readouterr().out
    # interact swallows the callback's errors; called directly, an error would fail the test
    shown(1, "p6")
    assert capsys.readouterr().out.count("IPython.core.display.Image") == 1
