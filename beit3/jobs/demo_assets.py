"""The embedded default: the synthetic world, its SentencePiece model and a tiny VQ-KD trained on
it, built once and cached so that ``beit3 pretrain --data synthetic`` needs no download.

Only finished builds are cached: the world and the tokenizer each get a ``READY`` marker once they
are complete. A build that was stopped is taken up by the next call, which says so in one line: the
tokenizer's from the checkpoint its run wrote when it stopped (``--resume auto``: the same weights
as an uninterrupted build), else from the start. SIGTERM or SIGINT during a build stops it (the
tokenizer at its next step, with a checkpoint) and raises ``BuildStopped``, so the command that
asked for the assets stops too, with one line, instead of going on without them.
"""
from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass
from typing import Iterator

from beit3.core.errors import UserError
from beit3.core.files import atomic_write_bytes, cache_root, read_json
from beit3.data.downstream import build_all_indexes
from beit3.data.synthetic import world as _world
from beit3.data.synthetic.segmentation import has_segmentation, write_segmentation
from beit3.jobs.tokenizer.config import TokenizerTrainConfig
from beit3.jobs.tokenizer.train import TokenizerRun
from beit3.trainer.checkpoint import latest_checkpoint, read_marker
from beit3.vqkd.teachers import build_teacher
from beit3.vqkd.vqkd import VQKDConfig, trained_weights

READY = "READY"  # written into a cached folder once its build is complete


class BuildStopped(UserError):
    """SIGTERM/SIGINT stopped the build of a cached asset; the next call takes it up."""


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


@contextlib.contextmanager
def stop_raises(what: str, then: str) -> Iterator[None]:
    """SIGTERM/SIGINT inside the block raise ``BuildStopped`` ("stopped by SIGTERM while ``what``;
    ``then``"); a block that installs its own handlers (the tokenizer's run) takes them over."""
    def stop(signum, frame):
        raise BuildStopped(f"stopped by {signal.Signals(signum).name} while {what}; {then}")
    try:
        old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread: leave the handlers alone
        yield
        return
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def ensure_synthetic_world(world: str, seed: int, num_images: int, image_size: int, log=print) -> None:
    """Write the world into ``world`` unless a complete one (its READY marker) is there."""
    ready = os.path.join(world, READY)
    if not os.path.isfile(ready):
        started = os.path.isfile(os.path.join(world, "world.json"))
        log(f"building the synthetic world in {world} ({'again: its last build was stopped' if started else 'once'}; "
            f"cached)")
        with stop_raises(f"building the synthetic world in {world}", "the next run builds it again"):
            _world.make_synthetic_world(world, num_images=num_images, image_size=image_size, seed=seed)
        atomic_write_bytes(ready, b"")


def demo_assets(seed: int = 0, num_images: int = 2000, image_size: int = 64, tokenizer_steps: int = 200,
                tokenizer_batch: int = 64, build: bool = True, log=print) -> DemoAssets:
    """The cached demo assets, built first when ``build`` (rank 0 builds; the other ranks pass
    ``build=False`` and wait at a barrier of their own before using the paths)."""
    root = synthetic_root(seed, num_images, image_size)
    world = os.path.join(root, "world")
    tok_dir = os.path.join(root, f"vqkd-tiny-pixel-{tokenizer_steps}x{tokenizer_batch}")
    if build:
        ensure_synthetic_world(world, seed, num_images, image_size, log)
        ensure_demo_tokenizer(os.path.join(world, "images", "train"), tok_dir, tokenizer_steps, tokenizer_batch,
                              seed, log)
    return DemoAssets(world=world, shards=os.path.join(world, "shards"),
                      spm=os.path.join(world, "spm", "synthetic.model"), tokenizer=tok_dir)


