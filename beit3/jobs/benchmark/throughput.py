"""The benchmark's run (``beit3 benchmark``): the device's matmul peak, then the timed pretraining
steps of each configuration and peer, printed as text or JSON records (and ``--markdown``); with
``--profile``, torch.profiler over our model's steps."""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

import torch

from beit3.model.config import BEiT3Config
from beit3.trainer.distributed import finish_distributed, init_distributed
from beit3.trainer.flops import datasheet_peak, measure_matmul_peak
from beit3.jobs.benchmark import report, runner
from beit3.jobs.benchmark.batches import BatchMix
from beit3.jobs.benchmark.config import BenchmarkConfig
from beit3.jobs.benchmark.measure import time_steps
from beit3.jobs.benchmark.profile import profile_steps
from beit3.jobs.benchmark.runner import Batches, Settings, build_trainer


def _settings(args, mix, ds_config, device: str):
    dist = init_distributed(device=device)  # DeepSpeed needs a process group, also for one rank
    cfg = BEiT3Config.from_preset(args.preset, layout=args.layout)
    s = Settings(cfg=cfg, device=dist.device, mix=mix, warmup=args.warmup, steps=args.steps,
                 checkpoint_every=args.checkpoint_every, checkpoint_mode=args.checkpoint_mode, ds_config=ds_config,
                 compile=args.compile, sdpa=args.sdpa, num_visual_tokens=args.num_visual_tokens,
                 compare=tuple(dict.fromkeys(args.compare)), checkpoint_cost=args.checkpoint_cost, seed=args.seed)
    torch.manual_seed(args.seed)
    return s, dist


def run_benchmark(args: BenchmarkConfig, mix: BatchMix, ds_config: Optional[dict], device: str, world: int) -> bool:
    """Time the steps ``args`` describe (every rank steps; rank 0 prints the records and writes
    ``--markdown``). False if ``--find-max-batch`` found no batch that fits."""
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
            return False
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
    return True


def find_max_batch(args, s, say):
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
