"""The embedded default: the synthetic world, its SentencePiece model and a tiny VQ-KD trained on
it, built once and cached so that ``beit3 pretrain --data synthetic`` needs no download."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..files import cache_root, read_json
from . import world as _world
from .segmentation import has_segmentation, write_segmentation


@dataclass
class DemoAssets:
    world: str  # synthetic world directory
    shards: str  # pretraining shards directory (images/texts/pairs + manifest.json)
    spm: str  # SentencePiece model
    tokenizer: str  # trained VQ-KD directory


def synthetic_root(seed: int, num_images: int, image_size: int) -> str:
    """Cache folder of one synthetic world and what is built from it; keyed on the generator's
    version, so a world written by an older generator is never reused."""
    return os.path.join(cache_root(), f"synthetic-v{_world.WORLD_VERSION}-s{seed}-n{num_images}-px{image_size}")


def ensure_synthetic_world(world: str, seed: int, num_images: int, image_size: int, log=print) -> None:
    """Write the world into ``world`` unless a complete one (its READY marker) is there."""
    ready = os.path.join(world, "READY")
    if not os.path.isfile(ready):
        log(f"building the synthetic world in {world} (once; cached)")
        _world.make_synthetic_world(world, num_images=num_images, image_size=image_size, seed=seed)
        open(ready, "w").close()


def demo_assets(seed: int = 0, num_images: int = 2000, image_size: int = 64, tokenizer_steps: int = 200,
                tokenizer_batch: int = 64, build: bool = True, log=print) -> DemoAssets:
    """The cached demo assets, built first when ``build`` (rank 0 builds; the other ranks pass
    ``build=False`` and wait at a barrier of their own before using the paths)."""
    root = synthetic_root(seed, num_images, image_size)
    world = os.path.join(root, "world")
    tok_dir = os.path.join(root, f"vqkd-tiny-pixel-{tokenizer_steps}x{tokenizer_batch}")
    if build:
        ensure_synthetic_world(world, seed, num_images, image_size, log)
        from ..tokenizer.vqkd import trained_weights
        if trained_weights(tok_dir) is None:
            log(f"training the tiny VQ-KD visual tokenizer on it ({tokenizer_steps} steps, once; cached)")
            _train_demo_tokenizer(os.path.join(world, "images", "train"), tok_dir, tokenizer_steps,
                                  tokenizer_batch, seed)
    return DemoAssets(world=world, shards=os.path.join(world, "shards"),
                      spm=os.path.join(world, "spm", "synthetic.model"), tokenizer=tok_dir)


def finetune_world(seed: int = 0, num_images: int = 2000, image_size: int = 64, build: bool = True,
                   log=print) -> DemoAssets:
    """The cached world of ``demo_assets`` (so a model pretrained there fits its vocabulary) with its
    fine-tuning index files and segmentation masks, written once when ``build``; ``tokenizer`` is
    left empty."""
    from ..data.downstream import build_all_indexes

    world = os.path.join(synthetic_root(seed, num_images, image_size), "world")
    spm = os.path.join(world, "spm", "synthetic.model")
    if build:
        ensure_synthetic_world(world, seed, num_images, image_size, log)
        if not os.path.isfile(os.path.join(world, "INDEXES_READY")):
            log(f"writing the fine-tuning index files into {world} (once)")
            build_all_indexes(os.path.join(world, "raw"), world, spm, seed=seed, rest_val_images=num_images // 20)
            open(os.path.join(world, "INDEXES_READY"), "w").close()
        if not has_segmentation(world):  # a world cached before the masks existed
            log(f"writing the segmentation masks into {world} (once)")
            write_segmentation(world, read_json(os.path.join(world, "scenes.json"))["images"])
    return DemoAssets(world=world, shards=os.path.join(world, "shards"), spm=spm, tokenizer="")


def _train_demo_tokenizer(images: str, out_dir: str, steps: int, batch_size: int, seed: int) -> None:
    from ..tokenizer.teachers import build_teacher
    from ..tokenizer.train import train_tokenizer
    from ..tokenizer.vqkd import VQKDConfig

    grid = VQKDConfig.from_preset("tiny")
    # The pixel teacher (normalised pixel patches, as MaskFeat/MAE targets) gives codes that carry
    # the picture's content within a few hundred steps; HOG needs several times more.
    teacher = build_teacher("pixel", None, grid=grid.grid_size, img_size=grid.img_size)
    config = VQKDConfig.from_preset("tiny", teacher_dim=teacher.dim)
    train_tokenizer(images, config, teacher, steps, batch_size, output_dir=out_dir, seed=seed,
                    min_crop_scale=0.5)
