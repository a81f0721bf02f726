"""torchvision interop: a ``fasterrcnn_resnet50_fpn`` state dict, loaded into fpnlib's FasterRCNN,
gives torchvision's pyramid, proposals and detections (fpnlib.modeling.torchvision_interop).

Both models run on images resized to 320 / 480 px (min / max side) instead of torchvision's
800 / 1333, so that two R-50 forward passes take seconds on a CPU.
"""
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn, fasterrcnn_resnet50_fpn
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import FrozenBatchNorm2d

from fpnlib.modeling.anchors import AnchorGenerator
from fpnlib.modeling.box_coder import BBOX_CLAMP, FAST_RCNN_BOX_WEIGHTS
from fpnlib.modeling.rpn import select_proposals
from fpnlib.modeling.detectors import batch_images
from fpnlib.host_work import count_host_work
from fpnlib.modeling.torchvision_interop import (
    boxes_to_original_size,
    convert_torchvision_state_dict,
    detect,
    load_torchvision_faster_rcnn,
    preprocess,
    torchvision_faster_rcnn_config,
)

MIN_SIZE, MAX_SIZE = 320, 480
NUM_CLASSES = 91  # torchvision's count, background included (COCO)
# RPN top-k per level before NMS, in both models (torchvision: 1000). On these random features
# P2's logits run highest and, with 1000, fill the 1000 proposals with P2-P4 boxes; with 300
# every level, P6 included, is among them, and so are its anchors (see IMAGE_SIZES).
PRE_NMS_TOP_N = 300
# 240x300 -> 320x400; 300x213 -> 450.7x320, floored to 450 (rounding would give 451). The
# batch pads to 480x416: P5 is 15x13, P6 8x7, so torchvision's P6 strides are 60 and 59, not 64.
IMAGE_SIZES = ((240, 300), (300, 213))
LEVELS = {"p2": "0", "p3": "1", "p4": "2", "p5": "3", "p6": "pool"}


def _rescale_(layer: nn.Module, output: torch.Tensor, std: float) -> None:
    factor = std / output.std()
    layer.weight.mul_(factor)
    layer.bias.mul_(factor)


@torch.no_grad()
def _non_degenerate_(tv: nn.Module, images: list[torch.Tensor], g: torch.Generator) -> None:
    """Give torchvision's random model weights whose outputs can tell a wrong mapping apart.

    Its init leaves BN an identity (mean 0, var 1, weight 1, bias 0), so a random R-50's
    activations grow without bound; the RPN and box predictor (N(0, 0.01) / default init) emit
    near-constant logits, so the RPN's top-k is a tie and no class passes the 0.05 score
    threshold. Here: random positive BN affines with running statistics measured on the test
    batch (activations O(1)); RPN logits of std 3 with a random bias per anchor (scores spread
    over (0, 1), ranks distinct), RPN deltas of std 0.3; class logits of std 2.5 and box deltas
    of std 1 (0.1 after the (10, 10, 5, 5) weights).
    """
    batch = tv.transform(images)[0].tensors
    body = tv.backbone.body
    for m in body.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5, generator=g)
            m.bias.uniform_(-0.2, 0.2, generator=g)
            m.momentum = None  # cumulative average: the statistics of this one batch
            m.reset_running_stats()
    body.train()
    body(batch)
    tv.eval()
    feats = tv.backbone(batch)
    head = tv.rpn.head
    nn.init.normal_(head.conv[0][0].weight, std=(2 / (9 * 256)) ** 0.5, generator=g)  # He
    hidden = [head.conv(f) for f in feats.values()]
    nn.init.normal_(head.cls_logits.bias, std=1.0, generator=g)
    _rescale_(head.cls_logits, torch.cat([head.cls_logits(x).flatten() for x in hidden]), 3.0)
    _rescale_(head.bbox_pred, torch.cat([head.bbox_pred(x).flatten() for x in hidden]), 0.3)
    image_list = tv.transform(images)[0]
    proposals = tv.rpn(image_list, feats)[0]
    x = tv.roi_heads.box_head(tv.roi_heads.box_roi_pool(feats, proposals, image_list.image_sizes))
    predictor = tv.roi_heads.box_predictor
    nn.init.normal_(predictor.cls_score.bias, std=1.0, generator=g)
    _rescale_(predictor.cls_score, predictor.cls_score(x), 2.5)
    _rescale_(predictor.bbox_pred, predictor.bbox_pred(x), 1.0)


