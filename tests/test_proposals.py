"""Fixed proposals: saved and read back, errors naming the file, resized and flipped with the image."""
from __future__ import annotations

import pytest
import torch

from fpnlib.data.coco import load_coco_split
from fpnlib.data.proposals import WithProposals, load_proposals, save_proposals
from fpnlib.data.transforms import Compose, RandomHorizontalFlip, ResizeShorterSide


def _fake(ds):
    """Each image's ground-truth boxes (original pixels) as proposals, plus one low-scored box."""
    out = {}
    for img_id in ds.ids:
        anns = ds.coco.imgToAnns[img_id]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes = torch.cat([boxes, torch.tensor([[0.0, 0.0, 5.0, 5.0]])])
        out[img_id] = (boxes, torch.cat([torch.ones(len(boxes) - 1), torch.zeros(1)]))
    return out


def test_round_trip_and_missing_images(smoke_root, tmp_path):
    ds = load_coco_split(smoke_root, "val", with_masks=False)
    props = _fake(ds)
    path = save_proposals(tmp_path / "p.pt", props, rpn="fpn", preset="smoke")
    back, meta = load_proposals(path, image_ids=ds.ids)
    assert meta == {"rpn": "fpn", "preset": "smoke"}
    assert all(torch.equal(back[i][0], props[i][0]) for i in props)
    partial = dict(list(props.items())[1:])
    save_proposals(tmp_path / "partial.pt", partial)
    with pytest.raises(ValueError, match=r"partial\.pt: no proposals for 1 image"):
        load_proposals(tmp_path / "partial.pt", image_ids=ds.ids)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_proposals(tmp_path / "nope.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"broken\.pt: not a readable proposals file"):
        load_proposals(tmp_path / "broken.pt")


@pytest.mark.parametrize("proposals, problem", [
    ({1: (torch.tensor([[0.0, 0.0, float("nan"), 5.0]]), torch.ones(1))}, "image 1 has non-finite boxes"),
    ({1: (torch.tensor([[0.0, 0.0, 5.0, 5.0]]), torch.tensor([float("inf")]))}, "image 1 has non-finite boxes or scores"),
    ({1: (torch.tensor([[6.0, 0.0, 5.0, 5.0]]), torch.ones(1))}, r"image 1 has boxes with x2 < x1"),
    ({1: torch.zeros(1, 4)}, r"image 1 has no \(boxes, scores\) pair"),
    ([torch.zeros(1, 4)], "'proposals' is a list"),
], ids=["nan-box", "inf-score", "flipped-box", "no-pair", "not-a-dict"])
def test_bad_contents_are_named(tmp_path, proposals, problem):
    torch.save({"meta": {}, "proposals": proposals}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=rf"bad\.pt: {problem}"):
        load_proposals(tmp_path / "bad.pt")


def test_proposals_follow_resize_and_flip(smoke_root):
    ds = load_coco_split(smoke_root, "val", with_masks=False)
    tf = Compose([ResizeShorterSide(240, 400), RandomHorizontalFlip(p=1.0)])
    wrapped = WithProposals(ds, _fake(ds), transforms=tf, max_proposals=1000)
    checked = 0
    for i in range(len(wrapped)):
        image, target = wrapped[i]
        n = len(target["boxes"])
        if n == 0 or bool(target["iscrowd"].any()):
            continue
        # the proposals were the ground truth: they must still be, after resize and flip
        assert torch.allclose(target["proposals"][:n], target["boxes"], atol=1e-4)
        assert target["proposals"][:, 2].max() <= image.shape[-1] + 1e-4
        checked += 1
    assert checked >= 5
    with pytest.raises(ValueError, match="without transforms"):
        WithProposals(load_coco_split(smoke_root, "val", transforms=tf, with_masks=False), _fake(ds))


def test_top_proposals_by_score_are_kept(smoke_root):
    ds = load_coco_split(smoke_root, "val", with_masks=False)
    props = _fake(ds)
    _, target = WithProposals(ds, props, max_proposals=1)[0]
    boxes, scores = props[int(target["image_id"])]
    assert torch.equal(target["proposals"], boxes[scores.argmax()][None])
