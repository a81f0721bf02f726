"""Bottom-up pathway (ResNetBackbone) and FPN head (Sec. 3, Fig. 3, Table 1 ablations)."""
import copy
import math

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops import FrozenBatchNorm2d as TorchvisionFrozenBN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from fpnlib.modeling.backbone import ResNetBackbone, load_torchvision_resnet
from fpnlib.modeling.fpn import FPN, p6_from_p5, top_down_merge
from fpnlib.modeling.frozen_bn import FrozenBatchNorm2d

STRIDES = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}
ODD = (67, 93)


def _ceil_size(hw, stride):
    return tuple(math.ceil(s / stride) for s in hw)


@pytest.fixture(scope="module")
def r18_odd_feats():
    """Real backbone outputs for an odd-sized 67x93 input (R18 at width 16)."""
    torch.manual_seed(0)
    backbone = ResNetBackbone(depth=18, width=16, freeze_at=0).eval()
    with torch.no_grad():
        return backbone(torch.randn(2, 3, *ODD))


# --------------------------------------------------------------------- backbone


@pytest.mark.parametrize(
    "depth,width,hw",
    [(18, 64, (64, 64)), (18, 64, ODD), (50, 64, (64, 64)), (50, 16, ODD)],
)
def test_backbone_shapes_and_strides(depth, width, hw):
    backbone = ResNetBackbone(depth=depth, width=width).eval()
    expansion = 1 if depth == 18 else 4
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, *hw))
    assert list(feats) == ["c2", "c3", "c4", "c5"]
    assert backbone.strides == STRIDES
    for i, (name, f) in enumerate(feats.items()):
        channels = width * 2**i * expansion
        assert backbone.out_channels[name] == channels
        assert f.shape == (1, channels, *_ceil_size(hw, STRIDES[name]))


@pytest.mark.parametrize(
    "depth,width,expected",
    [
        (18, 64, (64, 128, 256, 512)),
        (34, 32, (32, 64, 128, 256)),
        (50, 64, (256, 512, 1024, 2048)),
        (50, 16, (64, 128, 256, 512)),
        (101, 32, (128, 256, 512, 1024)),
    ],
)
def test_backbone_out_channels(depth, width, expected):
    backbone = ResNetBackbone(depth=depth, width=width)
    assert tuple(backbone.out_channels.values()) == expected
    # the built convs really have those widths (not just the advertised dict)
    last_convs = [[m for m in getattr(backbone, f"layer{i}").modules() if isinstance(m, nn.Conv2d)][-1] for i in range(1, 5)]
    assert tuple(c.out_channels for c in last_convs) == expected
    assert backbone.conv1.out_channels == width


def test_backbone_stops_after_last_needed_stage():
    backbone = ResNetBackbone(depth=18, width=16, out_features=("c4",))
    assert not hasattr(backbone, "layer4")
    assert not any(name.startswith("layer4") for name, _ in backbone.named_parameters())
    ran = []
    for i in (1, 2, 3):
        getattr(backbone, f"layer{i}").register_forward_hook(lambda *_, i=i: ran.append(i))
    feats = backbone(torch.randn(1, 3, 64, 64))
    assert list(feats) == ["c4"] and feats["c4"].shape == (1, 64, 4, 4)
    assert ran == [1, 2, 3]
    assert backbone.out_channels == {"c4": 64} and backbone.strides == {"c4": 16}


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 3, 5])
def test_freeze_at(freeze_at):
    backbone = ResNetBackbone(depth=18, width=16, norm="bn", freeze_at=freeze_at)
    frozen_prefixes = (["conv1.", "bn1."] if freeze_at >= 1 else []) + [f"layer{i}." for i in range(1, freeze_at)]
    for name, p in backbone.named_parameters():
        assert p.requires_grad == (not name.startswith(tuple(frozen_prefixes))), name
    # frozen BN statistics must not drift in train mode either
    backbone.train()
    if freeze_at >= 2:
        assert not backbone.layer1[0].bn1.training and not backbone.bn1.training
    assert backbone.layer4[0].bn1.training == (freeze_at < 5)


