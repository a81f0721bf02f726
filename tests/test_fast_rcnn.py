"""Fast R-CNN on fixed proposals: every Table 2 row runs, trains and detects."""
from __future__ import annotations

import pytest
import torch

from fpnlib.modeling.fast_rcnn import HEAD_VARIANTS, FastRCNN, FastRCNNConfig

SMALL = dict(num_classes=3, depth=18, width=8, norm="gn", freeze_at=0, fpn_channels=16, hidden=32,
             batch_per_image=64)


def _batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 128, generator=g), torch.rand(3, 80, 96, generator=g)]
    targets = [
        {"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0], [60.0, 20.0, 120.0, 90.0]]),
         "labels": torch.tensor([1, 3]), "iscrowd": torch.tensor([0, 0])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "iscrowd": torch.zeros(0)},
    ]
    xy = torch.rand(2, 40, 2, generator=g) * 60
    for i, t in enumerate(targets):
        t["proposals"] = torch.cat([xy[i], xy[i] + 8 + torch.rand(40, 2, generator=g) * 30], 1)
    return images, targets


@pytest.mark.parametrize("variant", HEAD_VARIANTS)
def test_every_table2_row_trains_and_detects(variant):
    torch.manual_seed(0)
    model = FastRCNN(FastRCNNConfig(variant=variant, **SMALL), generator=torch.Generator().manual_seed(0))
    images, targets = _batch()
    losses = model(images, targets)
    assert set(losses) == {"loss_cls", "loss_box_reg"} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        dets = model(images, [{"proposals": t["proposals"]} for t in targets])
    assert len(dets) == 2
    for d, im in zip(dets, images):
        # an untrained head scores every class near 1/4, above the 0.05 threshold: some detections
        assert 0 < len(d["boxes"]) <= 100 and ((d["labels"] >= 1) & (d["labels"] <= 3)).all()
        assert (d["boxes"][:, 2] <= im.shape[2]).all() and (d["boxes"][:, 3] <= im.shape[1]).all()


def test_background_only_images_have_zero_box_loss():
    torch.manual_seed(0)
    model = FastRCNN(FastRCNNConfig(variant="fpn", **SMALL))
    images, targets = _batch()
    losses = model(images[1:], targets[1:])
    assert losses["loss_box_reg"].item() == 0.0 and losses["loss_cls"].item() > 0


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    model = FastRCNN(FastRCNNConfig(variant="fpn", **SMALL), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, targets = _batch()
    first = None
    for _ in range(15):
        loss = sum(model(images, targets).values())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


def test_mismatched_inputs_are_refused():
    model = FastRCNN(FastRCNNConfig(variant="c5_2fc", **SMALL))
    images, targets = _batch()
    with pytest.raises(ValueError, match="'proposals'"):
        model(images, targets[:1])
    with pytest.raises(ValueError, match="unknown variant"):
        FastRCNN(FastRCNNConfig(variant="c6", **SMALL))
