"""The Triton kernel of :mod:`fpnlib.modeling.pyramid_roi_align`, in its own file so that Triton
is imported only where the kernel runs (its interpreter is chosen by ``TRITON_INTERPRET`` then).

Its arithmetic is torchvision's ``roi_align_forward_kernel_impl`` and
``roi_align_backward_kernel_impl``, operation for operation."""
import triton
import triton.language as tl


@triton.jit
def _sample(y, x, height, width):
    """Bilinear sample at (y, x): whether it counts (points more than one pixel outside the map
    are 0), its four neighbours and their weights."""
    inside = (y >= -1.0) & (y <= height) & (x >= -1.0) & (x <= width)
    y = tl.maximum(y, 0.0)
    x = tl.maximum(x, 0.0)
    y_low = y.to(tl.int32)
    x_low = x.to(tl.int32)
    y_last = y_low >= height - 1  # at the last row or column both neighbours are that one
    x_last = x_low >= width - 1
    y_low = tl.where(y_last, height - 1, y_low)
    x_low = tl.where(x_last, width - 1, x_low)
    y_high = tl.where(y_last, y_low, y_low + 1)
    x_high = tl.where(x_last, x_low, x_low + 1)
    ly = tl.where(y_last, y_low.to(tl.float32), y) - y_low
    lx = tl.where(x_last, x_low.to(tl.float32), x) - x_low
    hy = 1.0 - ly
    hx = 1.0 - lx
    return inside, y_low, y_high, x_low, x_high, hy * hx, hy * lx, ly * hx, ly * lx


@triton.jit
def _bin(fmap, height, width, s_n, s_c, s_h, s_w, scale, roi, ph, pw, bin_ptr, channels,
         SIZE: tl.constexpr, RATIO: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_C: tl.constexpr,
         BACKWARD: tl.constexpr):
    """Bin (ph, pw) of one RoI, all channels. Forward: the mean of its sample points, written to
    ``bin_ptr``. Backward: the bin's gradient, read at ``bin_ptr``, added into ``fmap`` (the
    map's float32 gradient) at each point's four neighbours."""
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
    count = RATIO * RATIO * 1.0
    c = tl.arange(0, BLOCK_C)
    c_ok = c < channels
    base = fmap + b * s_n + c.to(tl.int64) * s_c
    if BACKWARD:
        g = tl.load(bin_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    total = tl.zeros([BLOCK_C], dtype=tl.float32)
    for iy in tl.static_range(RATIO):
        y = start_h + ph * bin_h + tl.math.div_rn((iy + 0.5) * bin_h, RATIO * 1.0)
        for ix in tl.static_range(RATIO):
            x = start_w + pw * bin_w + tl.math.div_rn((ix + 0.5) * bin_w, RATIO * 1.0)
            inside, y_low, y_high, x_low, x_high, w1, w2, w3, w4 = _sample(y, x, height, width)
            m = tl.where(inside, c_ok, False)  # (a scalar & a block fails in Triton's interpreter)
            p1 = base + y_low * s_h + x_low * s_w
            p2 = base + y_low * s_h + x_high * s_w
            p3 = base + y_high * s_h + x_low * s_w
            p4 = base + y_high * s_h + x_high * s_w
            if BACKWARD:
                tl.atomic_add(p1, tl.math.div_rn(g * w1, count), mask=m, sem="relaxed")
                tl.atomic_add(p2, tl.math.div_rn(g * w2, count), mask=m, sem="relaxed")
                tl.atomic_add(p3, tl.math.div_rn(g * w3, count), mask=m, sem="relaxed")
                tl.atomic_add(p4, tl.math.div_rn(g * w4, count), mask=m, sem="relaxed")
            else:
                v1 = tl.load(p1, mask=m, other=0.0).to(tl.float32)
                v2 = tl.load(p2, mask=m, other=0.0).to(tl.float32)
                v3 = tl.load(p3, mask=m, other=0.0).to(tl.float32)
                v4 = tl.load(p4, mask=m, other=0.0).to(tl.float32)
                total += tl.where(inside, w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4, 0.0)
    if not BACKWARD:
        total = tl.math.div_rn(total, count)
        if bin_ptr.dtype.element_ty != tl.float32:  # to nearest even, as torch's .to(); Triton's interpreter truncates
            total = total.to(bin_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        tl.store(bin_ptr + c, total, mask=c_ok)


@triton.jit
def pyramid_roi_align_kernel(
    rois, level, bins, channels,
    m0, h0, w0, n0, c0, y0, x0, sc0,
    m1, h1, w1, n1, c1, y1, x1, sc1,
    m2, h2, w2, n2, c2, y2, x2, sc2,
    m3, h3, w3, n3, c3, y3, x3, sc3,
    SIZE: tl.constexpr, RATIO: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_C: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    """Program (k, cell): bin ``cell`` of RoI ``k`` on map ``level[k]`` (each map: pointer,
    height, width, four strides, scale). ``bins`` ``[K, SIZE, SIZE, channels]`` holds the output
    (forward) or its gradient (backward, the maps then being float32 gradients)."""
    k = tl.program_id(0).to(tl.int64)
    cell = tl.program_id(1)
    ph = cell // SIZE
    pw = cell % SIZE
    roi = rois + k * 5
    bin_ptr = bins + (k * SIZE * SIZE + cell) * channels  # the bin's channels are contiguous
    lvl = tl.load(level + k)
    # each RoI reads one map: the other levels' branches are skipped, not masked
    if lvl == 0:
        _bin(m0, h0, w0, n0, c0, y0, x0, sc0, roi, ph, pw, bin_ptr, channels, SIZE, RATIO, ALIGNED, BLOCK_C, BACKWARD)
    elif lvl == 1:
        _bin(m1, h1, w1, n1, c1, y1, x1, sc1, roi, ph, pw, bin_ptr, channels, SIZE, RATIO, ALIGNED, BLOCK_C, BACKWARD)
    elif lvl == 2:
        _bin(m2, h2, w2, n2, c2, y2, x2, sc2, roi, ph, pw, bin_ptr, channels, SIZE, RATIO, ALIGNED, BLOCK_C, BACKWARD)
    else:
        _bin(m3, h3, w3, n3, c3, y3, x3, sc3, roi, ph, pw, bin_ptr, channels, SIZE, RATIO, ALIGNED, BLOCK_C, BACKWARD)
