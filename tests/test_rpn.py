"""Tests of the RPN on a pyramid (Sec. 4.1) and the RPN-only detectors of Table 1."""
from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_iou

from fpnlib.modeling.anchor_labels import label_anchors
from fpnlib.modeling.anchors import VARIANTS, AnchorGenerator, count_anchors
from fpnlib.modeling.box_coder import clip_boxes, decode, encode
from fpnlib.modeling.detectors import RPNDetector, RPNDetectorConfig, batch_images, build_rpn_detector
from fpnlib.modeling.rpn import (
    RPN,
    RPNConfig,
    RPNHead,
    flatten_head_outputs,
    rpn_losses,
    select_proposals,
)

LEVELS = ("p2", "p3", "p4", "p5", "p6")
STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # On a shared 2-core machine two intra-op threads contending with other processes run
    # these small convs ~10x slower than one thread does.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _maps(levels, image_hw, n=1, channels=1):
    """Zero feature maps of the sizes a padded ``image_hw`` batch gives on ``levels``."""
    h, w = image_hw
    return {lvl: torch.zeros(n, channels, -(-h // STRIDES[lvl]), -(-w // STRIDES[lvl])) for lvl in levels}


def _random_head_outputs(maps, a, seed, delta_scale=0.5):
    g = torch.Generator().manual_seed(seed)
    logits = {k: torch.randn(m.shape[0], a, *m.shape[-2:], generator=g) for k, m in maps.items()}
    deltas = {k: delta_scale * torch.randn(m.shape[0], 4 * a, *m.shape[-2:], generator=g) for k, m in maps.items()}
    return logits, deltas


# ----------------------------------------------------------------------------- head


@pytest.mark.parametrize("shared", [True, False])
def test_head_shapes_on_every_level(shared):
    head = RPNHead(8, 3, LEVELS, shared=shared)
    feats = {k: torch.randn(2, 8, s, s + 1) for k, s in zip(LEVELS, (16, 8, 4, 2, 1))}
    logits, deltas = head(feats)
    assert list(logits) == list(LEVELS) and list(deltas) == list(LEVELS)
    for k, f in feats.items():
        assert logits[k].shape == (2, 3, *f.shape[-2:])
        assert deltas[k].shape == (2, 12, *f.shape[-2:])


def test_shared_head_is_one_head_and_unshared_is_one_per_level():
    shared = RPNHead(8, 3, LEVELS, shared=True, hidden=6)
    unshared = RPNHead(8, 3, LEVELS, shared=False, hidden=6)
    n_shared = sum(p.numel() for p in shared.parameters())
    # conv3x3 (8->6), cls 1x1 (6->3), box 1x1 (6->12), with biases
    assert n_shared == (8 * 6 * 9 + 6) + (6 * 3 + 3) + (6 * 12 + 12)
    assert sum(p.numel() for p in unshared.parameters()) == len(LEVELS) * n_shared
    # The same input on two levels gives the same output only when weights are shared.
    x = torch.randn(1, 8, 5, 5)
    feats = {k: x for k in LEVELS}
    s_logits, _ = shared(feats)
    u_logits, _ = unshared(feats)
    assert torch.equal(s_logits["p2"], s_logits["p6"])
    assert not torch.allclose(u_logits["p2"], u_logits["p6"])


def test_head_init_is_faster_rcnn():
    head = RPNHead(64, 3, ("p2",), hidden=64)
    for conv in (head.head.conv, head.head.objectness, head.head.deltas):
        assert torch.all(conv.bias == 0)
        assert abs(conv.weight.std().item() - 0.01) < 0.003
    # The 3x3 conv is followed by a ReLU: with zero biases a linear head would be odd.
    x = torch.randn(1, 64, 6, 6)
    assert not torch.allclose(head({"p2": -x})[0]["p2"], -head({"p2": x})[0]["p2"])


# ------------------------------------------------------------------- flatten order


@pytest.mark.parametrize("level,a,y,x", [("p2", 0, 3, 5), ("p2", 2, 9, 2), ("p3", 1, 4, 7), ("p4", 2, 2, 1)])
def test_flatten_order_matches_grid_anchors(level, a, y, x):
    image_hw = (72, 136)  # maps of different heights and widths, so y/x swaps show
    levels = ("p2", "p3", "p4")
    gen = AnchorGenerator({"p2": (12.0,), "p3": (24.0,), "p4": (40.0,)})
    maps = _maps(levels, image_hw)
    anchors = gen(maps)
    logits, deltas = _random_head_outputs(maps, 3, seed=0, delta_scale=0.2)
    logits = {k: v - 10.0 for k, v in logits.items()}
    logits[level][0, a, y, x] = 10.0

    # The expected box is read straight off the maps: deltas channels are (A, 4).
    h, w = maps[level].shape[-2:]
    anchor = anchors[level][(y * w + x) * 3 + a]
    stride = STRIDES[level]
    assert torch.allclose((anchor[:2] + anchor[2:]) / 2, torch.tensor([(x + 0.5) * stride, (y + 0.5) * stride]))
    expected = clip_boxes(decode(deltas[level][0, 4 * a : 4 * a + 4, y, x], anchor), image_hw)

    flat_logits, flat_deltas = flatten_head_outputs(logits, deltas)
    all_anchors = torch.cat(list(anchors.values()))
    top = flat_logits[0].argmax()
    assert torch.equal(all_anchors[top], anchor)
    assert torch.allclose(flat_deltas[0, top], deltas[level][0, 4 * a : 4 * a + 4, y, x])

    (boxes, scores), = select_proposals(logits, deltas, anchors, [image_hw], 1000, 1000, 0.7, 0.0)
    assert torch.allclose(boxes[0], expected, atol=1e-5)
    assert scores[0].item() == pytest.approx(torch.sigmoid(torch.tensor(10.0)).item())


# -------------------------------------------------------------------- proposals


def test_select_proposals_is_per_image_and_independent_of_batch():
    image_hws = [(64, 96), (50, 60), (40, 96)]
    levels = ("p2", "p3", "p4")
    gen = AnchorGenerator({"p2": (16.0,), "p3": (32.0,), "p4": (64.0,)})
    maps = _maps(levels, (64, 96), n=3)
    anchors = gen(maps)
    logits, deltas = _random_head_outputs(maps, 3, seed=1)
    pre, post = 60, 40
    batch = select_proposals(logits, deltas, anchors, image_hws, pre, post, 0.7, 0.0)
    for i, (boxes, scores) in enumerate(batch):
        alone = select_proposals(
            {k: v[i : i + 1] for k, v in logits.items()},
            {k: v[i : i + 1] for k, v in deltas.items()},
            anchors,
            [image_hws[i]],
            pre,
            post,
            0.7,
            0.0,
        )[0]
        assert torch.equal(boxes, alone[0]) and torch.equal(scores, alone[1])
        assert len(boxes) == post  # 3 levels x 60 candidates: the per-image cap binds
        assert torch.all(scores[:-1] >= scores[1:]) and torch.all((scores > 0) & (scores < 1))
        h, w = image_hws[i]
        assert boxes[:, 0].min() >= 0 and boxes[:, 1].min() >= 0
        assert boxes[:, 2].max() <= w and boxes[:, 3].max() <= h
        assert (boxes[:, 2] == w).any() or (boxes[:, 3] == h).any()  # clipping did happen
    # A different batch-mate changes nothing either.
    swapped = select_proposals(
        {k: v.flip(0) for k, v in logits.items()}, {k: v.flip(0) for k, v in deltas.items()},
        anchors, image_hws[::-1], pre, post, 0.7, 0.0,
    )
    assert torch.equal(swapped[2][0], batch[0][0])


def test_pre_nms_top_k_is_per_level():
    image_hw = (64, 64)
    levels = ("p2", "p3", "p4")
    gen = AnchorGenerator({"p2": (16.0,), "p3": (32.0,), "p4": (64.0,)})
    maps = _maps(levels, image_hw, n=2)
    anchors = gen(maps)
    logits, deltas = _random_head_outputs(maps, 3, seed=2, delta_scale=0.1)
    # p2 dominates: a global top-k would take only p2 anchors.
    logits["p2"] = logits["p2"] + 100.0
    for i, (boxes, scores) in enumerate(select_proposals(logits, deltas, anchors, [image_hw] * 2, 1, 100, 0.7, 0.0)):
        assert len(boxes) == 3  # one per level
        for lvl, box in zip(levels, boxes):
            flat_l, flat_d = flatten_head_outputs({lvl: logits[lvl]}, {lvl: deltas[lvl]})
            j = flat_l[i].argmax()
            assert torch.allclose(box, clip_boxes(decode(flat_d[i, j], anchors[lvl][j]), image_hw), atol=1e-5)


def test_nms_removes_duplicates_within_a_level_only():
    a = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    near = a + 1.0  # IoU ~0.9 with a
    far = torch.tensor([[60.0, 60.0, 90.0, 90.0]])
    anchors = {"p2": torch.cat([a, near]), "p3": torch.cat([a, far])}
    logits = [torch.tensor([[3.0, 2.0]]), torch.tensor([[2.5, 1.0]])]  # flattened [N, n_level]
    deltas = [torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)]
    (boxes, scores), = select_proposals(logits, deltas, anchors, [(100, 100)], 10, 10, 0.7, 0.0)
    assert torch.equal(boxes, torch.cat([a, a, far]))  # `near` suppressed; p3's copy of `a` kept
    assert torch.allclose(scores, torch.sigmoid(torch.tensor([3.0, 2.5, 1.0])))
    (boxes, _), = select_proposals(logits, deltas, anchors, [(100, 100)], 10, 10, 0.95, 0.0)
    assert len(boxes) == 4
    # min_size drops small boxes before NMS
    (boxes, _), = select_proposals(logits, deltas, anchors, [(100, 100)], 10, 10, 0.7, 35.0)
    assert torch.equal(boxes, torch.cat([a, a]))


def test_proposals_carry_no_gradient():
    logits = [torch.randn(1, 5, requires_grad=True)]
    deltas = [torch.randn(1, 5, 4, requires_grad=True)]
    anchors = {"p2": torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(5, 1) + torch.arange(5.0)[:, None] * 12}
    (boxes, scores), = select_proposals(logits, deltas, anchors, [(100, 100)], 10, 10, 0.7, 0.0)
    assert not boxes.requires_grad and not scores.requires_grad


# ------------------------------------------------------------------------ losses


def _loss_setup():
    image_hw = (64, 64)
    gen = AnchorGenerator({"p2": (16.0,), "p3": (32.0,)})
    anchors = torch.cat(list(gen(_maps(("p2", "p3"), image_hw)).values()))  # 3 * (256 + 64) anchors
    gt = torch.tensor([[4.0, 6.0, 22.0, 24.0], [30.0, 20.0, 60.0, 52.0]])
    return image_hw, anchors, gt


def test_loss_on_an_image_without_objects():
    image_hw, anchors, _ = _loss_setup()
    logits = torch.randn(1, len(anchors), requires_grad=True)
    deltas = torch.randn(1, len(anchors), 4, requires_grad=True)
    losses = rpn_losses(logits, deltas, anchors, [torch.zeros(0, 4)], [image_hw], RPNConfig())
    assert losses["loss_rpn_box"].item() == 0.0
    assert torch.isfinite(losses["loss_objectness"]) and losses["loss_objectness"] > 0
    sum(losses.values()).backward()
    assert torch.isfinite(logits.grad).all() and torch.all(deltas.grad == 0)


def test_perfect_prediction_has_lower_loss_than_zero_prediction():
    image_hw, anchors, gt = _loss_setup()
    labels, matched = label_anchors(anchors, gt)
    assert (labels == 1).sum() > 0
    perfect_logits = torch.where(labels == 1, 8.0, -8.0)[None]
    perfect_deltas = encode(anchors, gt[matched])[None]
    cfg = RPNConfig()
    perfect = rpn_losses(perfect_logits, perfect_deltas, anchors, [gt], [image_hw], cfg, torch.Generator().manual_seed(0))
    zero = rpn_losses(
        torch.zeros(1, len(anchors)), torch.zeros(1, len(anchors), 4), anchors, [gt], [image_hw], cfg,
        torch.Generator().manual_seed(0),
    )
    assert perfect["loss_objectness"] < 0.01 < zero["loss_objectness"]
    assert perfect["loss_rpn_box"] < 1e-6 < zero["loss_rpn_box"]


def test_at_most_256_sampled_anchors_per_image():
    image_hw, anchors, gt = _loss_setup()
    n = 3
    logits = torch.zeros(n, len(anchors), requires_grad=True)
    deltas = torch.zeros(n, len(anchors), 4, requires_grad=True)
    gts = [gt, gt[:1], torch.zeros(0, 4)]
    losses = rpn_losses(logits, deltas, anchors, gts, [image_hw] * n, RPNConfig(), torch.Generator().manual_seed(0))
    sum(losses.values()).backward()
    # Only sampled anchors get an objectness gradient, only positives a box gradient.
    sampled = (logits.grad != 0).sum(dim=1)
    positives = (deltas.grad != 0).any(dim=2).sum(dim=1)
    assert sampled.tolist() == [256, 256, 256]  # 960 anchors per image: plenty of negatives
    assert torch.all(positives <= 128) and positives[0] > positives[1] > 0 and positives[2] == 0
    # Both terms are normalised by the number of sampled anchors of the batch.
    assert torch.allclose(logits.grad.abs()[logits.grad != 0], torch.tensor(0.5 / (n * 256)))


def test_crowd_boxes_are_not_ground_truth():
    image_hw = (64, 64)
    gen = AnchorGenerator({"p2": (16.0,), "p3": (32.0,)})
    head = RPNHead(4, 3, ("p2", "p3"))
    rpn = RPN(head, gen, RPNConfig(), generator=torch.Generator().manual_seed(0)).train()
    feats = {k: torch.randn(1, 4, *m.shape[-2:]) for k, m in _maps(("p2", "p3"), image_hw).items()}
    crowd_only = [{"boxes": torch.tensor([[0.0, 0.0, 40.0, 40.0]]), "iscrowd": torch.tensor([1])}]
    proposals, losses = rpn(feats, [image_hw], crowd_only)
    assert losses["loss_rpn_box"].item() == 0.0
    assert 0 < len(proposals[0][0]) <= RPNConfig().post_nms_top_n_train  # training still proposes
    assert rpn(feats, [image_hw], crowd_only, return_proposals=False)[0] == []
    as_gt = [{"boxes": torch.tensor([[0.0, 0.0, 40.0, 40.0]]), "iscrowd": torch.tensor([0])}]
    _, losses = rpn(feats, [image_hw], as_gt)
    assert losses["loss_rpn_box"].item() > 0.0


# --------------------------------------------------------------------- detectors


def test_batch_images_pads_bottom_right_to_multiple_of_32():
    a, b = torch.ones(3, 90, 110), 2 * torch.ones(3, 96, 128)
    batch, hws = batch_images([a, b])
    assert batch.shape == (2, 3, 96, 128) and hws == [(90, 110), (96, 128)]
    assert torch.all(batch[0, :, :90, :110] == 1) and batch[0, :, 90:].abs().sum() == 0
    assert batch[0, :, :, 110:].abs().sum() == 0 and torch.equal(batch[1], b)
    assert batch_images([torch.zeros(3, 33, 64)])[0].shape == (1, 3, 64, 64)


SMALL = dict(depth=18, width=16, norm="gn", fpn_channels=32)


@pytest.mark.parametrize("variant", VARIANTS)
def test_rpn_detector_variants(variant):
    torch.manual_seed(0)
    model = build_rpn_detector(variant, post_nms_top_n_test=50, **SMALL)
    images = [torch.rand(3, 96, 128), torch.rand(3, 80, 112)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 20.0, 120.0, 50.0]])},
        {"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0]])},
    ]
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    # freeze_at=2: conv2_x is frozen, conv3_x is the first stage that learns.
    grads = [p.grad for p in model.backbone.layer2.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.backbone.layer1.parameters())

    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for det, im in zip(out, images):
        h, w = im.shape[-2:]
        assert 0 < len(det["boxes"]) <= 50 and det["scores"].shape == (len(det["boxes"]),)
        assert det["boxes"][:, :2].min() >= 0
        assert det["boxes"][:, 2].max() <= w and det["boxes"][:, 3].max() <= h

    feats = model.features(images)
    assert set(feats) == set(model.rpn.head.levels)
    num = sum(len(a) for a in model.rpn.anchors(feats).values())
    assert num == count_anchors((96, 128), variant)


