"""Top-down pathway and lateral connections: C2..C5 -> P2..P6 (Sec. 3, Fig. 3).

Sec. 3, "Top-down pathway and lateral connections": a 1x1 lateral conv reduces each Ck
to d channels; starting from the coarsest map, the coarser map is upsampled x2
(nearest neighbour) and added element-wise to the lateral map (Fig. 3); a 3x3 conv on
each merged map gives the final Pk, "to reduce the aliasing effect of upsampling". d = 256
and the extra layers have no non-linearities. P6, used by the RPN only, is a stride-two
subsampling of P5 (Sec. 4.1).

The switches ``top_down``, ``lateral`` and ``out_levels`` give the ablations of Table 1
(Sec. 5.1.1): (c) the full FPN, (d) bottom-up pyramid, (e) top-down pyramid without
lateral connections, (f) only the finest level P2; see :class:`FPN`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}


def upsample_nearest(x: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest-neighbour upsampling to an exact ``size`` (Fig. 3, "2x up").

    The target is the finer map's size rather than a factor of 2, because a stride-2
    layer maps an odd side n to ceil(n / 2) and doubling that would overshoot by one.
    """
    return F.interpolate(x, size=tuple(size), mode="nearest")


def top_down_merge(coarser: Tensor, lateral: Tensor) -> Tensor:
    """Fig. 3 building block: upsample the coarser map x2 and add the lateral map."""
    return upsample_nearest(coarser, lateral.shape[-2:]) + lateral


def p6_from_p5(p5: Tensor) -> Tensor:
    """P6 = "simple stride two subsampling of P5" (Sec. 4.1).

    A 1x1 max-pool with stride 2 only subsamples (no window is pooled over); it is the
    same operation as torchvision's ``LastLevelMaxPool``.
    """
    return F.max_pool2d(p5, kernel_size=1, stride=2)


class FPN(nn.Module):
    """Feature Pyramid Network head over a bottom-up pathway (Sec. 3, Fig. 3).

    Args:
        in_channels: channels of the bottom-up maps, e.g. ``{"c2": 256, ..., "c5": 2048}``.
        out_channels: d, the channels of every Pk (256 in the paper).
        lateral: keep the 1x1 lateral connections. ``False`` is Table 1(e), the top-down
            pyramid without lateral connections: M5 = 1x1 conv of C5 (to reduce it to d
            channels; it is the only lateral conv kept), every finer Mk is the upsampled
            M(k+1) with no contribution from Ck (Ck only supplies the target size), and
            Pk = 3x3 conv of Mk. P2..P4 thus depend on C5 alone.
        top_down: keep the top-down additions. ``False`` is Table 1(d), the bottom-up
            pyramid: Pk = 3x3 conv(1x1 conv(Ck)), each level independent.
        out_levels: which of p2..p6 to return. ``("p2",)`` is Table 1(f), only the
            finest level, still computed through the full top-down pathway. Only the
            convs needed for the requested levels are built.

    Convs are initialised with ``kaiming_uniform_(a=1)`` and zero bias, as torchvision's
    ``FeaturePyramidNetwork``; with the same weights the two give identical outputs.
    """

    strides = STRIDES

    def __init__(
        self,
        in_channels: dict[str, int],
        out_channels: int = 256,
        lateral: bool = True,
        top_down: bool = True,
        out_levels: Sequence[str] = ("p2", "p3", "p4", "p5", "p6"),
    ) -> None:
        super().__init__()
        if not lateral and not top_down:
            raise ValueError(
                "lateral=False and top_down=False leaves no pathway from C2..C4 to the pyramid; "
                "use top_down=False for the bottom-up pyramid or lateral=False for the top-down one"
            )
        if not in_channels or not set(in_channels) <= {"c2", "c3", "c4", "c5"}:
            raise ValueError(f"in_channels keys must be among c2..c5, got {sorted(in_channels)}")
        in_levels = sorted(int(name[1:]) for name in in_channels)
        if not out_levels or any(p not in STRIDES for p in out_levels):
            raise ValueError(f"out_levels must be a non-empty subset of {tuple(STRIDES)}, got {out_levels}")
        self.lateral, self.top_down = lateral, top_down
        self.out_levels = tuple(p for p in STRIDES if p in out_levels)  # ordered p2..p6
        self.out_channels = out_channels

        # Pk computed by a 3x3 output conv; P6 needs P5.
        computed = {int(p[1:]) for p in self.out_levels if p != "p6"}
        if "p6" in self.out_levels:
            computed.add(5)
        absent = sorted(k for k in computed if k not in in_levels)
        if absent:
            raise ValueError(f"out_levels {self.out_levels} need c{absent} in in_channels, got {sorted(in_channels)}")
        self._computed = sorted(computed)
        # Merged maps Mk needed, coarse to fine: the top-down pathway runs from the
        # coarsest input down to the finest computed level.
        if top_down:
            self._merged = [k for k in reversed(in_levels) if k >= self._computed[0]]
        else:
            self._merged = sorted(computed, reverse=True)
        lateral_levels = self._merged if lateral else self._merged[:1]

        self.lateral_convs = nn.ModuleDict(
            {f"p{k}": nn.Conv2d(in_channels[f"c{k}"], out_channels, 1) for k in sorted(lateral_levels)}
        )
        self.output_convs = nn.ModuleDict(
            {f"p{k}": nn.Conv2d(out_channels, out_channels, 3, padding=1) for k in self._computed}
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        merged: dict[int, Tensor] = {}
        coarser = None
        for k in self._merged:  # coarse to fine
            c = feats[f"c{k}"]
            if coarser is None or not self.top_down:
                m = self.lateral_convs[f"p{k}"](c)
            elif self.lateral:
                m = top_down_merge(coarser, self.lateral_convs[f"p{k}"](c))
            else:
                m = upsample_nearest(coarser, c.shape[-2:])  # Ck gives only the size
            merged[k] = coarser = m
        # No non-linearity after the 3x3 conv (Sec. 3).
        pyramid = {f"p{k}": self.output_convs[f"p{k}"](merged[k]) for k in self._computed}
        if "p6" in self.out_levels:
            pyramid["p6"] = p6_from_p5(pyramid["p5"])
        return {p: pyramid[p] for p in self.out_levels}
