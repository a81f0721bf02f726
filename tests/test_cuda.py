"""What only a GPU can show: the CUDA paths of training and inference.

Skipped where no GPU is (CI has none); run on a lent GPU machine, where the record of the run
is kept (``results/bench/cuda-*.pytest.txt``). Tolerances:

* float32 with TF32 off: the optimized inference path (folded BN, fused convolutions, channels_last) gives the plain
  path's detections within 1e-3 px, the CPU test's tolerance (``test_fast_inference.py``);
* bf16 autocast moves activations by ~1e-2 relative, so detections are compared as sets: at
  least 85% of the float32 detections are found (same label, IoU >= 0.9). The untrained model's
  scores tie closely, and the share moves with the order of roundings: measured on an H200,
  0.905 with separate operators, 0.880 with cuDNN's fused convolutions (``fused_conv``, whose
  C5 maps differ from separate operators' by 1e-2 in bf16, 1e-6 in float32);
* the trainer (bf16 autocast, channels_last, cuDNN autotuning) gives finite losses and resumes.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BF16_FOUND = 0.85


def _model_and_images():
    from test_fast_inference import _images, _model

    return _model().cuda(), [im.cuda() for im in _images()]


def _eager_and_graphed(model):
    """``model``'s inference copy without and with CUDA graphs, keeping 300 proposals per image:
    these small images keep fewer than 1000, whose counts would be read (one wait more, and a
    pass that waits is not captured)."""
    from dataclasses import replace

    from fpnlib.modeling.fast_inference import optimized_for_inference

    model.rpn.cfg = replace(model.rpn.cfg, post_nms_top_n_test=300)
    return tuple(optimized_for_inference(model, cuda_graphs=graphs) for graphs in (False, True))


def _assert_same_detections(expected, got):
    for a, b in zip(expected, got, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))


def test_optimized_path_in_float32_gives_the_plain_detections_on_cuda():
    from fpnlib.modeling.fast_inference import max_box_difference, optimized_for_inference
    from fpnlib.modeling.torchvision_interop import detect

    model, images = _model_and_images()
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        plain = detect(model, images, 96, 128, amp=False)
        quick = detect(optimized_for_inference(model), images, 96, 128, amp=False)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert sum(len(d["boxes"]) for d in plain) > 0
    assert max_box_difference(plain, quick) <= 1e-3


def test_bf16_inference_finds_the_float32_detections():
    from fpnlib.bench import agreement
    from fpnlib.modeling.fast_inference import optimized_for_inference
    from fpnlib.modeling.torchvision_interop import detect

    model, images = _model_and_images()
    fast = optimized_for_inference(model)
    fp32 = detect(fast, images, 96, 128, amp=False)
    bf16 = detect(fast, images, 96, 128, amp=True)
    found = agreement(bf16, fp32)
    print(f"bf16 finds {found:.3f} of the float32 detections")
    assert sum(len(d["boxes"]) for d in fp32) > 0 and found >= BF16_FOUND
    assert all(d["boxes"].dtype == torch.float32 for d in bf16)  # post-processing runs in float32


def test_trainer_on_cuda_bf16_channels_last_and_resume(smoke_root, tmp_path):
    from fpnlib.data.coco import load_coco_split
    from fpnlib.data.transforms import build_transforms
    from fpnlib.engine.train import Schedule, train
    from fpnlib.modeling.faster_rcnn import FasterRCNN
    from fpnlib.modeling.torchvision_interop import torchvision_faster_rcnn_config

    data = load_coco_split(smoke_root, "train", transforms=build_transforms(True, 160, 214), with_masks=False)
    cfg = torchvision_faster_rcnn_config(num_classes=8, depth=18, width=16, fpn_channels=32, hidden=64, norm="gn",
                                         freeze_at=0, batch_per_image=64)
    schedule = Schedule(iterations=6, batch_size=4, lr=0.01, warmup_iters=2, checkpoint_every=3, log_every=1)

    def interrupt(it, losses):
        assert all(math.isfinite(v) for v in losses.values()), losses
        if it == 3:
            raise KeyboardInterrupt

    torch.manual_seed(0)
    model = FasterRCNN(cfg)
    with pytest.raises(KeyboardInterrupt):
        train(model, data, schedule, tmp_path, device="cuda", progress=False, on_iteration=interrupt)
    assert model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)  # for_cuda_training ran
    assert torch.backends.cudnn.benchmark
    torch.manual_seed(0)
    info = train(FasterRCNN(cfg), data, schedule, tmp_path, device="cuda", progress=False)
    # the interrupt saved the 4 completed steps
    assert info["resumed_from"] == 4 and info["iterations"] == 6
    assert all(math.isfinite(v) for v in info["last_losses"].values())


def test_segment_patch_gather_matches_the_cpu_and_repeats_its_gradient():
    """``gather_patches`` takes another indexing path on CUDA (the one whose backward is the same
    every run there): same patches as on the CPU, same gradient on every call."""
    from fpnlib.modeling.segment_proposals import gather_patches

    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 16, 12, 14, generator=g)
    b, y, x = torch.randint(0, 2, (500,), generator=g), torch.randint(0, 12, (500,), generator=g), \
        torch.randint(0, 14, (500,), generator=g)
    cpu = gather_patches(feat, b, y, x, 5)
    on_gpu = feat.cuda().requires_grad_()
    patches = gather_patches(on_gpu, b.cuda(), y.cuda(), x.cuda(), 5)
    assert torch.equal(patches.detach().cpu(), cpu)
    weights = torch.randn(patches.shape, generator=g).cuda()  # uneven: a sum's order shows in its rounding
    grads = []
    for _ in range(5):
        on_gpu.grad = None
        (gather_patches(on_gpu, b.cuda(), y.cuda(), x.cuda(), 5) * weights).sum().backward()
        grads.append(on_gpu.grad.clone())
    assert all(torch.equal(gr, grads[0]) for gr in grads[1:])


def _both_paths(monkeypatch, fn):
    monkeypatch.setenv("FPNLIB_GROUP_NMS", "0")
    plain = fn()
    monkeypatch.setenv("FPNLIB_GROUP_NMS", "1")
    return plain, fn()


@pytest.mark.parametrize("packed", ["0", "1"])
def test_grouped_nms_gives_the_per_image_proposals_and_detections_on_cuda(monkeypatch, packed):
    """CUDA's default path (``group_nms``: the Triton overlap kernel where Triton is, else the
    eager formula), and with ``FPNLIB_NMS_BITS=1`` its rounds on packed overlaps, against
    torchvision's NMS image by image: the same tensors."""
    from test_group_nms import _clustered_boxes, _pyramid_outputs

    from fpnlib.modeling import group_nms
    from fpnlib.modeling.postprocess import detections_from_head
    from fpnlib.modeling.rpn import select_proposals

    monkeypatch.setenv("FPNLIB_NMS_BITS", packed)
    if packed == "1" and group_nms._triton_kernels() is None:
        pytest.skip("no Triton: no packed rounds")
    print("overlaps by", "Triton" if group_nms._triton_kernels() is not None else "the eager formula")
    logits, deltas, anchors = _pyramid_outputs(3, (256, 320), seed=2)
    logits, deltas, anchors = ({k: v.cuda() for k, v in d.items()} for d in (logits, deltas, anchors))
    hws = [(256, 320), (200, 300), (256, 190)]
    plain, grouped = _both_paths(monkeypatch, lambda: select_proposals(logits, deltas, anchors, hws, 300, 800, 0.7, 1.0,
                                                                        with_levels=True))
    for a, b in zip(plain, grouped, strict=True):
        print("proposals", len(a[0]), len(b[0]))
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    g = torch.Generator().manual_seed(3)
    rois = [_clustered_boxes(g, 120, 300.0).cuda(), _clustered_boxes(g, 80, 300.0).cuda(), torch.zeros(0, 4).cuda(),
            _clustered_boxes(g, 200, 300.0).cuda()]
    total = sum(len(r) for r in rois)
    head = (2.0 * torch.randn(total, 7, generator=g).cuda(), 0.5 * torch.randn(total, 28, generator=g).cuda())
    hws = [(300, 320), (260, 300), (300, 300), (240, 280)]
    plain, grouped = _both_paths(monkeypatch, lambda: detections_from_head(*head, rois, hws, detections_per_img=200))
    for a, b in zip(plain, grouped, strict=True):
        print("detections", len(a["boxes"]), len(b["boxes"]))
        assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))


