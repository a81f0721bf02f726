"""The Fast R-CNN region head: RoI features -> class scores and class-specific boxes (Sec. 4.2).

Two ways to turn a pooled RoI into a feature vector, the two rows the paper compares:

* :class:`TwoFCHead`, FPN's head (Sec. 4.2): "RoI pooling to extract 7x7 features, and attach
  two hidden 1,024-d fully-connected (fc) layers (each followed by ReLU) before the final
  classification and bounding box regression layers". It is light, and randomly initialised,
  because a pyramid has no pre-trained conv5 left to use as a head (conv5 built P5).
* :class:`Conv5Head`, the ResNet Faster R-CNN baseline of Tables 2(a) and 3(a) (He et al.):
  RoIs pooled 14x14 from C4, then the whole conv5 stage (stride 2 -> 7x7), then global
  average pooling.

Both feed :class:`FastRCNNPredictor` (softmax over K+1 classes, 4 deltas per class), trained
with :func:`fast_rcnn_losses` (Fast R-CNN's multi-task loss).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import ResNet

from .backbone import RESNET_ARCH, he_init, norm_factory


def _c2_xavier_init(layer: nn.Linear) -> None:
    # Caffe2's "XavierFill" (Detectron's fc6/fc7): uniform in +-sqrt(3 / fan_in), zero bias.
    # kaiming_uniform_ with a = 1 gives exactly that bound.
    nn.init.kaiming_uniform_(layer.weight, a=1)
    nn.init.zeros_(layer.bias)


class TwoFCHead(nn.Module):
    """FPN's region head (Sec. 4.2): flatten the ``C x resolution x resolution`` RoI feature,
    then fc ``hidden`` + ReLU, fc ``hidden`` + ReLU. Input ``[R, C, r, r]``, output ``[R, hidden]``.
    """

    def __init__(self, in_channels: int, resolution: int = 7, hidden: int = 1024):
        super().__init__()
        self.fc6 = nn.Linear(in_channels * resolution * resolution, hidden)
        self.fc7 = nn.Linear(hidden, hidden)
        for layer in (self.fc6, self.fc7):
            _c2_xavier_init(layer)
        self.out_channels = hidden

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(start_dim=1)
        return F.relu(self.fc7(F.relu(self.fc6(x))))


class Conv5Head(nn.Module):
    """The conv5 head of the C4 baseline (Tables 2a, 3a): RoI features ``[R, C4 channels, 14, 14]``
    -> ResNet conv5_x (first block stride 2, so 7x7) -> global average pool -> ``[R, out_channels]``.

    ``depth``, ``width``, ``norm`` and ``gn_groups`` mean what they mean for
    :class:`~fpnlib.modeling.backbone.ResNetBackbone` (which must then be built with
    ``out_features=("c4",)``, so conv5 lives here, not in the backbone). The stage is
    torchvision's, built the way the backbone builds its stages, and its parameters are named
    ``layer4.*`` as in torchvision: an ImageNet ResNet checkpoint's ``layer4.*`` entries load
    into it with ``load_state_dict``.
    """

    def __init__(self, depth: int = 50, width: int = 64, norm: str = "frozen_bn", gn_groups: int = 32):
        super().__init__()
        if depth not in RESNET_ARCH:
            raise ValueError(f"unsupported depth {depth}; choose one of {sorted(RESNET_ARCH)}")
        block, layers = RESNET_ARCH[depth]
        norm_layer = norm_factory(norm, gn_groups)
        # torchvision's ResNet as the layer factory (see backbone.py): inplanes is the width of
        # C4, the input of conv5_x.
        factory = ResNet(block, [1, 1, 1, 1], norm_layer=norm_layer)
        factory.inplanes = width * 4 * block.expansion
        self.in_channels = factory.inplanes
        self.layer4 = factory._make_layer(block, width * 8, layers[3], stride=2)
        self.out_channels = width * 8 * block.expansion
        he_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer4(x).mean(dim=(2, 3))  # global average pooling, as ResNet's classifier


class FastRCNNPredictor(nn.Module):
    """The final sibling layers (Fast R-CNN): ``num_classes`` scores (background included, at
    index 0) and ``4 * num_classes`` class-specific box deltas, from ``[R, hidden]`` features.
    """

    def __init__(self, hidden: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(hidden, num_classes)
        self.bbox_pred = nn.Linear(hidden, 4 * num_classes)
        # Fast R-CNN's init: N(0, 0.01) for the classifier, N(0, 0.001) for the regressor (its
        # targets are small after the (10, 10, 5, 5) weights), zero biases.
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        for layer in (self.cls_score, self.bbox_pred):
            nn.init.zeros_(layer.bias)
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)  # also accepts [R, C, 1, 1]
        return self.cls_score(x), self.bbox_pred(x)


def fast_rcnn_losses(
    class_logits: Tensor,
    box_deltas: Tensor,
    labels: Tensor,
    regression_targets: Tensor,
    beta: float = 1.0,
) -> dict[str, Tensor]:
    """Fast R-CNN's multi-task loss over the sampled RoIs of a batch (Sec. 4.2 via Fast R-CNN).

    ``class_logits`` ``[R, K+1]``, ``box_deltas`` ``[R, 4(K+1)]``, ``labels`` int64 ``[R]``
    (0 = background), ``regression_targets`` ``[R, 4]`` (all images' RoIs concatenated).

    * classification: softmax cross-entropy, averaged over the R RoIs;
    * box: smooth-L1 (``beta``) between each foreground RoI's deltas *for its own class* and its
      targets; background RoIs have no box term ([u >= 1] in Fast R-CNN's Eq. 1). The sum is
      divided by R, not by the foreground count, as Fast R-CNN and Detectron: a batch with few
      foreground RoIs then does not get amplified box gradients.

    ``beta = 1`` is Fast R-CNN's smooth-L1 (and Detectron's for this head); with the targets
    weighted by (10, 10, 5, 5) it turns quadratic below a 10% offset. Without foreground the
    box loss is exactly 0, and with R = 0 both losses are 0 (a sum over nothing, not a NaN mean).
    """
    num_rois = max(labels.numel(), 1)
    loss_cls = F.cross_entropy(class_logits, labels, reduction="sum") / num_rois
    fg = torch.nonzero(labels > 0).squeeze(1)
    # [R, K+1, 4] with K+1 spelled out (a -1 is ambiguous when R = 0), then each foreground
    # RoI's row of its own class: [F, 4].
    deltas = box_deltas.reshape(box_deltas.shape[0], class_logits.shape[1], 4)[fg, labels[fg]]
    loss_box = F.smooth_l1_loss(deltas, regression_targets[fg], beta=beta, reduction="sum") / num_rois
    return {"loss_cls": loss_cls, "loss_box_reg": loss_box}
