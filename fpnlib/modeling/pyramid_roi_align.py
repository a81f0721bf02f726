"""RoIAlign of every pyramid level in one kernel, on channels_last maps (not in the paper; speed).

What Eq. (1) decides stays in ``roi_levels``; this module only makes the pooling cheap on a GPU.
``torchvision.ops.roi_align`` costs three things there that the pooling itself does not need:

* under bf16 autocast it casts each whole map to float32 first, and its kernel reads NCHW, so
  a channels_last map is also copied to NCHW (P2 of a batch of 8 padded to 800 x 1344 holds
  8 x 256 x 200 x 336 values); its backward writes float32 NCHW gradients, cast back after;
* one call per level, each on the RoIs of that level, which the caller finds by a sort, a
  count that the host must read (a wait), and a gather and a scatter per level;
* its threads each compute one output value of one channel, so neighbouring threads read
  neighbouring pixels of a channel plane, not the 256 channels of a pixel.

Here one Triton program pools one bin of one RoI for all channels: it reads the RoI's level,
samples the ``sampling_ratio`` x ``sampling_ratio`` points of the bin, and for each point reads
the four neighbouring pixels' channel vectors (contiguous in channels_last), in the map's own
dtype, accumulating in float32. The backward runs the same programs, adding each bin's
gradient into float32 channels_last gradients of the maps with atomic adds (as torchvision's
CUDA backward does, in float32 too), cast to the maps' dtype at the end.

The arithmetic is torchvision's kernels', operation for operation (start, bin size, sample
position, the out-of-map rule, the clamp at the last row and column, the weights, the order of
the sum and the division by the count), so the results are torchvision's within float32
rounding (contraction into fused multiply-adds is switched off). ``tests/test_roi_extraction.py``
runs the kernel in Triton's CPU interpreter, where it gives ``roi_align``'s float32 output and
gradients bit for bit, and compiles it for an H100 to check its PTX; ``tests/test_cuda.py``
compares the two on a GPU.

The output is ``[K, C, S, S]`` laid out channels_last (each program writes its bin's channels
contiguously); the box head's ``flatten`` reads it in the usual (c, y, x) order.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch
from torch import Tensor

MAX_LEVELS = 4  # P2-P5, the levels the region head reads (Sec. 4.2)
MAX_CHANNELS = 1024  # one program holds a bin's channels in registers
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # read as they are, summed in float32

def enabled(device: torch.device | str) -> bool:
    """Whether RoI extraction (training and inference) takes this kernel: on CUDA where Triton
    is installed (``FPNLIB_TRITON_ROI_ALIGN=0`` turns it off, for A/B runs); on a CPU only inside
    Triton's interpreter (``TRITON_INTERPRET=1``, the tests)."""
    if os.environ.get("FPNLIB_TRITON_ROI_ALIGN", "") == "0":
        return False
    on_device = torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    return on_device and _kernel() is not None


def path_note(device: torch.device | str) -> str:
    """Which RoIAlign runs on a CUDA ``device``, for benchmark records."""
    return "RoIAlign of all levels in one Triton kernel" if enabled(device) else "RoIAlign level by level (torchvision)"


@functools.cache
def _kernel():
    """The Triton kernel (forward and backward), or ``None`` without Triton."""
    try:
        from .pyramid_roi_align_kernel import pyramid_roi_align_kernel
    except ImportError:  # no Triton
        return None
    return pyramid_roi_align_kernel


def _launch(rois: Tensor, level: Tensor, bins: Tensor, maps: Sequence[Tensor], scales: Sequence[float],
            size: int, ratio: int, aligned: bool, backward: bool) -> None:
    """One program per (RoI, bin). ``bins`` ``[K, S, S, C]``: the output (forward) or its
    gradient (backward); ``maps``: the maps (forward) or their float32 gradients (backward)."""
    import triton

    args = []
    for i in range(MAX_LEVELS):  # unused slots repeat the first map: no RoI reads them
        m, s = (maps[i], scales[i]) if i < len(maps) else (maps[0], scales[0])
        args += [m, m.shape[2], m.shape[3], *m.stride(), float(s)]
    channels = maps[0].shape[1]
    _kernel()[(rois.shape[0], size * size)](
        rois, level, bins, channels, *args, SIZE=size, RATIO=ratio, ALIGNED=aligned,
        BLOCK_C=triton.next_power_of_2(channels), BACKWARD=backward, enable_fp_fusion=False)


class _OneKernelRoIAlign(torch.autograd.Function):
    """The kernel's forward; its backward adds each bin's gradient into float32 gradients of the
    maps with atomic adds (torchvision's CUDA backward does the same, also in float32)."""

    @staticmethod
    def forward(ctx, rois, level, scales, size, ratio, aligned, *maps):
        first = maps[0]
        out = torch.empty((rois.shape[0], size, size, first.shape[1]), dtype=first.dtype, device=first.device)
        if rois.shape[0] > 0:
            _launch(rois, level, out, maps, scales, size, ratio, aligned, backward=False)
        ctx.save_for_backward(rois, level)
        ctx.geometry = (scales, size, ratio, aligned, [(m.shape, m.dtype) for m in maps])
        return out.permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad):
        rois, level = ctx.saved_tensors
        scales, size, ratio, aligned, shapes = ctx.geometry
        # float32 gradients laid out channels_last, as the maps
        grads = [torch.zeros((n, h, w, c), dtype=torch.float32, device=grad.device).permute(0, 3, 1, 2)
                 for (n, c, h, w), _ in shapes]
        if rois.shape[0] > 0:
            bins = grad.permute(0, 2, 3, 1).contiguous()
            _launch(rois, level, bins, grads, scales, size, ratio, aligned, backward=True)
        return (None,) * 6 + tuple(g.to(dtype) for g, (_, dtype) in zip(grads, shapes))


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
    maps' dtype (the arguments of ``parallel_pieces.threaded_roi_align``), differentiable with
    respect to the maps; or ``None`` where the kernel does not apply (see :func:`enabled`;
    adaptive sampling, ``sampling_ratio <= 0``; levels that are not consecutive, more than four
    of them, or 1024 channels; float64 maps, or maps of differing dtype or channels), and the
    caller pools level by level."""
    if (not maps or len(maps) > MAX_LEVELS or list(levels) != list(range(levels[0], levels[0] + len(maps)))
            or sampling_ratio <= 0 or not enabled(maps[0].device)):
        return None
    first = maps[0]
    channels = first.shape[1]
    alike = all(m.dtype == first.dtype and m.shape[1] == channels and m.device == first.device for m in maps)
    if not alike or channels > MAX_CHANNELS or first.dtype not in _DTYPES:
        return None
    level = (level_of_roi - levels[0]).to(torch.int32)
    return _OneKernelRoIAlign.apply(rois.detach().float().contiguous(), level, tuple(scales), output_size,
                                    sampling_ratio, aligned, *maps)
