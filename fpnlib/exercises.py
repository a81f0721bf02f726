"""Checks for the notebooks' "your turn" cells: the student writes a piece of the paper, a
``check_*`` function compares it with the library on chosen and random cases and says, in one
sentence, what is wrong.

In a notebook a check prints its verdict and returns ``True`` or ``False``, so Run All goes on
past an exercise not yet solved and every exercise reports. ``strict=True`` (the tests) raises
``ExerciseError`` (an ``AssertionError``) with the first failing case instead. An answer that
calls the library function it replaces (``check.replaces``) is rejected: the exercise is to
write it. The lessons print only the interface of those functions (:func:`print_interface`),
never their source, before the exercise.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import sys
from collections.abc import Callable

import torch

from fpnlib.modeling.roi_levels import assign_fpn_levels


class ExerciseError(AssertionError):
    """A student's piece disagrees with the library; the message names the case."""


def _resolve(name: str):
    """``"package.module:attr.attr"`` -> the object."""
    module, _, attrs = name.partition(":")
    obj = importlib.import_module(module)
    for attr in attrs.split("."):
        obj = getattr(obj, attr)
    return obj


_FORBIDDEN: dict = {}  # code object -> library name, while a check runs


def exercise(*replaces: str):
    """Make ``check(fn, ...)`` a notebook check: it prints its verdict and returns a bool (raises
    with ``strict=True``), and rejects a ``fn`` that calls one of ``replaces`` (``"module:name"``
    of the library functions the exercise asks the student to write)."""
    def wrap(check):
        @functools.wraps(check)
        def run(fn, *args, strict: bool = False, **kwargs) -> bool:
            funcs = [_resolve(r) for r in replaces]
            _FORBIDDEN.clear()
            _FORBIDDEN.update({f.__code__: f.__qualname__ for f in funcs})
            try:
                return check(fn, *args, **kwargs)
            except ExerciseError as e:
                if strict:
                    raise
                print(f"{check.__name__}: {e}")
                return False
            finally:
                _FORBIDDEN.clear()

        run.replaces = tuple(r.rpartition(":")[2].rpartition(".")[2] for r in replaces)
        return run

    return wrap


def print_interface(*functions) -> None:
    """Each function's signature and docstring as written, without its body (the student edition's
    stub of it): what a lesson shows of a library function that one of its exercises asks for."""
    import textwrap

    from fpnlib.student import STUB, stub_source

    for f in functions:
        stub = stub_source(textwrap.dedent(inspect.getsource(f)))
        body = "\n".join("    " + line for line in STUB.splitlines())
        print(stub.replace(body, "    ...  # an exercise of this lesson writes it") + "\n")


def _boxes_of_side(sides: list[float]) -> torch.Tensor:
    s = torch.tensor(sides, dtype=torch.float32)
    return torch.stack([torch.zeros_like(s), torch.zeros_like(s), s, s], 1)


