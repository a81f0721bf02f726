"""The RPN head's backward at the sampled anchors only (not in the paper; speed, same math).

The RPN loss (Sec. 4.1; Faster R-CNN Eq. 1) reads the head's outputs at the sampled anchors
only: 256 per image, of the ~10^5 anchors of a pyramid. The gradient of the head's outputs is
therefore zero at every other position, and so are those positions' contributions to the
gradients of the head's weights and of the pyramid maps. A dense convolution backward still
computes all of them: the 3x3 conv's backward over every level of the pyramid, P2's included,
for sums of zeros (the measured gain: ``results/bench/ab/README.md``).

Here the head's forward runs as before (same kernels, same numbers; no autograd graph), and
its backward is computed at the positions whose output gradient is not zero:

* the 3x3 input patches of those positions are gathered from the map, the saved hidden
  activations read at them (the ReLU mask is the forward's own);
* weight gradients are sums over those positions (``g^T @ patches``), the map's gradient is
  the patches' gradient added back in place (``index_add_``).

Dropping terms that are exactly zero changes no sum; only the order of summation differs from
the convolution kernel's, so gradients agree to float rounding (``tests/test_rpn_head_grad.py``:
relative difference < 1e-5 on the head and on a whole detector's parameters). Where most
positions carry a gradient (a loss over the dense maps), the backward falls back to the
convolution's own. Used on CPUs in float32 (``_HeadBranch`` in ``rpn.py``); on CUDA the dense
backward is kept (unmeasured there, and finding the positions would make the host wait).
``FPNLIB_SPARSE_RPN_GRAD=0`` turns it off, for A/B runs.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

# above this share of positions with a gradient, the dense convolution backward is cheaper
DENSE_FRACTION = 0.25


def _switched_on() -> bool:
    return os.environ.get("FPNLIB_SPARSE_RPN_GRAD", "1") != "0"


def sparse_backward_applies(x: Tensor) -> bool:
    """Whether the head's backward on ``x`` should run at the sampled positions only."""
    return (torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and _switched_on())


def path_note() -> str:
    """The RPN head's backward on a CPU, for benchmark records."""
    if _switched_on():
        return "RPN head backward at the sampled anchors only (rpn_head_grad)"
    return "RPN head backward dense (FPNLIB_SPARSE_RPN_GRAD=0)"


def _head(x, w3, b3, wo, bo, wd, bd) -> tuple[Tensor, Tensor, Tensor]:
    """The head's hidden activations, logits and deltas (``rpn._HeadBranch.forward``'s ops)."""
    hidden = F.relu(F.conv2d(x, w3, b3, padding=1))
    return hidden, F.conv2d(hidden, wo, bo), F.conv2d(hidden, wd, bd)


def _dense_grads(ctx, g_logits: Tensor, g_deltas: Tensor):
    """The convolution backward of the whole head (recomputes the forward with a graph)."""
    x, hidden, w3, b3, wo, bo, wd, bd = ctx.saved_tensors
    inputs = [t.detach().requires_grad_(need) for t, need in zip((x, w3, b3, wo, bo, wd, bd), ctx.needs_input_grad)]
    with torch.enable_grad():
        _, *outs = _head(*inputs)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(outs, wanted, (g_logits, g_deltas), allow_unused=True))
    return tuple(next(grads) if t.requires_grad else None for t in inputs)


class _HeadSampledBackward(torch.autograd.Function):
    """3x3 conv + ReLU + sibling 1x1 convs (``rpn._HeadBranch``); backward at the positions
    whose output gradient is not zero."""

    @staticmethod
    def forward(ctx, x, w3, b3, wo, bo, wd, bd):
        hidden, logits, deltas = _head(x, w3, b3, wo, bo, wd, bd)
        ctx.save_for_backward(x, hidden, w3, b3, wo, bo, wd, bd)
        return logits, deltas

    @staticmethod
    def backward(ctx, g_logits, g_deltas):
        x, hidden, w3, b3, wo, bo, wd, bd = ctx.saved_tensors
        n, c, h, w = x.shape
        g_logits = torch.zeros((n, wo.shape[0], h, w), dtype=x.dtype) if g_logits is None else g_logits
        g_deltas = torch.zeros((n, wd.shape[0], h, w), dtype=x.dtype) if g_deltas is None else g_deltas
        go = g_logits.permute(0, 2, 3, 1).reshape(-1, wo.shape[0])  # rows: positions (image, y, x)
        gd = g_deltas.permute(0, 2, 3, 1).reshape(-1, wd.shape[0])
        where = torch.nonzero((go != 0).any(1) | (gd != 0).any(1)).squeeze(1)
        if where.numel() > DENSE_FRACTION * go.shape[0]:
            return _dense_grads(ctx, g_logits, g_deltas)
        if where.numel() == 0:  # no sampled anchor on this level: zeros, as the dense backward gives
            return tuple(torch.zeros_like(t) if need else None
                         for t, need in zip((x, w3, b3, wo, bo, wd, bd), ctx.needs_input_grad))
        go, gd = go[where], gd[where]
        image, y, x_ = where // (h * w), where // w % h, where % w
        t = hidden.permute(0, 2, 3, 1)[image, y, x_]  # [S, hidden]: the forward's activations
        g_wo, g_bo = go.t() @ t, go.sum(0)
        g_wd, g_bd = gd.t() @ t, gd.sum(0)
        g_pre = (go @ wo.flatten(1) + gd @ wd.flatten(1)) * (t > 0)  # through the ReLU
        # the 3x3 patches of those positions, (dy, dx, channel) per row, from the zero-padded map
        padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)
        k = torch.arange(3)
        rows, cols = (y[:, None] + k)[:, :, None], (x_[:, None] + k)[:, None, :]  # [S, 3, 1], [S, 1, 3]
        patches = padded[image[:, None, None], rows, cols].reshape(len(where), 9 * c)
        w3_rows = w3.permute(0, 2, 3, 1).reshape(w3.shape[0], -1)  # [hidden, (dy, dx, channel)]
        g_w3 = (g_pre.t() @ patches).view(w3.shape[0], 3, 3, c).permute(0, 3, 1, 2)
        g_x = None
        if ctx.needs_input_grad[0]:
            flat = (image[:, None, None] * (h + 2) + rows) * (w + 2) + cols  # rows of padded [N*(H+2)*(W+2), C]
            g_padded = x.new_zeros((n * (h + 2) * (w + 2), c))
            g_padded.index_add_(0, flat.reshape(-1), (g_pre @ w3_rows).view(-1, c))
            g_x = g_padded.view(n, h + 2, w + 2, c)[:, 1:-1, 1:-1].permute(0, 3, 1, 2)
        return g_x, g_w3, g_pre.sum(0), g_wo.view_as(wo), g_bo, g_wd.view_as(wd), g_bd


def head_with_sampled_backward(x: Tensor, conv: torch.nn.Conv2d, objectness: torch.nn.Conv2d,
                               deltas: torch.nn.Conv2d) -> tuple[Tensor, Tensor]:
    """``objectness(relu(conv(x))), deltas(relu(conv(x)))``, bit for bit as the modules give
    them, with the backward of this module's docstring. ``conv``: 3x3, stride 1, padding 1."""
    if conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1) or conv.groups != 1 \
            or conv.dilation != (1, 1) or any(m.bias is None for m in (conv, objectness, deltas)):
        raise ValueError(f"the sampled backward needs a 3x3 conv with stride 1 and padding 1, and biases; got {conv}")
    return _HeadSampledBackward.apply(x, conv.weight, conv.bias, objectness.weight, objectness.bias,
                                      deltas.weight, deltas.bias)