def test_frozen_bn_has_no_trainable_norm_params():
    backbone = ResNetBackbone(depth=50, width=16, norm="frozen_bn", freeze_at=0)
    norms = [m for m in backbone.modules() if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d, nn.GroupNorm))]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    assert not any(p.requires_grad for m in norms for p in m.parameters())
    # every trainable parameter is a conv weight
    conv_weights = {id(m.weight) for m in backbone.modules() if isinstance(m, nn.Conv2d)}
    assert {id(p) for p in backbone.parameters() if p.requires_grad} == conv_weights


@pytest.mark.parametrize("norm,cls", [("bn", nn.BatchNorm2d), ("gn", nn.GroupNorm), ("frozen_bn", FrozenBatchNorm2d)])
def test_norm_variants_build_and_run(norm, cls):
    backbone = ResNetBackbone(depth=18, width=16, norm=norm, freeze_at=0, gn_groups=32)
    norms = [m for m in backbone.modules() if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d, nn.GroupNorm))]
    assert norms and all(type(m) is cls for m in norms)
    if norm == "gn":
        for m in norms:
            assert m.num_channels % m.num_groups == 0 and m.num_groups == min(32, m.num_channels)
    feats = backbone(torch.randn(2, 3, 64, 64))
    assert feats["c5"].shape == (2, 128, 2, 2)
    with pytest.raises(ValueError):
        ResNetBackbone(depth=18, norm="syncbn")


# ------------------------------------------------------------------ checkpoint


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """A seeded torchvision resnet18 with non-trivial BN statistics, saved to disk.

    Default BN state (mean 0, var 1, weight 1, bias 0) equals FrozenBatchNorm2d's defaults,
    so the BN tensors are randomised to make a failed BN key mapping visible.
    """
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("ckpt") / "resnet18.pth"
    torch.save(net.state_dict(), path)
    return net.eval(), path


def test_load_torchvision_checkpoint_matches_torchvision(resnet18_file, tmp_path):
    net, path = resnet18_file
    backbone = ResNetBackbone(depth=18, norm="frozen_bn").eval()
    load_torchvision_resnet(backbone, path)
    # float64 so that the 1e-5 bound tests the weights, not float32 rounding of
    # BatchNorm2d vs FrozenBatchNorm2d arithmetic (|C5| reaches ~20 here)
    net, backbone = copy.deepcopy(net).double(), backbone.double()
    x = torch.randn(1, 3, 64, 80, dtype=torch.float64)
    with torch.no_grad():
        ref = net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))))))
        out = backbone(x)["c5"]
    assert (out - ref).abs().max() < 1e-5
    # also through a {"model": ...} wrapper, into a C3-only backbone (layer3/4 keys ignored)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": torch.load(path, weights_only=True)}, wrapped)
    small = ResNetBackbone(depth=18, out_features=("c3",)).eval().double()
    load_torchvision_resnet(small, wrapped)
    with torch.no_grad():
        assert (small(x)["c3"] - net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))))).abs().max() < 1e-5


def test_load_checkpoint_width_mismatch_names_file(resnet18_file):
    _, path = resnet18_file
    with pytest.raises(ValueError, match="resnet18.pth") as err:
        load_torchvision_resnet(ResNetBackbone(depth=18, width=32), path)
    assert "shape" in str(err.value) and "conv1.weight" in str(err.value)
    with pytest.raises(ValueError, match="missing keys"):  # R18 file into an R50
        load_torchvision_resnet(ResNetBackbone(depth=50, width=64), path)


def test_load_checkpoint_missing_or_corrupt_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_torchvision_resnet(ResNetBackbone(depth=18, width=16), missing)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="corrupt.pth"):
        load_torchvision_resnet(ResNetBackbone(depth=18, width=16), corrupt)


# ------------------------------------------------------------------------ FPN


