"""The CPU-threaded pieces (RoIAlign per level and image, NMS per image) give the sequential
results bit for bit, forward and backward, and a detector gives the same losses, gradients and
detections either way."""
import pytest
import torch

from fpnlib.modeling import parallel_pieces
from fpnlib.modeling.roi_extraction import pyramid_roi_features

STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32}


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _pyramid(num_images=3, channels=8, size=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(num_images, channels, size // s, size // s, generator=g, requires_grad=True)
            for name, s in STRIDES.items()}


def _boxes(num_images=3, per_image=40, size=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_images):
        xy = torch.rand(per_image, 2, generator=g) * size * 0.8
        wh = 2 + torch.rand(per_image, 2, generator=g) * size * 0.6  # small to large: every level gets RoIs
        out.append(torch.cat([xy, xy + wh], 1))
    return out


def _roi_features_and_grads(threaded: bool):
    maps, boxes = _pyramid(), _boxes()
    context = parallel_pieces.sequential() if not threaded else torch.enable_grad()
    with context:
        out = pyramid_roi_features(maps, boxes, STRIDES, canonical_size=32)
        weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
        (out * weights).sum().backward()
    return out.detach(), {k: v.grad for k, v in maps.items()}


def test_threaded_roi_align_is_the_sequential_one_bit_for_bit(two_threads):
    seq_out, seq_grads = _roi_features_and_grads(threaded=False)
    thr_out, thr_grads = _roi_features_and_grads(threaded=True)
    assert seq_out.abs().sum() > 0 and all(g.abs().sum() > 0 for g in seq_grads.values())  # every level used
    assert torch.equal(seq_out, thr_out)
    for name in STRIDES:
        assert torch.equal(seq_grads[name], thr_grads[name]), name


def test_the_threaded_path_is_taken_only_where_it_applies(two_threads):
    maps, boxes = _pyramid(), _boxes()
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
    level = torch.randint(2, 6, (len(rois),))
    args = ([maps[n] for n in STRIDES], rois, level, [2, 3, 4, 5], [1 / s for s in STRIDES.values()], 7, 2, False)
    assert parallel_pieces.threaded_roi_align(*args) is not None
    with parallel_pieces.sequential():
        assert parallel_pieces.threaded_roi_align(*args) is None
    torch.set_num_threads(1)
    assert parallel_pieces.threaded_roi_align(*args) is None


def test_map_pieces_keeps_order_and_grad_mode(two_threads):
    x = torch.ones(3, requires_grad=True)
    with torch.no_grad():
        out = parallel_pieces.map_pieces(lambda a, b: x * a + b, [1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 3.0])
    assert [float(o[0]) for o in out] == [1.0, 3.0, 5.0, 7.0]
    assert not any(o.requires_grad for o in out)  # the caller's no_grad reached the workers


def _detector_step(threaded: bool):
    from fpnlib.bench import CONFIGS, build_pair, synthetic_batch
    from fpnlib.modeling.torchvision_interop import preprocess

    cfg = CONFIGS["tiny"]
    ours, _ = build_pair(cfg)
    images, targets = synthetic_batch(cfg)
    # anchor and RoI sampling draw the same both ways
    ours.rpn.generator, ours.generator = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    context = parallel_pieces.sequential() if not threaded else torch.enable_grad()
    with context:
        inputs, _ = preprocess(images, cfg.min_size, cfg.max_size)
        losses = ours(inputs, targets)
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}
        ours.eval()
        with torch.no_grad():
            dets = ours(inputs)
    return losses, grads, dets


def test_a_detector_trains_and_detects_the_same_with_threads(two_threads):
    seq_losses, seq_grads, seq_dets = _detector_step(threaded=False)
    thr_losses, thr_grads, thr_dets = _detector_step(threaded=True)
    assert {k: float(v.detach()) for k, v in seq_losses.items()} == {k: float(v.detach()) for k, v in thr_losses.items()}
    assert seq_grads.keys() == thr_grads.keys() and len(seq_grads) > 10
    for name in seq_grads:
        assert torch.equal(seq_grads[name], thr_grads[name]), name
    assert sum(len(d["boxes"]) for d in seq_dets) > 0
    for a, b in zip(seq_dets, thr_dets):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(a[key], b[key]), key
