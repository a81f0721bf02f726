"""Figure 1 of the paper, measured: four ways to get multi-scale features, and what each costs.

(a) featurized image pyramid: the whole network runs on every scale of an image pyramid;
    strong features at every scale, but compute and memory grow with the number of scales.
(b) single feature map: one pass, only the coarsest map (C5) is used; fast, one scale.
(c) pyramidal feature hierarchy (SSD-style): one pass, every stage's map is used; free, but
    the fine maps (C2, C3) are semantically weak.
(d) feature pyramid network: one pass plus a light top-down pathway with lateral connections;
    strong features at every scale for little extra cost (Sec. 1, Fig. 1).

``measure_figure1`` runs one forward pass of each on the same image and reports the median
wall time and the memory of the activations (on CUDA the allocator's peak; on CPU, where
torch keeps no peak statistic, the bytes of every layer's output summed up).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fpnlib.modeling.backbone import ResNetBackbone
from fpnlib.modeling.fpn import FPN

ARCHITECTURES = {
    "a": "featurized image pyramid",
    "b": "single feature map (C5)",
    "c": "pyramidal feature hierarchy (C2-C5)",
    "d": "feature pyramid network (P2-P6)",
}
IMAGE_PYRAMID_SCALES = (0.5, 1.0, 2.0)  # one octave either side: a common test-time pyramid

# The network measured per preset: the paper's ResNet-50 with d = 256 where a run can afford
# it; a small one for the seconds-long smoke preset.
NETWORKS = {
    "smoke": dict(depth=18, width=16, fpn_channels=32),
    "cpu": dict(depth=50, width=64, fpn_channels=256),
    "gpu": dict(depth=50, width=64, fpn_channels=256),
    "paper": dict(depth=50, width=64, fpn_channels=256),
}


def figure1_forward(arch: str, backbone: ResNetBackbone, fpn: FPN, image: Tensor,
                    scales=IMAGE_PYRAMID_SCALES) -> dict[str, Tensor]:
    """The maps architecture ``arch`` ("a".."d") produces for a ``[N, 3, H, W]`` batch."""
    if arch == "a":
        maps = {}
        for s in scales:
            x = image if s == 1.0 else F.interpolate(image, scale_factor=s, mode="bilinear", align_corners=False)
            maps.update({f"{name}@{s:g}x": m for name, m in backbone(x).items()})
        return maps
    feats = backbone(image)
    if arch == "b":
        return {"c5": feats["c5"]}
    if arch == "c":
        return feats
    if arch == "d":
        return fpn(feats)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")


def activation_bytes(model: nn.Module, run: Callable[[], object]) -> int:
    """Bytes of every leaf module's output during ``run()``: the activations a forward pass
    creates (what a training pass would keep for backward), independent of the allocator."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        for t in output.values() if isinstance(output, dict) else (output if isinstance(output, (tuple, list)) else (output,)):
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return total


@torch.no_grad()
def measure_figure1(image: Tensor, depth: int = 50, width: int = 64, fpn_channels: int = 256,
                    repeats: int = 5, seed: int = 0, device: str = "cpu") -> dict[str, dict]:
    """Median time (s), activation memory (MB) and the maps of one forward pass per architecture."""
    torch.manual_seed(seed)
    backbone = ResNetBackbone(depth=depth, width=width, norm="frozen_bn", freeze_at=0).to(device).eval()
    fpn = FPN(backbone.out_channels, out_channels=fpn_channels).to(device).eval()
    both = nn.ModuleDict({"backbone": backbone, "fpn": fpn})
    image = image.to(device)
    cuda = torch.device(device).type == "cuda"
    results = {}
    for arch, name in ARCHITECTURES.items():
        def run(arch=arch):
            return figure1_forward(arch, backbone, fpn, image)

        run()  # warm-up
        times = []
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            maps = run()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            run()
            mem = torch.cuda.max_memory_allocated()
        else:
            mem = activation_bytes(both, run)
        results[arch] = {
            "name": name,
            "time_s": statistics.median(times),
            "memory_mb": mem / 2**20,
            "memory_kind": "CUDA peak allocated" if cuda else "sum of layer outputs",
            "maps": {k: tuple(v.shape[1:]) for k, v in maps.items()},
        }
    return results


def run_figure1(preset: str, image: Tensor, out_dir, repeats: int = 5, seed: int = 0, device: str = "cpu") -> dict:
    """``measure_figure1`` with the preset's network; writes ``out_dir/figure1.json`` with provenance."""
    import json
    from pathlib import Path

    from fpnlib.provenance import provenance

    t0 = time.perf_counter()
    results = measure_figure1(image, repeats=repeats, seed=seed, device=device, **NETWORKS[preset])
    record = {"figure": 1, "network": NETWORKS[preset], "image_hw": list(image.shape[-2:]),
              "scales_of_a": list(IMAGE_PYRAMID_SCALES), "repeats": repeats, "results": results,
              "provenance": provenance(preset, seed, time.perf_counter() - t0, device=str(device),
                                       threads=torch.get_num_threads())}
    out = Path(out_dir) / "figure1.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    return record
