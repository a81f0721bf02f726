"""Segment proposals of Appendix A: scale assignment, positive cells, mask targets, losses,
sampling, inference, and a learning test on the smoke set."""
from __future__ import annotations

import math

import pytest
import torch

from fpnlib.modeling.segment_proposals import (
    LocationGrid,
    MaskMLP,
    assign_segment_levels,
    build_segment_model,
    canonical_slots,
    gather_patches,
    label_locations,
    mask_scale,
    mask_targets,
    paste_masks,
    sample_locations,
)

TINY = dict(depth=18, width=8, norm="gn", freeze_at=0, fpn_channels=16, hidden=32, scale=0.25)


def _where(sizes, mlps=("5x5", "7x7"), scale=1.0):
    slots = canonical_slots(mlps, scale)
    idx = assign_segment_levels(torch.tensor(sizes, dtype=torch.float32), slots)
    return [(slots[i].level, slots[i].mlp) for i in idx.tolist()]


def _grid(slots, hw, divisible=64):
    h, w = (-(-v // divisible) * divisible for v in hw)
    return LocationGrid(slots, [(h // s.stride, w // s.stride) for s in slots])


def test_canonical_scales_and_windows():
    dual = canonical_slots(("5x5", "7x7"))
    assert [round(s.scale, 1) for s in dual] == [32.0, 45.3, 64.0, 90.5, 128.0, 181.0, 256.0, 362.0, 512.0]
    assert [(s.level, s.mlp) for s in dual][:3] == [("p2", "5x5"), ("p2", "7x7"), ("p3", "5x5")]
    # 25% padding: {40, 80, 160, 320, 640} for the 5x5 MLP, sqrt(2) larger for the 7x7 MLP
    assert [s.window for s in dual if s.mlp == "5x5"] == [40.0, 80.0, 160.0, 320.0, 640.0]
    assert [round(s.window / math.sqrt(2)) for s in dual if s.mlp == "7x7"] == [40, 80, 160, 320]
    assert [s.window for s in canonical_slots(("5x5",), scale=0.5)] == [20.0, 40.0, 80.0, 160.0, 320.0]
    assert [s.level for s in canonical_slots(("7x7",))] == ["p2", "p3", "p4", "p5", "p6"]
    with pytest.raises(ValueError):
        canonical_slots(("3x3",))


def test_mask_scale_is_the_longer_side():
    assert mask_scale(torch.tensor([[0.0, 0.0, 30.0, 50.0], [10.0, 10.0, 90.0, 20.0]])).tolist() == [50.0, 80.0]


def test_objects_go_to_the_nearest_scale_in_log_space():
    # 32, 45 ~ 32 sqrt 2, 64, 128 sqrt 2, 512, tiny and huge (clamped), 100 (nearest: 90.5), 150 (nearest: 128)
    assert _where([32, 45, 64, 181, 512, 4, 3000, 100, 150]) == [
        ("p2", "5x5"), ("p2", "7x7"), ("p3", "5x5"), ("p4", "7x7"), ("p6", "5x5"), ("p2", "5x5"), ("p6", "5x5"),
        ("p3", "7x7"), ("p4", "5x5")]
    # a single MLP serves full octaves only: half octaves go to the nearest one
    assert _where([45, 50, 170, 190, 3000], mlps=("5x5",)) == [
        ("p2", "5x5"), ("p3", "5x5"), ("p4", "5x5"), ("p5", "5x5"), ("p6", "5x5")]
    assert _where([45, 50, 8], mlps=("7x7",)) == [("p2", "7x7"), ("p3", "7x7"), ("p2", "7x7")]
    # scale multiplies the canonical scales: 16 px is P2's at scale 0.5
    assert _where([16, 23, 32], scale=0.5) == [("p2", "5x5"), ("p2", "7x7"), ("p3", "5x5")]


def test_the_3x3_cells_around_the_centre_are_positive_and_nothing_else():
    slots = canonical_slots(("5x5", "7x7"))
    grid = _grid(slots, (256, 256))
    box = torch.tensor([[68.0, 28.0, 132.0, 92.0]])  # 64 px, centre (100, 60): P3 (stride 8), 5x5 MLP
    labels, matched = label_locations(box, grid, (256, 256))
    pos = torch.nonzero(labels == 1).flatten()
    slot, y, x = grid.decode(pos)
    assert {(slots[s].level, slots[s].mlp) for s in slot.tolist()} == {("p3", "5x5")}
    # the centre (100, 60) lies in cell (x=12, y=7) of P3
    assert sorted(zip(y.tolist(), x.tolist())) == [(yy, xx) for yy in (6, 7, 8) for xx in (11, 12, 13)]
    assert (matched[pos] == 0).all() and (labels != -1).all() and int((labels == 0).sum()) == len(grid) - 9


def test_crowds_padding_and_shared_cells():
    slots = canonical_slots(("5x5",))
    grid = _grid(slots, (100, 120), divisible=64)  # 128 x 128 padded batch
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0],  # P2, centre cell (4, 4)
                          [8.0, 4.0, 40.0, 36.0],  # P2, centre (24, 20): cell (x=6, y=5), shares cells with object 0
                          [60.0, 60.0, 92.0, 92.0]])  # a crowd, P2 cell (19, 19)
    labels, matched = label_locations(boxes, grid, (100, 120), iscrowd=torch.tensor([0, 0, 1]))
    p2 = grid.range(0)
    lab2, m2 = labels[p2].view(32, 32), matched[p2].view(32, 32)
    assert int((lab2 == 1).sum()) == 9 + 9 - 2  # cells (y, x) = (4, 5), (5, 5) are claimed by both
    assert m2[3, 5] == 0 and m2[4, 5] == 1 and m2[5, 5] == 1  # a shared cell takes the closer centre
    assert (lab2[18:21, 18:21] == -1).all()  # a crowd is neither positive nor negative
    assert (lab2[25:, :] == -1).all() and (lab2[:, 30:] == -1).all()  # cell centres in the padding
    assert int((labels == 1).sum()) == 16  # nothing on other levels


def test_an_object_at_the_edge_claims_no_cell_in_the_padding():
    """The labels of an image do not depend on how far its batch-mates pad it: a neighbour
    cell past the right or bottom edge stays ignored, as inference never scores it."""
    slots = canonical_slots(("5x5",))
    box = torch.tensor([[90.0, 70.0, 122.0, 102.0]])  # 32 px on P2, centre (106, 86): cell (x=26, y=21)
    for padded in ((128, 128), (192, 256)):  # (h, w) of the batch: the same image, other batch-mates
        grid = _grid(slots, padded)
        labels, _ = label_locations(box, grid, (88, 108))  # the image ends inside cell x=27, y=22
        lab = labels[grid.range(0)].view(*grid.shapes[0])
        assert sorted(map(tuple, torch.nonzero(lab == 1).tolist())) == [(y, x) for y in (20, 21) for x in (25, 26)]
        assert (lab[22:, :] == -1).all() and (lab[:, 27:] == -1).all()  # centres 90 >= 88 and 110 >= 108


def test_mask_target_of_a_square_fills_the_central_fraction_of_its_window():
    slots = canonical_slots(("5x5", "7x7"))
    grid = _grid(slots, (256, 256))
    masks = torch.zeros((1, 256, 256), dtype=torch.uint8)
    masks[0, 28:92, 68:132] = 1  # the 64 px square centred at (100, 60): cell centre of P3 (12, 7)
    box = torch.tensor([[68.0, 28.0, 132.0, 92.0]])
    labels, matched = label_locations(box, grid, (256, 256))
    pos = torch.nonzero(labels == 1).flatten()
    centre = pos[(grid.centres(pos) == torch.tensor([100.0, 60.0])).all(dim=1)]
    window = grid.windows(centre)
    assert window.tolist() == [[60.0, 20.0, 140.0, 100.0]]  # 80 px = 1.25 x 64
    for size in (14, 28):
        t = mask_targets(masks, matched[centre], window, size)[0]
        # the square fills the central 64 / 80 = 0.8 of each side
        side = {math.floor(0.8 * size), math.ceil(0.8 * size)}
        assert int(t.sum(dim=1).max()) in side and int((t.sum(dim=1) > 0).sum()) in side
        assert t[0].sum() == 0 and t[-1].sum() == 0 and t[:, 0].sum() == 0 and t[:, -1].sum() == 0
        assert torch.equal(t, t.flip(0)) and torch.equal(t, t.flip(1))
        assert abs(float(t.mean()) - 0.64) < 0.1
        # pasting the target back at its window gives the square again
        pasted = paste_masks(t[None], window, (256, 256))[0]
        iou = (pasted & masks[0].bool()).sum() / (pasted | masks[0].bool()).sum()
        assert iou > (0.85 if size == 14 else 0.9)  # 14x14 rounds the corners off


def test_paste_cuts_windows_at_the_image_border():
    probs = torch.ones((2, 14, 14))
    windows = torch.tensor([[-10.0, -10.0, 30.0, 30.0], [80.0, 5.0, 120.0, 45.0]])
    out = paste_masks(probs, windows, (50, 100))
    assert out.shape == (2, 50, 100) and out.dtype == torch.bool
    assert int(out[0].sum()) == 30 * 30 and int(out[1].sum()) == 20 * 40
    assert paste_masks(torch.zeros((0, 14, 14)), torch.zeros((0, 4)), (5, 6)).shape == (0, 5, 6)


def test_mlp_at_sampled_locations_equals_the_fully_convolutional_mlp():
    torch.manual_seed(0)
    for kernel in (5, 7):
        mlp = MaskMLP(8, kernel, hidden=16, mask_size=14)
        feat = torch.randn(2, 8, 9, 11)
        b, y, x = torch.tensor([0, 1, 1, 0]), torch.tensor([0, 8, 4, 2]), torch.tensor([10, 0, 5, 3])
        dense = mlp.hidden_map(feat)[b, :, y, x]
        sparse = mlp.at(gather_patches(feat, b, y, x, kernel))
        assert torch.allclose(dense, sparse, atol=1e-5)
        assert torch.allclose(mlp.scores(sparse), mlp.score(mlp.hidden_map(feat))[b, 0, y, x], atol=1e-5)
        assert mlp.masks(sparse).shape == (4, 14, 14)


def test_gather_patches_is_exact_and_its_gradient_the_same_every_time():
    """The patches are F.unfold's, bit for bit; overlapping patches' gradients are summed in the
    same order on every call (advanced indexing summed them with atomic adds on several CPU
    threads, and a training run differed from the next in 1 step of ~8)."""
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 32, 20, 24, generator=g, requires_grad=True)
    n = 3000  # many overlapping 5x5 patches: every pixel is in ~30 of them
    b, y, x = (torch.randint(0, 2, (n,), generator=g), torch.randint(0, 20, (n,), generator=g),
               torch.randint(0, 24, (n,), generator=g))
    patches = gather_patches(feat, b, y, x, 5)
    every = torch.nn.functional.unfold(feat.detach(), 5, padding=2).reshape(2, 32, 5, 5, 20, 24)
    assert torch.equal(patches.detach(), every[b, :, :, :, y, x])
    weights = torch.randn(patches.shape, generator=g)
    grads = []
    for _ in range(20):
        feat.grad = None
        (gather_patches(feat, b, y, x, 5) * weights).sum().backward()
        grads.append(feat.grad.clone())
    assert all(torch.equal(gr, grads[0]) for gr in grads[1:])


def test_sampling_is_128_per_image_at_most_a_quarter_positive():
    labels = torch.zeros(5000, dtype=torch.long)
    labels[:200] = 1
    pos, neg = sample_locations(labels, 128, 0.25, torch.Generator().manual_seed(0))
    assert len(pos) == 32 and len(neg) == 96 and (labels[pos] == 1).all() and (labels[neg] == 0).all()
    labels[10:200] = 0  # few positives: all of them, negatives fill up to 128
    pos, neg = sample_locations(labels, 128, 0.25, torch.Generator().manual_seed(0))
    assert len(pos) == 10 and len(neg) == 118
    again = sample_locations(labels, 128, 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(neg, again[1])


def _image_with_objects(h=96, w=128):
    masks = torch.zeros((2, h, w), dtype=torch.uint8)
    masks[0, 10:40, 20:44] = 1
    masks[1, 50:60, 70:90] = 1
    return {"boxes": torch.tensor([[20.0, 10.0, 44.0, 40.0], [70.0, 50.0, 90.0, 60.0]]), "labels": torch.ones(2, dtype=torch.long),
            "masks": masks, "iscrowd": torch.zeros(2, dtype=torch.long)}


def test_losses_empty_images_and_determinism():
    torch.manual_seed(0)
    model = build_segment_model(**TINY).train()
    images = [torch.rand(3, 96, 128), torch.rand(3, 80, 100)]
    empty = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.long),
             "masks": torch.zeros((0, 80, 100), dtype=torch.uint8)}
    losses = model(images[1:], [empty])
    assert losses["loss_seg_mask"].item() == 0.0 and math.isfinite(losses["loss_seg_score"].item())
    sum(losses.values()).backward()  # negatives only still train the score branch
    assert model.mlps["5x5"].score.weight.grad.abs().sum() > 0

    degenerate = _image_with_objects()
    degenerate["masks"][1] = 0  # an empty mask must not crash: its target is all zeros
    torch.manual_seed(1)
    a = model(images, [degenerate, empty])
    torch.manual_seed(1)
    b = model(images, [degenerate, empty])
    assert a["loss_seg_mask"].item() > 0 and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_outputs_masks_at_the_input_size():
    torch.manual_seed(0)
    model = build_segment_model(**dict(TINY, proposals=50, mask_size=28)).eval()
    out = model([torch.rand(3, 96, 128), torch.rand(3, 70, 90)])
    assert [o["masks"].shape for o in out] == [(50, 96, 128), (50, 70, 90)]
    for o in out:
        assert o["masks"].dtype == torch.bool and o["boxes"].shape == (50, 4) and o["scores"].shape == (50,)
        assert (o["scores"][:-1] >= o["scores"][1:]).all()  # ranked, no NMS
    single = build_segment_model(**dict(TINY, mlps=("7x7",))).eval()
    assert set(single.mlps) == {"7x7"} and len(single.slots) == 5
    assert len(single([torch.rand(3, 64, 64)])[0]["scores"]) <= 1000


