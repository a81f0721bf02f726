"""COCO-format loading, validation errors and detection transforms, on tiny handmade sets."""
from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_utils

from fpnlib.data.coco import CocoDetection, CocoFormatError, CocoFormatWarning, load_coco_split
from fpnlib.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    Normalize,
    RandomHorizontalFlip,
    ResizeShorterSide,
    boxes_to_original,
    build_transforms,
    collate_fn,
)

# pycocotools' decoder trips a NumPy 2 deprecation (silenced by fpnlib.data.coco, but pytest
# re-enables DeprecationWarnings).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# ----------------------------------------------------------------------------- fixtures


def rect_mask(h, w, x1, y1, x2, y2):
    m = np.zeros((h, w), np.uint8)
    m[y1:y2, x1:x2] = 1
    return m


def uncompressed_rle(m):
    """Column-major run lengths starting with a run of zeros (COCO's uncompressed RLE)."""
    counts, cur, run = [], 0, 0
    for v in m.flatten(order="F"):
        if v == cur:
            run += 1
        else:
            counts.append(run)
            cur, run = v, 1
    counts.append(run)
    return {"counts": counts, "size": list(m.shape)}


def compressed_rle(m):
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"counts": rle["counts"].decode("ascii"), "size": list(m.shape)}


def bbox_of(m):
    ys, xs = np.nonzero(m)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


# Image 1 (40x30 RGB): a polygon, an uncompressed RLE, a compressed RLE (an L shape) and a crowd.
H1, W1 = 30, 40
POLY_MASK = rect_mask(H1, W1, 10, 5, 20, 15)
URLE_MASK = rect_mask(H1, W1, 25, 2, 35, 8)
CRLE_MASK = rect_mask(H1, W1, 2, 16, 6, 28) | rect_mask(H1, W1, 2, 24, 14, 28)
CROWD_MASK = rect_mask(H1, W1, 20, 20, 38, 29)
# Image 2 (24x20 grayscale JPEG): one polygon.
H2, W2 = 20, 24
GRAY_MASK = rect_mask(H2, W2, 2, 3, 12, 9)


def coco_dict():
    ann = lambda aid, img, cat, m, segm, crowd=0: {  # noqa: E731
        "id": aid, "image_id": img, "category_id": cat, "bbox": bbox_of(m),
        "area": float(m.sum()), "iscrowd": crowd, "segmentation": segm,
    }
    return {
        "images": [
            {"id": 7, "file_name": "empty.png", "width": 16, "height": 12},
            {"id": 1, "file_name": "rgb.png", "width": W1, "height": H1},
            {"id": 2, "file_name": "gray.jpg", "width": W2, "height": H2},
        ],
        "annotations": [
            ann(101, 1, 1, POLY_MASK, [[10, 5, 20, 5, 20, 15, 10, 15]]),
            ann(102, 1, 3, URLE_MASK, uncompressed_rle(URLE_MASK)),
            ann(103, 1, 7, CRLE_MASK, compressed_rle(CRLE_MASK)),
            ann(104, 1, 7, CROWD_MASK, uncompressed_rle(CROWD_MASK), crowd=1),
            ann(201, 2, 3, GRAY_MASK, [[2, 3, 12, 3, 12, 9, 2, 9]]),
        ],
        # Non-contiguous and out of order, as in COCO.
        "categories": [{"id": 7, "name": "seven"}, {"id": 1, "name": "one"}, {"id": 3, "name": "three"}],
    }


def write_set(tmp_path, d=None, raw=None):
    """Write the three images and the annotation file (``d``, or ``raw`` text); return paths."""
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (H1, W1, 3), dtype=np.uint8)).save(img_dir / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (H2, W2), dtype=np.uint8), mode="L").save(img_dir / "gray.jpg")
    Image.fromarray(rng.integers(0, 256, (12, 16, 4), dtype=np.uint8), mode="RGBA").save(img_dir / "empty.png")
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(raw if raw is not None else json.dumps(coco_dict() if d is None else d))
    return img_dir, ann_file


@pytest.fixture
def ds(tmp_path):
    return CocoDetection(*write_set(tmp_path))


# ----------------------------------------------------------------------------- loading


def test_labels_contiguous_and_mapped_back(ds):
    assert ds.cat_ids == [1, 3, 7]
    assert ds.cat_id_to_label == {1: 1, 3: 2, 7: 3}
    assert ds.label_to_cat_id == {1: 1, 2: 3, 3: 7}
    assert ds.num_classes == 3
    assert [c["name"] for c in ds.categories] == ["one", "three", "seven"]
    _, t = ds[ds.ids.index(1)]
    assert t["labels"].dtype == torch.int64
    assert t["labels"].tolist() == [1, 2, 3, 3]
    assert [ds.label_to_cat_id[l] for l in t["labels"].tolist()] == [1, 3, 7, 7]


