"""How a detector's AP grows with training: the measurement a CPU budget is chosen from.

``fast_rcnn_curve`` trains one Table 2 row (Fast R-CNN on the fixed proposals of Table 1(c)) on a
schedule of its own and scores it on val every ``every`` iterations, without disturbing the run:
every training iteration draws from seeds of its own (``fpnlib.engine.train``), so the scored run
is the run that would have been trained unscored. The record (``results/<preset>/curve_*.json``)
keeps every point with the run's time per iteration and provenance, and a budget that names it
is read against it (DEVIATIONS.md).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from fpnlib.engine.train import Schedule, derive_seed, train


def fast_rcnn_curve(preset: str, data_root, runs_root, out_path, schedule: Schedule, every: int, variant: str = "fpn",
                    seed: int = 0, device: str = "cpu", progress: bool = True, model_overrides: dict | None = None,
                    label: str = "") -> dict:
    """Train Table 2's row ``variant`` on ``schedule`` from the pre-trained backbone (pre-training and
    Table 1(c) are trained first in ``runs_root`` if missing) and record val AP every ``every``
    iterations in ``out_path``. ``model_overrides`` replace fields of the row's ``FastRCNNConfig``
    (e.g. ``freeze_at``)."""
    from fpnlib.engine.evaluate import box_ap
    from fpnlib.engine.inference import predict
    from fpnlib.experiments import table1, table2
    from fpnlib.experiments.pretrain import initialisation, initialised, pretrained_weights
    from fpnlib.provenance import provenance

    runs_root, out_path = Path(runs_root), Path(out_path)
    weights = pretrained_weights(preset, data_root, runs_root, seed=seed, device=device, progress=progress)
    table1.run_row("fpn", preset, data_root, runs_root / "table1" / "fpn", seed=seed, device=device,
                   progress=progress, pretrained=weights)
    proposals = table2.compute_fixed_proposals(preset, data_root, runs_root / "table1" / "fpn", runs_root / "table2",
                                               seed=seed, device=device, progress=progress)
    train_set = table2.split_with_proposals(preset, data_root, "train", proposals["train"], train=True)
    val_set = table2.split_with_proposals(preset, data_root, "val", proposals["val"], train=False,
                                          max_proposals=table2.light_settings(variant, preset).get("test_proposals"))
    model = table2.build_row(variant, preset, train_set.dataset.num_classes, seed)
    if model_overrides:  # the same seeded init as build_row's, with the fields replaced
        torch.manual_seed(derive_seed(seed, 1))
        model = type(model)(replace(model.cfg, **model_overrides))
    model = initialised(model, weights)
    points, t_train = [], [time.perf_counter(), 0.0]

    def score(it: int, _losses: dict) -> None:
        if (it + 1) % every and it + 1 != schedule.iterations:
            return
        t_train[1] += time.perf_counter() - t_train[0]
        model.eval()
        dets = predict(model, val_set, device=device, progress=False)
        metrics = box_ap(val_set.coco, dets, val_set.dataset.label_to_cat_id)
        model.train()
        points.append({"iteration": it + 1, "train_time_s": round(t_train[1], 1), **metrics})
        _write()
        t_train[0] = time.perf_counter()

    def _write() -> None:
        record = {"what": f"Table 2 ({variant}) val box AP against iterations{': ' + label if label else ''}",
                  "variant": variant, "schedule": asdict(schedule), "model_overrides": model_overrides or {},
                  "initialisation": initialisation(weights), "points": points,
                  "provenance": provenance(preset, seed, device=str(device))}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(record, indent=1) + "\n")

    run_dir = runs_root / "curves" / (out_path.stem)
    train(model, train_set, schedule, run_dir, seed=seed, device=device, progress=progress, resume=False,
          on_iteration=score, description=f"curve {variant}")
    return json.loads(out_path.read_text())
