"""Greedy NMS of many groups at once, with no wait on the GPU per group (not in the paper; speed).

Two places of the detector run NMS within groups: proposal selection within each (image,
level) and post-processing within each (image, class). torchvision's CUDA ``nms`` finishes
its suppression on the host, so a GPU waits once per image (and, in ``batched_nms`` above 5000
boxes, once per group). Here every group is a row of a padded ``[G, n]`` layout and the whole
batch is suppressed with tensor operations:

1. ``overlaps_above``: ``S[g, i, j] = IoU(i, j) > t``, computed with the float32 arithmetic of
   torchvision's NMS kernel on the same device (``inter / (area_i + area_j - inter)``, strict
   ``>``, the area sum fused on CUDA), so each pair is judged as there, at the threshold too.
   On CUDA a Triton kernel computes ``S`` in one pass where Triton is installed.
2. ``greedy_keep``: greedy NMS keeps box ``j`` iff no *kept* box ranked before it overlaps it,
   ``keep[j] = not any_{i<j} keep[i] and S[i, j]``. Iterating this map from "keep all" fixes
   one more leading box per round, and its only fixed point is greedy NMS's answer, so the
   iteration stops exactly there (as Cluster-NMS, Zheng et al., 2020: the rounds needed are
   the longest chain of suppressions, not the number of boxes).

Each round is one batched matrix-vector product; the host waits only to test convergence (in
inference not even that: the rounds are guessed and the test read at the end, ``guessed_sizes``).
Opt-in (``FPNLIB_NMS_BITS=1``, :func:`packed_rounds`), ``S`` is packed 32 pairs a word and a
round is one Triton kernel over the kept rows' words.
The kept sets are those of torchvision's ``nms`` run on each group (``tests/test_group_nms.py``,
``tests/test_cuda.py``); orders of equal scores may differ (torchvision's sort is not stable,
this one is). ``batched_nms`` on small inputs shifts each group's boxes first, which can decide
a pair at the threshold otherwise (README, "Same detections through grouped NMS"). Dense pairs cost ``G * n^2`` work, so
a CPU, where torchvision's kernel skips suppressed boxes, keeps the per-image path
(``use_group_nms``).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from .guessed_sizes import LEARNED, active
from .lean_ops import take_rows

PAIRS_PER_CHUNK = 1 << 25  # IoU temporaries: 128 MiB of float32 each


def use_group_nms(device: torch.device | str) -> bool:
    """Whether proposal selection and post-processing take the grouped path: on CUDA by default;
    ``FPNLIB_GROUP_NMS=0`` turns it off (the per-image path, for A/B runs), ``=1`` on everywhere
    (the tests compare both paths on a CPU)."""
    switch = os.environ.get("FPNLIB_GROUP_NMS", "")
    return switch == "1" or (switch != "0" and torch.device(device).type == "cuda")


def path_note(device: torch.device | str) -> str:
    """Which NMS path runs on ``device``, for benchmark records."""
    if not use_group_nms(device):
        return "NMS image by image (torchvision)"
    cuda = torch.device(device).type == "cuda"
    triton = cuda and _triton_kernels() is not None
    return ("NMS of all groups at once, overlaps by " + ("Triton" if triton else "eager torch")
            + (", rounds on packed overlaps (FPNLIB_NMS_BITS=1)" if triton and packed_rounds(device) else ""))


def overlaps_above(boxes: Tensor, thresh: float, fused: bool = False) -> Tensor:
    """``[..., n, n]`` bool: IoU of xyxy ``boxes`` ``[..., n, 4]`` pairs ``(i, j)`` above ``thresh``.

    The float32 operations of torchvision's NMS kernels, so that pairs at the threshold are
    decided as there: ``inter / (area_i + area_j - inter)``, where the CPU kernel rounds
    ``area_j = w_j * h_j`` before the sum and the CUDA kernel (compiled with fused multiply-adds)
    does not, ``fma(w_j, h_j, area_i)`` (``fused``; emulated in float64, where ``w_j * h_j`` is
    exact). Found by measurement: on box pairs at the threshold +- a few float steps, each
    formula decides every pair as its device's kernel, and the other formula decides some of
    them otherwise (``tests/test_group_nms.py`` on a CPU, ``tests/test_cuda.py`` on CUDA)."""
    x1, y1, x2, y2 = boxes.float().unbind(-1)
    w_box, h_box = x2 - x1, y2 - y1
    area = w_box * h_box
    w = (torch.minimum(x2[..., :, None], x2[..., None, :]) - torch.maximum(x1[..., :, None], x1[..., None, :]))
    h = (torch.minimum(y2[..., :, None], y2[..., None, :]) - torch.maximum(y1[..., :, None], y1[..., None, :]))
    inter = w.clamp_(min=0).mul_(h.clamp_(min=0))
    if fused:
        total = torch.addcmul(area.double()[..., :, None], w_box.double()[..., None, :], h_box.double()[..., None, :])
        union = total.float().sub_(inter)
    else:
        union = (area[..., :, None] + area[..., None, :]).sub_(inter)
    return inter.div_(union) > thresh  # float32 threshold, as the CUDA kernel compares


_TRITON_KERNELS: list = []  # [kernel] once built, [None] where Triton is unavailable


def _triton_kernels():
    """The Triton kernels ``(overlaps, round)`` (on CUDA), or ``None`` without Triton: the first
    writes ``S`` in one pass, the second runs one round on ``S`` packed (:func:`packed_rounds`).

    The eager formula makes a dozen passes over ``[G, n, n]`` float32 temporaries; the kernel
    reads the boxes and writes ``S`` once. It computes each pair with the same float32
    operations: no FMA contraction but the one asked for (``enable_fp_fusion=False`` at launch,
    ``tl.fma`` where ``FUSED``) and a correctly rounded division (``div_rn``)."""
    if not _TRITON_KERNELS:
        try:
            import triton
            import triton.language as tl
        except ImportError:
            _TRITON_KERNELS.append(None)
            return None

        @triton.jit
        def overlaps_kernel(boxes, valid, ends, out, n, words, thresh, FUSED: tl.constexpr, PACKED: tl.constexpr,
                            BLOCK: tl.constexpr):
            g, bi, bj = tl.program_id(2).to(tl.int64), tl.program_id(0), tl.program_id(1)
            end = tl.load(ends + g)  # no candidate at or after this position of group g
            i = bi * BLOCK + tl.arange(0, BLOCK)
            j = bj * BLOCK + tl.arange(0, BLOCK)
            if PACKED:  # 32 pairs (i, j..j+31) a word, bit b for j + b: [G, n, words] int32
                word = bj * (BLOCK // 32) + tl.arange(0, BLOCK // 32)  # (not `w`: a width below)
                tile = out + g * n * words + i[:, None] * words + word[None, :]
                inside = (i[:, None] < n) & (word[None, :] < words)
                zeros = tl.zeros((BLOCK, BLOCK // 32), dtype=tl.int32)
            else:
                tile = out + g * n * n + i[:, None] * n + j[None, :]
                inside = (i[:, None] < n) & (j[None, :] < n)
                zeros = tl.zeros((BLOCK, BLOCK), dtype=out.dtype.element_ty)
            # below the diagonal every j < i (half the tiles); at or after the group's end (a group
            # padded to the widest: most of it) no candidate: no pair to compute
            if (bj < bi) | (bj * BLOCK >= end):
                tl.store(tile, zeros, mask=inside)
            else:
                base = boxes + g * n * 4
                x1i, y1i = tl.load(base + i * 4, mask=i < n, other=0.0), tl.load(base + i * 4 + 1, mask=i < n, other=0.0)
                x2i = tl.load(base + i * 4 + 2, mask=i < n, other=0.0)
                y2i = tl.load(base + i * 4 + 3, mask=i < n, other=0.0)
                x1j, y1j = tl.load(base + j * 4, mask=j < n, other=0.0), tl.load(base + j * 4 + 1, mask=j < n, other=0.0)
                x2j = tl.load(base + j * 4 + 2, mask=j < n, other=0.0)
                y2j = tl.load(base + j * 4 + 3, mask=j < n, other=0.0)
                area_i = (x2i - x1i) * (y2i - y1i)
                w = tl.maximum(tl.minimum(x2i[:, None], x2j[None, :]) - tl.maximum(x1i[:, None], x1j[None, :]), 0.0)
                h = tl.maximum(tl.minimum(y2i[:, None], y2j[None, :]) - tl.maximum(y1i[:, None], y1j[None, :]), 0.0)
                inter = w * h
                if FUSED:
                    total = tl.fma((x2j - x1j)[None, :], (y2j - y1j)[None, :], area_i[:, None])
                else:
                    total = area_i[:, None] + ((x2j - x1j) * (y2j - y1j))[None, :]
                iou = tl.math.div_rn(inter, total - inter)
                row_ok = tl.load(valid + g * n + i, mask=i < n, other=0) != 0
                col_ok = tl.load(valid + g * n + j, mask=j < n, other=0) != 0
                s = (iou > thresh) & (j[None, :] > i[:, None]) & row_ok[:, None] & col_ok[None, :]
                if PACKED:  # distinct bits: their sum is their OR
                    shifted = tl.reshape(s.to(tl.int32), (BLOCK, BLOCK // 32, 32)) << tl.arange(0, 32)[None, None, :]
                    tl.store(tile, tl.sum(shifted, axis=2), mask=inside)
                else:
                    tl.store(tile, s.to(out.dtype.element_ty), mask=inside)

        @triton.jit
        def round_kernel(bits, keep, valid, ends, out, n, words, ROWS: tl.constexpr, WORDS: tl.constexpr):
            # one greedy-NMS round on packed overlaps: out[g, j] = valid[g, j] and no kept i
            # (i < j) with bit j of row i; rows are read WORDS words wide, ROWS at a time, and
            # their bits unpacked to take the maximum over the kept rows (Triton's portable reductions)
            g, wb = tl.program_id(1).to(tl.int64), tl.program_id(0)
            end = tl.load(ends + g)  # rows at or after it are not candidates, so never kept
            w = wb * WORDS + tl.arange(0, WORDS)
            b = tl.arange(0, 32)
            hit = tl.zeros((WORDS, 32), dtype=tl.int32)
            for i0 in range(0, tl.minimum(tl.minimum((wb + 1) * WORDS * 32, n), end), ROWS):  # i >= j: no j here
                i = i0 + tl.arange(0, ROWS)
                kept = tl.load(keep + g * n + i, mask=i < n, other=0) != 0
                tile = tl.load(bits + g * n * words + i[:, None] * words + w[None, :],
                               mask=kept[:, None] & (w[None, :] < words), other=0)
                hit = tl.maximum(hit, tl.max((tile[:, :, None] >> b[None, None, :]) & 1, axis=0))
            j = wb * WORDS * 32 + tl.arange(0, WORDS * 32)
            suppressed = tl.reshape(hit, (WORDS * 32,)) != 0
            ok = tl.load(valid + g * n + j, mask=j < n, other=0) != 0
            tl.store(out + g * n + j, (ok & ~suppressed).to(tl.uint8), mask=j < n)

        _TRITON_KERNELS.append((overlaps_kernel, round_kernel))
    return _TRITON_KERNELS[0]


def _kernels(device: torch.device | str):
    """The Triton kernels (overlaps, round) where they run on ``device`` (CUDA, or Triton's
    interpreter), else ``None``."""
    on_device = torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    return _triton_kernels() if on_device else None


def packed_rounds(device: torch.device | str) -> bool:
    """Whether NMS's rounds run on packed overlaps (``FPNLIB_NMS_BITS=1``, where the kernels run):
    32 pairs a word instead of one float16 each, 1/16 of the memory a round reads, one kernel a
    round. Opt-in until timed on a GPU (tested in Triton's interpreter on a CPU)."""
    return os.environ.get("FPNLIB_NMS_BITS", "0") == "1" and _kernels(device) is not None


def _group_ends(valid: Tensor) -> Tensor:
    """``[G]`` int32: one past each group's last candidate (0 for none). The kernels skip the
    padding after it: post-processing pads every (image, class) group to the widest, which
    can hold many times the candidates of most groups."""
    n = valid.shape[1]
    position = torch.arange(1, n + 1, dtype=torch.int32, device=valid.device)
    return torch.where(valid, position, 0).amax(dim=1)


def _suppression_matrix(boxes: Tensor, valid: Tensor, thresh: float, dtype: torch.dtype,
                        fused: bool | None = None, ends: Tensor | None = None) -> Tensor:
    """``S[g, i, j]`` (0/1 in ``dtype``): candidate ``i`` is ranked before candidate ``j`` and
    overlaps it above ``thresh`` (``fused``, default: on CUDA, as in :func:`overlaps_above`).
    ``int32``: packed by the kernel, ``[G, n, ceil(n / 32)]``, pair ``(i, j)`` at bit ``j % 32``
    of word ``j // 32``. ``ends``: :func:`_group_ends` of ``valid``, if already made."""
    g, n = valid.shape
    fused = boxes.is_cuda if fused is None else fused
    kernels = _kernels(boxes.device)
    packed = dtype == torch.int32
    if packed and kernels is None:
        raise ValueError("packed overlaps need the Triton kernel (CUDA, or Triton's interpreter)")
    words = -(-n // 32)
    suppress = torch.empty((g, n, words) if packed else (g, n, n), dtype=dtype, device=boxes.device)
    if kernels is not None:
        block = 64
        grid = (-(-n // block), -(-n // block), g)
        ends = _group_ends(valid) if ends is None else ends
        kernels[0][grid](boxes.float().contiguous(), valid.to(torch.uint8).contiguous(), ends, suppress, n, words,
                         float(thresh), FUSED=fused, PACKED=packed, BLOCK=block, enable_fp_fusion=False)
        return suppress
    upper = torch.ones((n, n), dtype=torch.bool, device=boxes.device).triu_(1)
    per_chunk = max(1, PAIRS_PER_CHUNK // (n * n))
    for s in range(0, g, per_chunk):
        over = overlaps_above(boxes[s:s + per_chunk], thresh, fused)
        part = valid[s:s + per_chunk]
        suppress[s:s + per_chunk] = over & upper & part[:, :, None] & part[:, None, :]
    return suppress


def greedy_keep(boxes: Tensor, valid: Tensor, thresh: float, check_every: int = 2,
                site: str | None = None) -> Tensor:
    """``[G, n]`` bool: the boxes greedy NMS keeps in each group.

    ``boxes`` ``[G, n, 4]`` sorted by decreasing score within each group; ``valid`` ``[G, n]``
    marks real candidates (padding and dropped boxes are neither kept nor suppress). Inside
    ``guessed_sizes.with_guessed_sizes``, a call that names its ``site`` runs the rounds learned
    for it without a wait and leaves the convergence test as that pass's check."""
    g, n = valid.shape
    if g == 0 or n == 0:
        return valid.clone()
    guessing = active() if site is not None else None
    limit = n if guessing is None else min(n, LEARNED.rounds_for(site))
    if packed_rounds(boxes.device):  # the kept set as uint8 [G, n]; a round is one kernel
        ends = _group_ends(valid)
        bits = _suppression_matrix(boxes, valid, thresh, torch.int32, ends=ends)
        candidate = valid.to(torch.uint8).contiguous()
        words, round_kernel = bits.shape[2], _kernels(boxes.device)[1]
        grid = (-(-words // 8), g)

        def step(keep: Tensor) -> Tensor:
            new = torch.empty_like(candidate)
            round_kernel[grid](bits, keep, candidate, ends, new, n, words, ROWS=32, WORDS=8)
            return new
    else:
        # float16 on CUDA: sums of 0s and 1s (counts up to 2048 are exact), only tested == 0
        dtype = torch.float16 if boxes.is_cuda else torch.float32
        suppress = _suppression_matrix(boxes, valid, thresh, dtype)
        # the kept set as 0/1 weights [G, 1, n], so that a round is three operators: the kept
        # boxes overlapping each box counted (bmm), none (== 0), and a candidate (* weight)
        candidate = valid.to(dtype)[:, None, :]

        def step(keep: Tensor) -> Tensor:
            return candidate * (torch.bmm(keep, suppress) == 0)

    keep, rounds = candidate, 0
    with torch.autocast(boxes.device.type, enabled=False):  # no bf16 copy of S per round
        while True:
            new = step(keep)
            rounds += 1
            if guessing is not None:
                if rounds >= limit:
                    if rounds < n:  # n rounds always suffice
                        guessing.check(("rounds", site), (new != keep).any(), 0)  # 1: not converged
                    break
            elif rounds % check_every == 0 or rounds >= n:
                if rounds >= n or torch.equal(new, keep):  # the host waits here only
                    if site is not None:
                        LEARNED.took_rounds(site, rounds)
                    break
            keep = new
    return new.reshape(g, n) > 0


def grouped_nms(boxes: Tensor, scores: Tensor, valid: Tensor, thresh: float,
                site: str | None = None) -> tuple[Tensor, Tensor]:
    """NMS within each row of a padded layout: ``boxes`` ``[G, n, 4]``, ``scores`` ``[G, n]``
    (higher first), ``valid`` ``[G, n]``. Returns (``order`` ``[G, n]``: each row's positions by
    decreasing score, stable; ``keep`` ``[G, n]``: whether the box at ``order[g, r]`` is kept)."""
    order = scores.masked_fill(~valid, float("-inf")).argsort(dim=1, descending=True, stable=True)
    return order, greedy_keep(take_rows(boxes, order), take_rows(valid, order), thresh, site=site)