def test_overlap_kernel_is_the_eager_formula_on_cuda():
    from test_group_nms import _clustered_boxes

    from fpnlib.modeling import group_nms

    if group_nms._triton_kernels() is None:
        pytest.skip("no Triton: the eager formula is the path")
    g = torch.Generator().manual_seed(0)
    boxes = torch.stack([_clustered_boxes(g, 1000) for _ in range(5)]).cuda()
    valid = (torch.rand(5, 1000, generator=g) > 0.1).cuda()
    valid[3], valid[4] = torch.arange(1000) < 100, False  # padded after 100 candidates; none
    upper = torch.ones((1000, 1000), dtype=torch.bool, device="cuda").triu_(1)
    for t in (0.5, 0.7):
        for fused in (False, True):
            eager = group_nms.overlaps_above(boxes, t, fused) & upper & valid[:, :, None] & valid[:, None, :]
            kernel = group_nms._suppression_matrix(boxes, valid, t, torch.float16, fused)
            print(t, fused, int(eager.sum()), int((kernel != eager.half()).sum()))
            assert torch.equal(kernel, eager.half())


@pytest.mark.parametrize("t", [0.5, 0.7])
def test_borderline_pairs_are_decided_as_torchvisions_cuda_kernel_decides(t):
    """Pairs at IoU t +- a few float steps: the grouped path's arithmetic on CUDA (fused area
    sum) decides each as torchvision's CUDA ``nms`` does; the unfused sum (its CPU kernel's)
    would not."""
    from test_group_nms import borderline_pairs, torchvision_suppresses

    from fpnlib.modeling import group_nms

    pairs = borderline_pairs(3000, t, "cuda")
    truth = torchvision_suppresses(pairs, t)
    valid = torch.ones(len(pairs), 2, dtype=torch.bool, device="cuda")
    path = group_nms._suppression_matrix(pairs, valid, t, torch.float16)[:, 0, 1] > 0
    eager = group_nms.overlaps_above(pairs, t, fused=True)[:, 0, 1]
    unfused = group_nms.overlaps_above(pairs, t)[:, 0, 1]
    print(f"t={t}: disagreements with torchvision's CUDA nms: path {int((path != truth).sum())}, eager fused "
          f"{int((eager != truth).sum())}, unfused {int((unfused != truth).sum())} of {len(pairs)}")
    assert 0.2 < truth.float().mean() < 0.8
    assert torch.equal(path, truth) and torch.equal(eager, truth)
    assert (unfused != truth).sum() > 10


