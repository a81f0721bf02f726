"""The optimized inference path (``fpnlib.modeling.fast_inference``) gives the plain path's
proposals and detections.

Tolerance: a box matches when every coordinate is within 1e-3 px. Folding BN and channels_last
only reorder float32 sums (relative error ~1e-6 on activations); that never moves a box by a
thousandth of a pixel, but it can swap two proposals whose scores tie to ~1e-6 (an untrained RPN
has many), so proposals are compared as sets: at least 99% of them must match (measured: 6
coordinates of 2328 differed, from such swaps), and the same number per image. Detections (after
the score threshold, per-class NMS and the top 100) must all match, with equal labels.
"""
from __future__ import annotations

import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d

from fpnlib.modeling.detectors import batch_images
from fpnlib.modeling.fast_inference import (compile_body, fold_conv_frozen_bn, matched_fraction,
                                             max_box_difference, optimized_for_inference)
from fpnlib.modeling.faster_rcnn import FasterRCNN
from fpnlib.modeling.torchvision_interop import torchvision_faster_rcnn_config

BOX_TOL, SCORE_TOL, PROPOSALS_MATCHED = 1e-3, 1e-4, 0.99


def _model(norm: str = "frozen_bn") -> FasterRCNN:
    torch.manual_seed(0)
    model = FasterRCNN(torchvision_faster_rcnn_config(num_classes=4, depth=18, width=16, fpn_channels=32, hidden=64,
                                                      norm=norm))
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # non-trivial statistics, so that folding has something to fold
        if isinstance(m, FrozenBatchNorm2d):
            c = m.weight.numel()
            m.weight.copy_(0.5 + torch.rand(c, generator=g))
            m.bias.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return model.eval()


def _images():
    g = torch.Generator().manual_seed(2)
    return [torch.rand(3, 96, 128, generator=g), torch.rand(3, 112, 96, generator=g)]


def test_folded_conv_equals_conv_then_frozen_bn():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    bn = FrozenBatchNorm2d(8)
    bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(), bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(fold_conv_frozen_bn(conv, bn)(x), bn(conv(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["frozen_bn", "gn"])
def test_optimized_path_gives_the_same_proposals_and_detections(norm):
    model = _model(norm)
    fast = optimized_for_inference(model)
    assert ("channels_last" in fast.optimizations) and (any("folded" in o for o in fast.optimizations) == (norm == "frozen_bn"))
    images = _images()
    with torch.no_grad():
        batch, hws = batch_images(images, model.cfg.size_divisible)
        plain_props = model.rpn(model._maps(batch), hws)[0]
        fast_props = fast.rpn(fast._maps(batch), hws)[0]
        plain, quick = model(images), fast(images)
    for (b0, _), (b1, _) in zip(plain_props, fast_props):
        assert b0.shape == b1.shape and len(b0) > 0
        assert matched_fraction(b1, b0, BOX_TOL) >= PROPOSALS_MATCHED
    assert sum(len(d["boxes"]) for d in plain) > 0
    assert max_box_difference(plain, quick) <= BOX_TOL
    for d0, d1 in zip(plain, quick):
        assert torch.equal(d0["labels"], d1["labels"])
        torch.testing.assert_close(d1["scores"], d0["scores"], rtol=0, atol=SCORE_TOL)


def test_the_original_model_is_untouched():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimized_for_inference(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not model.backbone._forward_pre_hooks


def test_compile_body_replaces_only_the_forward_of_backbone_and_fpn():
    """``torch.compile``'s wiring, traced by Dynamo (backend "eager": no code generation, so the
    outputs are the eager ones bit for bit; the bench's ``--compile`` arm records inductor's
    agreement with torchvision in ``same_outputs``)."""
    model = _model()
    fast = optimized_for_inference(model)
    images = _images()
    with torch.no_grad():
        before = fast(images)
    keys = list(fast.state_dict())
    calls = []
    fast.backbone.register_forward_hook(lambda *_: calls.append("backbone"))
    assert compile_body(fast, backend="eager") == ["backbone", "neck"]
    assert compile_body(fast, backend="eager") == []  # once only
    with torch.no_grad():
        after = fast(images)
    assert calls == ["backbone"] and list(fast.state_dict()) == keys  # hooks and weights as they were
    for d0, d1 in zip(before, after, strict=True):
        assert all(torch.equal(d0[k], d1[k]) for k in ("boxes", "scores", "labels"))
    with pytest.raises(ValueError, match="already compiled"):
        optimized_for_inference(fast)  # a copy would still call the original's compiled forward

    model.train()
    compile_body(model, backend="eager")
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1])} for _ in images]
    sum(model(images, targets).values()).backward()
    trained = [p for p in model.backbone.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)
    assert all(p.grad is not None for p in model.neck.parameters())