def _freeze_bn_(module: nn.Module) -> None:
    """BatchNorm2d -> FrozenBatchNorm2d with the same buffers, in place.

    Without ImageNet weights torchvision builds BatchNorm2d; with them (COCO_V1 included) it
    builds FrozenBatchNorm2d, as fpnlib does. In eval mode the two compute the same function
    but round differently, and a random R-50's gains amplify those 1-ulp differences (measured:
    6e-4 at P2, values up to 20). Freezing the reference makes both sides run the same float32
    kernels, so any difference left comes from the mapping or the configuration.
    """
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key))
            setattr(module, name, frozen)
        else:
            _freeze_bn_(child)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    tv = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES,
                                 min_size=MIN_SIZE, max_size=MAX_SIZE, rpn_pre_nms_top_n_test=PRE_NMS_TOP_N).eval()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, w, generator=g) for h, w in IMAGE_SIZES]
    _non_degenerate_(tv, images, g)
    path = tmp_path_factory.mktemp("tv") / "fasterrcnn_resnet50_fpn.pth"
    torch.save(tv.state_dict(), path)
    ours = load_torchvision_faster_rcnn(path, pre_nms_top_n_test=PRE_NMS_TOP_N)
    _freeze_bn_(tv)

    with torch.no_grad():
        image_list = tv.transform(images)[0]
        feats = tv.backbone(image_list.tensors)
        proposals = tv.rpn(image_list, feats)[0]
        dets = tv.roi_heads(feats, proposals, image_list.image_sizes)[0]
        dets = tv.transform.postprocess(dets, image_list.image_sizes, list(IMAGE_SIZES))

    # fpnlib: one pass of detect(), the pyramid and the proposals caught on the way
    caught = {}
    hooks = [ours.neck.register_forward_hook(lambda m, i, out: caught.__setitem__("maps", out)),
             ours.rpn.register_forward_hook(lambda m, i, out: caught.__setitem__("proposals", out[0]))]
    ours_dets = detect(ours, images, MIN_SIZE, MAX_SIZE)
    for h in hooks:
        h.remove()
    return SimpleNamespace(tv=tv, ours=ours, path=path, images=images, image_list=image_list, feats=feats,
                           proposals=proposals, dets=dets, ours_maps=caught["maps"],
                           ours_proposals=caught["proposals"], ours_dets=ours_dets)


# --------------------------------------------------------------- same outputs as torchvision


def test_preprocessing_matches_generalized_rcnn_transform(run):
    inputs, sizes = preprocess(run.images, MIN_SIZE, MAX_SIZE)
    batch, hws = batch_images(inputs, 32)
    assert sizes == list(IMAGE_SIZES)
    assert hws == [tuple(s) for s in run.image_list.image_sizes] == [(320, 400), (450, 320)]
    assert batch.shape == run.image_list.tensors.shape
    torch.testing.assert_close(batch, run.image_list.tensors, rtol=0, atol=1e-6)


def test_fpn_features_match_to_1e_5(run):
    for ours, theirs in LEVELS.items():
        assert run.ours_maps[ours].shape == run.feats[theirs].shape, ours
        torch.testing.assert_close(run.ours_maps[ours], run.feats[theirs], rtol=0, atol=1e-5, msg=ours)
    # not trivially small: the tolerance is meaningful
    assert all(run.feats[k].std() > 1.0 for k in LEVELS.values())


