"""The bottom-up ResNet as an image classifier: what ImageNet pre-training trains (Sec. 5).

He et al.'s ResNet classifies an image by global average pooling of C5 and one fully
connected layer. ``BackboneClassifier`` is exactly that around a ``ResNetBackbone``; after
training, ``backbone_state`` is the bottom-up pathway's weights under torchvision's names,
the file every detector of the tables starts from (``fpnlib.experiments.pretrain``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .backbone import ResNetBackbone


class BackboneClassifier(nn.Module):
    """``ResNetBackbone`` -> global average pool of C5 -> fc over ``num_classes`` (background
    included). Follows the training loop's convention: ``forward(images, targets)`` returns
    ``{"loss_cls"}`` in train mode and the logits ``[N, num_classes]`` in eval mode."""

    def __init__(self, num_classes: int, depth: int = 18, width: int = 64, norm: str = "gn"):
        super().__init__()
        # nothing frozen: pre-training is where the frozen stages of fine-tuning are learned
        self.backbone = ResNetBackbone(depth=depth, norm=norm, freeze_at=0, width=width, out_features=("c5",))
        self.fc = nn.Linear(self.backbone.out_channels["c5"], num_classes)

    def forward(self, images, targets=None):
        x = torch.stack(list(images)) if not isinstance(images, Tensor) else images
        logits = self.fc(self.backbone(x)["c5"].mean(dim=(2, 3)))
        if not self.training:
            return logits
        labels = torch.stack([t["labels"] for t in targets]).to(logits.device)
        return {"loss_cls": F.cross_entropy(logits, labels)}

    def backbone_state(self) -> dict[str, Tensor]:
        """The bottom-up pathway's weights (conv1, bn1, layer1..layer4): a torchvision-style
        ResNet state dict without ``fc``, which ``backbone.load_torchvision_resnet`` reads."""
        return {k: v.detach().clone() for k, v in self.backbone.state_dict().items()}