def test_ids_sorted_and_image_fields(ds):
    assert ds.ids == [1, 2, 7] and len(ds) == 3
    img, t = ds[0]
    assert img.dtype == torch.float32 and img.shape == (3, H1, W1)
    assert 0.0 <= img.min() and img.max() <= 1.0
    assert t["image_id"].dtype == torch.int64 and t["image_id"].ndim == 0 and t["image_id"].item() == 1
    assert t["orig_size"].tolist() == [H1, W1] and t["size"].tolist() == [H1, W1]
    assert t["area"].dtype == torch.float32
    assert t["area"].tolist() == [float(m.sum()) for m in (POLY_MASK, URLE_MASK, CRLE_MASK, CROWD_MASK)]


def test_boxes_converted_xywh_to_xyxy(ds):
    _, t = ds[0]
    assert t["boxes"].dtype == torch.float32
    assert t["boxes"].tolist() == [[10, 5, 20, 15], [25, 2, 35, 8], [2, 16, 14, 28], [20, 20, 38, 29]]


def test_masks_decoded_from_polygon_and_both_rles(ds):
    _, t = ds[0]
    assert t["masks"].dtype == torch.uint8 and t["masks"].shape == (4, H1, W1)
    for got, drawn in zip(t["masks"].numpy(), (POLY_MASK, URLE_MASK, CRLE_MASK, CROWD_MASK)):
        np.testing.assert_array_equal(got, drawn)


def test_crowd_kept_and_flagged(ds):
    _, t = ds[0]
    assert t["iscrowd"].dtype == torch.int64 and t["iscrowd"].tolist() == [0, 0, 0, 1]


def test_grayscale_image_becomes_three_channels(ds):
    img, t = ds[1]
    assert img.shape == (3, H2, W2)
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
    np.testing.assert_array_equal(t["masks"][0].numpy(), GRAY_MASK)


def test_image_without_annotations_gives_empty_shapes(ds):
    img, t = ds[2]  # also RGBA, converted to RGB
    assert img.shape == (3, 12, 16)
    assert t["boxes"].shape == (0, 4) and t["boxes"].dtype == torch.float32
    assert t["labels"].shape == (0,) and t["labels"].dtype == torch.int64
    assert t["iscrowd"].shape == (0,) and t["area"].shape == (0,)
    assert t["masks"].shape == (0, 12, 16) and t["masks"].dtype == torch.uint8


def test_without_masks_segmentation_not_needed(tmp_path):
    d = coco_dict()
    del d["annotations"][0]["segmentation"]
    ds = CocoDetection(*write_set(tmp_path, d), with_masks=False)
    _, t = ds[0]
    assert "masks" not in t and t["boxes"].shape == (4, 4)


def test_boxes_clipped_to_image(tmp_path):
    d = coco_dict()
    d["annotations"][4]["bbox"] = [-3, 15, 10, 10]  # image 2 is 24x20
    ds = CocoDetection(*write_set(tmp_path, d))
    _, t = ds[1]
    assert t["boxes"].tolist() == [[0, 15, 7, 20]]


def test_coco_index_built_silently(tmp_path, capsys):
    ds = CocoDetection(*write_set(tmp_path))
    assert capsys.readouterr().out == ""
    assert sorted(ds.coco.getAnnIds(imgIds=[1])) == [101, 102, 103, 104]
    assert ds.coco.getAnnIds(imgIds=[7]) == []


def test_load_coco_split_layout(tmp_path):
    (tmp_path / "annotations").mkdir()
    img_dir, ann_file = write_set(tmp_path)
    img_dir.rename(tmp_path / "val2017")
    ann_file.rename(tmp_path / "annotations" / "instances_val2017.json")
    ds = load_coco_split(tmp_path, "val2017")
    assert len(ds) == 3 and ds[0][0].shape == (3, H1, W1)
    with pytest.raises(CocoFormatError, match="instances_train2017.json"):
        load_coco_split(tmp_path, "train2017")


# ----------------------------------------------------------------------------- validation


def expect_error(tmp_path, mutate=None, *fragments, raw=None, with_masks=True):
    d = coco_dict()
    if mutate is not None:
        mutate(d)
    img_dir, ann_file = write_set(tmp_path, d, raw=raw)
    with pytest.raises(CocoFormatError) as exc:
        CocoDetection(img_dir, ann_file, with_masks=with_masks)
    msg = str(exc.value)
    assert str(ann_file) in msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_error_missing_annotation_file(tmp_path):
    with pytest.raises(CocoFormatError, match="cannot read annotation file") as exc:
        CocoDetection(tmp_path, tmp_path / "nope.json")
    assert "nope.json" in str(exc.value)