def test_grouped_nms_end_to_end_detections_on_cuda(monkeypatch):
    from fpnlib.modeling.fast_inference import optimized_for_inference
    from fpnlib.modeling.torchvision_interop import detect

    model, images = _model_and_images()
    fast = optimized_for_inference(model)
    plain, grouped = _both_paths(monkeypatch, lambda: detect(fast, images * 3, 96, 128))
    assert sum(len(d["boxes"]) for d in plain) > 0
    _assert_same_detections(plain, grouped)


def test_anchor_sampling_on_cuda_draws_the_right_subsets_reproducibly():
    from fpnlib.modeling.anchor_labels import NEGATIVE, POSITIVE, sample_anchors

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(-1, 2, (50000,), generator=g).cuda()
    labels[:40000][labels[:40000] == POSITIVE] = NEGATIVE  # 1/3 of 10000 positives, ~1/2 of the rest negative
    draws = []
    for _ in range(2):
        gen = torch.Generator(device="cuda").manual_seed(1)
        pos, neg = sample_anchors(labels, 256, 0.5, generator=gen)
        assert len(pos) == 128 and len(neg) == 128
        assert (labels[pos] == POSITIVE).all() and (labels[neg] == NEGATIVE).all()
        assert len(set(pos.tolist())) == 128 and len(set(neg.tolist())) == 128
        draws.append((pos, neg))
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])


