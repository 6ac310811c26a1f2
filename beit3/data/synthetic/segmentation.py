"""The synthetic world's per-pixel class masks, in ADE20K's layout (``beit3.data.ade20k``), so that
``beit3 finetune --task segmentation`` runs on the world as it would on ADE20K:

    ADEChallengeData2016/images/{training,validation}/NNNNNN.png       the world's train and val pictures
                                                                        (hard links where possible)
    ADEChallengeData2016/annotations/{training,validation}/NNNNNN.png  one class id a pixel: 0 the
                                                                        background (not scored, as ADE's
                                                                        "other"), k the k-th class
    ADEChallengeData2016/objectInfo150.txt                             the classes in ADE's format (Idx,
                                                                        Ratio of all pixels, Train and Val
                                                                        images holding it, Name); written last

The classes are the world's 18 ``{color}_{shape}`` (``scenes.CLASSES``), ids 1..18 in that order.
Masks are drawn from ``scenes.json`` with the pictures' own drawing code, so they cover exactly the
shapes' pixels.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from beit3.data.ade20k import CLASS_FILE, FOLDER, SPLIT_DIRS
from beit3.data.synthetic.render import draw_shape
from beit3.data.synthetic.scenes import CLASSES

CLASS_IDS = {name: k for k, name in enumerate(CLASSES, start=1)}
WORLD_SPLITS = {"train": SPLIT_DIRS["train"], "val": SPLIT_DIRS["val"]}  # the world's test split is not used


def render_mask(scene: dict) -> Image.Image:
    """(H, W) mode-L mask of a scene of ``scenes.json``: 0 background, ``CLASS_IDS`` on the shapes."""
    mask = Image.new("L", (scene["width"], scene["height"]), 0)
    draw = ImageDraw.Draw(mask)
    for o in scene["objects"]:
        draw_shape(draw, o["shape"], o["box"], CLASS_IDS[f"{o['color']}_{o['shape']}"])
    return mask


def _link(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:  # file systems without hard links
        shutil.copyfile(src, dest)


def _class_table(pixels: np.ndarray, images: dict[str, np.ndarray]) -> str:
    rows = ["Idx\tRatio\tTrain\tVal\tName"]
    share = pixels / max(int(pixels.sum()), 1)
    for k, name in enumerate(CLASSES, start=1):
        rows.append(f"{k}\t{share[k]:.4f}\t{int(images['train'][k])}\t{int(images['val'][k])}\t{name}")
    return "\n".join(rows) + "\n"


def write_segmentation(out: str | os.PathLike, scenes: list[dict]) -> int:
    """Write ``out/ADEChallengeData2016`` (replacing a previous or partial one) from the scene records
    of ``scenes.json``; returns the number of image / mask pairs."""
    out = Path(out)
    root = out / FOLDER
    if root.exists():
        shutil.rmtree(root)
    pixels = np.zeros(len(CLASSES) + 1, dtype=np.int64)
    images = {split: np.zeros(len(CLASSES) + 1, dtype=np.int64) for split in WORLD_SPLITS}
    n = 0
    for scene in (s for s in scenes if s["split"] in WORLD_SPLITS):
        folder = WORLD_SPLITS[scene["split"]]
        name = os.path.basename(scene["file"])
        for kind in ("images", "annotations"):
            (root / kind / folder).mkdir(parents=True, exist_ok=True)
        _link(out / scene["file"], root / "images" / folder / name)
        mask = render_mask(scene)
        mask.save(root / "annotations" / folder / f"{Path(name).stem}.png", compress_level=3)
        counts = np.bincount(np.asarray(mask).ravel(), minlength=len(CLASSES) + 1)
        pixels += counts
        images[scene["split"]] += counts > 0
        n += 1
    (root / CLASS_FILE).write_text(_class_table(pixels, images), encoding="utf-8")
    return n


def has_segmentation(world: str | os.PathLike) -> bool:
    """Whether ``world`` holds a complete segmentation folder (its class table is written last)."""
    return (Path(world) / FOLDER / CLASS_FILE).is_file()


__all__ = ["CLASS_IDS", "FOLDER", "has_segmentation", "render_mask", "write_segmentation"]
