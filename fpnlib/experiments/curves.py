"""How a row's metric grows with training: the measurement a CPU budget is chosen from.

``learning_curve`` trains a model on a schedule of its own and scores it on val every ``every``
iterations, without disturbing the run: every training iteration draws from seeds of its own
(``fpnlib.engine.train``), so the scored run is the run that would have been trained unscored.
``rpn_curve`` does it for a Table 1 row (AR), ``fast_rcnn_curve`` for a Table 2 row (box AP, on the
fixed proposals of Table 1(c)); both start from the pre-trained backbone, as the tables do. The
record (``results/<preset>/curve_*.json``) keeps every point with the training time it took and
provenance; a budget that names it is read against it (DEVIATIONS.md).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch

from fpnlib.engine.train import Schedule, derive_seed, train


def learning_curve(model, train_set, score: Callable[[object], dict], schedule: Schedule, every: int, out_path,
                   run_dir, what: dict, seed: int = 0, device: str = "cpu", progress: bool = True,
                   start_from: str = "random") -> dict:
    """Train ``model`` on ``train_set`` with ``schedule`` in ``run_dir`` (from scratch) and record
    ``score(model)`` (in eval mode) every ``every`` iterations and at the end, with the training
    seconds so far, in ``out_path``; ``what`` describes the run in the record."""
    from fpnlib.provenance import provenance

    out_path = Path(out_path)
    points, clock = [], {"since": time.perf_counter(), "train_s": 0.0}
    # the code version and time the run started with (the record is rewritten after every point)
    started = provenance(what.get("preset", ""), seed, device=str(device), torch_threads=torch.get_num_threads())

    def write() -> None:
        record = dict(what, schedule=asdict(schedule), points=points, provenance=started)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(record, indent=1) + "\n")

    def on_iteration(it: int, _losses: dict) -> None:
        done = it + 1
        if done % every and done != schedule.iterations:
            return
        clock["train_s"] += time.perf_counter() - clock["since"]
        model.eval()
        points.append({"iteration": done, "train_time_s": round(clock["train_s"], 1), **score(model)})
        model.train()
        write()
        clock["since"] = time.perf_counter()

    train(model, train_set, schedule, run_dir, seed=seed, device=device, progress=progress, resume=False,
          on_iteration=on_iteration, description=f"curve {out_path.stem}", start_from=start_from)
    return json.loads(out_path.read_text())


def _overridden(model, overrides: dict | None, seed: int):
    """``model`` rebuilt with ``overrides`` of its config, from the same seeded init as ``build_row``'s."""
    if not overrides:
        return model
    torch.manual_seed(derive_seed(seed, 1))
    return type(model)(replace(model.cfg, **overrides))


def rpn_curve(preset: str, data_root, runs_root, out_path, schedule: Schedule, every: int, variant: str = "fpn",
              seed: int = 0, device: str = "cpu", progress: bool = True, model_overrides: dict | None = None) -> dict:
    """AR of Table 1's row ``variant`` against iterations (pre-trained first in ``runs_root`` if missing)."""
    from fpnlib.config import get_preset
    from fpnlib.data.coco import load_coco_split
    from fpnlib.data.transforms import build_transforms
    from fpnlib.engine.inference import evaluate_proposals
    from fpnlib.experiments import table1
    from fpnlib.experiments.pretrain import initialisation, initialised, pretrained_weights, start_from

    weights = pretrained_weights(preset, data_root, runs_root, seed=seed, device=device, progress=progress)
    data = get_preset(preset).data
    sizes = (data.image_size, data.max_size)
    train_set = load_coco_split(data_root, "train", transforms=build_transforms(True, *sizes), with_masks=False)
    val_set = load_coco_split(data_root, "val", transforms=build_transforms(False, *sizes), with_masks=False)
    model = _overridden(table1.build_row(variant, preset, seed), model_overrides, seed)
    model = initialised(model, weights)
    what = {"what": f"Table 1 ({variant}) val AR against iterations", "preset": preset, "variant": variant,
            "model_overrides": model_overrides or {}, "initialisation": initialisation(weights)}
    return learning_curve(model, train_set, lambda m: evaluate_proposals(m, val_set, device=device, progress=False),
                          schedule, every, out_path, Path(runs_root) / "curves" / Path(out_path).stem, what, seed,
                          device, progress, start_from(weights))


def fast_rcnn_curve(preset: str, data_root, runs_root, out_path, schedule: Schedule, every: int, variant: str = "fpn",
                    seed: int = 0, device: str = "cpu", progress: bool = True, model_overrides: dict | None = None) -> dict:
    """Box AP of Table 2's row ``variant`` against iterations, on the fixed proposals of Table 1(c)
    (pre-training and Table 1(c) are trained first in ``runs_root`` if missing). ``model_overrides``
    replace fields of the row's ``FastRCNNConfig`` (e.g. ``freeze_at``)."""
    from fpnlib.engine.evaluate import box_ap
    from fpnlib.engine.inference import predict
    from fpnlib.experiments import table1, table2
    from fpnlib.experiments.pretrain import initialisation, initialised, pretrained_weights, start_from

    runs_root = Path(runs_root)
    weights = pretrained_weights(preset, data_root, runs_root, seed=seed, device=device, progress=progress)
    table1.run_row("fpn", preset, data_root, runs_root / "table1" / "fpn", seed=seed, device=device,
                   progress=progress, pretrained=weights)
    proposals = table2.compute_fixed_proposals(preset, data_root, runs_root / "table1" / "fpn", runs_root / "table2",
                                               seed=seed, device=device, progress=progress)
    train_set = table2.split_with_proposals(preset, data_root, "train", proposals["train"], train=True)
    val_set = table2.split_with_proposals(preset, data_root, "val", proposals["val"], train=False,
                                          max_proposals=table2.light_settings(variant, preset).get("test_proposals"))
    model = _overridden(table2.build_row(variant, preset, train_set.dataset.num_classes, seed), model_overrides, seed)
    model = initialised(model, weights)

    def score(m) -> dict:
        return box_ap(val_set.coco, predict(m, val_set, device=device, progress=False), val_set.dataset.label_to_cat_id)

    what = {"what": f"Table 2 ({variant}) val box AP against iterations", "preset": preset, "variant": variant,
            "model_overrides": model_overrides or {}, "initialisation": initialisation(weights)}
    return learning_curve(model, train_set, score, schedule, every, out_path, runs_root / "curves" / Path(out_path).stem,
                          what, seed, device, progress, start_from(weights))
