"""Sec. 5's initialisation: every network starts from a classifier-pre-trained bottom-up ResNet.

"[The networks] are initialized by the ImageNet-1k pre-trained models" (Sec. 5, 5.1): the
bottom-up pathway, and the conv5 head of the C4 baseline (which is ResNet's own conv5 stage),
start from weights trained for image classification; the pyramid, the RPN and the region heads
start random. Here the ImageNet stand-in is a classifier of crops of the train split's objects
and background (``fpnlib.data.crops``), trained once per preset and seed with the same training
loop as every table (deterministic, resumable, a progress bar). Its bottom-up weights are kept in
``runs/<preset>/pretrain/backbone.pt`` and every row of every table loads them
(``initialise_from_pretraining``). The ``paper`` preset loads a torchvision ImageNet checkpoint
file instead (``Preset.extra["imagenet_checkpoint"]``).

Held-out accuracy is measured on crops of train-split images the classifier never saw (every
tenth image); the val split is never touched. ``results/<preset>/pretrain.json`` keeps it by
class and by object size, with provenance.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from fpnlib.config import get_preset
from fpnlib.engine.train import Schedule, derive_seed, train

HELD_OUT_EVERY = 10  # every tenth train image is held out for the classifier's accuracy
BACKBONE_FILE = "backbone.pt"


@dataclass(frozen=True)
class PretrainBudget:
    """The classifier's network (the preset's bottom-up ResNet), crop size and schedule."""

    depth: int
    width: int
    norm: str
    crop_size: int  # = Eq. (1)'s canonical size of the preset (``table2.canonical_size``)
    schedule: Schedule


def _budget(preset: str, schedule: Schedule) -> PretrainBudget:
    from fpnlib.experiments import table1, table2

    model = table1.BUDGETS[preset].model
    return PretrainBudget(model["depth"], model["width"], model["norm"], round(table2.canonical_size(preset)), schedule)


BUDGETS = {
    # about a minute on one core: what the tests pre-train (the smoke notebooks shorten it)
    "smoke": lambda: _budget("smoke", Schedule(iterations=400, batch_size=32, lr=0.02, warmup_iters=20, steps=(320,),
                                               checkpoint_every=50, log_every=10)),
    "cpu": lambda: _budget("cpu", Schedule(iterations=600, batch_size=128, lr=0.1, warmup_iters=50, steps=(480,),
                                           checkpoint_every=100, log_every=10)),
    "gpu": lambda: _budget("gpu", Schedule(iterations=3000, batch_size=256, lr=0.1, warmup_iters=200, steps=(2400,),
                                           checkpoint_every=500, log_every=20)),
}


def budget_for(preset: str) -> PretrainBudget:
    if preset not in BUDGETS:
        raise KeyError(f"preset {preset!r} is not pre-trained here; it loads an ImageNet checkpoint "
                       f"(Preset.extra['imagenet_checkpoint'])")
    return BUDGETS[preset]()


def held_out(num_images: int) -> tuple[list[int], list[int]]:
    """(training images, held-out images) of the train split, by index."""
    kept = [i for i in range(num_images) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return kept, [i for i in range(num_images) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]


@torch.no_grad()
def held_out_accuracy(model: nn.Module, crops, batch_size: int = 256) -> dict:
    """Top-1 accuracy (%) on ``crops`` overall, by class name and by COCO size bucket."""
    from fpnlib.data.crops import BACKGROUND

    model.eval()
    predicted = []
    for start in range(0, len(crops), batch_size):
        batch = [crops[i][0] for i in range(start, min(start + batch_size, len(crops)))]
        predicted.append(model(torch.stack(batch)).argmax(1))
    predicted = torch.cat(predicted)
    labels, sizes = crops.labels(), crops.sizes()
    correct = (predicted == labels).float()
    names = {BACKGROUND: "background", **{i + 1: c["name"] for i, c in enumerate(crops.split.categories)}}

    def pct(mask) -> float | None:
        return round(100.0 * float(correct[mask].mean()), 1) if bool(mask.any()) else None

    is_object = labels != BACKGROUND
    return {"accuracy": pct(torch.ones_like(correct, dtype=torch.bool)), "crops": len(crops),
            "by_class": {names[k]: pct(labels == k) for k in sorted(names)},
            "by_size": {b: pct(is_object & torch.tensor([s == b for s in sizes])) for b in ("small", "medium", "large")},
            "chance": round(100.0 / len(names), 1)}


def run_pretrain(preset: str, data_root, run_dir, out_dir=None, seed: int = 0, device: str = "cpu",
                 progress: bool = True, iterations: int | None = None) -> dict:
    """Train (or resume, or load) the preset's classifier; write ``run_dir/backbone.pt`` and, when
    ``out_dir`` is given, ``out_dir/pretrain.json``. Returns the record."""
    from fpnlib.data.coco import load_coco_split
    from fpnlib.data.crops import ObjectCrops
    from fpnlib.engine.train import shortened
    from fpnlib.modeling.classifier import BackboneClassifier
    from fpnlib.provenance import provenance

    budget = budget_for(preset)
    schedule = shortened(budget.schedule, iterations)
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    split = load_coco_split(data_root, "train", with_masks=False)
    split.check_for_training(progress=None if progress else False)  # a bad image fails now, not minutes in
    fit, kept_out = held_out(len(split))
    train_crops = ObjectCrops(split, fit, budget.crop_size, train=True, seed=derive_seed(seed, 7))
    test_crops = ObjectCrops(split, kept_out, budget.crop_size, train=False, seed=derive_seed(seed, 8))
    torch.manual_seed(derive_seed(seed, 1))
    model = BackboneClassifier(split.num_classes + 1, budget.depth, budget.width, budget.norm)
    run = train(model, train_crops, schedule, run_dir, seed=seed, device=device, progress=progress,
                description=f"pre-training ({preset})")
    torch.save(model.backbone_state(), run_dir / BACKBONE_FILE)
    record = {"step": "pre-training, the stand-in for ImageNet (Sec. 5)",
              "budget": {k: v for k, v in asdict(budget).items() if k != "schedule"} | {"schedule": asdict(schedule)},
              "train_crops": len(train_crops), "held_out_images": len(kept_out),
              "held_out": held_out_accuracy(model.to(device), test_crops),
              "train_time_s": round(run["train_time_s"], 1), "train_commits": run["commits"],
              "final_loss": run["last_losses"].get("loss_cls"),
              "provenance": provenance(preset, seed, time.perf_counter() - t0, device=str(device))}
    (run_dir / "pretrain.json").write_text(json.dumps(record, indent=1) + "\n")
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "pretrain.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def pretrained_weights(preset: str, data_root, runs_root, seed: int = 0, device: str = "cpu",
                       progress: bool = True, out_dir=None, iterations: int | None = None) -> Path:
    """The bottom-up weights every row of ``preset`` starts from: ``runs_root/pretrain/backbone.pt``
    (``pretrain-seed<k>`` for another seed, ``…-<n>it`` when ``iterations`` shortens it as it shortens
    the tables' rows), pre-trained first if missing, with ``out_dir/pretrain.json`` its record.
    ``paper``: the ImageNet checkpoint the preset names."""
    from fpnlib.engine.train import shortened

    extra = get_preset(preset).extra
    if "imagenet_checkpoint" in extra or preset not in BUDGETS:
        path = Path(extra.get("imagenet_checkpoint", ""))
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the ImageNet ResNet checkpoint (torchvision state dict) that preset "
                                    f"{preset!r} starts from is missing; put it there")
        return path
    # one folder per seed and schedule, so that a shortened run never meets the full one's checkpoint
    run_dir = Path(runs_root) / ("pretrain" + (f"-seed{seed}" if seed else "") + (f"-{iterations}it" if iterations else ""))
    path = run_dir / BACKBONE_FILE
    finished = run_dir / "pretrain.json"
    kept = json.loads(finished.read_text()) if path.exists() and finished.exists() else None
    wanted = json.loads(json.dumps(asdict(shortened(budget_for(preset).schedule, iterations))))  # as JSON keeps it
    if not (kept and kept["budget"]["schedule"] == wanted and kept["provenance"]["seed"] == seed):
        run_pretrain(preset, data_root, run_dir, out_dir, seed=seed, device=device, progress=progress,
                     iterations=iterations)
    elif out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "pretrain.json").write_text(finished.read_text())
    return path


def initialise_from_pretraining(model: nn.Module, weights) -> nn.Module:
    """Load the pre-trained bottom-up weights into every ``ResNetBackbone`` of ``model`` (a
    Faster R-CNN without shared features has two) and ResNet's conv5 stage into every
    ``Conv5Head`` (the C4 baseline's head, Sec. 5.2.1). Everything else keeps its random init."""
    from fpnlib.modeling.backbone import ResNetBackbone, load_torchvision_resnet, read_state_dict
    from fpnlib.modeling.box_head import Conv5Head

    found = 0
    for module in model.modules():
        if isinstance(module, ResNetBackbone):
            load_torchvision_resnet(module, weights)
            found += 1
        elif isinstance(module, Conv5Head):
            state = read_state_dict(weights, "ResNet checkpoint")
            module.load_state_dict({k: v for k, v in state.items() if k.startswith("layer4.")})
            found += 1
    if not found:
        raise ValueError(f"{type(model).__name__} has no ResNet backbone to initialise from {weights}")
    return model


def load_classifier(preset: str, run_dir, num_classes: int, device: str = "cpu") -> nn.Module:
    """The trained classifier of ``run_dir`` (its ``train`` checkpoint), in eval mode."""
    from fpnlib.engine.train import load_checkpoint
    from fpnlib.modeling.classifier import BackboneClassifier

    budget = budget_for(preset)
    model = BackboneClassifier(num_classes, budget.depth, budget.width, budget.norm)
    load_checkpoint(model, Path(run_dir) / "last.pt", device=device)
    return model.to(device).eval()


def initialised(model: nn.Module, weights) -> nn.Module:
    """``model`` started from the pre-trained weights ``weights`` (None: as built, random init)."""
    return model if weights is None else initialise_from_pretraining(model, weights)


def start_from(weights) -> str:
    """The name ``train`` keeps a run's initialisation under: ``random``, or the weights' sha256."""
    if weights is None:
        return "random"
    import hashlib

    return "sha256:" + hashlib.sha256(Path(weights).read_bytes()).hexdigest()


def initialisation(weights) -> dict:
    """What a row started from, for its record: the weights file and its sha256, or random."""
    if weights is None:
        return {"backbone": "random (He init)"}
    from fpnlib.provenance import shown_path

    return {"backbone": "pre-trained", "weights": shown_path(weights), "start_from": start_from(weights)}