def test_variant_wiring():
    m = build_rpn_detector("c4", **SMALL)
    assert m.neck is None and not hasattr(m.backbone, "layer4") and m.rpn.head.levels == ("c4",)
    assert m.rpn.head.num_anchors == 15 and m.rpn.head.head.conv.out_channels == m.backbone.out_channels["c4"]
    m = build_rpn_detector("fpn", shared_head=False, **SMALL)
    assert m.rpn.head.levels == LEVELS and m.rpn.head.num_anchors == 3 and len(m.rpn.head.heads) == 5
    assert build_rpn_detector("bottom_up", **SMALL).neck.top_down is False
    assert build_rpn_detector("top_down_no_lateral", **SMALL).neck.lateral is False
    m = build_rpn_detector("p2_only", **SMALL)
    assert m.rpn.head.levels == ("p2",) and m.rpn.head.num_anchors == 15
    assert isinstance(RPNDetector(RPNDetectorConfig(variant="c5", **SMALL)).neck, type(None))
    with pytest.raises(TypeError):
        build_rpn_detector("fpn", not_a_field=1)


# ---------------------------------------------------------------- learning check


def _synthetic_image(seed, hw=(96, 128)):
    g = torch.Generator().manual_seed(seed)
    image = 0.1 * torch.rand(3, *hw, generator=g)
    boxes = torch.tensor([[8.0, 10.0, 40.0, 34.0], [50.0, 30.0, 118.0, 86.0], [20.0, 56.0, 44.0, 90.0]])
    for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
        image[:, y1:y2, x1:x2] = torch.tensor([0.9, 0.5, 0.2]).roll(k)[:, None, None]
    return image, {"boxes": boxes}


def test_fpn_rpn_learns_to_propose_the_objects():
    torch.manual_seed(0)
    model = build_rpn_detector("fpn", freeze_at=0, generator=torch.Generator().manual_seed(0), **SMALL)
    image, target = _synthetic_image(0)

    def best_iou_of_top_proposals():
        model.eval()
        with torch.no_grad():
            det = model([image])[0]
        return box_iou(target["boxes"], det["boxes"][:20]).max(dim=1).values

    assert best_iou_of_top_proposals().min() < 0.5  # untrained: some object is missed
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    history = []
    for _ in range(60):
        loss = sum(model([image], [target]).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert sum(history[-5:]) < sum(history[:5]) / 10
    best_iou = best_iou_of_top_proposals()
    assert torch.all(best_iou > 0.5), best_iou

