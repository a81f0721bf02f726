"""RoIAlign of every pyramid level in one kernel, on channels_last maps (not in the paper; speed).

What Eq. (1) decides stays in ``roi_levels``; this module only makes the pooling cheap on a GPU
at inference. ``torchvision.ops.roi_align`` costs three things there that the pooling itself
does not need:

* under bf16 autocast it casts each whole map to float32 first, and its kernel reads NCHW, so
  a channels_last map is also copied to NCHW (P2 of a batch of 8 padded to 800 x 1344 holds
  8 x 256 x 200 x 336 values);
* one call per level, each on the RoIs of that level, which the caller finds by a sort, a
  count that the host must read (a wait), and a gather and a scatter per level;
* its threads each compute one output value of one channel, so neighbouring threads read
  neighbouring pixels of a channel plane, not the 256 channels of a pixel.

Here one Triton program pools one bin of one RoI for all channels: it reads the RoI's level,
samples the ``sampling_ratio`` x ``sampling_ratio`` points of the bin, and for each point reads
the four neighbouring pixels' channel vectors (contiguous in channels_last), in the map's own
dtype, accumulating in float32. The arithmetic is torchvision's kernel's, operation for
operation (start, bin size, sample position, the out-of-map rule, the clamp at the last row and
column, the weights, the order of the sum and the division by the count), so the result is
torchvision's within float32 rounding (contraction into fused multiply-adds is switched off).
``tests/test_roi_extraction.py`` runs the kernel in Triton's CPU interpreter, where it gives
``roi_align``'s float32 result bit for bit, and compiles it for an H100 to check its PTX;
``tests/test_cuda.py`` compares the two on a GPU.

The output is ``[K, C, S, S]`` laid out channels_last (each program writes its bin's channels
contiguously); the box head's ``flatten`` reads it in the usual (c, y, x) order. No gradient:
training keeps torchvision's ``roi_align`` and its backward (:func:`pyramid_roi_align` returns
``None`` when a map requires grad).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

MAX_LEVELS = 4  # P2-P5, the levels the region head reads (Sec. 4.2)
MAX_CHANNELS = 1024  # one program holds a bin's channels in registers
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # read as they are, summed in float32

_KERNEL: list = []  # [kernel] once built, [None] where Triton is unavailable


def enabled(device: torch.device | str) -> bool:
    """Whether RoI extraction at inference takes this kernel: on CUDA where Triton is installed
    (``FPNLIB_TRITON_ROI_ALIGN=0`` turns it off, for A/B runs); on a CPU only inside Triton's
    interpreter (``TRITON_INTERPRET=1``, the tests)."""
    if os.environ.get("FPNLIB_TRITON_ROI_ALIGN", "") == "0":
        return False
    on_device = torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    return on_device and _kernel() is not None


def path_note(device: torch.device | str) -> str:
    """Which RoIAlign runs at inference on a CUDA ``device``, for benchmark records."""
    return "RoIAlign of all levels in one Triton kernel" if enabled(device) else "RoIAlign level by level (torchvision)"


def _kernel():
    if not _KERNEL:
        try:
            from .pyramid_roi_align_kernel import pyramid_roi_align_kernel
        except ImportError:  # no Triton
            pyramid_roi_align_kernel = None
        _KERNEL.append(pyramid_roi_align_kernel)
    return _KERNEL[0]


def pyramid_roi_align(
    maps: Sequence[Tensor],
    rois: Tensor,
    level_of_roi: Tensor,
    levels: Sequence[int],
    scales: Sequence[float],
    output_size: int,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor | None:
    """``[K, C, S, S]`` (channels_last): RoI ``r`` (row ``(image, x1, y1, x2, y2)`` of ``rois``)
    pooled by RoIAlign from ``maps[levels.index(level_of_roi[r])]`` at that map's scale, in the
    maps' dtype (the arguments of ``parallel_pieces.threaded_roi_align``); or ``None`` where the
    kernel does not apply (see :func:`enabled`; a map requiring grad; adaptive sampling,
    ``sampling_ratio <= 0``; levels that are not consecutive, more than four of them, or 1024
    channels; float64 maps, or maps of differing dtype or channels), and the caller pools level
    by level."""
    if (not maps or len(maps) > MAX_LEVELS or list(levels) != list(range(levels[0], levels[0] + len(maps)))
            or sampling_ratio <= 0 or not enabled(maps[0].device)):
        return None
    first = maps[0]
    channels = first.shape[1]
    needs_grad = torch.is_grad_enabled() and any(m.requires_grad for m in maps)
    alike = all(m.dtype == first.dtype and m.shape[1] == channels and m.device == first.device for m in maps)
    if needs_grad or not alike or channels > MAX_CHANNELS or first.dtype not in _DTYPES:
        return None
    num = rois.shape[0]
    out = torch.empty((num, output_size, output_size, channels), dtype=first.dtype, device=first.device)
    if num > 0:
        import triton

        args = []
        for i in range(MAX_LEVELS):
            m, s = (maps[i], scales[i]) if i < len(maps) else (first, scales[0])  # unused slots: never read
            args += [m, m.shape[2], m.shape[3], *m.stride(), float(s)]
        _kernel()[(num, output_size * output_size)](
            rois.float().contiguous(), (level_of_roi - levels[0]).to(torch.int32), out, channels, *args,
            SIZE=output_size, RATIO=sampling_ratio, ALIGNED=aligned,
            BLOCK_C=triton.next_power_of_2(channels), enable_fp_fusion=False)
    return out.permute(0, 3, 1, 2)