def test_fpn_shapes_square():
    torch.manual_seed(0)
    in_channels = {"c2": 16, "c3": 32, "c4": 64, "c5": 128}
    feats = {k: torch.randn(2, c, 64 // s, 64 // s) for (k, c), s in zip(in_channels.items(), STRIDES.values())}
    out = FPN(in_channels, out_channels=32)(feats)
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
    for p, f in out.items():
        assert f.shape == (2, 32, 64 // FPN.strides[p], 64 // FPN.strides[p])


def test_fpn_shapes_odd_and_p6(r18_odd_feats):
    fpn = FPN({k: v.shape[1] for k, v in r18_odd_feats.items()}, out_channels=32)
    out = fpn(r18_odd_feats)
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
    for p, f in out.items():
        assert f.shape == (2, 32, *_ceil_size(ODD, FPN.strides[p])), p
    assert torch.equal(out["p6"], out["p5"][..., ::2, ::2])
    assert torch.equal(p6_from_p5(out["p5"]), out["p6"])


def test_fpn_equals_torchvision(r18_odd_feats):
    torch.manual_seed(0)
    names = list(r18_odd_feats)
    in_channels = {k: v.shape[1] for k, v in r18_odd_feats.items()}
    ref = FeaturePyramidNetwork(list(in_channels.values()), 32, extra_blocks=LastLevelMaxPool()).eval()
    fpn = FPN(in_channels, out_channels=32)
    with torch.no_grad():
        for i, c in enumerate(names):
            p = "p" + c[1:]
            fpn.lateral_convs[p].load_state_dict(ref.inner_blocks[i][0].state_dict())
            fpn.output_convs[p].load_state_dict(ref.layer_blocks[i][0].state_dict())
        ours = fpn(r18_odd_feats)
        theirs = ref(dict(r18_odd_feats))
    assert list(theirs) == names + ["pool"]
    for c in names:
        assert (ours["p" + c[1:]] - theirs[c]).abs().max() < 1e-5
    assert (ours["p6"] - theirs["pool"]).abs().max() < 1e-5


def test_fpn_init_like_torchvision():
    fpn = FPN({"c2": 8, "c3": 8, "c4": 8, "c5": 8}, out_channels=16)
    convs = [m for m in fpn.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 8 and all(torch.all(c.bias == 0) for c in convs)
    # kaiming_uniform_(a=1): bound = sqrt(6 / ((1 + 1) * fan_in)) = sqrt(3 / fan_in)
    bound = math.sqrt(3 / (16 * 9))
    w = fpn.output_convs["p2"].weight
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound


def _grad_of_p2(fpn, feats):
    feats = {k: v.clone().requires_grad_(True) for k, v in feats.items()}
    out = fpn(feats)
    grads = torch.autograd.grad(out["p2"].sum(), list(feats.values()), allow_unused=True)
    return {k: g is not None and bool(g.abs().sum() > 0) for k, g in zip(feats, grads)}


def test_ablation_connections_by_gradient(r18_odd_feats):
    in_channels = {k: v.shape[1] for k, v in r18_odd_feats.items()}
    torch.manual_seed(0)
    full = _grad_of_p2(FPN(in_channels, 16), r18_odd_feats)
    assert full == {"c2": True, "c3": True, "c4": True, "c5": True}  # top-down carries C5 to P2
    no_lateral = _grad_of_p2(FPN(in_channels, 16, lateral=False), r18_odd_feats)  # Table 1(e)
    assert no_lateral == {"c2": False, "c3": False, "c4": False, "c5": True}
    bottom_up = _grad_of_p2(FPN(in_channels, 16, top_down=False), r18_odd_feats)  # Table 1(d)
    assert bottom_up == {"c2": True, "c3": False, "c4": False, "c5": False}
    with pytest.raises(ValueError):
        FPN(in_channels, 16, lateral=False, top_down=False)


def test_finest_level_only(r18_odd_feats):
    in_channels = {k: v.shape[1] for k, v in r18_odd_feats.items()}
    fpn = FPN(in_channels, 16, out_levels=("p2",))  # Table 1(f)
    out = fpn(r18_odd_feats)
    assert list(out) == ["p2"] and out["p2"].shape == (2, 16, *_ceil_size(ODD, 4))
    assert list(fpn.output_convs) == ["p2"]
    assert _grad_of_p2(fpn, r18_odd_feats)["c5"]  # still the full top-down pathway
    assert list(FPN(in_channels, 16, out_levels=("p5", "p3"))(r18_odd_feats)) == ["p3", "p5"]


def test_top_down_merge_odd_sizes_nearest():
    coarser = torch.arange(15.0).reshape(1, 1, 3, 5)
    lateral = torch.ones(1, 1, 5, 9)
    expected = torch.tensor(
        [
            [0, 0, 1, 1, 2, 2, 3, 3, 4],
            [0, 0, 1, 1, 2, 2, 3, 3, 4],
            [5, 5, 6, 6, 7, 7, 8, 8, 9],
            [5, 5, 6, 6, 7, 7, 8, 8, 9],
            [10, 10, 11, 11, 12, 12, 13, 13, 14],
        ],
        dtype=torch.float32,
    )
    out = top_down_merge(coarser, lateral)
    assert out.shape == lateral.shape
    assert torch.equal(out[0, 0], expected + 1)
    # an exact x2 case replicates every coarse pixel into a 2x2 block
    assert torch.equal(top_down_merge(coarser, torch.zeros(1, 1, 6, 10))[0, 0, ::2, ::2], coarser[0, 0])


def _frozen_pair(channels: int = 8, seed: int = 0):
    """fpnlib's frozen BN and torchvision's, with the same random statistics."""
    ours, theirs = FrozenBatchNorm2d(channels), TorchvisionFrozenBN(channels)
    g = torch.Generator().manual_seed(seed)
    values = {n: torch.randn(channels, generator=g) for n in ("weight", "bias", "running_mean")}
    values["running_var"] = torch.rand(channels, generator=g) + 0.1
    for m in (ours, theirs):
        for n, v in values.items():
            getattr(m, n).copy_(v)
    return ours, theirs


def test_frozen_bn_keeps_torchvisions_outputs_and_gradients_bit_for_bit():
    ours, theirs = _frozen_pair()
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    for _ in range(2):  # the second forward reads the kept scale and shift
        y_ours, y_theirs = ours(x), theirs(x)
        assert torch.equal(y_ours, y_theirs)
        g = torch.randn_like(y_ours)
        assert torch.equal(torch.autograd.grad(y_ours, x, g)[0], torch.autograd.grad(y_theirs, x, g)[0])
    assert ours._affine_key is not None  # it was kept


def test_frozen_bn_follows_every_change_of_its_buffers():
    ours, theirs = _frozen_pair()
    x = torch.randn(2, 8, 5, 5)
    ours(x)
    # an in-place edit, a state dict, another eps, another dtype: each seen at the next forward
    with torch.no_grad():
        ours.running_mean.add_(1.0)
        theirs.running_mean.add_(1.0)
    assert torch.equal(ours(x), theirs(x))
    other, _ = _frozen_pair(seed=1)
    ours.load_state_dict(other.state_dict())
    theirs.load_state_dict(other.state_dict())
    assert torch.equal(ours(x), theirs(x))
    ours.eps = theirs.eps = 1e-3
    assert torch.equal(ours(x), theirs(x))
    ours.double(), theirs.double()
    assert torch.equal(ours(x.double()), theirs(x.double()))


def test_frozen_bn_under_inference_mode_leaves_training_working():
    ours, theirs = _frozen_pair()
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    with torch.inference_mode():
        assert torch.equal(ours(x.detach()), theirs(x.detach()))
    y = ours(x)  # nothing kept from inference mode: a training forward saves for backward
    y.sum().backward()
    assert torch.equal(x.grad, theirs.weight.reshape(1, -1, 1, 1).expand_as(x)
                       * (theirs.running_var + theirs.eps).rsqrt().reshape(1, -1, 1, 1))


def test_frozen_bn_compiles_in_one_graph():
    """Under ``torch.compile`` (``bench --compile``) the kept affine map is skipped: its cache key
    (storage addresses, version counters) cannot be traced, and graph breaks there made Dynamo
    recompile per layer until it gave up and ran the rest eagerly."""
    import torch._dynamo as dynamo

    ours, theirs = _frozen_pair()
    x = torch.randn(2, 8, 5, 5)
    ours(x)  # a kept map from an eager forward must not leak into the graph either
    explained = dynamo.explain(ours)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    assert torch.equal(torch.compile(ours, backend="eager")(x), theirs(x))
