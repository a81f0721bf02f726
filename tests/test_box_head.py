"""Fast R-CNN region heads (Sec. 4.2): 2fc and conv5 heads, predictor, multi-task loss."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.models import resnet18

from fpnlib.modeling.box_head import Conv5Head, FastRCNNPredictor, TwoFCHead, fast_rcnn_losses

K1 = 4  # 3 object classes + background


def _batch(r=12, c=8, res=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(r, c, res, res, generator=g)
    labels = torch.randint(0, K1, (r,), generator=g)
    labels[:2] = torch.tensor([0, 2])  # both kinds present
    targets = torch.randn(r, 4, generator=g) * (labels > 0)[:, None]
    return feats, labels, targets


def test_shapes():
    feats, _, _ = _batch()
    head = TwoFCHead(8, resolution=7, hidden=32)
    x = head(feats)
    assert x.shape == (12, 32) and head.out_channels == 32
    assert (x >= 0).all()  # ReLU after fc7
    logits, deltas = FastRCNNPredictor(32, K1)(x)
    assert logits.shape == (12, K1) and deltas.shape == (12, 4 * K1)
    # paper sizes: 256-d pyramid, 7x7 RoIs, two 1024-d layers
    paper = TwoFCHead(256)
    assert paper.fc6.in_features == 256 * 49 and paper.fc7.out_features == 1024


def test_background_only_batch_has_exactly_zero_box_loss():
    feats, _, _ = _batch()
    head, pred = TwoFCHead(8, 7, 32), FastRCNNPredictor(32, K1)
    logits, deltas = pred(head(feats))
    labels = torch.zeros(12, dtype=torch.int64)
    losses = fast_rcnn_losses(logits, deltas, labels, torch.zeros(12, 4))
    assert losses["loss_box_reg"].item() == 0.0
    assert torch.isfinite(losses["loss_cls"]) and losses["loss_cls"] > 0
    sum(losses.values()).backward()  # the zero box term still backpropagates cleanly
    assert torch.isfinite(pred.cls_score.weight.grad).all()
    # no RoIs at all: both terms 0, not NaN
    empty = fast_rcnn_losses(logits[:0], deltas[:0], labels[:0], torch.zeros(0, 4))
    assert empty["loss_cls"].item() == 0.0 and empty["loss_box_reg"].item() == 0.0


def test_box_loss_reads_the_own_class_deltas_and_divides_by_all_rois():
    r = 6
    logits = torch.zeros(r, K1)
    labels = torch.tensor([0, 1, 2, 3, 0, 0])
    targets = torch.arange(r * 4, dtype=torch.float32).view(r, 4) / 10 * (labels > 0)[:, None]
    deltas = torch.randn(r, K1, 4)
    losses = fast_rcnn_losses(logits, deltas.view(r, -1), labels, targets)
    fg = labels > 0
    own = deltas[torch.arange(r), labels][fg]
    expected = F.smooth_l1_loss(own, targets[fg], beta=1.0, reduction="sum") / r
    assert torch.allclose(losses["loss_box_reg"], expected)
    assert torch.allclose(losses["loss_cls"], torch.log(torch.tensor(float(K1))))  # uniform logits
    # other classes' deltas (and every background row's) do not matter
    other = deltas.clone()
    mask = torch.ones(r, K1, dtype=torch.bool)
    mask[torch.arange(r)[fg], labels[fg]] = False
    other[mask] += 100.0
    again = fast_rcnn_losses(logits, other.view(r, -1), labels, targets)
    assert torch.equal(again["loss_box_reg"], losses["loss_box_reg"])


def test_a_few_sgd_steps_reduce_the_loss():
    torch.manual_seed(0)
    feats, labels, targets = _batch(r=16, seed=1)
    head, pred = TwoFCHead(8, 7, 32), FastRCNNPredictor(32, K1)
    opt = torch.optim.SGD([*head.parameters(), *pred.parameters()], lr=0.1, momentum=0.9)
    history = []
    for _ in range(20):
        losses = fast_rcnn_losses(*pred(head(feats)), labels, targets)
        loss = losses["loss_cls"] + losses["loss_box_reg"]
        history.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert history[-1] < 0.5 * history[0], history


@pytest.mark.parametrize("depth, width, c_in, c_out", [(18, 8, 32, 64), (50, 8, 128, 256)])
def test_conv5_head_turns_14x14_c4_rois_into_vectors(depth, width, c_in, c_out):
    head = Conv5Head(depth=depth, width=width, norm="gn")
    assert head.in_channels == c_in and head.out_channels == c_out
    x = torch.randn(3, c_in, 14, 14)
    stage = head.layer4(x)
    assert stage.shape == (3, c_out, 7, 7)  # conv5's first block has stride 2
    out = head(x)
    assert out.shape == (3, c_out)
    assert torch.allclose(out, stage.mean(dim=(2, 3)))
    logits, deltas = FastRCNNPredictor(head.out_channels, K1)(out)
    assert logits.shape == (3, K1) and deltas.shape == (3, 4 * K1)


def test_conv5_head_takes_torchvision_layer4_weights():
    tv = resnet18()
    head = Conv5Head(depth=18, width=64, norm="bn")
    layer4 = {k: v for k, v in tv.state_dict().items() if k.startswith("layer4.")}
    head.load_state_dict(layer4)  # strict: same names, same shapes
    head.eval()
    tv.eval()
    x = torch.randn(1, 256, 14, 14)
    assert torch.allclose(head(x), tv.layer4(x).mean(dim=(2, 3)), atol=1e-5)
    # frozen BN (the paper's setting) keeps the same parameter names, minus num_batches_tracked
    frozen = Conv5Head(depth=18, width=64, norm="frozen_bn")
    frozen.load_state_dict({k: v for k, v in layer4.items() if not k.endswith("num_batches_tracked")})
