"""The embedded default: the synthetic world, its SentencePiece model and a tiny VQ-KD trained on
it, built once and cached so that ``beit3 pretrain --data synthetic`` needs no download."""
from __future__ import annotations

import os
from dataclasses import dataclass

from .distributed import barrier


def cache_root() -> str:
    return os.environ.get("BEIT3_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "beit3"))


@dataclass
class DemoAssets:
    world: str  # synthetic world directory
    shards: str  # pretraining shards directory (images/texts/pairs + manifest.json)
    spm: str  # SentencePiece model
    tokenizer: str  # trained VQ-KD directory


def synthetic_root(seed: int, num_images: int, image_size: int) -> str:
    """Cache folder of one synthetic world and what is built from it; keyed on the generator's
    version, so a world written by an older generator is never reused."""
    from ..data.synthetic import WORLD_VERSION
    return os.path.join(cache_root(), f"synthetic-v{WORLD_VERSION}-s{seed}-n{num_images}-px{image_size}")


def ensure_synthetic_world(world: str, seed: int, num_images: int, image_size: int, log=print) -> None:
    """Write the world into ``world`` unless a complete one (its READY marker) is there."""
    ready = os.path.join(world, "READY")
    if not os.path.isfile(ready):
        from ..data.synthetic import make_synthetic_world
        log(f"building the synthetic world in {world} (once; cached)")
        make_synthetic_world(world, num_images=num_images, image_size=image_size, seed=seed)
        open(ready, "w").close()


def demo_assets(seed: int = 0, num_images: int = 2000, image_size: int = 64, tokenizer_steps: int = 200,
                tokenizer_batch: int = 64, is_main: bool = True, log=print) -> DemoAssets:
    """Build (rank 0) or wait for (other ranks) the cached demo assets."""
    root = synthetic_root(seed, num_images, image_size)
    world = os.path.join(root, "world")
    tok_dir = os.path.join(root, f"vqkd-tiny-pixel-{tokenizer_steps}x{tokenizer_batch}")
    tok_ready = os.path.join(tok_dir, "tokenizer.pth")
    if is_main:
        from ..tokenizer.train import main as train_tokenizer_main

        ensure_synthetic_world(world, seed, num_images, image_size, log)
        if not os.path.isfile(tok_ready):
            log(f"training the tiny VQ-KD visual tokenizer on it ({tokenizer_steps} steps, once; cached)")
            # The pixel teacher (normalised pixel patches, as MaskFeat/MAE targets) gives codes that
            # carry the picture's content within a few hundred steps; HOG needs several times more.
            rc = train_tokenizer_main(["--images", os.path.join(world, "images", "train"), "--preset", "tiny",
                                       "--teacher", "pixel", "--steps", str(tokenizer_steps),
                                       "--batch-size", str(tokenizer_batch), "--output", tok_dir,
                                       "--seed", str(seed)])
            if rc != 0:
                raise RuntimeError(f"training the demo VQ-KD into {tok_dir} failed (exit code {rc})")
    barrier()
    return DemoAssets(world=world, shards=os.path.join(world, "shards"),
                      spm=os.path.join(world, "spm", "synthetic.model"), tokenizer=tok_dir)
