"""RoI minibatch of the Fast R-CNN head (Sec. 4.2, 5.2): gt added, IoU rules, 25% of 512, crowds."""
from __future__ import annotations

import torch
from torchvision.ops import box_iou

from fpnlib.modeling.box_coder import decode
from fpnlib.modeling.roi_sampling import FAST_RCNN_BOX_WEIGHTS, sample_rois, sample_rois_batch


def _jittered(gt: torch.Tensor, n: int, scale: float, seed: int) -> torch.Tensor:
    """``n`` boxes around each gt box, corners moved by up to ``scale`` of its size."""
    g = torch.Generator().manual_seed(seed)
    base = gt.repeat_interleave(n, dim=0)
    wh = (base[:, 2:] - base[:, :2]).repeat(1, 2)
    return base + (torch.rand(base.shape, generator=g) * 2 - 1) * scale * wh


def _background(n: int, seed: int) -> torch.Tensor:
    """``n`` small boxes in the bottom-right corner, far from the gt boxes of these tests."""
    g = torch.Generator().manual_seed(seed)
    xy = 600 + torch.rand(n, 2, generator=g) * 300
    return torch.cat([xy, xy + 20 + torch.rand(n, 2, generator=g) * 50], dim=1)


GT = torch.tensor([[10.0, 20.0, 110.0, 90.0], [200.0, 150.0, 260.0, 300.0]])
GT_LABELS = torch.tensor([3, 7])


def test_gt_boxes_are_added_as_foreground():
    # Proposals that miss every object: the only foreground RoIs are the gt boxes themselves.
    out = sample_rois(_background(40, 0), GT, GT_LABELS, generator=torch.Generator().manual_seed(0))
    fg = out.labels > 0
    assert fg.sum() == 2
    assert sorted(out.labels[fg].tolist()) == [3, 7]
    got = out.rois[fg][torch.argsort(out.labels[fg])]
    assert torch.equal(got, GT)
    assert out.regression_targets[fg].abs().max() < 1e-6  # a gt box is its own target
    assert out.rois.shape[0] == 42  # fewer candidates than 512: all are used
    # foreground rows come first
    assert out.labels[:2].gt(0).all() and out.labels[2:].eq(0).all()


def test_fraction_and_count_caps():
    proposals = torch.cat([_jittered(GT, 400, 0.05, 1), _background(2000, 2)])
    out = sample_rois(proposals, GT, GT_LABELS, generator=torch.Generator().manual_seed(0))
    assert out.rois.shape == (512, 4) and out.labels.shape == (512,) and out.regression_targets.shape == (512, 4)
    assert (out.labels > 0).sum() == 128  # 25% of 512, plenty of foreground available
    # smaller batch / fraction
    out = sample_rois(proposals, GT, GT_LABELS, batch_size_per_image=64, positive_fraction=0.5)
    assert out.rois.shape[0] == 64 and (out.labels > 0).sum() == 32
    # few background candidates: foreground stays capped, the batch is just smaller
    out = sample_rois(torch.cat([_jittered(GT, 400, 0.05, 1), _background(10, 2)]), GT, GT_LABELS)
    assert (out.labels > 0).sum() == 128 and out.rois.shape[0] == 138


def test_iou_rules_and_labels_follow_the_matched_gt():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    proposals = torch.tensor([
        [0.0, 0.0, 10.0, 20.0],  # IoU exactly 0.5 -> foreground (>= 0.5)
        [0.0, 0.0, 10.0, 21.0],  # IoU 0.476 -> background
        [50.0, 50.0, 60.0, 60.0],  # IoU 0 -> background with bg_iou_lo = 0 ...
    ])
    out = sample_rois(proposals, gt, torch.tensor([4]))
    iou = box_iou(out.rois, gt)[:, 0]
    assert torch.equal(out.labels > 0, iou >= 0.5)
    assert out.labels.tolist().count(4) == 2 and out.rois.shape[0] == 4  # proposal 0 and the gt
    # ... but not with Fast R-CNN's original lower bound of 0.1
    out = sample_rois(proposals, gt, torch.tensor([4]), bg_iou_lo=0.1)
    assert out.rois.shape[0] == 3 and not (out.rois == proposals[2]).all(dim=1).any()