def test_rpn_proposals_match(run):
    # same count, same order (by decreasing objectness), boxes to 1e-3 px
    for (boxes, scores), theirs in zip(run.ours_proposals, run.proposals, strict=True):
        assert boxes.shape == theirs.shape and boxes.shape[0] > 500
        torch.testing.assert_close(boxes, theirs, rtol=0, atol=1e-3)
        assert (scores[:-1] >= scores[1:]).all()
        assert scores[0] - scores[-1] > 0.1  # spread, not a tie broken by index
    # every level, P6 (torchvision's stride quirk) included, supplied some of them
    with torch.no_grad():
        hws = [tuple(s) for s in run.image_list.image_sizes]
        for _, _, levels in run.ours.rpn(run.ours_maps, hws, with_levels=True)[0]:
            assert (torch.bincount(levels, minlength=5) >= 10).all()


def test_detections_match(run):
    # boxes to 1e-3 px in the input image, scores to 1e-5, labels exactly, same order
    for ours, theirs in zip(run.ours_dets, run.dets, strict=True):
        assert ours["boxes"].shape == theirs["boxes"].shape
        assert len(theirs["boxes"]) >= 20 and len(theirs["labels"].unique()) >= 3
        torch.testing.assert_close(ours["boxes"], theirs["boxes"], rtol=0, atol=1e-3)
        torch.testing.assert_close(ours["scores"], theirs["scores"], rtol=0, atol=1e-5)
        assert torch.equal(ours["labels"], theirs["labels"])


def test_boxes_go_back_to_the_original_pixels_as_torchvision_with_no_copy_to_the_device():
    from torchvision.models.detection.transform import resize_boxes

    g = torch.Generator().manual_seed(0)
    for resized, original in (((320, 400), (240, 300)), ((450, 320), (300, 213)), ((800, 1199), (427, 640))):
        boxes = torch.rand(30, 4, generator=g) * max(resized)
        assert torch.equal(boxes_to_original_size(boxes, resized, original), resize_boxes(boxes, resized, original))
    # "meta" stands for the GPU: the float32 ratios are CPU scalars, so nothing is copied or waited for
    on_device = boxes.to("meta")
    counts = count_host_work(lambda: boxes_to_original_size(on_device, (800, 1199), (427, 640)), "meta")
    assert counts["waits"] == 0 and "aten._to_copy.default" not in counts["top_ops"], counts


def test_a_batch_of_one_size_is_preprocessed_and_scaled_back_as_image_by_image(monkeypatch):
    from fpnlib.modeling.torchvision_interop import _as_one_batch

    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 240, 300, generator=g) for _ in range(3)]
    # one batch off the CPU only (a CPU is faster image by image), unless switched on
    assert not _as_one_batch(images) and _as_one_batch([im.to("meta") for im in images])
    one_by_one, sizes = preprocess(images, MIN_SIZE, MAX_SIZE)
    monkeypatch.setenv("FPNLIB_BATCH_PREPROCESS", "1")
    assert _as_one_batch(images) and not _as_one_batch([images[0], images[1][:, :200]])
    inputs, batched_sizes = preprocess(images, MIN_SIZE, MAX_SIZE)  # one stacked batch
    assert sizes == batched_sizes == [(240, 300)] * 3
    assert all(torch.equal(a, b) for a, b in zip(inputs, one_by_one, strict=True))
    # the normalisation's statistics reach a device once ("meta" stands for the GPU): a copy
    # from the host at every call would wait for the device's queue
    on_device = [im.to("meta") for im in images]
    assert count_host_work(lambda: preprocess(on_device, MIN_SIZE, MAX_SIZE), "meta", warmup=1)["waits"] == 0

    # detect's boxes go back to each image's pixels in one call for the batch, as one by one
    found = [torch.rand(n, 4, generator=g) * 300 for n in (5, 0, 7)]

    class Fixed(nn.Module):  # a "detector" that returns the boxes above
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(1))

        def forward(self, inputs):
            return [{"boxes": b.clone(), "labels": torch.ones(len(b), dtype=torch.int64)} for b in found]

    resized = tuple(inputs[0].shape[-2:])
    for out, boxes in zip(detect(Fixed(), images, MIN_SIZE, MAX_SIZE), found, strict=True):
        assert torch.equal(out["boxes"], boxes_to_original_size(boxes, resized, (240, 300)))