# ---------------------------------------------------------------------------- learning

# Does each Table 6 row learn on the smoke budget (``table6.run_row``: 150 iterations of 4 images,
# 60-100 s each on 2 CPU cores)? Measured by ``table6.held_out_losses`` on the 16 smoke val
# images, trained against untrained (seed 0), not by AR: at this budget few pasted masks cross
# 0.5 over most of an object, so AR counts one or two objects and swings with float rounding.
# The same single_5x5 run gave AR 0.6, 1.2, 1.5 and 1.6 under four CPU kernel sets (default,
# ATEN_CPU_CAPABILITY=default, ONEDNN_MAX_CPU_ISA=SSE41, one thread), and CI's machine gave 0.6
# where a threshold of 0.8 had passed on the dev machine. The held-out losses, 2 threads,
# default kernels (AR beside them for comparison):
#
#     variant        objectness BCE         mask BCE x 10         AR
#                    untrained  trained     untrained  trained    trained
#     single_5x5       0.69      0.20         6.94      4.43       1.0
#     single_7x7       0.67      0.21         6.94      4.54       1.0
#     dual             0.70      0.26         6.94      4.78       2.8
#     dual_2x_mask     0.71      0.24         6.95      4.58       1.8
#
# Across the other kernel sets, and before segment training was bit-reproducible (see
# ``test_gather_patches_is_exact_and_its_gradient_the_same_every_time``), the trained losses
# stayed within 0.18-0.26 and 4.35-4.78. An untrained model outputs ~0.5 everywhere (BCE
# ln 2 = 0.69); a broken sampler, target or loss leaves the held-out losses there or pushes them
# up. Whether the masks come out right (target crop, paste) is shown by
# ``test_dual_mlp_can_fit_the_masks_of_one_image``.
LEARN_ITERATIONS = 150  # the smoke budget
SCORE_FACTOR, MASK_FACTOR = 0.5, 0.8  # trained / untrained held-out loss must be below these