def test_targets_decode_to_the_matched_gt():
    proposals = torch.cat([_jittered(GT, 50, 0.1, 3), _background(50, 4)])
    out = sample_rois(proposals, GT, GT_LABELS, generator=torch.Generator().manual_seed(1))
    fg = out.labels > 0
    assert fg.any() and (~fg).any()
    decoded = decode(out.regression_targets[fg], out.rois[fg], FAST_RCNN_BOX_WEIGHTS)
    assert torch.allclose(decoded, GT[out.matched_idx[fg]], atol=1e-3)
    assert torch.equal(out.labels[fg], GT_LABELS[out.matched_idx[fg]])
    assert torch.equal(out.regression_targets[~fg], torch.zeros(int((~fg).sum()), 4))


def test_image_without_objects_is_all_background():
    # includes a degenerate proposal (clipped to a zero-width sliver): its zero target stays finite
    proposals = torch.cat([_background(700, 5), torch.tensor([[640.0, 10.0, 640.0, 50.0]])])
    out = sample_rois(proposals, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    assert out.rois.shape[0] == 512
    assert out.labels.eq(0).all()
    assert torch.equal(out.regression_targets, torch.zeros(512, 4))
    # and with no proposals at all: an empty, well-formed batch
    out = sample_rois(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    assert out.rois.shape == (0, 4) and out.labels.shape == (0,) and out.regression_targets.shape == (0, 4)


def test_seeded_generator_makes_the_draw_reproducible():
    proposals = torch.cat([_jittered(GT, 300, 0.05, 6), _background(1500, 7)])
    a = sample_rois(proposals, GT, GT_LABELS, generator=torch.Generator().manual_seed(42))
    b = sample_rois(proposals, GT, GT_LABELS, generator=torch.Generator().manual_seed(42))
    c = sample_rois(proposals, GT, GT_LABELS, generator=torch.Generator().manual_seed(43))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a.rois, c.rois)


def test_crowd_regions_are_not_sampled_as_background():
    crowd = torch.tensor([[600.0, 600.0, 1000.0, 1000.0]])
    inside = _background(100, 8)  # all lie in [600, 970]^2, i.e. inside the crowd region
    outside = inside - 500.0
    proposals = torch.cat([inside, outside])
    out = sample_rois(proposals, GT, GT_LABELS, ignore_boxes=crowd)
    assert out.rois.shape[0] == 2 + 100  # the two gt boxes and the proposals outside the crowd
    assert (out.rois[:, 0] < 600).all()
    out = sample_rois(proposals, GT, GT_LABELS)  # without it they are ordinary background
    assert out.rois.shape[0] == 202


def test_proposals_are_detached():
    proposals = _background(20, 9).requires_grad_()
    out = sample_rois(proposals, GT, GT_LABELS)
    assert not out.rois.requires_grad and not out.regression_targets.requires_grad


def test_a_batch_draws_what_each_image_alone_draws():
    # Different proposal and gt counts, an image without objects, a crowd region: the batch pads
    # them, and its RoIs, labels, targets and matched indices are each image's own, draws included
    # (the generator is read in image order and ends in the same state).
    proposals = [torch.cat([_jittered(GT, 100, 0.3, 1), _background(300, 2)]), _background(50, 3),
                 torch.cat([_jittered(GT[:1], 200, 0.2, 4), _background(700, 5)])]
    gts = [GT, torch.zeros(0, 4), GT[:1]]
    labels = [GT_LABELS, torch.zeros(0, dtype=torch.int64), GT_LABELS[:1]]
    crowds = [None, None, torch.tensor([[600.0, 600.0, 750.0, 750.0]])]
    g_batch, g_alone = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    batch = sample_rois_batch(proposals, gts, labels, batch_size_per_image=256, generator=g_batch,
                              ignore_boxes=crowds)
    for out, p, gt, lab, crowd in zip(batch, proposals, gts, labels, crowds):
        alone = sample_rois(p, gt, lab, batch_size_per_image=256, generator=g_alone, ignore_boxes=crowd)
        for a, b in zip(out, alone):
            assert a.dtype == b.dtype and torch.equal(a, b)
    assert torch.equal(g_batch.get_state(), g_alone.get_state())
    assert [int((o.labels > 0).sum()) for o in batch] == [64, 0, 64]  # 25% of 256 where objects are
    assert sample_rois_batch([], [], []) == []
