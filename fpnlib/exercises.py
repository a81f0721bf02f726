"""Checks for the notebooks' "your turn" cells: the student writes a piece of the paper, a
``check_*`` function compares it with the library on chosen and random cases and says, in one
sentence, what is wrong. Each returns ``True`` when the piece is right and raises
``ExerciseError`` (an ``AssertionError``) with the first failing case otherwise.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from fpnlib.modeling.roi_levels import assign_fpn_levels


class ExerciseError(AssertionError):
    """A student's piece disagrees with the library; the message names the case."""


def _boxes_of_side(sides: list[float]) -> torch.Tensor:
    s = torch.tensor(sides, dtype=torch.float32)
    return torch.stack([torch.zeros_like(s), torch.zeros_like(s), s, s], 1)


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


def _compare(level_of, boxes: torch.Tensor, why: str) -> None:
    want = assign_fpn_levels(boxes)
    try:
        got = torch.as_tensor(level_of(boxes.clone()))
    except NotImplementedError:
        raise ExerciseError("level_of is not written yet (it raises NotImplementedError)") from None
    if got.shape != want.shape:
        raise ExerciseError(f"level_of returned shape {tuple(got.shape)} for {len(boxes)} boxes; expected {tuple(want.shape)}")
    bad = torch.nonzero(got.to(torch.int64) != want).flatten()
    if len(bad):
        i = int(bad[0])
        w, h = (boxes[i, 2] - boxes[i, 0]).item(), (boxes[i, 3] - boxes[i, 1]).item()
        raise ExerciseError(f"{why}: for a {w:.0f} x {h:.0f} box you return {got[i].item()}, "
                            f"Eq. (1) gives {want[i].item()} ({len(bad)} of {len(boxes)} boxes differ)")
