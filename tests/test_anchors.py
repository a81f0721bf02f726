"""Anchors (Sec. 4.1, Table 1), their labels and the per-image sampling (Sec. 4.1, 5.1)."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from fpnlib.modeling.anchor_labels import label_anchors, label_anchors_batch, sample_anchors, sample_batch
from fpnlib.modeling.anchors import (
    ASPECT_RATIOS,
    LEVEL_STRIDES,
    PAPER_ANCHOR_SIZES,
    VARIANTS,
    AnchorGenerator,
    anchor_sizes_for,
    cell_anchors,
    count_anchors,
    grid_anchors,
)

S2 = 22.627416997969522  # 16 * sqrt(2)
S1 = 11.313708498984761  # 8 * sqrt(2)


# ---------------------------------------------------------------- cell / grid anchors


def test_cell_anchors_exact_coordinates():
    # size 32, ratio = h / w: 0.5 -> w = 32*sqrt2, h = 32/sqrt2; 2 -> the transpose.
    expected = torch.tensor([[-S2, -S1, S2, S1], [-16.0, -16.0, 16.0, 16.0], [-S1, -S2, S1, S2]])
    got = cell_anchors([32.0], ASPECT_RATIOS)
    assert got.dtype == torch.float32 and got.shape == (3, 4)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_cell_anchors_areas_are_exactly_size_squared():
    sizes = list(PAPER_ANCHOR_SIZES.values())
    a = cell_anchors(sizes, ASPECT_RATIOS).double()
    areas = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    expected = torch.tensor([s * s for s in sizes] * 3, dtype=torch.float64)
    # Rounding to whole pixels (py-faster-rcnn, torchvision) would give 45 x 23 = 1035 for 32².
    torch.testing.assert_close(areas, expected, rtol=1e-6, atol=0)


def test_cell_anchors_are_ratio_major():
    got = cell_anchors([32.0, 64.0], [0.5, 1.0, 2.0])
    expected = torch.tensor(
        [
            [-S2, -S1, S2, S1],  # r=0.5, s=32
            [-2 * S2, -2 * S1, 2 * S2, 2 * S1],  # r=0.5, s=64
            [-16.0, -16.0, 16.0, 16.0],  # r=1, s=32
            [-32.0, -32.0, 32.0, 32.0],  # r=1, s=64
            [-S1, -S2, S1, S2],  # r=2, s=32
            [-2 * S1, -2 * S2, 2 * S1, 2 * S2],  # r=2, s=64
        ]
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


CELL = torch.tensor([[-2.0, -1.0, 2.0, 1.0], [-1.0, -2.0, 1.0, 2.0]])  # A = 2, distinguishable


def test_grid_anchors_2x3_offset_half():
    # stride 4, centres x in {2, 6, 10}, y in {2, 6}; order (y, x, a).
    expected = torch.tensor(
        [
            [0, 1, 4, 3], [1, 0, 3, 4],  # (0, 0)
            [4, 1, 8, 3], [5, 0, 7, 4],  # (0, 1)
            [8, 1, 12, 3], [9, 0, 11, 4],  # (0, 2)
            [0, 5, 4, 7], [1, 4, 3, 8],  # (1, 0)
            [4, 5, 8, 7], [5, 4, 7, 8],  # (1, 1)
            [8, 5, 12, 7], [9, 4, 11, 8],  # (1, 2)
        ],
        dtype=torch.float32,
    )  # fmt: skip
    torch.testing.assert_close(grid_anchors(CELL, (2, 3), 4), expected, rtol=0, atol=0)
    torch.testing.assert_close(grid_anchors(CELL, (2, 3), 4, offset=0.5), expected, rtol=0, atol=0)


def test_grid_anchors_2x3_offset_zero():
    expected = torch.tensor(
        [
            [-2, -1, 2, 1], [-1, -2, 1, 2],
            [2, -1, 6, 1], [3, -2, 5, 2],
            [6, -1, 10, 1], [7, -2, 9, 2],
            [-2, 3, 2, 5], [-1, 2, 1, 6],
            [2, 3, 6, 5], [3, 2, 5, 6],
            [6, 3, 10, 5], [7, 2, 9, 6],
        ],
        dtype=torch.float32,
    )  # fmt: skip
    torch.testing.assert_close(grid_anchors(CELL, (2, 3), 4, offset=0.0), expected, rtol=0, atol=0)


def test_grid_order_matches_rpn_head_layout():
    # A head output (N, A, H, W) permuted to (N, H, W, A) and flattened must line up with anchors.
    a_, h, w, stride = 2, 3, 5, 8
    head = torch.zeros(1, a_, h, w)
    for a in range(a_):
        for y in range(h):
            for x in range(w):
                head[0, a, y, x] = 100 * a + 10 * y + x
    flat = head.permute(0, 2, 3, 1).reshape(-1)
    anchors = grid_anchors(CELL, (h, w), stride)
    cx = (anchors[:, 0] + anchors[:, 2]) / 2
    cy = (anchors[:, 1] + anchors[:, 3]) / 2
    x = (cx / stride - 0.5).round()
    y = (cy / stride - 0.5).round()
    a = (anchors[:, 2] - anchors[:, 0] == 2).long()  # CELL[1] is the narrow one
    torch.testing.assert_close(flat, 100 * a + 10 * y + x, check_dtype=False)


def test_offset_zero_interoperates_with_torchvision():
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    tv = TVAnchorGenerator(sizes=((32,),), aspect_ratios=((0.5, 1.0, 2.0),))
    images = ImageList(torch.zeros(1, 3, 64, 96), [(64, 96)])
    feature = torch.zeros(1, 1, 16, 24)  # stride 4
    ref = tv(images, [feature])[0]
    ours = AnchorGenerator({"p2": (32.0,)}, offset=0.0)({"p2": feature})["p2"]
    assert ours.shape == ref.shape
    # Same order; torchvision rounds cell anchors to whole pixels, we keep exact areas.
    torch.testing.assert_close(ours, ref, rtol=0, atol=0.5)


# ---------------------------------------------------------------- sizes and counts


def test_fpn_variants_have_one_size_per_level():
    for variant in ("fpn", "bottom_up", "top_down_no_lateral"):
        sizes = anchor_sizes_for(variant)
        assert sizes == {"p2": (32.0,), "p3": (64.0,), "p4": (128.0,), "p5": (256.0,), "p6": (512.0,)}
        gen = AnchorGenerator(sizes)
        assert all(gen.num_anchors(lvl) == 3 for lvl in sizes)
        assert sum(gen.num_anchors(lvl) for lvl in sizes) == 15  # "15 anchors over the pyramid"


@pytest.mark.parametrize("variant,level", [("c4", "c4"), ("c5", "c5"), ("p2_only", "p2")])
def test_single_map_variants_have_15_anchors_per_location(variant, level):
    sizes = anchor_sizes_for(variant)
    assert list(sizes) == [level]
    assert sizes[level] == (32.0, 64.0, 128.0, 256.0, 512.0)
    assert AnchorGenerator(sizes).num_anchors(level) == 15


def test_scale_multiplies_every_size():
    for variant in VARIANTS:
        base, scaled = anchor_sizes_for(variant), anchor_sizes_for(variant, scale=0.4)
        assert base.keys() == scaled.keys()
        for lvl in base:
            assert scaled[lvl] == pytest.approx([0.4 * s for s in base[lvl]])
    with pytest.raises(ValueError):
        anchor_sizes_for("c6")


@pytest.mark.parametrize(
    "variant,count,paper",
    [
        ("c4", 47250, 47_000),
        ("c5", 12000, 12_000),
        ("fpn", 199974, 200_000),
        ("bottom_up", 199974, 200_000),
        ("top_down_no_lateral", 199974, 200_000),
        ("p2_only", 750000, 750_000),
    ],
)
def test_count_anchors_matches_table1(variant, count, paper):
    n = count_anchors((800, 1000), variant)
    assert n == count
    assert round(n, -3) == paper  # Table 1 "# anchors": 47k, 12k, 200k, 750k


def _resnet_feature_shapes(image_hw):
    """Shapes of C2..C5 and P6 (stride-2 subsampling of P5, Sec. 4.1) of a real ResNet-50,
    propagated on the meta device (no compute)."""
    with torch.device("meta"):
        m = torchvision.models.resnet50()
        x = m.maxpool(m.relu(m.bn1(m.conv1(torch.empty(1, 3, *image_hw)))))
        shapes = {}
        for i, layer in enumerate([m.layer1, m.layer2, m.layer3, m.layer4], start=2):
            x = layer(x)
            shapes[f"c{i}"] = shapes[f"p{i}"] = tuple(x.shape[-2:])
        shapes["p6"] = tuple(F.max_pool2d(x, kernel_size=1, stride=2).shape[-2:])
    return shapes


def test_generator_length_equals_count_for_real_feature_shapes():
    shapes = _resnet_feature_shapes((800, 1000))
    maps = {lvl: torch.empty(1, 0, *hw) for lvl, hw in shapes.items()}  # shape only
    for variant in VARIANTS:
        gen = AnchorGenerator(anchor_sizes_for(variant))
        out = gen(maps)
        assert list(out) == list(gen.levels)
        for lvl, anchors in out.items():
            h, w = shapes[lvl]
            assert anchors.shape == (h * w * gen.num_anchors(lvl), 4)
            assert anchors.dtype == torch.float32
        assert sum(a.shape[0] for a in out.values()) == count_anchors((800, 1000), variant)


def test_generator_levels_strides_and_cache():
    gen = AnchorGenerator(anchor_sizes_for("fpn"))
    maps = {"p2": torch.zeros(2, 4, 8, 10), "p3": torch.zeros(2, 4, 4, 5), "p4": torch.zeros(2, 4, 2, 3),
            "p5": torch.zeros(2, 4, 1, 2), "p6": torch.zeros(2, 4, 1, 1), "c5": torch.zeros(2, 4, 1, 2)}
    out = gen(maps)
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]  # extra maps (c5) ignored
    for lvl, anchors in out.items():
        cell = cell_anchors([PAPER_ANCHOR_SIZES[lvl]])
        expected = grid_anchors(cell, tuple(maps[lvl].shape[-2:]), LEVEL_STRIDES[lvl])
        torch.testing.assert_close(anchors, expected, rtol=0, atol=0)
    assert gen(maps)["p2"] is out["p2"]  # cached by (level, H, W, device)
    assert gen({**maps, "p2": torch.zeros(1, 4, 9, 10)})["p2"].shape[0] == 9 * 10 * 3
    with pytest.raises(KeyError):
        gen({"p2": maps["p2"]})


# ---------------------------------------------------------------- labels (Sec. 4.1)

GT = torch.tensor([[0.0, 0.0, 10.0, 10.0]])


def _labels(anchors, gt=GT, **kw):
    return label_anchors(torch.tensor(anchors, dtype=torch.float32), gt, **kw)


def test_iou_above_0_7_is_positive():
    # IoUs 1.0 (the gt's best), 0.8 (positive only through the threshold), 0.7 (not "over").
    labels, matched = _labels([[0, 0, 10, 10], [0, 0, 10, 8], [0, 0, 10, 7]])
    assert labels.tolist() == [1, 1, -1]
    assert labels.dtype == matched.dtype == torch.int64


def test_best_anchor_for_a_gt_is_positive_below_0_7():
    # IoUs 0.6 (the best for the gt), 0.5, 0.
    labels, _ = _labels([[0, 0, 10, 6], [0, 0, 10, 5], [20, 20, 30, 30]])
    assert labels.tolist() == [1, -1, 0]
    # Even below the negative threshold: a gt covered only at IoU 0.2 still gets a positive.
    labels, _ = _labels([[0, 0, 10, 2], [20, 20, 30, 30]])
    assert labels.tolist() == [1, 0]


def test_tied_best_anchors_are_all_positive():
    labels, _ = _labels([[0, 0, 10, 6], [0, 4, 10, 10], [0, 0, 10, 5]])  # IoUs 0.6, 0.6, 0.5
    assert labels.tolist() == [1, 1, -1]


def test_gt_that_no_anchor_touches_gives_no_positive():
    labels, _ = _labels([[20, 20, 30, 30], [40, 40, 50, 50]])
    assert labels.tolist() == [0, 0]


def test_iou_between_thresholds_is_ignored():
    # IoUs 1 (keeps the best-anchor rule away), 0.5, 0.3 (not "lower than 0.3"), 0.7 (not "over").
    anchors = [[0, 0, 10, 10], [0, 0, 10, 5], [0, 0, 10, 3], [0, 0, 10, 7]]
    labels, _ = label_anchors(torch.tensor(anchors, dtype=torch.float64), GT.double())
    assert labels.tolist() == [1, -1, -1, -1]


def test_iou_below_0_3_is_negative():
    labels, _ = _labels([[0, 0, 10, 10], [0, 0, 10, 2.9], [5, 5, 15, 15], [50, 50, 60, 60]])
    # IoUs: 1, 0.29, 25/175 = 0.14, 0
    assert labels.tolist() == [1, 0, 0, 0]


def test_matched_idx_points_to_the_best_gt():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    labels, matched = _labels([[20, 20, 30, 29], [0, 0, 10, 9], [0, 0, 10, 1]], gt)
    assert labels.tolist() == [1, 1, 0]
    assert matched[:2].tolist() == [1, 0]


def test_cross_boundary_anchors_kept_by_default_ignored_with_flag():
    # 20 x 20 image. Anchor 0 leaves the image and is the gt's best (IoU 0.67); anchor 1 is
    # inside (IoU 0.6); anchor 2 crosses the border far from the gt (negative); anchor 3 inside.
    anchors = [[-5, 0, 10, 10], [0, 0, 10, 6], [15, 15, 25, 25], [12, 12, 18, 18]]
    labels, _ = _labels(anchors, image_hw=(20, 20))
    assert labels.tolist() == [1, -1, 0, 0]  # Sec. 5.1: outside anchors are used
    labels, _ = _labels(anchors, image_hw=(20, 20), ignore_cross_boundary=True)
    # Faster R-CNN: outside anchors ignored, and the best anchor is sought among inside ones.
    assert labels.tolist() == [-1, 1, -1, 0]
    with pytest.raises(ValueError):
        _labels(anchors, ignore_cross_boundary=True)


def test_crowd_region_makes_negatives_ignored_but_keeps_positives():
    crowd = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    anchors = [
        [0, 0, 10, 10],  # positive, inside the crowd box: stays positive
        [60, 60, 70, 70],  # negative, fully inside: ignored
        [95, 95, 105, 105],  # 25% inside: stays negative
        [96, 0, 106, 10],  # 40% inside: stays negative
        [94, 0, 104, 10],  # 60% inside: ignored
        [200, 200, 210, 210],  # far: negative
    ]
    labels, _ = _labels(anchors)
    assert labels.tolist() == [1, 0, 0, 0, 0, 0]
    labels, _ = _labels(anchors, ignore_boxes=crowd)
    assert labels.tolist() == [1, -1, 0, 0, -1, 0]
    labels, _ = _labels(anchors, ignore_boxes=torch.zeros(0, 4))
    assert labels.tolist() == [1, 0, 0, 0, 0, 0]


def test_image_without_objects_is_all_negative():
    anchors = [[0, 0, 10, 10], [-5, -5, 5, 5], [10, 10, 30, 30]]
    labels, matched = _labels(anchors, gt=torch.zeros(0, 4))
    assert labels.tolist() == [0, 0, 0]
    assert matched.tolist() == [0, 0, 0]
    labels, _ = _labels(anchors, gt=torch.zeros(0, 4), image_hw=(20, 20), ignore_cross_boundary=True)
    assert labels.tolist() == [0, -1, -1]
    # A crowd-only image: anchor 0 lies fully inside the crowd box, anchor 1 only 25%.
    labels, _ = _labels(anchors, gt=torch.zeros(0, 4), ignore_boxes=torch.tensor([[0.0, 0.0, 12.0, 12.0]]))
    assert labels.tolist() == [-1, 0, 0]


def test_labels_on_real_anchors_are_consistent():
    # FPN anchors of a 128 x 160 image: every gt gets at least one positive anchor.
    gen = AnchorGenerator(anchor_sizes_for("fpn", scale=0.25))
    shapes = {"p2": (32, 40), "p3": (16, 20), "p4": (8, 10), "p5": (4, 5), "p6": (2, 3)}
    anchors = torch.cat(list(gen({k: torch.empty(1, 0, *v) for k, v in shapes.items()}).values()))
    gt = torch.tensor([[3.0, 5.0, 20.0, 11.0], [40.0, 30.0, 140.0, 120.0], [100.0, 2.0, 108.0, 40.0]])
    labels, matched = label_anchors(anchors, gt)
    assert set(matched[labels == 1].tolist()) == {0, 1, 2}
    iou = torchvision.ops.box_iou(gt, anchors).max(dim=0).values
    assert (iou[labels == 0] < 0.3).all()
    assert (iou[labels == -1] >= 0.3).all()


@pytest.mark.parametrize("cross_boundary", [False, True])
def test_a_batch_is_labelled_as_each_image_alone(cross_boundary):
    # Images with 3, 0 and 2 objects (two of them the same box: a tie for the best gt), one with a
    # crowd region: padding the gt boxes to a batch changes no label and no matched index.
    gen = AnchorGenerator(anchor_sizes_for("fpn", scale=0.25))
    shapes = {"p2": (32, 40), "p3": (16, 20), "p4": (8, 10), "p5": (4, 5), "p6": (2, 3)}
    anchors = torch.cat(list(gen({k: torch.empty(1, 0, *v) for k, v in shapes.items()}).values()))
    gts = [torch.tensor([[3.0, 5.0, 20.0, 11.0], [40.0, 30.0, 140.0, 120.0], [100.0, 2.0, 108.0, 40.0]]),
           torch.zeros(0, 4), torch.tensor([[10.0, 10.0, 60.0, 50.0], [10.0, 10.0, 60.0, 50.0]])]
    hws = [(128, 160), (100, 160), (128, 120)]
    crowds = [None, torch.tensor([[0.0, 0.0, 64.0, 64.0]]), None]
    labels, matched = label_anchors_batch(anchors, gts, image_hws=hws, ignore_cross_boundary=cross_boundary,
                                          ignore_boxes=crowds)
    assert labels.shape == matched.shape == (3, anchors.shape[0])
    for i, (gt, hw, crowd) in enumerate(zip(gts, hws, crowds)):
        alone = label_anchors(anchors, gt, image_hw=hw, ignore_cross_boundary=cross_boundary, ignore_boxes=crowd)
        assert torch.equal(labels[i], alone[0]) and torch.equal(matched[i], alone[1])
    assert (labels[0] == 1).any() and (labels[1] == -1).any() and (labels[2] == 1).any()
    # the tie: both copies of the box have the same anchors, which match the first copy
    assert matched[2][labels[2] == 1].eq(0).all()


# ---------------------------------------------------------------- sampling (Sec. 5.1)


def _make_labels(n_pos, n_neg, n_ign=50, seed=0):
    labels = torch.tensor([1] * n_pos + [0] * n_neg + [-1] * n_ign)
    return labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))]


def _check(labels, pos, neg):
    assert (labels[pos] == 1).all() and (labels[neg] == 0).all()
    assert pos.unique().numel() == pos.numel() and neg.unique().numel() == neg.numel()
    assert pos.dtype == neg.dtype == torch.int64


def test_sampling_caps_total_and_positive_fraction():
    labels = _make_labels(1000, 1000)
    pos, neg = sample_anchors(labels, 256, 0.5)
    _check(labels, pos, neg)
    assert pos.numel() == 128 and neg.numel() == 128
    pos, neg = sample_anchors(labels, 256, 0.25)
    assert pos.numel() == 64 and neg.numel() == 192


def test_sampling_fills_with_negatives_when_positives_are_few():
    labels = _make_labels(10, 1000)
    pos, neg = sample_anchors(labels)
    _check(labels, pos, neg)
    assert pos.numel() == 10 and neg.numel() == 246


def test_sampling_returns_what_exists_when_negatives_are_few():
    labels = _make_labels(10, 20)
    pos, neg = sample_anchors(labels)
    _check(labels, pos, neg)
    assert pos.numel() == 10 and neg.numel() == 20
    labels = _make_labels(500, 20)  # positives stay capped at half
    pos, neg = sample_anchors(labels)
    assert pos.numel() == 128 and neg.numel() == 20
    pos, neg = sample_anchors(torch.full((7,), -1))
    assert pos.numel() == 0 and neg.numel() == 0


def test_sampling_is_deterministic_with_a_seeded_generator():
    labels = _make_labels(1000, 5000)
    a = sample_anchors(labels, generator=torch.Generator().manual_seed(3))
    b = sample_anchors(labels, generator=torch.Generator().manual_seed(3))
    c = sample_anchors(labels, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])


def test_sampling_is_a_random_subset_not_the_first_indices():
    labels = torch.tensor([1] * 1000 + [0] * 1000)
    pos, neg = sample_anchors(labels, generator=torch.Generator().manual_seed(0))
    assert pos.max() > 128 and neg.max() > 1128
    assert math.isclose(float(pos.float().mean()), 500, rel_tol=0.2)


def test_a_batch_is_sampled_as_each_image_alone():
    # rows with many, few and no positives: the same draws, in row order, offset into the flat batch
    labels = torch.stack([_make_labels(300, 500, seed=1), _make_labels(10, 790, seed=2), _make_labels(0, 800, seed=3)])
    g_batch, g_alone = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    keep, drawn = sample_batch(labels, 256, 0.5, g_batch)
    expected = []
    for i, row in enumerate(labels):
        pos, neg = sample_anchors(row, 256, 0.5, g_alone)
        expected += [pos + i * row.numel(), neg + i * row.numel()]
        assert drawn[i] == (pos.numel(), neg.numel())
    assert torch.equal(keep, torch.cat(expected))
    assert drawn == [(128, 128), (10, 246), (0, 256)]
    assert torch.equal(g_batch.get_state(), g_alone.get_state())


def test_a_cpu_generators_draws_reach_the_device_in_one_copy(monkeypatch):
    # "meta" stands for the GPU. A seeded CPU generator draws the permutations on the CPU (the same
    # subsets on any device); they are copied to the device once for the batch, not once per draw:
    # each blocking copy from the host waits for the GPU's queue.
    from fpnlib.host_work import count_host_work
    from fpnlib.modeling import anchor_labels

    labels = torch.stack([_make_labels(300, 500, seed=1), _make_labels(10, 790, seed=2), _make_labels(0, 800, seed=3)])
    counts = anchor_labels.label_counts(labels)
    monkeypatch.setattr(anchor_labels, "label_counts", lambda _: counts)  # a meta tensor holds no data to count
    g, on_device = torch.Generator().manual_seed(7), labels.to("meta")
    work = count_host_work(lambda: sample_batch(on_device, 256, 0.5, g), "meta")
    assert work["waits_by_kind"] == {"aten._to_copy.default": 1}, work