def test_a_cpu_generator_draws_the_cpus_subsets_on_cuda_in_one_copy():
    from fpnlib.host_work import count_host_work
    from fpnlib.modeling.anchor_labels import sample_batch

    labels = torch.randint(-1, 2, (3, 20000), generator=torch.Generator().manual_seed(0))
    labels[1, :19990][labels[1, :19990] == 1] = 0  # an image with 10 positives at most
    on_cpu = sample_batch(labels, 256, 0.5, torch.Generator().manual_seed(5))
    on_gpu = sample_batch(labels.cuda(), 256, 0.5, torch.Generator().manual_seed(5))
    assert on_gpu[1] == on_cpu[1] and torch.equal(on_gpu[0].cpu(), on_cpu[0])
    # waits: the one read of the counts, and the one copy of the batch's permutations
    on_device, g = labels.cuda(), torch.Generator().manual_seed(5)
    work = count_host_work(lambda: sample_batch(on_device, 256, 0.5, g), "cuda")
    assert work["waits"] == 2, work


def test_roialign_of_all_levels_in_one_kernel_matches_torchvisions_on_cuda(monkeypatch):
    """``pyramid_roi_align`` (RoI extraction on CUDA) against torchvision's ``roi_align`` level by
    level (``FPNLIB_TRITON_ROI_ALIGN=0``), on channels_last maps of an R50-FPN's width, output
    and gradients of the maps: float32 within 2e-4 (torchvision's kernel is compiled with fused
    multiply-adds, the Triton one without, so a sampling point's coordinate, up to ~350 on P2
    where float32's spacing is 3e-5, can round differently, and the interpolation multiplies that
    by the difference between neighbouring values, a few units on these maps; measured on an
    H200: 6.1e-5 on outputs of up to 3.1, 4.9e-5 on gradients; both add gradients atomically, in
    no fixed order), bf16 under autocast within one bf16 step; and no wait for the GPU."""
    from test_roi_extraction import STRIDES, _boxes, _pyramid

    from fpnlib.host_work import count_host_work
    from fpnlib.modeling import pyramid_roi_align as kernel
    from fpnlib.modeling.roi_extraction import pyramid_roi_features

    if not kernel.enabled("cuda"):
        pytest.skip("no Triton: torchvision's roi_align is the path")
    feats, _ = _pyramid(800, 1216, c=256, n=2)
    # _boxes' sides stop at 400 px, below P5's 448 (Eq. 1), and a map without RoIs has no gradient
    # on torchvision's level-by-level path: 50 boxes of each image are made twice as large
    boxes = [torch.cat([b, torch.cat([big[:, :2], 2 * big[:, 2:] - big[:, :2]], 1)]).cuda()
             for b, big in zip(_boxes(2, 450, 800, 1216), _boxes(2, 50, 800, 1216, seed=2))]
    weights = torch.randn(1000, 256, 7, 7, generator=torch.Generator().manual_seed(0)).cuda()
    for dtype in (torch.float32, torch.bfloat16):
        maps = {k: v.cuda().to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
                for k, v in feats.items()}

        def pool(grad=True):  # bf16 as in training: under autocast, which casts torchvision's inputs to float32
            amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
            with torch.set_grad_enabled(grad), amp:
                return pyramid_roi_features(maps, boxes, STRIDES, output_size=7, mode="align", sampling_ratio=2)

        def pool_and_grads():
            out = pool()
            return out.detach(), torch.autograd.grad((out.float() * weights).sum(), list(maps.values()))

        ours, our_grads = pool_and_grads()
        monkeypatch.setenv("FPNLIB_TRITON_ROI_ALIGN", "0")
        theirs, their_grads = pool_and_grads()
        monkeypatch.delenv("FPNLIB_TRITON_ROI_ALIGN")
        print(dtype, "largest difference", (ours.float() - theirs.float()).abs().max().item(), "of",
              theirs.abs().max().item(), "; gradients", [(a.float() - b.float()).abs().max().item()
                                                         for a, b in zip(our_grads, their_grads)])
        assert ours.is_contiguous(memory_format=torch.channels_last) and ours.dtype == theirs.dtype == dtype
        tol = dict(rtol=1e-5, atol=2e-4) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-3)
        torch.testing.assert_close(ours.float(), theirs.float(), **tol)
        for a, b in zip(our_grads, their_grads, strict=True):
            assert a.dtype == b.dtype == dtype and b.abs().sum() > 0
            torch.testing.assert_close(a.float(), b.float(), **tol)
        assert count_host_work(lambda: pool(grad=False), device="cuda")["waits"] == 0


