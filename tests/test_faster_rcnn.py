"""Faster R-CNN (Tables 3 and 5): every row runs with and without shared features, the training
stages touch only what they should, and the 4-step training shares one backbone."""
from __future__ import annotations

import pytest
import torch

from fpnlib.engine.four_step import share_backbone, train_shared
from fpnlib.engine.train import Schedule
from fpnlib.modeling.faster_rcnn import RPN_VARIANT, FasterRCNN, FasterRCNNConfig

SMALL = dict(num_classes=3, depth=18, width=8, norm="gn", freeze_at=0, fpn_channels=16, hidden=32,
             batch_per_image=64, anchor_scale=0.25)


def _batch(empty_second: bool = True):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 128, generator=g), torch.rand(3, 80, 96, generator=g)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0], [60.0, 20.0, 120.0, 90.0]]),
                "labels": torch.tensor([1, 3]), "iscrowd": torch.tensor([0, 0])}]
    if empty_second:
        targets.append({"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                        "iscrowd": torch.zeros(0)})
    else:
        targets.append({"boxes": torch.tensor([[5.0, 8.0, 40.0, 70.0]]), "labels": torch.tensor([2]),
                        "iscrowd": torch.tensor([0])})
    return images, targets


def _model(variant="fpn", share=False, seed=0):
    torch.manual_seed(seed)
    return FasterRCNN(FasterRCNNConfig(variant=variant, share_features=share, **SMALL),
                      generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("share", [False, True], ids=["separate", "shared"])
@pytest.mark.parametrize("variant", list(RPN_VARIANT))
def test_every_table3_row_trains_and_detects(variant, share):
    model = _model(variant, share)
    images, targets = _batch(empty_second=False)
    losses = model(images, targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box", "loss_cls", "loss_box_reg"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values()), losses
    sum(losses.values()).backward()
    # the RPN learns from its loss whether or not it shares the backbone
    assert model.rpn.head.parameters().__next__().grad is not None
    model.eval()
    with torch.no_grad():
        dets = model(images)
    for d, im in zip(dets, images):
        # an untrained head scores every class near 1/4, above the 0.05 threshold: some detections
        assert set(d) == {"boxes", "scores", "labels"} and 0 < len(d["boxes"]) <= 100
        assert ((d["labels"] >= 1) & (d["labels"] <= 3)).all()
        assert (d["boxes"][:, 2] <= im.shape[2]).all() and (d["boxes"][:, 3] <= im.shape[1]).all()


def test_sharing_means_one_backbone():
    shared, separate = _model(share=True), _model(share=False)
    assert separate.rpn_network is not None and shared.rpn_network is None
    assert separate.rpn is separate.rpn_network.rpn
    n_backbone = sum(p.numel() for p in separate.rpn_network.backbone.parameters())
    n_neck = sum(p.numel() for p in separate.rpn_network.neck.parameters())
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(separate) - n(shared) == n_backbone + n_neck


@pytest.mark.parametrize("share", [False, True], ids=["separate", "shared"])
def test_background_only_images_give_zero_box_losses(share):
    model = _model(share=share)
    images, targets = _batch()
    losses = model(images[1:], targets[1:])
    assert losses["loss_rpn_box"].item() == 0.0 and losses["loss_box_reg"].item() == 0.0
    assert losses["loss_objectness"] > 0 and losses["loss_cls"] > 0


def test_stages_select_losses_and_gradients():
    model = _model(share=True)
    images, targets = _batch(empty_second=False)
    model.stage = "rpn"
    assert set(model(images, targets)) == {"loss_objectness", "loss_rpn_box"}
    model.stage = "detector"
    losses = model(images, targets)
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.rpn.parameters())  # the RPN only feeds proposals
    assert all(p.grad is not None for p in model.predictor.parameters())
    model.stage = "nonsense"
    with pytest.raises(ValueError, match="unknown stage"):
        model(images, targets)


def test_training_needs_targets():
    with pytest.raises(ValueError, match="one target per image"):
        _model()(_batch()[0])


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


class _Tiny(torch.utils.data.Dataset):
    """Two images with objects, in the (image, target) form ``train`` expects."""

    def __init__(self):
        self.images, self.targets = _batch(empty_second=False)

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return self.images[i], dict(self.targets[i], image_id=torch.tensor(i))


def test_four_step_shares_then_trains_only_the_unique_layers(tmp_path):
    separate = _model(share=False)
    shared = share_backbone(separate)
    # step 3 starts from the detector's backbone and the RPN's head
    assert _same(_snapshot(shared.backbone), _snapshot(separate.backbone))
    assert _same(_snapshot(shared.rpn), _snapshot(separate.rpn))
    assert _same(_snapshot(shared.head), _snapshot(separate.head))
    with pytest.raises(ValueError, match="share_features=False"):
        share_backbone(shared)

    before = {name: _snapshot(getattr(shared, name)) for name in ("backbone", "neck", "rpn", "head", "predictor")}
    s = Schedule(iterations=2, batch_size=2, lr=0.01, warmup_iters=0, steps=(), checkpoint_every=10)
    calls = []
    runs = train_shared(shared, _Tiny(), s, s, tmp_path, progress=False,
                        on_iteration=lambda it, losses: calls.append(sorted(losses)))
    assert calls == [["loss_objectness", "loss_rpn_box"]] * 2 + [["loss_box_reg", "loss_cls"]] * 2
    assert runs["step3"]["iterations"] == runs["step4"]["iterations"] == 2
    after = {name: _snapshot(getattr(shared, name)) for name in before}
    assert _same(before["backbone"], after["backbone"]) and _same(before["neck"], after["neck"])
    assert not _same(before["rpn"], after["rpn"])  # step 3
    assert not _same(before["head"], after["head"]) and not _same(before["predictor"], after["predictor"])  # step 4
    assert shared.stage == "joint"
