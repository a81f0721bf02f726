"""Pre-training, the stand-in for ImageNet (Sec. 5): the crop set, the classifier, the weights every
table row starts from, and that a checkpoint of one initialisation is never resumed as another's."""
from __future__ import annotations

import json

import pytest
import torch
from torchvision.ops import box_iou

from fpnlib.data.coco import load_coco_split
from fpnlib.data.crops import BACKGROUND, ObjectCrops, background_boxes, size_bucket
from fpnlib.engine.train import Schedule
from fpnlib.experiments import pretrain
from fpnlib.modeling.backbone import ResNetBackbone
from fpnlib.modeling.classifier import BackboneClassifier
from fpnlib.modeling.faster_rcnn import FasterRCNN, FasterRCNNConfig


def test_background_boxes_overlap_no_object():
    import numpy as np

    gt = torch.tensor([[10.0, 10.0, 60.0, 60.0], [80.0, 20.0, 150.0, 100.0]])
    boxes = background_boxes(gt, 160, 200, 20, 8.0, 120.0, np.random.default_rng(0))
    assert len(boxes) == 20
    assert float(box_iou(boxes, gt).max()) < 0.3
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 200).all() and (boxes[:, 3] <= 160).all()


def test_crops_cover_every_object_and_some_background(smoke_root):
    split = load_coco_split(smoke_root, "train", with_masks=False)
    fit, held = pretrain.held_out(len(split))
    assert set(fit).isdisjoint(held) and len(fit) + len(held) == len(split) and held
    crops = ObjectCrops(split, fit, 56, train=True, seed=0)
    labels = crops.labels()
    objects = sum(1 for i in fit for a in split.coco.imgToAnns.get(split.ids[i], []) if not a["iscrowd"])
    assert int((labels != BACKGROUND).sum()) == objects
    # background about as frequent as one class
    assert abs(int((labels == BACKGROUND).sum()) - objects // split.num_classes) <= 2
    x, t = crops[0]
    assert x.shape == (3, 56, 56) and t["labels"].dtype == torch.int64
    torch.manual_seed(5)
    a = crops[3][0]
    torch.manual_seed(5)
    assert torch.equal(a, crops[3][0])  # the jitter and the flip come from torch's (seeded) RNG
    # the evaluation crop is fixed
    test = ObjectCrops(split, held, 56, train=False, seed=0)
    assert torch.equal(test[0][0], test[0][0])
    assert size_bucket(31.0**2) == "small" and size_bucket(32.0**2) == "medium" and size_bucket(96.0**2) == "large"


def test_the_crop_size_is_eq1s_canonical_size():
    from fpnlib.experiments import table2

    for preset in ("smoke", "cpu", "gpu"):
        assert pretrain.budget_for(preset).crop_size == round(table2.canonical_size(preset))
    with pytest.raises(KeyError, match="ImageNet checkpoint"):
        pretrain.budget_for("paper")


def test_every_backbone_and_the_conv5_head_start_from_the_pretrained_weights(tmp_path):
    torch.manual_seed(0)
    classifier = BackboneClassifier(9, depth=18, width=8, norm="gn")
    path = tmp_path / "backbone.pt"
    torch.save(classifier.backbone_state(), path)
    cfg = dict(num_classes=3, depth=18, width=8, norm="gn", freeze_at=0, fpn_channels=16, hidden=32, anchor_scale=0.25)
    for variant in ("fpn", "c4_conv5"):
        torch.manual_seed(1)
        model = FasterRCNN(FasterRCNNConfig(variant=variant, **cfg))
        neck_before = None if model.neck is None else {k: v.clone() for k, v in model.neck.state_dict().items()}
        pretrain.initialise_from_pretraining(model, path)
        source = classifier.backbone.state_dict()
        backbones = [m for m in model.modules() if isinstance(m, ResNetBackbone)]
        assert len(backbones) == 2  # the detector's and its RPN's own (unshared features)
        for b in backbones:
            for k, v in b.state_dict().items():
                assert torch.equal(v, source[k]), k
        if variant == "c4_conv5":
            for k, v in model.head.state_dict().items():
                assert torch.equal(v, source[k]), k  # ResNet's conv5 stage, as the paper's C4 baseline
        else:  # the pyramid starts random
            assert all(torch.equal(v, model.neck.state_dict()[k]) for k, v in neck_before.items())
    with pytest.raises(ValueError, match="no ResNet backbone"):
        pretrain.initialise_from_pretraining(torch.nn.Linear(2, 2), path)


def test_pretraining_is_deterministic_and_its_record_is_kept(smoke_root, tmp_path, monkeypatch):
    tiny = Schedule(iterations=4, batch_size=8, lr=0.01, warmup_iters=0, steps=(), checkpoint_every=2, log_every=2)
    monkeypatch.setitem(pretrain.BUDGETS, "smoke", lambda: pretrain._budget("smoke", tiny))
    first = pretrain.pretrained_weights("smoke", smoke_root, tmp_path / "a", progress=False, out_dir=tmp_path / "out")
    second = pretrain.pretrained_weights("smoke", smoke_root, tmp_path / "b", progress=False)
    a, b = torch.load(first), torch.load(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((tmp_path / "out" / "pretrain.json").read_text())
    assert record["held_out"]["crops"] > 0 and set(record["held_out"]["by_size"]) == {"small", "medium", "large"}
    assert record["provenance"]["preset"] == "smoke" and record["budget"]["crop_size"] == 56
    # a finished pre-training is reused, not trained again
    stamp = first.stat().st_mtime_ns
    assert pretrain.pretrained_weights("smoke", smoke_root, tmp_path / "a", progress=False) == first
    assert first.stat().st_mtime_ns == stamp


def test_a_checkpoint_started_from_other_weights_is_not_resumed(tmp_path):
    from fpnlib.engine.train import train

    class Tiny(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3, 8, 8), {"labels": torch.tensor(i % 2)}

    model = BackboneClassifier(2, depth=18, width=8, norm="gn")
    s = Schedule(iterations=2, batch_size=2, lr=0.01, warmup_iters=0, steps=(), checkpoint_every=1)
    train(model, Tiny(), s, tmp_path, progress=False, start_from="sha256:aaa")
    with pytest.raises(ValueError, match="started from other weights"):
        train(model, Tiny(), s, tmp_path, progress=False, start_from="random")
    assert train(model, Tiny(), s, tmp_path, progress=False, start_from="sha256:aaa")["resumed_from"] == 2


# Held-out accuracy (%) the smoke budget must reach on a smoke-sized set of 200 train images (20
# held out, 109 crops): measured 58.7 (seed 0, one thread), chance is 11.1 (8 shapes + background).
# A classifier that learns nothing stays at chance; one that learns reaches several times it.
MIN_HELD_OUT_ACCURACY = 30.0


@pytest.mark.slow
def test_pretraining_learns_on_smoke(tmp_path):
    from fpnlib.config import get_preset
    from fpnlib.data.synthetic import generate

    root = tmp_path / "data"
    generate(root, get_preset("smoke", num_train=200).data, progress=False)
    record = pretrain.run_pretrain("smoke", root, tmp_path / "run", progress=False)
    held = record["held_out"]
    assert held["chance"] == pytest.approx(100 / 9, abs=0.1)
    assert held["accuracy"] >= MIN_HELD_OUT_ACCURACY > held["chance"] + 15, held


def test_the_lesson_figure_shows_crops_and_where_the_evidence_lies(smoke_root, tmp_path):
    from fpnlib.engine.train import train
    from fpnlib.viz_pretrain import class_activation, plot_crops_and_activations

    split = load_coco_split(smoke_root, "train", with_masks=False)
    crops = ObjectCrops(split, range(4), 56, train=False)
    model = BackboneClassifier(split.num_classes + 1, depth=18, width=32, norm="gn")
    s = Schedule(iterations=1, batch_size=2, lr=0.0, warmup_iters=0, steps=(), checkpoint_every=1)
    train(model, crops, s, tmp_path, progress=False)
    loaded = pretrain.load_classifier("smoke", tmp_path, split.num_classes + 1)
    label, cam = class_activation(loaded, crops[0][0])
    assert 0 <= label <= split.num_classes and cam.shape == (56, 56) and cam.min() >= 0 and cam.max() <= 1
    names = {0: "background", **{i + 1: c["name"] for i, c in enumerate(split.categories)}}
    fig = plot_crops_and_activations(loaded, crops, names, count=3)
    assert len(fig.axes) == 6
