"""Throughput of the real pretraining data loader (decode, crops, the tokenizer's view, masking,
text tokenisation), apart from the model: on the synthetic world, a shards folder or sources."""
from __future__ import annotations

import time
from typing import Optional

from beit3.data.pretrain_loader import PretrainDataConfig, PretrainLoader
from beit3.model.config import BEiT3Config
from beit3.trainer.flops import batch_counts
from beit3.jobs.demo_assets import demo_assets
from beit3.jobs.benchmark.batches import BatchMix


def time_loader(preset: str, mix: BatchMix, num_workers: int, warmup: int, steps: int, seed: int = 0,
                shards: Optional[str] = None, spm: Optional[str] = None, log=print,
                sources: Optional[dict] = None, decoder: str = "pil") -> dict:
    """Batches/s and samples/s of ``PretrainLoader`` on ``shards`` (tokenised with ``spm``), by
    default the cached synthetic world of ``beit3 pretrain --data synthetic`` (built on first
    use). Images are cut for a visual tokenizer of the model's input size (BEiT-3: 224 both).
    Warm-up batches, which include the workers' start-up, are not timed."""
    sources = {k: v for k, v in (sources or {}).items() if v}
    if shards is None and not sources:
        assets = demo_assets(seed=seed, log=log)
        shards, spm = assets.shards, spm or assets.spm
    if spm is None:
        raise ValueError("--data-loader with --data needs --spm (the SentencePiece model of the shards)")
    cfg = BEiT3Config.from_preset(preset)
    data_cfg = PretrainDataConfig(
        shards_dir=shards, batch_images=mix.images, batch_texts=mix.texts, batch_pairs=mix.pairs,
        img_size=cfg.img_size, patch_size=cfg.patch_size, tokenizer_img_size=cfg.img_size,
        max_text_len=mix.text_len, num_workers=num_workers, seed=seed, mask_pair_images=mix.mask_pair_images,
        image_decoder=decoder, **sources)
    it = iter(PretrainLoader(data_cfg, spm, rank=0, world_size=1))
    for _ in range(warmup):
        next(it)
    samples, t = 0, time.perf_counter()
    for _ in range(steps):
        samples += batch_counts(cfg, next(it))[0]
    dt = time.perf_counter() - t
    return {"config": "data-loader", "preset": preset, "shards": shards or sources, "num_workers": num_workers,
            "decoder": decoder,
            "batch_images": mix.images, "batch_texts": mix.texts, "batch_pairs": mix.pairs,
            "text_len": mix.text_len, "steps": steps, "batches_per_s": steps / dt, "samples_per_s": samples / dt}
