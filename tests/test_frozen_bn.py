"""FrozenBN applied inside the convolution (``fpnlib.modeling.frozen_bn``) is the same function as
FrozenBN as a layer, forward and backward, and leaves parameters and state-dict keys alone."""
import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from fpnlib.modeling.backbone import ResNetBackbone
from fpnlib.modeling.fast_inference import fold_frozen_bn
from fpnlib.modeling.frozen_bn import ConvFrozenBN, FrozenBNInConv, fuse_frozen_bn


def _randomise_bn(model: nn.Module) -> None:
    # default statistics (mean 0, var 1, weight 1, bias 0) would hide a wrong scale or shift
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            for name, lo, hi in (("weight", 0.5, 1.5), ("bias", -0.2, 0.2), ("running_mean", -0.2, 0.2),
                                 ("running_var", 0.5, 1.5)):
                getattr(m, name).copy_(lo + (hi - lo) * torch.rand(m.weight.shape, generator=g))


@pytest.mark.parametrize("depth", [18, 50])
def test_fused_backbone_equals_torchvision_frozen_bn_layers(depth):
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, f"resnet{depth}")(norm_layer=FrozenBatchNorm2d)
    _randomise_bn(theirs)
    ours = ResNetBackbone(depth=depth, norm="frozen_bn", freeze_at=2)
    assert fuse_frozen_bn(ours) == {18: 20, 50: 53}[depth]  # every conv of the stem, blocks, downsamples
    assert isinstance(ours.layer1[0].conv1, ConvFrozenBN) and isinstance(ours.layer1[0].bn1, FrozenBNInConv)
    state = {k: v for k, v in theirs.state_dict().items() if not k.startswith("fc.")}
    ours.load_state_dict(state, strict=True)  # the same keys as torchvision's ResNet
    # float64: the two orders of operations agree to ~1e-11 relative, so a wrong scale or shift
    # (~1e-1) cannot hide in float32 rounding (~1e-6 here, the same size for both orders)
    ours, theirs = ours.double(), theirs.double()

    x = torch.rand(2, 3, 96, 128, dtype=torch.float64)
    c5 = ours(x)["c5"]
    t = theirs.maxpool(theirs.relu(theirs.bn1(theirs.conv1(x))))
    ref = theirs.layer4(theirs.layer3(theirs.layer2(theirs.layer1(t))))
    torch.testing.assert_close(c5, ref, rtol=1e-9, atol=1e-9 * ref.abs().max().item())

    # gradients reach the convolution weights through the scaling, as through the layer
    (c5 * torch.linspace(-1, 1, c5.numel()).reshape(c5.shape)).sum().backward()
    (ref * torch.linspace(-1, 1, ref.numel()).reshape(ref.shape)).sum().backward()
    for name, p in ours.named_parameters():
        if p.requires_grad:
            g = theirs.get_parameter(name).grad
            torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-9 * g.abs().max().item(), msg=name)
    assert ours.layer1[0].conv1.weight.grad is None  # freeze_at=2 still freezes conv2_x


def test_fusing_keeps_parameters_buffers_and_copies_consistent():
    block = torchvision.models.resnet.Bottleneck(
        64, 16, downsample=nn.Sequential(nn.Conv2d(64, 64, 1, bias=False), FrozenBatchNorm2d(64)),
        norm_layer=FrozenBatchNorm2d)
    _randomise_bn(block)
    params, keys = list(block.parameters()), list(block.state_dict())
    x = torch.rand(1, 64, 9, 11)
    before = block(x)
    assert fuse_frozen_bn(block) == 4 and fuse_frozen_bn(block) == 0  # conv1..3 + downsample; once
    assert list(block.parameters()) == params and list(block.state_dict()) == keys
    torch.testing.assert_close(block(x), before, rtol=1e-5, atol=1e-6)

    # a copy's convolutions read the copy's statistics, not the original's
    twin = copy.deepcopy(block)
    twin.bn2.running_var.mul_(4)
    assert not torch.allclose(twin(x), before, atol=1e-3)
    torch.testing.assert_close(block(x), before, rtol=1e-5, atol=1e-6)
    # loading a state dict updates what the convolutions apply
    twin.load_state_dict(block.state_dict())
    torch.testing.assert_close(twin(x), before, rtol=1e-5, atol=1e-6)


def test_inference_folding_still_applies_to_fused_backbones():
    torch.manual_seed(0)
    backbone = ResNetBackbone(depth=18, norm="frozen_bn", width=16).eval()
    _randomise_bn(backbone)
    fuse_frozen_bn(backbone)  # as after training
    x = torch.rand(1, 3, 64, 64)
    before = backbone(x)["c5"]
    folded = copy.deepcopy(backbone)
    assert fold_frozen_bn(folded) == 20  # stem + 2x8 block convs + 3 downsamples
    assert not any(isinstance(m, (ConvFrozenBN, FrozenBNInConv)) for m in folded.modules())
    torch.testing.assert_close(folded(x)["c5"], before, rtol=1e-4, atol=1e-5)


class _ConvBNToy(nn.Module):
    """A stem (conv1 -> frozen bn1) and a linear read-out, in the detection convention."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = FrozenBatchNorm2d(4)
        self.out = nn.Linear(4, 1)

    def forward(self, images, targets):
        x = self.bn1(self.conv1(torch.stack(images))).mean((2, 3))
        y = torch.stack([t["y"] for t in targets])
        return {"loss": (self.out(x)[:, 0] - y).pow(2).mean()}


def test_trainer_fuses_and_training_follows_the_same_path(tmp_path):
    """``train`` applies ``for_training``; the weights it reaches are the unfused model's, up to
    float rounding, and its checkpoint loads into an unfused model."""
    from fpnlib.engine.train import Schedule, load_checkpoint, train

    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(3, 8, 8, generator=g), {"y": torch.rand((), generator=g)}) for _ in range(8)]
    schedule = Schedule(iterations=6, batch_size=2, lr=0.1, warmup_iters=0)
    models = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = _ConvBNToy()
        _randomise_bn(model)
        start = model.conv1.weight.detach().clone()
        if not fused:  # the reference: the trainer finds nothing to fuse
            model.bn1.__class__ = type("PlainFrozenBN", (FrozenBatchNorm2d,), {})
        train(model, data, schedule, tmp_path / str(fused), progress=False)
        models.append(model)
    fused, plain = models
    assert isinstance(fused.conv1, ConvFrozenBN) and type(plain.conv1) is nn.Conv2d
    assert (fused.conv1.weight - start).abs().max() > 1e-3  # it did train
    torch.testing.assert_close(fused.conv1.weight, plain.conv1.weight, rtol=1e-5, atol=1e-6)
    fresh = _ConvBNToy()
    load_checkpoint(fresh, tmp_path / "True" / "last.pt")
    torch.testing.assert_close(fresh.conv1.weight, fused.conv1.weight, rtol=0, atol=0)
