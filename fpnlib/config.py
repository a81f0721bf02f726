"""Named presets: plain dataclasses, one per budget.

``smoke`` is for tests and CI (seconds), ``cpu`` is the default ``make reproduce`` on a
2-core laptop, ``gpu`` is one modern GPU, ``paper`` carries the paper's settings and reads
real COCO from a path. Model and schedule fields are added by the modules that need them;
this file keeps what every part shares, starting with the data.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class DataConfig:
    """How the embedded data set is generated (``fpnlib.data.synthetic``) and resized.

    Object sides are drawn log-uniformly in ``[min_object, max_object_frac * image_size]``
    so that the set spans several octaves of scale, the regime FPN is built for (Sec. 1).
    """

    num_train: int
    num_val: int
    image_size: int  # shorter side of the generated images, px
    max_size: int  # longer side cap of the generated images, px
    min_object: float = 8.0  # smallest object side, px
    max_object_frac: float = 0.8  # largest object side as a fraction of image_size
    max_objects: int = 10  # objects per image, drawn uniformly in [1, max_objects]
    seed: int = 0


@dataclass(frozen=True)
class Preset:
    """A named budget. ``data=None`` means: read real COCO from ``coco_root``."""

    name: str
    data: DataConfig | None
    coco_root: str | None = None
    extra: dict = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "smoke": Preset("smoke", DataConfig(num_train=48, num_val=16, image_size=160, max_size=214)),
    # cpu: sized so that `make reproduce` (every table and notebook) fits 45 min on 2 cores
    "cpu": Preset("cpu", DataConfig(num_train=800, num_val=160, image_size=224, max_size=299)),
    "gpu": Preset("gpu", DataConfig(num_train=4000, num_val=500, image_size=640, max_size=854, max_objects=14)),
    # The paper trains on COCO trainval35k with shorter side 800 (Sec. 5.1); no generation.
    # ... and starts from an ImageNet ResNet-50 (torchvision's state dict file, put there by the user)
    "paper": Preset("paper", None, coco_root="data/coco", extra={"imagenet_checkpoint": "data/resnet50-imagenet.pth"}),
}


def describe_preset(name: str) -> dict:
    """Everything a preset sets, in one place: its data and, per table, the model and schedule
    (each table keeps its budgets beside its rows, as dataclasses keyed by preset name)."""
    from dataclasses import asdict

    from fpnlib.experiments import pretrain, table1, table2, table3, table5, table6

    preset = get_preset(name)
    out = {"name": name, "data": asdict(preset.data) if preset.data else {"coco_root": preset.coco_root}}
    out["pretrain"] = (asdict(pretrain.budget_for(name)) if name in pretrain.BUDGETS
                       else {"imagenet_checkpoint": preset.extra.get("imagenet_checkpoint")})
    for n, module in ((1, table1), (2, table2), (3, table3), (6, table6)):
        budget = module.BUDGETS[name]
        out[f"table{n}"] = {"model": budget.model, "schedule": asdict(budget.schedule),
                            "row_lr": getattr(module, "ROW_LR", {}).get(name, {})}
    out["table5"] = {"steps_3_4": [asdict(table5.BUDGETS[name].rpn), asdict(table5.BUDGETS[name].head)]}
    return out


def get_preset(name: str, **overrides) -> Preset:
    """Return the preset ``name``; keyword overrides replace its data fields."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[name]
    if overrides:
        if preset.data is None:
            raise ValueError(f"preset {name!r} reads real COCO; it has no generated data to override")
        preset = replace(preset, data=replace(preset.data, **overrides))
    return preset