def test_config_mirrors_torchvision_model():
    with torch.device("meta"):  # torchvision's defaults, no memory
        tv = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    ours = SimpleNamespace(cfg=torchvision_faster_rcnn_config())
    rpn = ours.cfg.rpn
    assert (rpn.pre_nms_top_n_train, rpn.pre_nms_top_n_test) == (tv.rpn._pre_nms_top_n["training"],
                                                                 tv.rpn._pre_nms_top_n["testing"])
    assert (rpn.post_nms_top_n_train, rpn.post_nms_top_n_test) == (tv.rpn._post_nms_top_n["training"],
                                                                   tv.rpn._post_nms_top_n["testing"])
    assert (rpn.nms_thresh, rpn.min_size) == (tv.rpn.nms_thresh, tv.rpn.min_size)
    heads = tv.roi_heads
    assert (ours.cfg.score_thresh, ours.cfg.nms_thresh, ours.cfg.detections_per_img) == (
        heads.score_thresh, heads.nms_thresh, heads.detections_per_img)
    assert ours.cfg.sampling_ratio == heads.box_roi_pool.sampling_ratio and ours.cfg.pooler == "align"
    assert tuple(heads.box_coder.weights) == tuple(FAST_RCNN_BOX_WEIGHTS)  # the head's; the RPN's are 1s
    assert tv.rpn.box_coder.weights == (1.0, 1.0, 1.0, 1.0)
    assert heads.box_coder.bbox_xform_clip == tv.rpn.box_coder.bbox_xform_clip == BBOX_CLAMP
    assert (tv.transform.min_size, tv.transform.max_size) == ((800,), 1333)
    assert ours.cfg.num_classes == 90 == tv.roi_heads.box_predictor.cls_score.out_features - 1


def test_anchors_match_torchvision_anchor_generator():
    sizes = {"p2": (32.0,), "p3": (64.0,), "p4": (128.0,), "p5": (256.0,), "p6": (512.0,)}
    strides = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    hw = {"p2": (200, 208), "p3": (100, 104), "p4": (50, 52), "p5": (25, 26), "p6": (13, 13)}  # an 800x832 batch
    maps = {lvl: torch.zeros(1, 1, *s) for lvl, s in hw.items()}
    theirs = TVAnchorGenerator(tuple((int(s[0]),) for s in sizes.values()), ((0.5, 1.0, 2.0),) * 5)(
        ImageList(torch.zeros(1, 3, 800, 832), [(800, 832)]), list(maps.values()))[0]
    ours = AnchorGenerator(sizes, strides=strides, offset=0.0, round_cells=True, strides_from_image=True)(maps)
    assert torch.equal(torch.cat(list(ours.values())), theirs)
    # the defaults (exact areas, nominal strides) are another geometry: P6 spaced 64, not 61 / 64
    plain = AnchorGenerator(sizes, strides=strides, offset=0.0)(maps)
    assert not torch.allclose(torch.cat(list(plain.values())), theirs, atol=0.4)


