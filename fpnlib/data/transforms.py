"""Joint image/target transforms for detection, and the batch collate function.

Every transform takes and returns ``(image, target)``; ``image`` is a float ``[C, H, W]``
tensor and ``target`` the dict of :class:`fpnlib.data.coco.CocoDetection` (or ``None`` at
inference). Boxes and masks are moved with the image so that they stay aligned.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Compose",
    "ResizeShorterSide",
    "RandomHorizontalFlip",
    "Normalize",
    "build_transforms",
    "collate_fn",
    "boxes_to_original",
]

# ImageNet RGB statistics on [0, 1] images: what torchvision's pretrained ResNets expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, target=None):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        return "Compose([" + ", ".join(map(repr, self.transforms)) + "])"


# target entries holding xyxy boxes that follow the image through resize and flip: the ground
# truth, and the fixed proposals a Fast R-CNN is trained on (Table 2)
BOX_KEYS = ("boxes", "proposals")


def _resized_hw(h: int, w: int, size: int, max_size: int | None) -> tuple[int, int]:
    scale = size / min(h, w)
    if max_size is not None and max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


class ResizeShorterSide:
    """Scale so the shorter side is ``size``, unless the longer side would pass ``max_size``.

    The paper resizes every image so its shorter side is 800 pixels (Sec. 5.1); the cap on
    the longer side (1333 in Detectron, not given in the paper) bounds memory for elongated
    images.

    The image is resized bilinearly, masks with ``nearest-exact`` (pixel centres map the same
    way as box coordinates, so masks and boxes stay aligned to well under a pixel), boxes by
    the realised per-axis factors ``(sy, sx) = (new_h / h, new_w / w)``. These are recorded,
    compounded with any earlier resize, as ``target["scale"]`` (float32 ``[2]``) along with
    ``target["size"]``; :func:`boxes_to_original` undoes them.
    """

    def __init__(self, size: int, max_size: int | None = None):
        if size <= 0 or (max_size is not None and max_size <= 0):
            raise ValueError(f"size and max_size must be positive, got {size}, {max_size}")
        self.size, self.max_size = size, max_size

    def __call__(self, image, target=None):
        h, w = image.shape[-2:]
        nh, nw = _resized_hw(h, w, self.size, self.max_size)
        # antialias=False matches torchvision's GeneralizedRCNNTransform and is faster.
        image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=False)[0]
        if target is None:
            return image, None
        target = dict(target)
        sy, sx = nh / h, nw / w
        for key in BOX_KEYS:
            if key in target:
                target[key] = target[key] * target[key].new_tensor([sx, sy, sx, sy])
        if "masks" in target:
            m = target["masks"]
            target["masks"] = (
                F.interpolate(m[None], size=(nh, nw), mode="nearest-exact")[0]
                if m.shape[0]
                else m.new_zeros((0, nh, nw))
            )
        prev = target.get("scale", torch.ones(2))
        target["scale"] = prev.to(torch.float32) * torch.tensor([sy, sx], dtype=torch.float32)
        target["size"] = torch.tensor([nh, nw], dtype=torch.int64)
        return image, target

    def __repr__(self) -> str:
        return f"ResizeShorterSide(size={self.size}, max_size={self.max_size})"


class RandomHorizontalFlip:
    """Flip image, boxes and masks left-right with probability ``p``.

    The usual augmentation of the Fast/Faster R-CNN training that FPN builds on. Draws from
    torch's global RNG, so ``torch.manual_seed`` makes it reproducible, or from ``generator``.
    """

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None):
        self.p, self.generator = p, generator

    def __call__(self, image, target=None):
        if torch.rand(1, generator=self.generator).item() >= self.p:
            return image, target
        image = image.flip(-1)
        if target is None:
            return image, None
        target = dict(target)
        w = image.shape[-1]
        for key in BOX_KEYS:
            if key in target:
                b = target[key]
                target[key] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
        if "masks" in target:
            target["masks"] = target["masks"].flip(-1)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Normalize:
    """``(image - mean) / std`` per channel; the target is untouched.

    Defaults are the ImageNet statistics that torchvision's pretrained ResNets were trained
    with. Note torchvision's own detection models (``FasterRCNN``, ``MaskRCNN``) normalise
    inside their ``GeneralizedRCNNTransform``: do not apply this twice.
    """

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)
        self._moved: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, image, target=None):
        """``image`` ``[..., 3, H, W]`` (one image or a batch)."""
        key = (image.device, image.dtype)
        if key not in self._moved:  # kept: on a GPU, each copy from the host waits for its queue
            self._moved[key] = (self.mean.to(image)[:, None, None], self.std.to(image)[:, None, None])
        mean, std = self._moved[key]
        # divided in place: a second batch-sized result costs a CPU more than the division itself
        return (image - mean).div_(std), target

    def __repr__(self) -> str:
        return f"Normalize(mean={tuple(self.mean.tolist())}, std={tuple(self.std.tolist())})"


def build_transforms(train: bool, min_size: int, max_size: int) -> Compose:
    """Resize (shorter side ``min_size``, longer at most ``max_size``), flip when training,
    normalise with ImageNet statistics."""
    ts = [ResizeShorterSide(min_size, max_size)]
    if train:
        ts.append(RandomHorizontalFlip(0.5))
    ts.append(Normalize())
    return Compose(ts)


def collate_fn(batch):
    """``[(image, target), ...]`` -> ``(images, targets)`` tuples.

    Images keep their own sizes (torchvision detection convention); the model pads them
    into one batch tensor.
    """
    return tuple(zip(*batch)) if batch else ((), ())


def boxes_to_original(boxes: torch.Tensor, target: dict) -> torch.Tensor:
    """Map ``xyxy`` boxes on the resized image back to original image pixels.

    Divides by ``target["scale"]`` (``(sy, sx)``, see :class:`ResizeShorterSide`), or, when
    absent, by ``size / orig_size``. Flips are not undone: use it on unflipped (eval) images.
    """
    if "scale" in target:
        sy, sx = (float(v) for v in target["scale"])
    else:
        (h, w), (oh, ow) = target["size"].tolist(), target["orig_size"].tolist()
        sy, sx = h / oh, w / ow
    return boxes / boxes.new_tensor([sx, sy, sx, sy])
