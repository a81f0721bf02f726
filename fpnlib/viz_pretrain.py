"""What the stand-in for ImageNet pre-training learned (notebook 01): held-out crops with the
classifier's answers, and where in a crop its C5 features respond (class activation maps)."""
from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure

from fpnlib.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def _show(crop: torch.Tensor) -> np.ndarray:
    """A normalised ``[3, S, S]`` crop back to an RGB image in [0, 1]."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (crop * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


@torch.no_grad()
def class_activation(model, crop: torch.Tensor) -> tuple[int, np.ndarray]:
    """The predicted class of ``crop`` and its class activation map (Zhou et al. 2016): the fc
    weights of that class applied to C5 at every position, upsampled to the crop, in [0, 1]."""
    model.eval()
    c5 = model.backbone(crop[None])["c5"][0]  # [C, h, w]
    logits = model.fc(c5.mean(dim=(1, 2)))
    label = int(logits.argmax())
    cam = torch.einsum("c,chw->hw", model.fc.weight[label], c5)
    cam = torch.nn.functional.interpolate(cam[None, None], size=crop.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = (cam - cam.min()) / (cam.max() - cam.min()).clamp(min=1e-6)
    return label, cam.numpy()


def plot_crops_and_activations(model, crops, names: dict[int, str], count: int = 8, seed: int = 0) -> Figure:
    """``count`` held-out crops (drawn by ``seed``): top row the crop with true / predicted class
    (green right, red wrong), bottom row where the predicted class's evidence lies."""
    picks = np.random.default_rng(seed).choice(len(crops), size=min(count, len(crops)), replace=False)
    fig = Figure(figsize=(1.5 * len(picks), 3.4), layout="constrained")
    axes = fig.subplots(2, len(picks), squeeze=False)
    for k, i in enumerate(picks):
        crop, target = crops[int(i)]
        label, cam = class_activation(model, crop)
        truth = int(target["labels"])
        axes[0, k].imshow(_show(crop))
        axes[0, k].set_title(f"{names[truth]}\n→ {names[label]}", fontsize=7, color="green" if label == truth else "red")
        axes[1, k].imshow(_show(crop))
        axes[1, k].imshow(cam, cmap="inferno", alpha=0.55)
        for ax in axes[:, k]:
            ax.set_axis_off()
    fig.suptitle("held-out crops: true → predicted (top); where the predicted class's C5 evidence lies (bottom)",
                 fontsize=8)
    return fig