def test_guessed_sizes_give_the_read_ones_and_inference_waits_once_on_cuda(monkeypatch, fresh_learned_guesses):
    from dataclasses import replace

    from fpnlib.host_work import count_host_work
    from fpnlib.modeling.fast_inference import optimized_for_inference
    from fpnlib.modeling.torchvision_interop import detect

    model, images = _model_and_images()
    fast = optimized_for_inference(model)
    # these small images keep fewer than 1000 proposals each, whose counts would then be read
    # (one wait more, measured on a CPU); 300 they keep
    fast.rpn.cfg = replace(fast.rpn.cfg, post_nms_top_n_test=300)
    monkeypatch.setenv("FPNLIB_GUESS_SIZES", "0")
    read = detect(fast, images, 96, 128)
    monkeypatch.setenv("FPNLIB_GUESS_SIZES", "1")
    guessed = [detect(fast, images, 96, 128) for _ in range(3)]  # the first ones may learn
    for outputs in guessed:
        _assert_same_detections(read, outputs)
    work = count_host_work(lambda: detect(fast, images, 96, 128), "cuda")
    assert work["waits"] == 1, work  # the detections' counts, read with every guess's check


@pytest.mark.parametrize("amp", [False, True])
def test_cuda_graph_replays_give_the_eager_detections_with_one_wait(monkeypatch, fresh_learned_guesses, amp):
    from fpnlib.host_work import count_host_work
    from fpnlib.modeling.torchvision_interop import detect

    model, images = _model_and_images()
    eager, graphed = _eager_and_graphed(model)
    batches = [images, [im.flip(-1) for im in images], [im.flip(-2) for im in images], images]
    expected = [detect(eager, b, 96, 128, amp=amp) for b in batches]
    got = [detect(graphed, b, 96, 128, amp=amp) for b in batches]
    graphs = graphed.inference_graphs
    assert graphs.stats == {"eager": 2, "captured": 1, "replayed": 2}, graphs.stats
    for e, g in zip(expected, got, strict=True):  # each output kept, not overwritten by the next replay
        _assert_same_detections(e, g)
    work = count_host_work(lambda: detect(graphed, images, 96, 128, amp=amp), "cuda")
    print(f"a replayed pass: {work['ops']} operators, {work['waits']} wait(s)")
    assert work["waits"] == 1 and work["ops"] < 100, work


def test_a_pass_that_would_wait_is_not_captured_on_cuda(monkeypatch, fresh_learned_guesses):
    from fpnlib.modeling.torchvision_interop import detect

    monkeypatch.setenv("FPNLIB_TRITON_ROI_ALIGN", "0")  # the per-level RoIAlign reads its levels' counts
    model, images = _model_and_images()
    eager, graphed = _eager_and_graphed(model)  # counts guessed: only RoIAlign reads
    expected = detect(eager, images, 96, 128)
    with pytest.warns(UserWarning, match="capture failed"):
        got = [detect(graphed, images, 96, 128) for _ in range(3)]
    assert graphed.inference_graphs.stats == {"eager": 3, "refused": 1}, graphed.inference_graphs.stats
    for outputs in got:
        _assert_same_detections(expected, outputs)


def test_graphs_of_two_shapes_share_a_memory_pool_and_replay_in_any_order(fresh_learned_guesses):
    """``CudaGraphBackend`` captures every graph into one memory pool; a replay may write where
    the other graph's outputs were, so each replay's outputs are copied out at once. Two batch
    shapes, replayed in and out of their capture order, give the eager pass's detections."""
    from fpnlib.modeling.torchvision_interop import detect

    model, images = _model_and_images()
    eager, graphed = _eager_and_graphed(model)
    two, one = images, images[1:]
    order = [two, two, one, one, two, one, two, one]  # captured at the 2nd and 4th, replayed after
    expected = {id(b): detect(eager, b, 96, 128) for b in (two, one)}
    got = [detect(graphed, b, 96, 128) for b in order]
    assert graphed.inference_graphs.stats == {"eager": 4, "captured": 2, "replayed": 4}, graphed.inference_graphs.stats
    for batch, outputs in zip(order, got, strict=True):
        _assert_same_detections(expected[id(batch)], outputs)