def test_error_malformed_json(tmp_path):
    expect_error(tmp_path, None, "malformed JSON", "line 2, column", raw='{"images": [\n  , ]}')


def test_error_top_level_not_object(tmp_path):
    expect_error(tmp_path, None, "top level must be a JSON object", raw="[1, 2]")


def test_error_missing_top_level_key(tmp_path):
    expect_error(tmp_path, lambda d: d.pop("categories"), "missing top-level key 'categories'")


def test_error_image_missing_key(tmp_path):
    expect_error(tmp_path, lambda d: d["images"][1].pop("width"), "images[1]", "missing key 'width'")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_error_image_size_not_finite(tmp_path, bad):
    # json reads NaN and Infinity; they must be refused by name, not fail on int()
    expect_error(tmp_path, lambda d: d["images"][2].update(width=bad), "image 2", "invalid width")


@pytest.mark.parametrize("bad", [7, "", None], ids=["number", "empty", "null"])
def test_error_file_name_not_a_path(tmp_path, bad):
    expect_error(tmp_path, lambda d: d["images"][1].update(file_name=bad), "image 1", "file_name")


def test_error_annotation_missing_key(tmp_path):
    expect_error(tmp_path, lambda d: d["annotations"][2].pop("bbox"), "id 103", "missing key 'bbox'")


def test_error_annotation_missing_segmentation_with_masks(tmp_path):
    expect_error(tmp_path, lambda d: d["annotations"][0].pop("segmentation"), "id 101", "'segmentation'")


def test_error_category_missing_id(tmp_path):
    expect_error(tmp_path, lambda d: d["categories"][2].pop("id"), "categories[2]", "missing key 'id'")


def test_error_bbox_not_four_numbers(tmp_path):
    def mutate(d):
        d["annotations"][1]["bbox"] = [1, 2, 3]

    expect_error(tmp_path, mutate, "annotation 102", "expected 4 numbers")


def test_error_duplicate_image_ids(tmp_path):
    expect_error(tmp_path, lambda d: d["images"][2].update(id=1), "duplicate image id 1")


def test_error_unknown_image_id(tmp_path):
    expect_error(tmp_path, lambda d: d["annotations"][3].update(image_id=42), "annotation 104", "unknown image id 42")


def test_error_unknown_category_id(tmp_path):
    expect_error(tmp_path, lambda d: d["annotations"][4].update(category_id=2), "annotation 201", "unknown category id 2")


def test_error_rle_size_differs_from_image(tmp_path):
    def mutate(d):
        d["annotations"][1]["segmentation"]["size"] = [H1 + 1, W1]

    expect_error(tmp_path, mutate, "annotation 102", "RLE of size")


def image_error(tmp_path, damage):
    img_dir, ann_file = write_set(tmp_path)
    damage(img_dir / "rgb.png")
    ds = CocoDetection(img_dir, ann_file)
    with pytest.raises(CocoFormatError) as exc:
        ds[0]
    msg = str(exc.value)
    assert str(img_dir / "rgb.png") in msg and "image id 1" in msg, msg
    ds[1]  # the other images still load
    return ds, msg


def test_error_missing_image_file(tmp_path):
    _, msg = image_error(tmp_path, lambda p: p.unlink())
    assert "not found" in msg and "instances.json" in msg


def test_error_corrupt_image(tmp_path):
    _, msg = image_error(tmp_path, lambda p: p.write_bytes(np.random.default_rng(1).bytes(500)))
    assert "cannot decode image" in msg and "cannot identify image file" in msg


def test_error_empty_image_file(tmp_path):
    _, msg = image_error(tmp_path, lambda p: p.write_bytes(b""))
    assert "cannot decode image" in msg and "UnidentifiedImageError" in msg


def test_error_truncated_image(tmp_path):
    _, msg = image_error(tmp_path, lambda p: p.write_bytes(p.read_bytes()[:200]))
    assert "cannot decode image" in msg and "truncated" in msg


def test_error_image_size_mismatch(tmp_path):
    _, msg = image_error(tmp_path, lambda p: Image.new("RGB", (W1, H1 + 2)).save(p))
    assert f"{W1}x{H1 + 2}" in msg and f"says {W1}x{H1}" in msg


