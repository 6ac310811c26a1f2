"""``beit3 benchmark``: pretraining throughput, model TFLOP/s and MFU on the current device.

    beit3 benchmark --preset tiny --compare torchscale --compare timm          (CPU)
    beit3 benchmark --preset giant --batch-images 0 --batch-texts 0 --batch-pairs 48 \\
        --text-len 64 --checkpoint-every 1 --compare torchscale                   (one GPU)

Measures the matmul peak of the device (bf16 8192^3 on GPU, fp32 on the CPU), then times
``--warmup`` + ``--steps`` pretraining steps (forward, backward, AdamW) of the preset on a
synthetic batch through the DeepSpeed config, and reports samples/s, tokens/s, model TFLOP/s
(6 x active parameters x tokens + attention, recomputation not counted), MFU against the measured
peak and the datasheet, and peak memory. ``--compare`` times the official torchscale BEiT-3 and/or
timm's ViT of the same size on the same batch in the same run. See docs/benchmark.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import torch

from beit3.core.errors import UserError
from beit3.core.settings import add_dataclass_flags, given
from beit3.trainer.distributed import pick_device
from beit3.jobs.benchmark import dataloader
from beit3.jobs.benchmark.batches import BatchMix
from beit3.jobs.benchmark.config import BenchmarkConfig
from beit3.jobs.benchmark.throughput import run_benchmark


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="beit3 benchmark", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_dataclass_flags(ap.add_argument_group("settings (BenchmarkConfig fields)"), BenchmarkConfig, skip=("command",))
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        args = BenchmarkConfig(**given(ns, BenchmarkConfig), command="beit3 benchmark " + shlex.join(argv))
        device = pick_device(args.device)
        if device == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        args = args.resolved(device)
        mix, ds_config = args.check(world)
    except (ValueError, UserError) as e:  # ConfigError and SettingError are ValueErrors
        print(f"beit3 benchmark: error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data_loader:
        return data_loader_main(args, mix)
    return 0 if run_benchmark(args, mix, ds_config, device, world) else 1


def data_loader_main(args: BenchmarkConfig, mix: BatchMix) -> int:
    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    sources = {"pair_shards": args.pair_shards, "image_shards": args.image_shards, "text_shards": args.text_shards}
    decoders = ["pil", "torchvision"] if args.image_decoder == "both" else [args.image_decoder]
    results = []
    for decoder in decoders:
        try:
            r = dataloader.time_loader(args.preset, mix, args.num_workers, args.warmup, args.steps, args.seed,
                                       shards=args.data, spm=args.spm, log=log, sources=sources, decoder=decoder)
        except (ValueError, FileNotFoundError) as e:
            print(f"beit3 benchmark --data-loader: error: {e}", file=sys.stderr)
            return 2
        results.append(r)
        if args.json:
            print(json.dumps(r))
        else:
            workers = max(1, args.num_workers)
            print(f"data loader, {decoder} decoder ({args.num_workers} workers, {mix.describe()}): "
                  f"{r['batches_per_s']:.2f} batches/s, {r['samples_per_s']:.1f} samples/s, "
                  f"{r['samples_per_s'] / workers:.1f} per worker")
    if len(results) == 2 and not args.json:
        a, b = (r["samples_per_s"] for r in results)
        print(f"torchvision / PIL: {b / a:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
