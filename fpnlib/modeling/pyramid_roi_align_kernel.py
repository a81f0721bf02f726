"""The Triton kernel of :mod:`fpnlib.modeling.pyramid_roi_align`, in its own file so that Triton
is imported only where the kernel runs (its interpreter is chosen by ``TRITON_INTERPRET`` then)."""
import triton
import triton.language as tl


@triton.jit
def _bin_of_level(fmap, height, width, s_n, s_c, s_h, s_w, scale, roi, ph, pw, channels,
                  SIZE: tl.constexpr, RATIO: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_C: tl.constexpr):
    """One bin of one RoI, all channels: torchvision's ``roi_align_forward_kernel_impl``, in its
    order of operations."""
    b = tl.load(roi).to(tl.int64)
    offset = 0.5 if ALIGNED else 0.0
    start_w = tl.load(roi + 1) * scale - offset
    start_h = tl.load(roi + 2) * scale - offset
    roi_w = (tl.load(roi + 3) * scale - offset) - start_w
    roi_h = (tl.load(roi + 4) * scale - offset) - start_h
    if not ALIGNED:  # malformed RoIs become 1 x 1
        roi_w = tl.maximum(roi_w, 1.0)
        roi_h = tl.maximum(roi_h, 1.0)
    bin_h = tl.math.div_rn(roi_h, SIZE * 1.0)  # correctly rounded divisions, as nvcc's default
    bin_w = tl.math.div_rn(roi_w, SIZE * 1.0)
    c = tl.arange(0, BLOCK_C)
    base = fmap + b * s_n + c.to(tl.int64) * s_c
    c_ok = c < channels
    total = tl.zeros([BLOCK_C], dtype=tl.float32)
    for iy in tl.static_range(RATIO):
        y = start_h + ph * bin_h + tl.math.div_rn((iy + 0.5) * bin_h, RATIO * 1.0)
        for ix in tl.static_range(RATIO):
            x = start_w + pw * bin_w + tl.math.div_rn((ix + 0.5) * bin_w, RATIO * 1.0)
            inside = (y >= -1.0) & (y <= height) & (x >= -1.0) & (x <= width)  # else the sample is 0
            yc = tl.maximum(y, 0.0)
            xc = tl.maximum(x, 0.0)
            y_low = yc.to(tl.int32)
            x_low = xc.to(tl.int32)
            y_last = y_low >= height - 1  # at the last row or column both neighbours are that one
            x_last = x_low >= width - 1
            y_low = tl.where(y_last, height - 1, y_low)
            x_low = tl.where(x_last, width - 1, x_low)
            y_high = tl.where(y_last, y_low, y_low + 1)
            x_high = tl.where(x_last, x_low, x_low + 1)
            yc = tl.where(y_last, y_low.to(tl.float32), yc)
            xc = tl.where(x_last, x_low.to(tl.float32), xc)
            ly = yc - y_low
            lx = xc - x_low
            hy = 1.0 - ly
            hx = 1.0 - lx
            m = tl.where(inside, c_ok, False)  # (a scalar & a block fails in Triton's interpreter)
            v1 = tl.load(base + y_low * s_h + x_low * s_w, mask=m, other=0.0).to(tl.float32)
            v2 = tl.load(base + y_low * s_h + x_high * s_w, mask=m, other=0.0).to(tl.float32)
            v3 = tl.load(base + y_high * s_h + x_low * s_w, mask=m, other=0.0).to(tl.float32)
            v4 = tl.load(base + y_high * s_h + x_high * s_w, mask=m, other=0.0).to(tl.float32)
            val = (hy * hx) * v1 + (hy * lx) * v2 + (ly * hx) * v3 + (ly * lx) * v4
            total += tl.where(inside, val, 0.0)
    return tl.math.div_rn(total, RATIO * RATIO * 1.0)


@triton.jit
def pyramid_roi_align_kernel(
    rois, level, out, channels,
    m0, h0, w0, n0, c0, y0, x0, sc0,
    m1, h1, w1, n1, c1, y1, x1, sc1,
    m2, h2, w2, n2, c2, y2, x2, sc2,
    m3, h3, w3, n3, c3, y3, x3, sc3,
    SIZE: tl.constexpr, RATIO: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (k, cell): bin ``cell`` of RoI ``k`` from map ``level[k]`` (each map: pointer,
    height, width, four strides, scale) into ``out`` ``[K, SIZE, SIZE, channels]``."""
    k = tl.program_id(0).to(tl.int64)
    cell = tl.program_id(1)
    ph = cell // SIZE
    pw = cell % SIZE
    roi = rois + k * 5
    lvl = tl.load(level + k)
    # each RoI reads one map: the other levels' branches are skipped, not masked
    if lvl == 0:
        val = _bin_of_level(m0, h0, w0, n0, c0, y0, x0, sc0, roi, ph, pw, channels, SIZE, RATIO, ALIGNED, BLOCK_C)
    elif lvl == 1:
        val = _bin_of_level(m1, h1, w1, n1, c1, y1, x1, sc1, roi, ph, pw, channels, SIZE, RATIO, ALIGNED, BLOCK_C)
    elif lvl == 2:
        val = _bin_of_level(m2, h2, w2, n2, c2, y2, x2, sc2, roi, ph, pw, channels, SIZE, RATIO, ALIGNED, BLOCK_C)
    else:
        val = _bin_of_level(m3, h3, w3, n3, c3, y3, x3, sc3, roi, ph, pw, channels, SIZE, RATIO, ALIGNED, BLOCK_C)
    if out.dtype.element_ty != tl.float32:  # round to nearest even, as torch's .to() (Triton's CPU interpreter truncates)
        val = val.to(out.dtype.element_ty, fp_downcast_rounding="rtne")
    c = tl.arange(0, BLOCK_C)
    # the bin's channels are contiguous in out
    tl.store(out + (k * SIZE * SIZE + cell) * channels + c, val, mask=c < channels)