@exercise("fpnlib.modeling.roi_levels:assign_fpn_levels")
def check_level_rule(level_of: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Eq. (1) (Sec. 4.2): ``level_of(boxes [N, 4] xyxy) -> [N]`` levels k in 2..5, with k0 = 4
    and canonical size 224, compared with ``fpnlib.modeling.roi_levels.assign_fpn_levels``."""
    cases = [("a 224 x 224 RoI (the ImageNet size) belongs to P4 = k0", [224.0]),
             ("a 112 x 112 RoI is half the canonical size: one level finer", [112.0]),
             ("a 448 x 448 RoI is twice the canonical size: one level coarser", [448.0]),
             ("just below a boundary stays on the finer level (floor, not round)", [111.0, 223.0, 447.0]),
             ("tiny RoIs clamp to P2 (the finest level the head reads)", [4.0, 20.0]),
             ("huge RoIs clamp to P5 (P6 is for the RPN only)", [1000.0, 2000.0])]
    for why, sides in cases:
        boxes = _boxes_of_side(sides)
        _compare(level_of, boxes, why)
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(500, 2, generator=g) * 400
    wh = torch.exp(torch.rand(500, 2, generator=g) * 6.5) + 1  # 2 .. 700 px, elongated too
    _compare(level_of, torch.cat([xy, xy + wh], 1), "on random (also non-square) RoIs: use sqrt(w h)")
    print("check_level_rule: correct — your Eq. (1) matches fpnlib on every case")
    return True


def _int_mismatches(got: torch.Tensor, want: torch.Tensor, why: str, what: str) -> torch.Tensor:
    """Indices where integer answers differ; a wrong shape is reported first (``what`` says
    what one entry per row is)."""
    if tuple(got.shape) != tuple(want.shape):
        raise ExerciseError(f"{why}: you return shape {tuple(got.shape)}; expected {tuple(want.shape)}, {what}")
    return torch.nonzero(got.to(torch.int64) != want).flatten()


def _compare(level_of, boxes: torch.Tensor, why: str) -> None:
    want = assign_fpn_levels(boxes)
    got = torch.as_tensor(_call(level_of, "level_of", why, boxes.clone()))
    bad = _int_mismatches(got, want, why, "one level per box")
    if len(bad):
        i = int(bad[0])
        w, h = (boxes[i, 2] - boxes[i, 0]).item(), (boxes[i, 3] - boxes[i, 1]).item()
        raise ExerciseError(f"{why}: for a {w:.0f} x {h:.0f} box you return {got[i].item()}, "
                            f"Eq. (1) gives {want[i].item()} ({len(bad)} of {len(boxes)} boxes differ)")


# ----------------------------------------------------------------------------- helpers of the checks below


def _call(fn, name: str, why: str, *args):
    """Call the student's ``fn``; a missing piece, a crash or a call of the library function the
    exercise replaces becomes a one-sentence ``ExerciseError``."""
    called = []

    def watch(frame, event, arg):  # every Python call the student's function makes, however named
        if event == "call" and frame.f_code in _FORBIDDEN:
            called.append(_FORBIDDEN[frame.f_code])

    previous = sys.getprofile()
    sys.setprofile(watch if _FORBIDDEN else previous)
    try:
        result = fn(*args)
    except NotImplementedError:
        raise ExerciseError(f"{name} is not written yet (it raises NotImplementedError)") from None
    except Exception as e:  # the student's code crashed on this case: say which case
        raise ExerciseError(f"{why}: {name} raised {type(e).__name__}: {e}") from None
    finally:
        sys.setprofile(previous)
    if called:
        raise ExerciseError(f"{name} calls fpnlib's {called[0]}, the very function this exercise asks you to "
                            f"write: build it from torch operations")
    return result


def _fmt(values) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in values) + "]"


# ----------------------------------------------------------------------------- 01: the bottom-up pathway

_BACKBONES: dict = {}


def _library_stage_shapes(depth: int, width: int, image_hw: tuple[int, int]) -> dict[str, tuple[int, int, int]]:
    from fpnlib.modeling.backbone import ResNetBackbone

    key = (depth, width)
    if key not in _BACKBONES:
        torch.manual_seed(0)
        _BACKBONES[key] = ResNetBackbone(depth=depth, width=width, norm="gn", freeze_at=0).eval()
    net = _BACKBONES[key]
    with torch.no_grad():
        feats = net(torch.zeros(1, 3, *image_hw))
    return {k: (int(f.shape[1]), int(f.shape[2]), int(f.shape[3])) for k, f in feats.items()}


@exercise("fpnlib.modeling.backbone:ResNetBackbone.__init__", "fpnlib.modeling.backbone:ResNetBackbone.forward")
def check_stage_shapes(stage_shapes: Callable[[int, int, tuple[int, int]], dict]) -> bool:
    """Sec. 3, "Bottom-up pathway": ``stage_shapes(depth, width, image_hw) -> {"c2": (channels,
    height, width), ..., "c5": (...)}`` for a ResNet of ``depth`` (18, 34, 50, 101) whose stem has
    ``width`` channels, on an ``image_hw`` image, compared with what
    ``fpnlib.modeling.backbone.ResNetBackbone`` really outputs."""
    cases = [("ResNet-18 at full width: C2..C5 have 64, 128, 256, 512 channels at strides 4..32", 18, 64, (64, 64)),
             ("ResNet-50's bottleneck blocks expand 4x: C2..C5 have 256..2048 channels", 50, 64, (64, 96)),
             ("the slim CPU backbone (width 32) has half the channels of every stage", 18, 32, (64, 64)),
             ("a side that is not a multiple of 32: every stride-2 layer rounds up (ceil), not down", 18, 16, (100, 75)),
             ("ResNet-101 has the channels of ResNet-50 (only more blocks in conv4_x)", 101, 16, (37, 70))]
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        depth = (18, 34, 50, 101)[int(torch.randint(4, (1,), generator=g))]
        width = (8, 16, 32)[int(torch.randint(3, (1,), generator=g))]
        hw = tuple(int(v) for v in torch.randint(33, 140, (2,), generator=g))
        cases.append(("on a random depth, width and image size", depth, width, hw))
    for why, depth, width, hw in cases:
        want = _library_stage_shapes(depth, width, hw)
        got = _call(stage_shapes, "stage_shapes", why, depth, width, hw)
        if not isinstance(got, dict) or sorted(got) != sorted(want):
            keys = sorted(got) if isinstance(got, dict) else type(got).__name__
            raise ExerciseError(f"stage_shapes must return a dict with keys c2, c3, c4, c5; got {keys}")
        for name in ("c2", "c3", "c4", "c5"):
            try:
                shape = tuple(int(v) for v in got[name])
            except (TypeError, ValueError):
                raise ExerciseError(f"stage_shapes(...)[{name!r}] must be (channels, height, width); got {got[name]!r}") from None
            if shape != want[name]:
                raise ExerciseError(f"{why}: for ResNet-{depth} (width {width}) on a {hw[0]}x{hw[1]} image you give "
                                    f"{name.upper()} the shape {shape}, the network outputs {want[name]} "
                                    f"(channels, height, width)")
    print("check_stage_shapes: correct — your C2..C5 shapes match fpnlib's ResNet on every case")
    return True


# ----------------------------------------------------------------------------- 02: the Fig. 3 merge block


@exercise("fpnlib.modeling.fpn:top_down_merge", "fpnlib.modeling.fpn:upsample_nearest")
def check_lateral_merge(merge: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> bool:
    """Fig. 3: ``merge(coarser [N, C, h, w], lateral [N, C, H, W]) -> [N, C, H, W]``, the coarser map
    upsampled by nearest neighbour to the lateral map's size and added to it, compared with
    ``fpnlib.modeling.fpn.top_down_merge``."""
    from fpnlib.modeling.fpn import top_down_merge

    g = torch.Generator().manual_seed(0)
    cases = [("even sizes: a 4x4 map doubled to 8x8 (each cell becomes a 2x2 block)", (1, 1, 4, 4), (1, 1, 8, 8)),
             ("several channels and images: the merge is per channel, per image", (2, 3, 5, 6), (2, 3, 10, 12)),
             ("odd sides (12x10 under 23x20, as C5 under C4 of a 366 px image): upsample to the lateral's "
              "exact size, not by a factor 2", (1, 2, 12, 10), (1, 2, 23, 20)),
             ("odd sides in both directions", (1, 1, 3, 3), (1, 1, 5, 5)),
             ("a 1x1 coarse map is copied to every cell", (1, 2, 1, 1), (1, 2, 2, 1))]
    for _ in range(5):
        h, w = (int(v) for v in torch.randint(1, 12, (2,), generator=g))
        hh, ww = 2 * h - int(torch.randint(2, (1,), generator=g)), 2 * w - int(torch.randint(2, (1,), generator=g))
        cases.append(("on random sizes (odd and even)", (2, 4, h, w), (2, 4, max(hh, 1), max(ww, 1))))
    for why, coarse_shape, lateral_shape in cases:
        coarser = torch.randn(coarse_shape, generator=g)
        lateral = torch.randn(lateral_shape, generator=g)
        want = top_down_merge(coarser, lateral)
        got = _call(merge, "merge", why, coarser.clone(), lateral.clone())
        got = torch.as_tensor(got)
        if tuple(got.shape) != tuple(want.shape):
            raise ExerciseError(f"{why}: merging a {tuple(coarse_shape)} map into a {tuple(lateral_shape)} lateral map "
                                f"returns shape {tuple(got.shape)}; expected {tuple(want.shape)}, the lateral map's shape")
        bad = torch.nonzero(~torch.isclose(got.float(), want, atol=1e-5, rtol=1e-5))
        if len(bad):
            n, c, y, x = (int(v) for v in bad[0])
            hint = ""
            if torch.allclose(got.float(), want - lateral, atol=1e-5):
                hint = " (the lateral map is not added)"
            elif torch.allclose(got.float() - lateral, torch.nn.functional.interpolate(
                    coarser, size=lateral_shape[-2:], mode="bilinear", align_corners=False), atol=1e-5):
                hint = " (that is bilinear upsampling: Fig. 3 uses nearest neighbour)"
            raise ExerciseError(f"{why}: at image {n}, channel {c}, cell (y={y}, x={x}) you return "
                                f"{got[n, c, y, x].item():.4f}, the merge gives {want[n, c, y, x].item():.4f}{hint} "
                                f"({len(bad)} of {want.numel()} values differ)")
    print("check_lateral_merge: correct — your merge matches fpnlib's top_down_merge on every case")
    return True


# ----------------------------------------------------------------------------- 03: anchors


@exercise("fpnlib.modeling.anchors:grid_anchors")
def check_anchor_grid(grid: Callable[[torch.Tensor, tuple[int, int], int], torch.Tensor]) -> bool:
    """Sec. 4.1: ``grid(cell [A, 4], feature_hw (H, W), stride) -> [H*W*A, 4]``, the cell anchors
    (centred at 0, 0) shifted to every location of an H x W map, location (y, x) centred at
    ((x + 0.5) * stride, (y + 0.5) * stride), in (y, x, a) order, compared with
    ``fpnlib.modeling.anchors.grid_anchors``."""
    from fpnlib.modeling.anchors import cell_anchors, grid_anchors

    cases = [("one 32 px anchor on a 1x1 map of stride 4 sits at the centre of the 4x4 patch, (2, 2)",
              cell_anchors([32.0], [1.0]), (1, 1), 4),
             ("a 1x2 map: location x = 1 is one stride to the right of x = 0", cell_anchors([16.0], [1.0]), (1, 2), 8),
             ("a 2x3 map (not square): rows (y) come first, then columns (x) — the order of the RPN head's "
              "[N, H, W, A] output", cell_anchors([16.0], [1.0]), (2, 3), 8),
             ("three ratios per location: all A anchors of a location come together, in the cell's order",
              cell_anchors([64.0]), (2, 2), 16),
             ("P6: stride 64, 512 px anchors", cell_anchors([512.0]), (3, 2), 64)]
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        sizes = [float(v) for v in torch.randint(8, 300, (int(torch.randint(1, 3, (1,), generator=g)),), generator=g)]
        hw = tuple(int(v) for v in torch.randint(1, 9, (2,), generator=g))
        stride = (4, 8, 16, 32, 64)[int(torch.randint(5, (1,), generator=g))]
        cases.append(("on random sizes, maps and strides", cell_anchors(sizes), hw, stride))
    for why, cell, hw, stride in cases:
        want = grid_anchors(cell, hw, stride)
        got = torch.as_tensor(_call(grid, "grid", why, cell.clone(), hw, stride))
        a = len(cell)
        if tuple(got.shape) != tuple(want.shape):
            raise ExerciseError(f"{why}: {a} cell anchor(s) on a {hw[0]}x{hw[1]} map give shape {tuple(got.shape)}; "
                                f"expected {tuple(want.shape)} (H * W * A rows of x1, y1, x2, y2)")
        bad = torch.nonzero(~torch.isclose(got.float(), want, atol=1e-3).all(dim=1)).flatten()
        if len(bad):
            i = int(bad[0])
            y, x, k = i // (hw[1] * a), (i // a) % hw[1], i % a
            hint = ""
            if torch.allclose(got.float(), want - stride / 2, atol=1e-3):
                hint = " (centres are at the cell's top-left corner: add half a stride)"
            raise ExerciseError(f"{why}: row {i} should be anchor {k} of location (y={y}, x={x}), "
                                f"{_fmt(want[i])}; you return {_fmt(got[i])}{hint}")
    print("check_anchor_grid: correct — your anchor grid matches fpnlib's grid_anchors on every case")
    return True


def _explain_label(iou: torch.Tensor, a: int, want: int) -> str:
    """Why anchor ``a`` has label ``want`` under the rule, from the [G, A] IoU matrix."""
    if iou.numel() == 0:
        return "with no object in the image every anchor is a negative (0)"
    best = float(iou[:, a].max())
    gt_max = iou.max(dim=1).values
    best_of = [g for g in range(iou.shape[0]) if gt_max[g] > 0 and float(iou[g, a]) == float(gt_max[g])]
    if want == 1 and best > 0.7:
        return f"its IoU with a ground truth is {best:.2f} > 0.7: positive (1)"
    if want == 1:
        ties = int((iou[best_of[0]] == gt_max[best_of[0]]).sum())
        tie = f", tied with {ties - 1} other anchor(s) — ties all count" if ties > 1 else ""
        return (f"its IoU is only {best:.2f}, yet it is the best anchor of ground truth {best_of[0]} (whose best "
                f"IoU is below 0.7{tie}): positive (1)")
    if want == 0:
        return f"its highest IoU with any ground truth is {best:.2f} < 0.3 and it is no object's best anchor: negative (0)"
    return f"its highest IoU is {best:.2f}, between 0.3 and 0.7, and it is no object's best anchor: ignored (-1)"


@exercise("fpnlib.modeling.anchor_labels:label_anchors", "fpnlib.modeling.anchor_labels:labels_from_iou",
          "fpnlib.modeling.anchor_labels:best_anchors_per_gt")
def check_labeling_rule(label: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> bool:
    """Sec. 4.1 (Faster R-CNN's rule): ``label(anchors [A, 4], gt_boxes [G, 4]) -> [A]`` with 1 for an
    anchor whose IoU with some ground truth is over 0.7 or that is the best anchor (ties included)
    of some ground truth, 0 for an anchor whose IoU is lower than 0.3 with every ground truth
    (and is not positive), -1 (ignored) otherwise; compared with
    ``fpnlib.modeling.anchor_labels.label_anchors``."""
    from torchvision.ops import box_iou

    from fpnlib.modeling.anchor_labels import label_anchors
    from fpnlib.modeling.anchors import cell_anchors, grid_anchors

    t = torch.tensor
    big, small, mid = [0.0, 0.0, 100.0, 100.0], [400.0, 400.0, 410.0, 410.0], [600.0, 600.0, 650.0, 650.0]
    anchors = t([[0, 0, 100, 100],  # IoU 1 with the big object
                 [0, 0, 100, 90],  # 0.9
                 [0, 0, 100, 50],  # 0.5: ignored
                 [0, 0, 100, 20],  # 0.2: negative
                 [200, 200, 300, 300],  # touches nothing
                 [400, 400, 420, 420],  # 0.25 with the 10 px object, its best anchor: positive
                 [395, 395, 425, 425],  # 0.11 with it: negative
                 [600, 600, 650, 700],  # 0.5 with the 50 px object, tied best...
                 [600, 600, 700, 650],  # ...with this one: both positive
                 [600, 600, 650, 720]], dtype=torch.float32)  # 0.42: ignored
    cases = [("one object, anchors over and under the thresholds", anchors[:5], t([big])),
             ("a 10 px object no anchor covers by 0.3: its best anchor is still positive", anchors[4:7], t([small])),
             ("an object whose two best anchors tie at IoU 0.5: both are positive", anchors[7:], t([mid])),
             ("three objects at once: an anchor takes its highest IoU over all objects", anchors, t([big, small, mid])),
             ("an image with no objects", anchors, torch.zeros(0, 4))]
    g = torch.Generator().manual_seed(0)
    grid = torch.cat([grid_anchors(cell_anchors([s]), (64 // s * 2, 64 // s * 2), s // 2) for s in (8, 16, 32)])
    for _ in range(4):
        xy = torch.rand(5, 2, generator=g) * 50
        wh = torch.exp(torch.rand(5, 2, generator=g) * 3.5) + 2  # 3 .. 35 px
        cases.append(("on a random image (anchors of three sizes and random objects)", grid, torch.cat([xy, xy + wh], 1)))
    for why, a, gt in cases:
        want = label_anchors(a, gt)[0]
        got = torch.as_tensor(_call(label, "label", why, a.clone(), gt.clone()))
        bad = _int_mismatches(got, want, why, "one label per anchor")
        if len(bad):
            i = int(bad[0])
            reason = _explain_label(box_iou(gt, a) if len(gt) else torch.zeros(0, len(a)), i, int(want[i]))
            raise ExerciseError(f"{why}: anchor {i} {_fmt(a[i])} gets {int(got[i])} from you, but {reason} "
                                f"({len(bad)} of {len(a)} labels differ)")
    print("check_labeling_rule: correct — your labels match fpnlib's label_anchors on every case")
    return True


# ----------------------------------------------------------------------------- 07: segment proposals


@exercise("fpnlib.modeling.segment_proposals:assign_segment_levels")
def check_segment_level_rule(slot_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> bool:
    """Appendix A: ``slot_of(boxes [G, 4], canonical [S]) -> [G]``, for each object the index of the
    canonical scale (``canonical``, increasing, in px) nearest to its scale max(w, h) in log space,
    compared with ``fpnlib.modeling.segment_proposals.assign_segment_levels`` on the 9 canonical
    scales of the dual MLP (32 * 2^(j/2) px), the 5 of a single MLP, and scaled ones."""
    from fpnlib.modeling.segment_proposals import assign_segment_levels, canonical_slots, mask_scale

    def squares(sides):
        s = torch.tensor(sides, dtype=torch.float32)
        return torch.stack([torch.zeros_like(s), torch.zeros_like(s), s, s], 1)

    dual, single = canonical_slots(("5x5", "7x7")), canonical_slots(("5x5",))
    cases = [("objects exactly at the canonical scales 32, 45, 64, ... 512 px", dual,
              squares([32 * 2 ** (j / 2) for j in range(9)])),
             ("38.3 px is nearer to 45.25 than to 32 in log space (their geometric mean is 38.05), though not "
              "in pixels", dual, squares([38.3])),
             ("with one MLP only the full octaves exist: 46.5 px goes to 64 (geometric mean 45.25), not to 32",
              single, squares([46.5, 44.0, 362.0, 363.0])),
             ("just below and above the geometric mean of two neighbours", dual,
              squares([32 * 2 ** 0.25 * 0.99, 32 * 2 ** 0.25 * 1.01, 128 * 2 ** 0.25 * 0.99, 128 * 2 ** 0.25 * 1.01])),
             ("objects smaller than 32 px or larger than 512 px clamp to the first or last canonical scale", dual,
              squares([4.0, 10.0, 800.0, 2000.0])),
             ("the scale of an object is max(w, h), not sqrt(w h): a 20 x 128 box has scale 128", dual,
              torch.tensor([[0.0, 0.0, 20.0, 128.0], [10.0, 10.0, 266.0, 42.0]])),
             ("canonical scales scaled x0.5 for 320 px images (16 .. 256 px)", canonical_slots(("5x5", "7x7"), 0.5),
              squares([16.0, 19.0, 20.0, 100.0, 300.0]))]
    g = torch.Generator().manual_seed(0)
    for slots in (dual, single, canonical_slots(("7x7",), 0.25)):
        xy = torch.rand(300, 2, generator=g) * 100
        wh = torch.exp(torch.rand(300, 2, generator=g) * 7.0) + 2  # 3 .. 1100 px, elongated too
        cases.append(("on random (also elongated) boxes", slots, torch.cat([xy, xy + wh], 1)))
    for why, slots, boxes in cases:
        canonical = torch.tensor([s.scale for s in slots], dtype=torch.float32)
        want = assign_segment_levels(mask_scale(boxes), slots)
        got = torch.as_tensor(_call(slot_of, "slot_of", why, boxes.clone(), canonical.clone()))
        bad = _int_mismatches(got, want, why, "one index into canonical per object")
        if len(bad):
            i = int(bad[0])
            w, h = (boxes[i, 2] - boxes[i, 0]).item(), (boxes[i, 3] - boxes[i, 1]).item()
            g_i = int(got[i])
            yours = f"{canonical[g_i].item():.1f} px" if 0 <= g_i < len(canonical) else "out of range"
            raise ExerciseError(f"{why}: a {w:.1f} x {h:.1f} box gets index {g_i} ({yours}) from you, the nearest "
                                f"canonical scale in log space is index {int(want[i])} ({canonical[want[i]].item():.1f} px) "
                                f"({len(bad)} of {len(boxes)} boxes differ)")
    print("check_segment_level_rule: correct — your rule matches fpnlib's assign_segment_levels on every case")
    return True


# ----------------------------------------------------------------------------- 04 and 06: the box parametrization


def _random_boxes(n: int, g: torch.Generator, lo: float = 2.0, hi: float = 300.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * 400
    wh = lo * torch.exp(torch.rand(n, 2, generator=g) * torch.log(torch.tensor(hi / lo)))
    return torch.cat([xy, xy + wh], 1)


def _compare_boxes(got, want: torch.Tensor, why: str, what: str, rows: str, hints: dict) -> None:
    got = torch.as_tensor(got)
    if tuple(got.shape) != tuple(want.shape):
        raise ExerciseError(f"{why}: you return shape {tuple(got.shape)}; expected {tuple(want.shape)}, {what}")
    bad = torch.nonzero(~torch.isclose(got.double(), want.double(), rtol=1e-4, atol=1e-3).all(dim=1)).flatten()
    if len(bad):
        i = int(bad[0])
        hint = next((h for h, other in hints.items() if torch.allclose(got.double(), other.double(), rtol=1e-4, atol=1e-3)), "")
        raise ExerciseError(f"{why}: {rows} {i} should be {_fmt(want[i])}; you return {_fmt(got[i])}"
                            f"{' (' + hint + ')' if hint else ''} ({len(bad)} of {len(want)} rows differ)")


@exercise("fpnlib.modeling.box_coder:decode", "fpnlib.modeling.box_coder:encode")
def check_decode(decode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> bool:
    """Sec. 4.1 (Faster R-CNN's parametrization): ``decode(deltas [N, 4], anchors [N, 4]) -> boxes
    [N, 4]`` xyxy, the RPN's (dx, dy, dw, dh) applied to its anchors: centre moved by (dx wa, dy ha),
    size scaled by (exp dw, exp dh), dw and dh first capped at log(1000 / 16); compared with
    ``fpnlib.modeling.box_coder.decode``."""
    from fpnlib.modeling import box_coder

    g = torch.Generator().manual_seed(0)
    anchors = box_coder.decode(torch.zeros(4, 4), torch.tensor([[0.0, 0.0, 32.0, 32.0], [10.0, 20.0, 30.0, 60.0],
                                                                [100.0, 100.0, 356.0, 228.0], [5.0, 5.0, 16.0, 16.0]]))
    t = torch.tensor
    cases = [("zero deltas give back the anchors", torch.zeros(4, 4), anchors),
             ("dx = 0.5 moves the centre by half the anchor's width",
              t([[0.5, 0.0, 0.0, 0.0]] * 4), anchors),
             ("dw = log 2 doubles the width about the centre", t([[0.0, 0.0, 0.6931, 0.0]] * 4), anchors),
             ("dh = -log 2 halves the height: sizes are scaled by exp(dh)", t([[0.0, 0.0, 0.0, -0.6931]] * 4), anchors),
             ("a wild dw = 20 early in training is capped at log(1000 / 16) before exp", t([[0.0, 0.0, 20.0, 8.0]] * 4), anchors)]
    for _ in range(3):
        cases.append(("on random anchors and deltas", torch.randn(50, 4, generator=g), _random_boxes(50, g)))
    for why, deltas, ref in cases:
        want = box_coder.decode(deltas, ref)
        got = _call(decode, "decode", why, deltas.clone(), ref.clone())
        x, y, w, h = (ref[:, 0] + ref[:, 2]) / 2, (ref[:, 1] + ref[:, 3]) / 2, ref[:, 2] - ref[:, 0], ref[:, 3] - ref[:, 1]
        no_exp = torch.stack([x + deltas[:, 0] * w - (1 + deltas[:, 2]) * w / 2, y + deltas[:, 1] * h - (1 + deltas[:, 3]) * h / 2,
                              x + deltas[:, 0] * w + (1 + deltas[:, 2]) * w / 2, y + deltas[:, 1] * h + (1 + deltas[:, 3]) * h / 2], 1)
        _compare_boxes(got, want, why, "one xyxy box per anchor", "box",
                       {"sizes are scaled by exp(dw), exp(dh), not by 1 + dw": no_exp,
                        "xyxy boxes: the centre is (x1 + x2) / 2, not x1":
                            box_coder.decode(deltas, ref - torch.stack([w, h, w, h], 1) / 2),
                        "dw and dh are capped at log(1000 / 16) before exp": box_coder.decode(deltas, ref, clamp=float("inf"))})
    print("check_decode: correct — your decoding matches fpnlib's box_coder.decode on every case")
    return True


@exercise("fpnlib.modeling.box_coder:encode", "fpnlib.modeling.box_coder:decode")
def check_regression_targets(targets: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> bool:
    """Sec. 4.2 (Fast R-CNN's head): ``targets(rois [N, 4], gt [N, 4]) -> [N, 4]``, what the head's
    box branch learns for each foreground RoI: (10 (x - xa) / wa, 10 (y - ya) / ha, 5 log(w / wa),
    5 log(h / ha)), ``a`` the RoI and (x, y, w, h) its ground truth's centre and size; compared with
    ``fpnlib.modeling.box_coder.encode`` with ``FAST_RCNN_BOX_WEIGHTS``."""
    from fpnlib.modeling import box_coder

    weights = box_coder.FAST_RCNN_BOX_WEIGHTS
    g = torch.Generator().manual_seed(0)
    roi = torch.tensor([[0.0, 0.0, 40.0, 20.0]])
    t = torch.tensor
    cases = [("an RoI that is its ground truth: all zeros", roi, roi.clone()),
             ("a ground truth shifted right by half the RoI's width: dx = 10 x 0.5 = 5", roi, t([[20.0, 0.0, 60.0, 20.0]])),
             ("a ground truth twice as tall about the same centre: dh = 5 log 2", roi, t([[0.0, -10.0, 40.0, 30.0]])),
             ("centres, not corners: a ground truth grown about the RoI's centre has dx = dy = 0", roi, t([[-10.0, -5.0, 50.0, 25.0]]))]
    for _ in range(3):
        rois = _random_boxes(60, g, lo=4.0)
        # each RoI's ground truth: moved by up to half its size, 0.5x .. 2x as wide and as tall
        cases.append(("on random RoIs and ground truths", rois,
                      box_coder.decode(torch.rand(60, 4, generator=g) * 1.4 - 0.7, rois)))
    for why, rois, gt in cases:
        want = box_coder.encode(rois, gt, weights)
        got = _call(targets, "targets", why, rois.clone(), gt.clone())
        _compare_boxes(got, want, why, "four targets per RoI", "RoI",
                       {"the weights (10, 10, 5, 5) multiply the deltas": box_coder.encode(rois, gt),
                        "the deltas go from the RoI to its ground truth, not back": box_coder.encode(gt, rois, weights)})
    print("check_regression_targets: correct — your targets match fpnlib's box_coder.encode on every case")
    return True


# ----------------------------------------------------------------------------- 08: reading the tables


def _recorded_tables(results_dir) -> dict[str, dict]:
    import json
    from pathlib import Path

    from fpnlib.report import RESULTS_DIR

    folder = Path(results_dir) if results_dir is not None else RESULTS_DIR / "cpu"
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("table[12356].json"))}


def _best(record: dict, metric: str) -> str:
    from fpnlib.narration import best_row

    return best_row(record, metric)[0]


@exercise()  # no library function answers it: the shuffled copies reject answers typed in
def check_best_row(best_row: Callable[[dict, str], str], results_dir=None) -> bool:
    """08's questions: ``best_row(record, metric) -> row name``, the row of a table record (as
    ``results/<preset>/tableN.json`` holds it: ``record["rows"][name]["metrics"][metric]``) with the
    highest value of ``metric``. Asked of every metric of every table in ``results_dir`` (default:
    ``results/cpu``), and of the same tables with their rows' numbers shuffled, so an answer copied
    from the tables above does not pass. Prints the answers it checked."""
    import copy

    tables = _recorded_tables(results_dir)
    if not tables:
        raise ExerciseError(f"no table records in {results_dir}: run the tables first (make reproduce)")
    g = torch.Generator().manual_seed(0)
    answers = []
    for name, record in tables.items():
        metrics = list(next(iter(record["rows"].values()))["metrics"])
        shuffled = copy.deepcopy(record)
        rows = list(shuffled["rows"].values())
        for metric in metrics:
            values = [r["metrics"].get(metric) for r in rows]
            for r, k in zip(rows, torch.randperm(len(rows), generator=g).tolist()):
                r["metrics"][metric] = values[k]
        for which, rec in (("", record), (" with its rows' numbers shuffled", shuffled)):
            for metric in metrics:
                want = _best(rec, metric)
                got = _call(best_row, "best_row", f"{name}{which}, {metric}", copy.deepcopy(rec), metric)
                if got not in rec["rows"] or rec["rows"][got]["metrics"][metric] != rec["rows"][want]["metrics"][metric]:
                    shown = f"{got!r}" + (f" ({metric} {rec['rows'][got]['metrics'][metric]:.1f})" if got in rec["rows"] else "")
                    raise ExerciseError(f"{name}{which}: the highest {metric} is row {want!r} "
                                        f"({rec['rows'][want]['metrics'][metric]:.1f}); you answer {shown}")
            if not which:
                answers.append(f"{name}: " + ", ".join(f"{m} {_best(rec, m)} ({rec['rows'][_best(rec, m)]['metrics'][m]:.1f})"
                                                      for m in metrics))
    print("check_best_row: correct — the best row of every table, by metric:\n  " + "\n  ".join(answers))
    return True
