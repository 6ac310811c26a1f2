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


def demo_assets(seed: int = 0, num_images: int = 2000, image_size: int = 64, tokenizer_steps: int = 200,
                tokenizer_batch: int = 64, is_main: bool = True, log=print) -> DemoAssets:
    """Build (rank 0) or wait for (other ranks) the cached demo assets."""
    root = os.path.join(cache_root(), f"synthetic-s{seed}-n{num_images}-px{image_size}")
    world = os.path.join(root, "world")
    tok_dir = os.path.join(root, f"vqkd-tiny-pixel-{tokenizer_steps}x{tokenizer_batch}")
    world_ready = os.path.join(world, "READY")
    tok_ready = os.path.join(tok_dir, "tokenizer.pth")
    if is_main and not (os.path.isfile(world_ready) and os.path.isfile(tok_ready)):
        from ..data.synthetic import make_synthetic_world
        from ..tokenizer.train import main as train_tokenizer_main

        if not os.path.isfile(world_ready):
            log(f"building the synthetic world in {world} (once; cached)")
            make_synthetic_world(world, num_images=num_images, image_size=image_size, seed=seed)
            open(world_ready, "w").close()
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
