"""Run a trained model over a data set and hand its outputs to pycocotools (``evaluate.py``).

Outputs are mapped back to each image's original pixels, the frame of the COCO ground truth.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from fpnlib.data.transforms import boxes_to_original, collate_fn
from fpnlib.engine.evaluate import proposal_recall


@torch.no_grad()
def predict(model: nn.Module, dataset, batch_size: int = 4, device: str | torch.device = "cpu",
            workers: int = 0, progress: bool = True, desc: str = "inference", amp: bool = True) -> dict[int, dict]:
    """``{image_id: output}`` for every image of ``dataset`` (a ``CocoDetection`` with eval
    transforms); each output's ``boxes`` are in original image pixels. ``amp``: bf16 autocast
    on CUDA, as in training (a CPU runs float32 either way)."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    model.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn, num_workers=workers)
    results = {}
    for images, targets in tqdm(loader, desc=desc, disable=not progress, unit="batch"):
        images = [im.to(device) for im in images]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            if getattr(model, "uses_proposals", False):  # Fast R-CNN on fixed proposals (Table 2)
                outputs = model(images, [{"proposals": t["proposals"].to(device)} for t in targets])
            else:
                outputs = model(images)
        for out, tgt in zip(outputs, targets):
            out = {k: (v.float() if v.is_floating_point() else v).cpu() for k, v in out.items()}
            out["boxes"] = boxes_to_original(out["boxes"], tgt)
            results[int(tgt["image_id"])] = out
    return results


def evaluate_proposals(model: nn.Module, dataset, max_dets=(100, 1000), **kwargs) -> dict[str, float]:
    """Table 1's metrics (AR100, AR1k, AR1k_s/m/l, percent) of an RPN on ``dataset``."""
    outputs = predict(model, dataset, desc=kwargs.pop("desc", "proposals"), **kwargs)
    proposals = {i: (o["boxes"], o["scores"]) for i, o in outputs.items()}
    return proposal_recall(dataset.coco, proposals, max_dets=max_dets)