def test_a_capture_survives_a_thread_allocating_pinned_memory_meanwhile(monkeypatch, fresh_learned_guesses):
    """A DataLoader's pin-memory thread allocates pinned memory (``cudaHostAlloc``) for the next
    batch while evaluation captures a graph. Under CUDA's default capture mode such a call from
    another thread breaks the capture and raises in that thread; ``cuda_graphs`` captures with
    ``capture_error_mode="thread_local"``. The thread's allocations are counted during the capture
    itself, so the test shows they overlapped."""
    import threading
    from fpnlib.modeling.torchvision_interop import detect

    model, images = _model_and_images()
    eager, graphed = _eager_and_graphed(model)
    expected = detect(eager, images, 96, 128)
    stop, pinned, errors, during = threading.Event(), [], [], []
    graph = torch.cuda.graph

    @contextlib.contextmanager
    def counted_graph(*args, **kwargs):
        with graph(*args, **kwargs):
            before = len(pinned)
            yield
            during.append(len(pinned) - before)

    monkeypatch.setattr(torch.cuda, "graph", counted_graph)

    def pin():
        try:
            while not stop.is_set():
                pinned.append(torch.empty(1 << 14, dtype=torch.uint8, pin_memory=True))
        except Exception as err:  # noqa: BLE001 (reported by the test below)
            errors.append(err)

    thread = threading.Thread(target=pin)
    thread.start()
    try:
        got = [detect(graphed, images, 96, 128) for _ in range(3)]
    finally:
        stop.set()
        thread.join()
    print(f"pinned allocations during the capture: {during}")
    assert not errors, errors
    assert graphed.inference_graphs.stats == {"eager": 2, "captured": 1, "replayed": 1}, graphed.inference_graphs.stats
    assert during and during[0] > 0, during
    for outputs in got:
        _assert_same_detections(expected, outputs)


def test_the_gpus_busy_share_is_measured_and_falls_when_the_host_makes_it_wait():
    from fpnlib.host_work import device_busy

    x = torch.randn(2048, 2048, device="cuda")

    def busy_step():
        for _ in range(20):
            x @ x  # ~1 ms each on an H100: the host stays ahead

    def waiting_step():
        for _ in range(20):
            (x[:8, :8] @ x[:8, :8]).sum().item()  # a tiny kernel, then a read: the GPU waits for the host

    busy, waiting = device_busy(busy_step, "cuda"), device_busy(waiting_step, "cuda")
    assert 0.9 < busy["busy_share"] <= 1.0 and 0.0 < waiting["busy_share"] < 0.5, (busy, waiting)
    # the busy time of a step: twenty products' kernels, a few tiny ones'
    assert busy["busy_s_per_step"] > 10 * waiting["busy_s_per_step"] > 0, (busy, waiting)
    assert sum(busy["longest_kernels_ms_per_step"].values()) > 0.9e3 * busy["busy_s_per_step"], busy  # the products


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_convolutions_are_the_separate_operators_on_cuda(monkeypatch, dtype):
    """cuDNN's conv + bias (+ shortcut) + ReLU in one call (``fused_conv``) against the same
    layers as separate operators (``FPNLIB_FUSED_CONV=0``), on a folded ResNet-50 (width 16),
    channels_last: float32 (TF32 off) within 1e-4 of the C5 map's norm, bf16 under autocast
    within 5e-2 (each of the 50 layers rounds to bf16, in an order each path chooses; measured
    on an H200: 1e-6 and 1e-2); a missing bias or ReLU moves the output by far more. The fused
    operators must have run, unrefused."""
    from test_fused_conv import _folded_backbone
    from torch.profiler import ProfilerActivity, profile

    from fpnlib.modeling import fused_conv

    backbone = _folded_backbone(50)
    fused_conv.fuse_blocks(backbone)
    backbone = backbone.cuda().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 256, 320, generator=torch.Generator().manual_seed(3)).cuda() \
        .contiguous(memory_format=torch.channels_last)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        def run():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                return backbone(x)["c5"].float()

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fused = run()
        monkeypatch.setenv("FPNLIB_FUSED_CONV", "0")
        separate = run()
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    ran = {e.key for e in prof.key_averages()}
    assert not fused_conv._refused, fused_conv._refused
    assert {"aten::cudnn_convolution_relu", "aten::cudnn_convolution_add_relu"} <= ran
    error = ((fused - separate).norm() / separate.norm()).item()
    print(dtype, "relative difference of C5", error)
    assert separate.norm() > 0 and error <= (1e-4 if dtype == torch.float32 else 5e-2)