def test_rank_by_probability_orders_saturated_proposals_as_torchvision():
    # Two levels, one anchor each, far apart; logits 18 (P2) and 20 (P3) both give probability
    # 1.0 in float32. torchvision ranks by probability, so the tie keeps the level order and
    # its single post-NMS proposal is P2's; ranking by logits picks P3's.
    anchors = {"p2": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "p3": torch.tensor([[50.0, 50.0, 70.0, 70.0]])}
    logits = [torch.tensor([[18.0]]), torch.tensor([[20.0]])]
    deltas = [torch.zeros(1, 1, 4), torch.zeros(1, 1, 4)]
    tv_rpn = RegionProposalNetwork(TVAnchorGenerator(), nn.Identity(), 0.7, 0.3, 256, 0.5,
                                   dict(training=1, testing=1), dict(training=1, testing=1), 0.7).eval()
    theirs, _ = tv_rpn.filter_proposals(torch.cat(list(anchors.values()))[None], torch.cat(logits, 1),
                                        [(100, 100)], [1, 1])
    torch.testing.assert_close(theirs[0], anchors["p2"])
    args = (logits, deltas, anchors, [(100, 100)], 1, 1, 0.7, 1e-3)
    torch.testing.assert_close(select_proposals(*args, rank_by_probability=True)[0][0], anchors["p2"])
    torch.testing.assert_close(select_proposals(*args)[0][0], anchors["p3"])


# ------------------------------------------------------------------------ loading and errors


def test_legacy_names_wrapped_checkpoint_and_coco_eps(run, tmp_path):
    sd = torch.load(run.path, weights_only=True)
    legacy = {}
    for k, v in sd.items():  # names of checkpoints older than Conv2dNormActivation (COCO_V1's)
        k = k.replace(".0.weight", ".weight").replace(".0.bias", ".bias") if k.startswith("backbone.fpn.") else k
        k = k.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        legacy[k] = v
    assert "backbone.fpn.inner_blocks.0.weight" in legacy and "rpn.head.conv.weight" in legacy
    assert convert_torchvision_state_dict(legacy).keys() == convert_torchvision_state_dict(sd).keys()
    path = tmp_path / "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"  # torchvision's COCO_V1 file name
    torch.save({"model": legacy, "epoch": 25}, path)  # torchvision's reference scripts wrap it
    model = load_torchvision_faster_rcnn(path)
    ref = run.ours.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    eps = {m.eps for m in model.modules() if isinstance(m, FrozenBatchNorm2d)}
    assert eps == {0.0}  # torchvision's overwrite_eps(model, 0.0) for COCO_V1
    assert {m.eps for m in run.ours.modules() if isinstance(m, FrozenBatchNorm2d)} == {1e-5}


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_torchvision_faster_rcnn(path)


def test_file_that_is_not_a_state_dict(tmp_path):
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(ValueError, match="tensor.pth does not hold a state dict"):
        load_torchvision_faster_rcnn(tensor)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(RuntimeError, match="could not read .*garbage.pth"):
        load_torchvision_faster_rcnn(garbage)


def test_state_dict_of_another_model_names_the_keys(tmp_path):
    torch.manual_seed(0)
    other = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=5)
    path = tmp_path / "mobilenet.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(ValueError) as info:
        load_torchvision_faster_rcnn(path)
    message = str(info.value)
    assert "mobilenet.pth" in message
    assert "missing keys: backbone.body.conv1.weight" in message
    assert "unexpected keys: backbone.body.0.0.weight" in message


def test_converter_names_missing_unexpected_and_mismatched_keys(run):
    sd = torch.load(run.path, weights_only=True)
    broken = {k: v for k, v in sd.items() if k != "backbone.fpn.layer_blocks.2.0.bias"}
    broken["roi_heads.mask_head.0.weight"] = torch.zeros(1)  # a Mask R-CNN's
    broken["rpn.head.cls_logits.weight"] = torch.zeros(15, 256, 1, 1)  # 15 anchors, not 3
    with pytest.raises(ValueError) as info:
        convert_torchvision_state_dict(broken)
    message = str(info.value)
    assert "missing keys: backbone.fpn.layer_blocks.2.0.bias" in message
    assert "unexpected keys: roi_heads.mask_head.0.weight" in message
    assert "rpn.head.cls_logits.weight: (15, 256, 1, 1) vs (3, 256, 1, 1)" in message


def test_num_classes_must_match_the_predictor(run):
    with pytest.raises(ValueError, match="90 classes"):
        load_torchvision_faster_rcnn(run.path, num_classes=80)