def finetune_world(seed: int = 0, num_images: int = 2000, image_size: int = 64, build: bool = True,
                   log=print) -> DemoAssets:
    """The cached world of ``demo_assets`` (so a model pretrained there fits its vocabulary) with its
    fine-tuning index files and segmentation masks, written once when ``build``; ``tokenizer`` is
    left empty."""
    world = os.path.join(synthetic_root(seed, num_images, image_size), "world")
    spm = os.path.join(world, "spm", "synthetic.model")
    if build:
        ensure_synthetic_world(world, seed, num_images, image_size, log)
        if not os.path.isfile(os.path.join(world, "INDEXES_READY")):
            log(f"writing the fine-tuning index files into {world} (once)")
            with stop_raises(f"writing the fine-tuning index files into {world}", "the next run writes them again"):
                build_all_indexes(os.path.join(world, "raw"), world, spm, seed=seed, rest_val_images=num_images // 20)
            atomic_write_bytes(os.path.join(world, "INDEXES_READY"), b"")
        if not has_segmentation(world):  # a world cached before the masks existed
            log(f"writing the segmentation masks into {world} (once)")
            write_segmentation(world, read_json(os.path.join(world, "scenes.json"))["images"])
    return DemoAssets(world=world, shards=os.path.join(world, "shards"), spm=spm, tokenizer="")


def ensure_demo_tokenizer(images: str, tok_dir: str, steps: int, batch_size: int, seed: int, log=print) -> None:
    """Train the tiny VQ-KD into ``tok_dir`` unless a finished one (its READY marker) is there; a
    stopped build is resumed from its checkpoint. Raises ``BuildStopped`` if a signal stops it."""
    if os.path.isfile(os.path.join(tok_dir, READY)):
        return
    checkpoint = latest_checkpoint(os.path.join(tok_dir, "checkpoints"))
    if checkpoint is not None:
        log(f"resuming the build of the tiny VQ-KD visual tokenizer in {tok_dir}: it stopped at step "
            f"{read_marker(checkpoint).get('step')} of {steps}")
    elif os.path.isdir(tok_dir) and set(os.listdir(tok_dir)) - {".lock"}:
        log(f"training the tiny VQ-KD visual tokenizer in {tok_dir} again ({steps} steps): its last build "
            f"stopped before its first checkpoint")
    else:
        log(f"training the tiny VQ-KD visual tokenizer on it ({steps} steps, once; cached)")
    # Weights without a checkpoint to resume: an older version's cache, not known to be finished.
    restart = checkpoint is None and trained_weights(tok_dir) is not None
    what = f"building the tiny VQ-KD visual tokenizer in {tok_dir}"
    with stop_raises(what, "nothing else was done; the next run continues the build"):
        run = _demo_tokenizer_run(images, tok_dir, steps, batch_size, seed, restart)
        run.train()
    if run.step_reached < steps:
        name = signal.Signals(run.stopped_by).name if run.stopped_by else "a stop"
        raise BuildStopped(f"stopped by {name} at step {run.step_reached} of {steps} while {what}; nothing else "
                           f"was done; the next run resumes the build from the checkpoint it wrote")
    atomic_write_bytes(os.path.join(tok_dir, READY), b"")


def _demo_tokenizer_run(images: str, out_dir: str, steps: int, batch_size: int, seed: int, restart: bool):
    """The demo tokenizer's run in ``out_dir``: resuming a stopped build, or (``restart``) replacing
    what is there."""
    grid = VQKDConfig.from_preset("tiny")
    # The pixel teacher (normalised pixel patches, as MaskFeat/MAE targets) gives codes that carry
    # the picture's content within a few hundred steps; HOG needs several times more.
    teacher = build_teacher("pixel", None, grid=grid.grid_size, img_size=grid.img_size)
    config = VQKDConfig.from_preset("tiny", teacher_dim=teacher.dim)
    settings = TokenizerTrainConfig(images=images, output=out_dir, steps=steps, teacher="pixel", batch_size=batch_size,
                                    seed=seed, min_crop_scale=0.5, resume=None if restart else "auto",
                                    overwrite=restart)
    settings.check()
    return TokenizerRun(settings, config, teacher)
