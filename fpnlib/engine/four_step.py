"""4-step alternating training: how the RPN and Fast R-CNN come to share one backbone (Table 5).

Faster R-CNN (Ren et al., Sec. 3.2) makes the two networks share their convolutional layers
in four steps, which the FPN paper follows for its Table 5 (Sec. 5.2.3):

  1. train the RPN;
  2. train Fast R-CNN on step 1's proposals, with a backbone of its own;
  3. initialise the RPN from the detector's backbone, FREEZE the shared layers and fine-tune
     only the layers unique to the RPN (its head);
  4. keeping the shared layers frozen, fine-tune only the layers unique to Fast R-CNN (the
     2fc or conv5 head and the predictor), on the proposals of step 3's RPN.

Steps 1 and 2 are an unshared ``FasterRCNN`` (Table 3's detector); here they are its joint
training, in which the detector sees the RPN's current proposals instead of the final RPN's
(a stated deviation that saves one training run). ``share_backbone`` and ``train_shared``
are steps 3 and 4.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from torch import nn
from torch.utils.data import Dataset

from fpnlib.engine.train import Schedule, train
from fpnlib.modeling.faster_rcnn import FasterRCNN


def freeze(*modules: nn.Module | None) -> None:
    """Stop training ``modules`` (their parameters get no gradient and no optimizer slot)."""
    for m in modules:
        if m is not None:
            m.requires_grad_(False)


def share_backbone(unshared: FasterRCNN) -> FasterRCNN:
    """Step 3's starting point: one network with the detector's backbone (+ pyramid) and head and
    the trained RPN's head; the RPN's own backbone is dropped."""
    if unshared.rpn_network is None:
        raise ValueError("share_backbone takes a FasterRCNN trained with share_features=False (steps 1-2)")
    shared = FasterRCNN(replace(unshared.cfg, share_features=True), generator=unshared.generator)
    for name in ("backbone", "neck", "head", "predictor"):
        if getattr(unshared, name) is not None:
            getattr(shared, name).load_state_dict(getattr(unshared, name).state_dict())
    shared.shared_rpn.load_state_dict(unshared.rpn_network.rpn.state_dict())
    # Frozen-by-design backbone stages (``freeze_at``) stay frozen, as in the unshared model.
    for (_, p_shared), (_, p_src) in zip(shared.backbone.named_parameters(), unshared.backbone.named_parameters()):
        p_shared.requires_grad_(p_src.requires_grad)
    return shared.to(next(unshared.parameters()).device)


def train_shared(model: FasterRCNN, dataset: Dataset, rpn_schedule: Schedule, head_schedule: Schedule,
                 out_dir: str | os.PathLike, **train_kwargs) -> dict:
    """Steps 3 and 4 on a ``share_backbone`` model; checkpoints in ``out_dir/step3`` and
    ``out_dir/step4`` (each resumes like any ``train`` run). Returns both runs' summaries."""
    out_dir = Path(out_dir)
    freeze(model.backbone, model.neck)
    model.stage = "rpn"  # step 3: only the RPN head learns
    step3 = train(model, dataset, rpn_schedule, out_dir / "step3", **train_kwargs)
    freeze(model.rpn)
    model.stage = "detector"  # step 4: only the Fast R-CNN head learns, on the fixed RPN's proposals
    step4 = train(model, dataset, head_schedule, out_dir / "step4", **train_kwargs)
    model.stage = "joint"
    return {"step3": step3, "step4": step4}
