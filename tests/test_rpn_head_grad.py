"""The RPN head's backward at the sampled anchors (``rpn_head_grad``) gives the head's outputs
bit for bit and the dense backward's gradients to float rounding (relative 1e-5), on the head
alone and through a whole detector's training step."""
import pytest
import torch

from fpnlib.modeling import rpn_head_grad
from fpnlib.modeling.rpn import _HeadBranch

RTOL = 1e-5  # of the largest gradient entry: only the order of summation differs


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) <= RTOL * max(float(a.abs().max()), 1e-12)


def _branch_grads(monkeypatch, sparse: bool, anchors: int, loss: str, x_grad: bool = True):
    monkeypatch.setenv("FPNLIB_SPARSE_RPN_GRAD", "1" if sparse else "0")
    torch.manual_seed(0)
    branch = _HeadBranch(16, 12, anchors)
    for p in branch.parameters():
        torch.nn.init.normal_(p, std=0.3)  # the N(0, 0.01) init would leave most ReLUs at the bias
    x = torch.randn(2, 16, 9, 11, requires_grad=x_grad)
    logits, deltas = branch(x)
    flat_logits = logits.permute(0, 2, 3, 1).reshape(2, -1)
    flat_deltas = deltas.permute(0, 2, 3, 1).reshape(2, -1, 4)
    if loss == "sampled":  # as rpn_losses: a few anchors per image, the corners' among them
        idx = torch.cat([torch.tensor([0, flat_logits.shape[1] - 1]), torch.randperm(flat_logits.shape[1])[:18]])
        value = (flat_logits[:, idx] ** 2).sum() + flat_deltas[:, idx[:6]].pow(3).sum()
    elif loss == "dense":  # every position: the dense fallback
        value = (logits ** 2).sum() + deltas.sum()
    else:  # no position (a level without sampled anchors): zero gradients
        value = 0 * (logits.sum() + deltas.sum())
    value.backward()
    grads = [p.grad for p in branch.parameters()] + ([x.grad] if x_grad else [])
    return logits.detach(), deltas.detach(), grads


@pytest.mark.parametrize("anchors", [3, 15])  # FPN's 3 per level; the single-scale baselines' 15
@pytest.mark.parametrize("loss", ["sampled", "dense", "none"])
def test_same_outputs_and_gradients_as_the_dense_backward(monkeypatch, anchors, loss):
    dense = _branch_grads(monkeypatch, False, anchors, loss)
    sparse = _branch_grads(monkeypatch, True, anchors, loss)
    assert torch.equal(dense[0], sparse[0]) and torch.equal(dense[1], sparse[1])
    assert len(dense[2]) == len(sparse[2]) == 7
    for a, b in zip(dense[2], sparse[2]):
        if loss == "none":
            assert torch.equal(a, torch.zeros_like(a)) and torch.equal(b, a)
        else:
            assert a.abs().max() > 0 and _close(a, b)


def test_a_map_without_gradient_gets_none(monkeypatch):
    dense = _branch_grads(monkeypatch, False, 3, "sampled", x_grad=False)
    sparse = _branch_grads(monkeypatch, True, 3, "sampled", x_grad=False)
    assert all(_close(a, b) for a, b in zip(dense[2], sparse[2]))


def test_applies_on_cpu_float32_training_only(monkeypatch):
    x = torch.zeros(1, 2, 3, 3)
    monkeypatch.setenv("FPNLIB_SPARSE_RPN_GRAD", "1")
    assert rpn_head_grad.sparse_backward_applies(x) and "sampled anchors" in rpn_head_grad.path_note()
    assert not rpn_head_grad.sparse_backward_applies(x.double())
    with torch.no_grad():
        assert not rpn_head_grad.sparse_backward_applies(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not rpn_head_grad.sparse_backward_applies(x)
    monkeypatch.setenv("FPNLIB_SPARSE_RPN_GRAD", "0")
    assert not rpn_head_grad.sparse_backward_applies(x) and "dense" in rpn_head_grad.path_note()


def test_rejects_a_head_it_was_not_written_for():
    conv = torch.nn.Conv2d(4, 4, 3, padding=2, dilation=2)
    with pytest.raises(ValueError, match="3x3 conv with stride 1 and padding 1, and biases"):
        rpn_head_grad.head_with_sampled_backward(torch.zeros(1, 4, 5, 5), conv, torch.nn.Conv2d(4, 3, 1),
                                                 torch.nn.Conv2d(4, 12, 1))


def _detector_step(monkeypatch, sparse: bool):
    from fpnlib.bench import CONFIGS, build_pair, synthetic_batch
    from fpnlib.modeling.torchvision_interop import preprocess

    monkeypatch.setenv("FPNLIB_SPARSE_RPN_GRAD", "1" if sparse else "0")
    cfg = CONFIGS["tiny"]
    ours, _ = build_pair(cfg)
    images, targets = synthetic_batch(cfg)
    ours.rpn.generator, ours.generator = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    inputs, _ = preprocess(images, cfg.min_size, cfg.max_size)
    losses = ours(inputs, targets)
    sum(losses.values()).backward()
    return {k: float(v.detach()) for k, v in losses.items()}, {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}


def test_a_detector_trains_with_the_same_losses_and_gradients(monkeypatch):
    dense_losses, dense_grads = _detector_step(monkeypatch, False)
    sparse_losses, sparse_grads = _detector_step(monkeypatch, True)
    assert dense_losses == sparse_losses  # the forward is the same computation
    assert dense_grads.keys() == sparse_grads.keys() and any("rpn.head" in n for n in dense_grads)
    for name in dense_grads:  # the RPN head's and, through the maps, the backbone's and FPN's
        assert _close(dense_grads[name], sparse_grads[name]), name
