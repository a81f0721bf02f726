"""Make sure a preset's embedded data set is on disk, generating it only when needed, and only
into a folder that is new, empty or already the generator's: a user's folder is never written."""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from fpnlib.config import get_preset
from fpnlib.provenance import REPO_ROOT

STAMP = "dataset_config.json"  # the configuration of a finished generation, written last
GENERATION = "generation.json"  # how long generating the set took, for the provenance record
GENERATING = "generating.json"  # written first, removed after the stamp: an interrupted generation
SPLITS = ("train", "val")


class DataFolderError(ValueError):
    """A folder that holds no usable data set and that fpnlib will not write into."""


def default_root(preset: str, seed: int | None = None) -> Path:
    """``data/<preset>`` in the repository (git-ignored); ``data/<preset>-seed<seed>`` for another seed."""
    return REPO_ROOT / "data" / (preset if seed is None else f"{preset}-seed{seed}")


def generated_with(root: str | Path) -> dict | None:
    """The generation config stamped in ``root`` (None: not a finished generation of fpnlib's)."""
    try:
        return json.loads((Path(root) / STAMP).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _annotation_files(root: Path) -> list[Path]:
    return [root / "annotations" / f"instances_{s}.json" for s in SPLITS]


def _folder_state(root: Path) -> str:
    """``new`` (missing or empty), ``ours`` (a finished generation), ``interrupted`` (a
    generation of ours that stopped), ``coco`` (a COCO-format folder fpnlib did not make) or
    ``foreign`` (anything else)."""
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return "new"
    if (root / GENERATING).exists() or ((root / STAMP).exists() and generated_with(root) is None):
        return "interrupted"  # a torn stamp is an interrupted generation too
    if generated_with(root) is not None:
        return "ours"
    return "coco" if (root / "annotations").is_dir() else "foreign"


def _refusal(root: Path, state: str, preset: str) -> DataFolderError:
    what = {"coco": "holds a data set that fpnlib did not generate",
            "foreign": "is not empty and holds no data set (no annotations/instances_{train,val}.json)"}[state]
    return DataFolderError(f"{root}: {what}; fpnlib only writes into a new or empty folder, so it is left as it "
                           f"is: give a new folder to generate the {preset} preset's set into, or give a COCO-format "
                           f"folder (annotations/instances_train.json and instances_val.json, images in train/ and "
                           f"val/)")


def ensure_dataset(preset: str, root: str | Path | None = None, workers: int = 0,
                   progress: bool = True, force: bool = False, seed: int | None = None) -> Path:
    """Return the root of ``preset``'s generated set (with ``seed`` instead of the preset's, if
    given), generating it if it is missing or was made with another configuration (the stamp
    file records the configuration used).

    Only a folder that is new, empty or the generator's own is written: anything else raises
    ``DataFolderError``. A generated set of another configuration is regenerated in its default
    folder (``data/<preset>``, where a preset's change lands); in a folder given as ``root`` only
    with ``force``. The ``paper`` preset reads real COCO and is returned as is, never generated.
    """
    from fpnlib.data.synthetic import generate

    p = get_preset(preset) if seed is None else get_preset(preset, seed=seed)
    if p.data is None:
        return Path(root or p.coco_root)
    default = default_root(preset, seed)
    root = Path(root) if root is not None else default
    wanted, state = asdict(p.data), _folder_state(root)
    if state in ("coco", "foreign"):
        raise _refusal(root, state, preset)
    if state == "ours" and not force:
        made = generated_with(root)
        if made == wanted and all(f.exists() for f in _annotation_files(root)):
            return root
        if made != wanted and root.resolve() != default.resolve():
            changed = ", ".join(f"{k} {made.get(k)!r}" for k, v in wanted.items() if made.get(k) != v)
            raise DataFolderError(f"{root}: holds the set generated with another configuration ({changed}); "
                                  f"it is left as it is: pass --force to regenerate it as the {preset} preset's "
                                  f"(seed {wanted['seed']}), or give another folder")
    root.mkdir(parents=True, exist_ok=True)
    (root / GENERATING).write_text(json.dumps(wanted, indent=1))  # from here on the folder is ours
    (root / STAMP).unlink(missing_ok=True)
    t0 = time.perf_counter()
    generate(root, p.data, progress=progress, workers=workers)
    (root / GENERATION).write_text(json.dumps({"wall_time_s": round(time.perf_counter() - t0, 2),
                                               "workers": workers}) + "\n")
    # written last, so an interrupted generation is redone next time
    (root / STAMP).write_text(json.dumps(wanted, indent=1))
    (root / GENERATING).unlink()
    return root


def dataset_for(preset: str, root: str | Path | None = None, progress: bool = False) -> Path:
    """The data set that ``train`` / ``eval`` read: ``preset``'s own set (``ensure_dataset``), or
    the folder ``root`` when given. A given folder that holds a data set is read as it is, whatever
    made it (a set of another seed, a COCO-format folder); a new or empty one, or an interrupted
    generation, gets ``preset``'s set; anything else is refused (``DataFolderError``)."""
    if root is not None and get_preset(preset).data is not None:
        root = Path(root)
        state = _folder_state(root)
        if state in ("ours", "coco"):
            missing = [f for f in _annotation_files(root) if not f.is_file()]
            if not missing:
                return root
            if state == "coco":
                raise DataFolderError(f"{missing[0]}: annotation file not found; a data set folder holds "
                                      f"annotations/instances_train.json and instances_val.json, images in train/ "
                                      f"and val/ (the folder is left as it is)")
    return ensure_dataset(preset, root=root, progress=progress)


def generation_time(root: str | Path) -> float | None:
    """Seconds the set in ``root`` took to generate (``None`` if not recorded)."""
    path = Path(root) / GENERATION
    return json.loads(path.read_text())["wall_time_s"] if path.exists() else None
