"""The R-CNN box parametrization used by the RPN and Fast R-CNN heads."""
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fpnlib.modeling.box_coder import BBOX_CLAMP, clip_boxes, decode, encode

REF = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), size 10 x 20
TGT = torch.tensor([[5.0, 10.0, 25.0, 30.0]])  # centre (15, 20), size 20 x 20
LOG2 = 0.6931471805599453


def test_encode_hand_computed():
    # tx = 10/10, ty = 10/20, tw = log(20/10), th = log(20/20)
    torch.testing.assert_close(encode(REF, TGT), torch.tensor([[1.0, 0.5, LOG2, 0.0]]))
    torch.testing.assert_close(
        encode(REF, TGT, (10.0, 10.0, 5.0, 5.0)), torch.tensor([[10.0, 5.0, 5 * LOG2, 0.0]])
    )
    torch.testing.assert_close(encode(REF, REF), torch.zeros(1, 4))


def test_decode_hand_computed():
    torch.testing.assert_close(decode(torch.tensor([[1.0, 0.5, LOG2, 0.0]]), REF), TGT)
    fast_rcnn_deltas = torch.tensor([[10.0, 5.0, 5 * LOG2, 0.0]])
    torch.testing.assert_close(decode(fast_rcnn_deltas, REF, (10.0, 10.0, 5.0, 5.0)), TGT)
    # Moving by -1 width and shrinking to half size: centre (-5, 10), size 5 x 10.
    torch.testing.assert_close(
        decode(torch.tensor([[-1.0, 0.0, -LOG2, -LOG2]]), REF), torch.tensor([[-7.5, 5.0, -2.5, 15.0]])
    )


def test_clamp_prevents_inf():
    wild = torch.tensor([[0.0, 0.0, 1e4, 1e4]])
    boxes = decode(wild, REF)
    assert torch.isfinite(boxes).all()
    # Clamped at log(1000/16): the box is 62.5 x its reference, around the same centre.
    torch.testing.assert_close(boxes, torch.tensor([[5 - 312.5, 10 - 625.0, 5 + 312.5, 10 + 625.0]]))
    assert torch.isinf(decode(wild, REF, clamp=math.inf)).any()  # the clamp is what saves it
    assert BBOX_CLAMP == math.log(1000.0 / 16)
    # The clamp applies after the weights are taken out: dw = 1e4 / 5.
    boxes = decode(wild, REF, (10.0, 10.0, 5.0, 5.0))
    torch.testing.assert_close(boxes[0, 2] - boxes[0, 0], torch.tensor(625.0))


def test_decode_broadcasts_over_leading_dims():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 20.0], [5.0, 5.0, 9.0, 7.0], [-3.0, 2.0, 30.0, 4.0]])
    deltas = torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(0))
    out = decode(deltas, anchors)
    assert out.shape == (2, 5, 3, 4)
    torch.testing.assert_close(out[1, 3], decode(deltas[1, 3], anchors))


def test_clip_boxes():
    boxes = torch.tensor([[-5.0, -1.0, 50.0, 20.0], [3.0, 4.0, 5.0, 6.0]])
    torch.testing.assert_close(
        clip_boxes(boxes, (10, 40)), torch.tensor([[0.0, 0.0, 40.0, 10.0], [3.0, 4.0, 5.0, 6.0]])
    )
    assert clip_boxes(boxes[None], (10, 40)).shape == (1, 2, 4)


@st.composite
def box_pairs(draw):
    """Reference boxes and targets within the clamp's range (size ratio < 62.5)."""
    n = draw(st.integers(1, 8))
    coord = st.floats(-1000, 1000, allow_nan=False)
    side = st.floats(0.5, 800, allow_nan=False)
    log_ratio = st.floats(-4.0, 4.0, allow_nan=False)  # e^4 = 54.6 < 62.5
    refs, tgts = [], []
    for _ in range(n):
        x, y, w, h = draw(coord), draw(coord), draw(side), draw(side)
        refs.append([x, y, x + w, y + h])
        tx, ty = draw(coord), draw(coord)
        tw, th = w * math.exp(draw(log_ratio)), h * math.exp(draw(log_ratio))
        tgts.append([tx, ty, tx + tw, ty + th])
    return torch.tensor(refs, dtype=torch.float64), torch.tensor(tgts, dtype=torch.float64)


weights_st = st.tuples(*[st.floats(0.5, 20.0, allow_nan=False)] * 4)


@settings(max_examples=150, deadline=None)
@given(box_pairs(), weights_st)
def test_encode_decode_round_trip(pair, weights):
    ref, tgt = pair
    deltas = encode(ref, tgt, weights)
    torch.testing.assert_close(decode(deltas, ref, weights), tgt, rtol=1e-9, atol=1e-8)
    # And in float32, the dtype of training, within a pixel fraction.
    deltas32 = encode(ref.float(), tgt.float(), weights)
    torch.testing.assert_close(decode(deltas32, ref.float(), weights), tgt.float(), rtol=1e-4, atol=2e-2)


@settings(max_examples=100, deadline=None)
@given(box_pairs(), weights_st)
def test_decode_encode_round_trip(pair, weights):
    ref, tgt = pair
    deltas = encode(ref, tgt, weights)
    again = encode(ref, decode(deltas, ref, weights), weights)
    torch.testing.assert_close(again, deltas, rtol=1e-7, atol=1e-7)