@pytest.fixture(scope="module")
def smoke_val_with_masks(smoke_root):
    from fpnlib.data.coco import load_coco_split
    from fpnlib.data.transforms import build_transforms

    return load_coco_split(smoke_root, "val", transforms=build_transforms(False, 160, 214), with_masks=True)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["single_5x5", "single_7x7", "dual", "dual_2x_mask"])
def test_each_segment_variant_learns(variant, smoke_root, smoke_val_with_masks, tmp_path):
    from fpnlib.engine.train import load_checkpoint
    from fpnlib.experiments.table6 import build_row, held_out_losses, run_row

    row = run_row(variant, "smoke", smoke_root, tmp_path / variant, seed=0, iterations=LEARN_ITERATIONS, progress=False)
    assert row["iterations"] == LEARN_ITERATIONS and set(row["metrics"]) >= {"AR", "AR_s", "AR_m", "AR_l"}
    val = smoke_val_with_masks
    untrained = held_out_losses(build_row(variant, "smoke", seed=0), val)
    trained_model = build_row(variant, "smoke", seed=0)
    load_checkpoint(trained_model, tmp_path / variant / "last.pt")
    trained = held_out_losses(trained_model, val)
    assert trained["loss_seg_score"] < SCORE_FACTOR * untrained["loss_seg_score"], (trained, untrained)
    assert trained["loss_seg_mask"] < MASK_FACTOR * untrained["loss_seg_mask"], (trained, untrained, row["metrics"])


