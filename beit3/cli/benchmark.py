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

from beit3.jobs.benchmark.config import BenchmarkConfig
from beit3.model.config import BEiT3Config
from beit3.core.errors import UserError
from beit3.core.settings import add_dataclass_flags, given


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="beit3 benchmark", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_dataclass_flags(ap.add_argument_group("settings (BenchmarkConfig fields)"), BenchmarkConfig, skip=("command",))
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(argv)
    import torch

    from beit3.trainer.distributed import pick_device

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
    return run_main(args, mix, ds_config, device, world)


def data_loader_main(args: BenchmarkConfig, mix) -> int:
    from beit3.jobs.benchmark import dataloader

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


def _settings(args, mix, ds_config, device: str):
    import torch

    from beit3.jobs.benchmark.runner import Settings
    from beit3.trainer.distributed import init_distributed

    dist = init_distributed(device=device)  # DeepSpeed needs a process group, also for one rank
    cfg = BEiT3Config.from_preset(args.preset, layout=args.layout)
    s = Settings(cfg=cfg, device=dist.device, mix=mix, warmup=args.warmup, steps=args.steps,
                 checkpoint_every=args.checkpoint_every, checkpoint_mode=args.checkpoint_mode, ds_config=ds_config,
                 compile=args.compile, sdpa=args.sdpa, num_visual_tokens=args.num_visual_tokens,
                 compare=tuple(dict.fromkeys(args.compare)), checkpoint_cost=args.checkpoint_cost, seed=args.seed)
    torch.manual_seed(args.seed)
    return s, dist


def run_main(args: BenchmarkConfig, mix, ds_config, device: str, world: int) -> int:
    from beit3.jobs.benchmark import report, runner
    from beit3.trainer.distributed import finish_distributed
    from beit3.trainer.flops import datasheet_peak, measure_matmul_peak

    s, dist = _settings(args, mix, ds_config, device)
    say = (lambda m: print(m, file=sys.stderr)) if args.json else print
    if not dist.is_main:
        say = lambda m: None  # noqa: E731
    if s.compile_skipped:
        say(f"--compile: not applied, running eagerly: {s.compile_skipped}")
    elif s.compile and ds_config and ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        say("--compile with ZeRO-3: DeepSpeed hooks every submodule to gather its parameters, which "
            "breaks each compiled layer into one graph per submodule; compare with --deepspeed none")
    if args.find_max_batch:
        s = find_max_batch(args, s, say)
        if s is None:
            return 1
    # The peak before and after the steps, the higher counts: a shared or cold device is not a
    # reason for an MFU above 100%.
    peak = measure_matmul_peak(s.device)
    results = runner.run(s)
    peak, sheet = max(peak, measure_matmul_peak(s.device)), datasheet_peak(s.device)
    env = report.environment(s.device, peak, sheet, world)
    say(f"{env['device_name']}: matmul peak {peak / 1e12:.3f} TFLOP/s measured "
        f"({'bf16' if s.device.type == 'cuda' else 'fp32'}), datasheet "
        f"{'n/a' if sheet is None else f'{sheet / 1e12:.0f} TFLOP/s'}")
    ds_name = "plain PyTorch" if ds_config is None else f"DeepSpeed {os.path.basename(args.ds_config)}"
    records = [report.record(c, ms, s, env, ds_name) for c, ms in results]
    if dist.is_main:
        emit(args, records, [c.peers for c, _ in results], say)
    if args.profile:
        profile_ours(s, args.profile if dist.is_main else None, say)
    finish_distributed(dist)
    return 0


def find_max_batch(args, s, say):
    from beit3.jobs.benchmark import runner
    if s.device.type != "cuda":
        say("--find-max-batch: not applicable on the CPU (there is no out-of-memory error to search "
            "against); measuring the given batch")
        return s
    b = runner.find_max_batch(s, args.max_batch_limit)
    if b == 0:
        say("--find-max-batch: even 1 sample per part does not fit in device memory")
        return None
    say(f"--find-max-batch: largest micro-batch that fits: {s.mix.scaled(b).describe()}")
    return runner.with_mix(s, s.mix.scaled(b))


def emit(args, records: list[dict], peers_of: list[tuple], say) -> None:
    from beit3.jobs.benchmark import report

    costs = report.checkpoint_costs(records)
    for cost in costs:  # each goes into the record of its configuration
        on = next(r for r in records if r["config"] == cost["config"])
        on.update(checkpoint_slowdown=cost["slowdown"], checkpoint_memory_saved_gb=cost["memory_saved_gb"])
    for r, peers in zip(records, peers_of):
        if args.json:
            print(json.dumps(r), flush=True)
        else:
            print("\n".join(report.text_lines(r, peers)))
    for cost in costs:
        say(report.checkpoint_line(cost))
    if args.markdown:
        report.write_markdown(args.markdown, report.markdown(records, args.command, peers_of))
        say(f"wrote {args.markdown}")


def profile_ours(s, out_dir: str | None, say) -> None:
    """torch.profiler over our model's steps on the main batch: the op table and time by kind
    (every rank steps, as ZeRO needs; ``out_dir`` None: no trace written)."""
    from beit3.jobs.benchmark.profile import profile_steps
    from beit3.jobs.benchmark.runner import Batches, build_trainer
    from beit3.jobs.benchmark.measure import time_steps

    trainer = build_trainer("beit3", s, s.checkpoint_every)
    try:
        step = Batches(s).step_fn(trainer, s.mix)
        time_steps(step, s.warmup, 0, s.device)
        prof = profile_steps(step, s.steps, s.device, out_dir)
    finally:
        trainer.close()
    say(prof.table)
    say("time by kind: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in prof.shares.items()))
    if out_dir:
        say(f"trace: {os.path.join(out_dir, 'trace.json')}")


if __name__ == "__main__":
    sys.exit(main())