def test_validate_images(tmp_path):
    img_dir, ann_file = write_set(tmp_path)
    ds = CocoDetection(img_dir, ann_file)
    ds.validate_images()  # all fine: no error
    (img_dir / "gray.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(CocoFormatError, match="gray.jpg.*image id 2"):
        ds.validate_images()


def test_degenerate_boxes_dropped_with_one_warning(tmp_path):
    d = coco_dict()
    bad = copy.deepcopy(d["annotations"][0])
    for aid, bbox in [(901, [1, 1, 0, 5]), (902, [1, 1, 5, -1]), (903, [1, 1, math.nan, 3]), (904, [50, 1, 5, 5])]:
        d["annotations"].append({**bad, "id": aid, "bbox": bbox})
    img_dir, ann_file = write_set(tmp_path, d)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ds = CocoDetection(img_dir, ann_file)
    assert len(rec) == 1 and issubclass(rec[0].category, CocoFormatWarning)
    msg = str(rec[0].message)
    assert str(ann_file) in msg and "dropped 4 annotations with degenerate boxes" in msg
    assert "[901, 902, 903, 904]" in msg
    with pytest.warns(CocoFormatWarning, match="dropped 4"):
        CocoDetection(img_dir, ann_file)
    assert ds.num_dropped == 4
    assert sorted(ds.coco.anns) == [101, 102, 103, 104, 201]
    assert ds[0][1]["boxes"].shape == (4, 4)


# ----------------------------------------------------------------------------- transforms


def rect_target(h, w, rects):
    masks = torch.stack([torch.from_numpy(rect_mask(h, w, *r)) for r in rects])
    return {
        "boxes": torch.tensor(rects, dtype=torch.float32),
        "masks": masks,
        "labels": torch.ones(len(rects), dtype=torch.int64),
        "orig_size": torch.tensor([h, w]),
        "size": torch.tensor([h, w]),
    }


def assert_masks_match_boxes(target):
    for m, b in zip(target["masks"], target["boxes"]):
        if not m.any():  # allowed only for a box shrunk below a pixel (it covers no pixel centre)
            assert min(b[2] - b[0], b[3] - b[1]) < 1, b
            continue
        ys, xs = torch.nonzero(m, as_tuple=True)
        mask_box = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        assert torch.allclose(mask_box, b, atol=1.0), (mask_box, b)


@pytest.mark.parametrize(
    "h, w, size, max_size, expected",
    [
        (30, 40, 20, None, (20, 27)),  # 40 * 2/3 = 26.7: odd rounding
        (31, 47, 63, 1000, (63, 96)),  # upscale, odd sizes: 47 * 63/31 = 95.5
        (30, 90, 20, 45, (15, 45)),  # longer side capped by max_size
        (90, 30, 20, 45, (45, 15)),  # same, portrait
        (40, 40, 17, 17, (17, 17)),
    ],
)
def test_resize_sizes_and_alignment(h, w, size, max_size, expected):
    rects = [(0, 0, 5, 7), (w - 9, h - 6, w, h), (w // 3, h // 4, w // 3 + 11, h // 4 + 13)]
    img, t = ResizeShorterSide(size, max_size)(torch.rand(3, h, w), rect_target(h, w, rects))
    assert tuple(img.shape) == (3, *expected) and t["size"].tolist() == list(expected)
    assert t["masks"].shape == (3, *expected) and t["masks"].dtype == torch.uint8
    assert torch.allclose(t["scale"], torch.tensor([expected[0] / h, expected[1] / w]))
    assert_masks_match_boxes(t)
    _, tf = RandomHorizontalFlip(p=1.0)(img, t)
    assert_masks_match_boxes(tf)
    assert torch.allclose(boxes_to_original(t["boxes"], t), torch.tensor(rects, dtype=torch.float32), atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(8, 64), w=st.integers(8, 64), size=st.integers(8, 96),
    cap=st.one_of(st.none(), st.integers(8, 128)), data=st.data(),
)
def test_boxes_and_masks_stay_aligned_property(h, w, size, cap, data):
    n = data.draw(st.integers(1, 4))
    rects = []
    for _ in range(n):
        x1, y1 = data.draw(st.integers(0, w - 4)), data.draw(st.integers(0, h - 4))
        x2, y2 = data.draw(st.integers(x1 + 4, w)), data.draw(st.integers(y1 + 4, h))
        rects.append((x1, y1, x2, y2))
    tf = Compose([ResizeShorterSide(size, cap), RandomHorizontalFlip(p=1.0)])
    img, t = tf(torch.rand(3, h, w), rect_target(h, w, rects))
    nh, nw = img.shape[-2:]
    if cap is not None:
        assert max(nh, nw) <= cap
    if cap is None or max(h, w) * size / min(h, w) <= cap:
        assert min(nh, nw) == size
    assert t["masks"].shape[-2:] == (nh, nw)
    assert_masks_match_boxes(t)


def test_flip_twice_is_identity():
    img, t = torch.rand(3, 9, 13), rect_target(9, 13, [(1, 2, 6, 8), (7, 0, 13, 9)])
    flip = RandomHorizontalFlip(p=1.0)
    img1, t1 = flip(img, t)
    assert not torch.equal(img1, img) and t1["boxes"].tolist() == [[7, 2, 12, 8], [0, 0, 6, 9]]
    img2, t2 = flip(img1, t1)
    assert torch.equal(img2, img)
    assert torch.equal(t2["boxes"], t["boxes"]) and torch.equal(t2["masks"], t["masks"])
    assert torch.equal(t["boxes"], torch.tensor([[1, 2, 6, 8], [7, 0, 13, 9]], dtype=torch.float32))  # input untouched


def test_flip_probability_and_seeding():
    img = torch.arange(6.0).reshape(1, 2, 3)
    flip = RandomHorizontalFlip(p=0.5)

    def decisions(n=32):
        return [not torch.equal(flip(img, None)[0], img) for _ in range(n)]

    torch.manual_seed(3)
    a = decisions()
    torch.manual_seed(3)
    assert decisions() == a and 0 < sum(a) < len(a)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    f1, f2 = RandomHorizontalFlip(0.5, g1), RandomHorizontalFlip(0.5, g2)
    assert [torch.equal(f1(img)[0], f2(img)[0]) for _ in range(16)] == [True] * 16
    assert torch.equal(RandomHorizontalFlip(p=0.0)(img)[0], img)


def test_boxes_to_original_without_scale_uses_sizes():
    t = {"size": torch.tensor([50, 100]), "orig_size": torch.tensor([25, 40])}
    out = boxes_to_original(torch.tensor([[10.0, 10.0, 50.0, 20.0]]), t)
    assert out.tolist() == [[4.0, 5.0, 20.0, 10.0]]


def test_resize_composes_scale_and_handles_no_target():
    img, t = torch.rand(3, 20, 30), rect_target(20, 30, [(2, 2, 10, 10)])
    _, t2 = Compose([ResizeShorterSide(40), ResizeShorterSide(10)])(img, t)
    assert torch.allclose(t2["scale"], torch.tensor([0.5, 0.5]))
    assert torch.allclose(boxes_to_original(t2["boxes"], t2), t["boxes"])
    out, none = build_transforms(True, 10, 100)(img, None)
    assert out.shape == (3, 10, 15) and none is None


def test_normalize_and_build_transforms():
    img = torch.rand(3, 4, 5)
    out, t = Normalize()(img, {"x": 1})
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    assert torch.allclose(out * std + mean, img, atol=1e-6) and t == {"x": 1}
    kinds = lambda c: [type(x).__name__ for x in c.transforms]  # noqa: E731
    assert kinds(build_transforms(True, 800, 1333)) == ["ResizeShorterSide", "RandomHorizontalFlip", "Normalize"]
    assert kinds(build_transforms(False, 800, 1333)) == ["ResizeShorterSide", "Normalize"]


def test_dataset_with_transforms_keeps_alignment(tmp_path):
    img_dir, ann_file = write_set(tmp_path)
    ds = CocoDetection(img_dir, ann_file, transforms=build_transforms(False, 45, 1000))
    img, t = ds[0]  # 30x40 -> 45x60
    assert img.shape == (3, 45, 60) and t["size"].tolist() == [45, 60] and t["orig_size"].tolist() == [30, 40]
    assert t["masks"].shape == (4, 45, 60)
    assert_masks_match_boxes({k: t[k][:2] for k in ("boxes", "masks")})  # the two rectangles
    assert torch.allclose(boxes_to_original(t["boxes"], t), ds.__class__(img_dir, ann_file)[0][1]["boxes"])
    _, t_empty = ds[2]
    assert t_empty["masks"].shape == (0, 45, 60) and t_empty["boxes"].shape == (0, 4)


def test_collate_keeps_per_image_sizes(ds):
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_fn)
    images, targets = next(iter(loader))
    assert isinstance(images, tuple) and isinstance(targets, tuple)
    assert [tuple(i.shape) for i in images] == [(3, 30, 40), (3, 20, 24), (3, 12, 16)]
    assert [t["image_id"].item() for t in targets] == [1, 2, 7]
    assert collate_fn([]) == ((), ())