def test_held_out_losses_leave_the_model_as_it_was(smoke_val_with_masks):
    from fpnlib.experiments.table6 import build_row, held_out_losses

    val = smoke_val_with_masks
    model = build_row("single_5x5", "smoke").eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    first, second = held_out_losses(model, val), held_out_losses(model, val)
    assert first == second and set(first) == {"loss_seg_score", "loss_seg_mask"}  # seeded draws
    assert held_out_losses(model, val, seed=1) != first  # the seed picks the locations
    assert not model.training and model.generator is None
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_untrained_model_scores_near_zero(smoke_root):
    from fpnlib.data.coco import load_coco_split
    from fpnlib.data.transforms import build_transforms
    from fpnlib.experiments.table6 import build_row, evaluate_segments

    val = load_coco_split(smoke_root, "val", transforms=build_transforms(False, 160, 214))
    metrics, seconds = evaluate_segments(build_row("dual", "smoke"), val, progress=False)
    assert metrics["AR"] < 0.25 and seconds > 0  # 0.0 measured: at most a hit or two by chance


@pytest.mark.slow
def test_dual_mlp_can_fit_the_masks_of_one_image(smoke_root):
    """The mask branch, targets and pasting are right if the model can learn one image by heart:
    300 steps on the smoke set's busiest training image (10 objects), then each object's best
    pasted mask among the top 1000 must overlap it well. Measured on the dev machine: IoU
    0.74-0.91 per object (mean 0.84); a mask target shifted, flipped or cut from the wrong
    window stays far below."""
    from fpnlib.data.coco import load_coco_split
    from fpnlib.data.transforms import build_transforms
    from fpnlib.experiments import table6

    torch.manual_seed(0)
    ds = load_coco_split(smoke_root, "train", transforms=build_transforms(False, 160, 214), with_masks=True)
    image, target = ds[max(range(len(ds)), key=lambda i: len(ds[i][1]["boxes"]))]
    model = table6.build_row("dual", "smoke")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02, momentum=0.9, weight_decay=1e-4)
    model.train()
    for _ in range(300):
        loss = sum(model([image, image], [target, target]).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        masks = model([image])[0]["masks"].float()
    gt = target["masks"].float()
    inter = torch.einsum("khw,ghw->kg", masks, gt)
    iou = inter / (masks.sum((1, 2))[:, None] + gt.sum((1, 2))[None] - inter).clamp(min=1)
    best = iou.max(0).values
    assert len(best) >= 5 and best.mean() > 0.6 and best.min() > 0.4, best
