"""Detections from the region head (Fast R-CNN inference): threshold, per-class NMS, top-k, clip."""
from __future__ import annotations

import math

import torch

from fpnlib.modeling.box_coder import encode
from fpnlib.modeling.postprocess import detections_from_head
from fpnlib.modeling.box_coder import FAST_RCNN_BOX_WEIGHTS

K1 = 4  # background + 3 classes
HW = (200, 300)


def _logits(probs: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is ``probs`` (rows over background + classes)."""
    return torch.tensor(probs).clamp(min=1e-12).log()


def test_one_confident_box_survives_with_its_class_delta():
    rois = torch.tensor([[50.0, 40.0, 150.0, 120.0]])
    target = torch.tensor([[55.0, 45.0, 160.0, 110.0]])
    deltas = torch.zeros(1, K1, 4)
    deltas[0, 2] = encode(rois, target, FAST_RCNN_BOX_WEIGHTS)[0]  # only class 2's deltas move
    logits = _logits([[0.01, 0.01, 0.97, 0.01]])
    (det,) = detections_from_head(logits, deltas.view(1, -1), [rois], [HW])
    assert det["labels"].tolist() == [2]
    assert det["labels"].dtype == torch.int64
    assert math.isclose(det["scores"].item(), 0.97, rel_tol=1e-5)
    assert torch.allclose(det["boxes"], target, atol=1e-3)


def test_duplicates_suppressed_within_a_class_not_across_classes():
    box = [20.0, 20.0, 120.0, 100.0]
    rois = torch.tensor([box, [22.0, 21.0, 121.0, 102.0], box, [200.0, 20.0, 280.0, 90.0]])
    probs = [
        [0.05, 0.95, 0.00, 0.00],  # class 1
        [0.15, 0.85, 0.00, 0.00],  # class 1 again, same object: suppressed
        [0.10, 0.45, 0.45, 0.00],  # classes 1 and 2, same box: the class-2 pair survives, the class-1 one not
        [0.30, 0.70, 0.00, 0.00],  # class 1, another object: kept
    ]
    (det,) = detections_from_head(_logits(probs), torch.zeros(4, 4 * K1), [rois], [HW])
    got = sorted(zip(det["labels"].tolist(), [round(s, 3) for s in det["scores"].tolist()]))
    assert got == [(1, 0.7), (1, 0.95), (2, 0.45)]
    assert torch.all(det["scores"][:-1] >= det["scores"][1:])  # sorted by score
    # with NMS off (threshold 1) the duplicates come back
    (det,) = detections_from_head(_logits(probs), torch.zeros(4, 4 * K1), [rois], [HW], nms_thresh=1.0)
    assert (det["labels"] == 1).sum() == 4


def test_threshold_topk_clip_and_no_background():
    g = torch.Generator().manual_seed(0)
    n = 300
    xy = torch.rand(n, 2, generator=g) * torch.tensor([280.0, 180.0])
    rois = torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 100], dim=1)  # many leave the image
    logits = torch.randn(n, K1, generator=g) * 2
    deltas = torch.randn(n, 4 * K1, generator=g) * 5
    (det,) = detections_from_head(logits, deltas, [rois], [HW], detections_per_img=25)
    assert det["boxes"].shape == (25, 4)
    assert (det["scores"] > 0.05).all()
    assert ((det["labels"] >= 1) & (det["labels"] < K1)).all()
    b = det["boxes"]
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= HW[1]).all() and (b[:, 3] <= HW[0]).all()
    assert ((b[:, 2:] - b[:, :2]) > 0).all()
    # a high threshold keeps only confident pairs
    (loose,) = detections_from_head(logits, deltas, [rois], [HW], detections_per_img=1000)
    (strict,) = detections_from_head(logits, deltas, [rois], [HW], score_thresh=0.9, detections_per_img=1000)
    assert (strict["scores"] > 0.9).all() and 0 < strict["scores"].numel() < loose["scores"].numel()
    assert loose["scores"].numel() > 100  # so the default cap of 100 binds
    (capped,) = detections_from_head(logits, deltas, [rois], [HW])
    assert capped["scores"].numel() == 100
    assert torch.equal(capped["scores"], loose["scores"][:100])  # the cap keeps the best


def test_batch_is_split_per_image_and_empty_images_work():
    rois_a = torch.tensor([[10.0, 10.0, 60.0, 60.0]])
    rois_b = torch.tensor([[0.0, 0.0, 500.0, 500.0], [30.0, 30.0, 90.0, 80.0]])
    logits = _logits([[0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    out = detections_from_head(logits, torch.zeros(3, 4 * K1), [rois_a, rois_b, torch.zeros(0, 4)],
                               [(100, 100), (50, 80), (64, 64)])
    assert len(out) == 3
    assert out[0]["labels"].tolist() == [3]
    assert out[1]["labels"].tolist() == [1]  # the background-only RoI yields nothing
    assert out[1]["boxes"].tolist() == [[0.0, 0.0, 80.0, 50.0]]  # clipped to its own image
    assert out[2]["boxes"].shape == (0, 4) and out[2]["scores"].shape == (0,)
