"""Make sure a preset's embedded data set is on disk, generating it only when needed."""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from fpnlib.config import get_preset
from fpnlib.provenance import REPO_ROOT

STAMP = "dataset_config.json"
GENERATION = "generation.json"  # how long generating the set took, for the provenance record


def default_root(preset: str) -> Path:
    """``data/<preset>`` in the repository (git-ignored)."""
    return REPO_ROOT / "data" / preset


def ensure_dataset(preset: str, root: str | Path | None = None, workers: int = 0,
                   progress: bool = True, force: bool = False) -> Path:
    """Return the root of ``preset``'s generated set, generating it if it is missing or was
    made with another configuration (the stamp file records the configuration used).

    The ``paper`` preset reads real COCO and is returned as is, never generated.
    """
    from fpnlib.data.synthetic import generate

    p = get_preset(preset)
    if p.data is None:
        return Path(root or p.coco_root)
    root = Path(root) if root is not None else default_root(preset)
    stamp = root / STAMP
    wanted = asdict(p.data)
    if not force and stamp.exists():
        try:
            if json.loads(stamp.read_text()) == wanted and all(
                    (root / "annotations" / f"instances_{s}.json").exists() for s in ("train", "val")):
                return root
        except json.JSONDecodeError:
            pass  # a broken stamp means an interrupted generation: make it again
    stamp.unlink(missing_ok=True)
    t0 = time.perf_counter()
    generate(root, p.data, progress=progress, workers=workers)
    (root / GENERATION).write_text(json.dumps({"wall_time_s": round(time.perf_counter() - t0, 2),
                                               "workers": workers}) + "\n")
    # written last, so an interrupted generation is redone next time
    stamp.write_text(json.dumps(wanted, indent=1))
    return root


def generation_time(root: str | Path) -> float | None:
    """Seconds the set in ``root`` took to generate (``None`` if not recorded)."""
    path = Path(root) / GENERATION
    return json.loads(path.read_text())["wall_time_s"] if path.exists() else None
