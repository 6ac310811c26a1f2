"""The parts of ``scripts/gpu_check.sh``: each measures one thing and records what it found.

Every part is a function ``part(ctx)`` run in a process of its own (``beit3.jobs.benchmark.gpu_check``
starts it with a time budget and goes on if it fails or runs out of time). A part records its
results through ``ctx.record`` as it goes, so what it measured before a failure is kept.
``ctx.dry`` runs the same code on the CPU with the tiny preset (the CI test of the script).
"""
from __future__ import annotations

import json
import math
import os
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile

from beit3.model.config import BEiT3Config
from beit3.trainer.distributed import DistInfo, init_distributed
from beit3.trainer.ds_config import default_ds_config, packaged_ds_config, resolve_ds_config
from beit3.trainer.flops import datasheet_peak, measure_matmul_peak
from beit3.trainer.optim import build_optimizer, param_groups
from beit3.trainer.trainer import to_device
from beit3.jobs.pretrain.objective import MaskedDataModeling, prepare_batch
from beit3.jobs.benchmark.batches import BatchMix, synthetic_batch
from beit3.jobs.benchmark.host_reads import HostReads
from beit3.jobs.benchmark.measure import GiB, Measurement, is_oom, measure, release_memory
from beit3.jobs.benchmark.report import device_name
from beit3.jobs.benchmark.runner import Batches, Settings, build_trainer
from beit3.jobs.benchmark.trainers import compile_layers, deepspeed_trainer

V = 8192  # VQ-KD codebook: MIM classes
MFU_TARGET, TORCHSCALE_TARGET = 0.5, 3.5


@dataclass
class Context:
    dry: bool
    device: torch.device
    result_path: str
    out_dir: str
    deadline: float  # time.monotonic() by which the part must be done
    earlier: dict = field(default_factory=dict)  # results of the parts run before, by part
    profile: str = "auto"
    results: dict = field(default_factory=dict)
    dist: Optional[DistInfo] = None  # the process group the part started, if any: ended after success

    def record(self, **kv) -> None:
        self.results.update(kv)
        tmp = self.result_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.results, f, indent=1, default=str)
        os.replace(tmp, self.result_path)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, msg: str) -> None:
        print(f"  {msg}", flush=True)

    # Sizes: the real ones on a GPU, the tiny preset in a dry run.
    def preset(self, real: str) -> str:
        return "tiny" if self.dry else real

    def steps(self, warmup: int, timed: int) -> tuple[int, int]:
        return (1, 2) if self.dry else (warmup, timed)


def mix_of(ctx: Context, per_part: int, text_len: int = 64, padding: float = 0.0) -> BatchMix:
    if ctx.dry:
        per_part, text_len = min(per_part, 2), min(text_len, 32)
    return BatchMix(per_part, per_part, per_part, text_len, padding)


# The GPU configs of each ZeRO stage (packaged with beit3), and the CPU's for a dry run (no
# overlap stream there).
GPU_DS = {3: "zero3_bf16.json", 2: "zero2_bf16.json"}


def ds_config_of(ctx: Context, mix: BatchMix, bf16: bool = True, stage: int = 3) -> dict:
    if not ctx.dry:
        cfg = resolve_ds_config(packaged_ds_config(GPU_DS[stage]), mix.samples, None, 1)
    elif stage == 3:
        cfg = resolve_ds_config(default_ds_config("cpu"), mix.samples, None, 1)
    else:
        cfg = resolve_ds_config(packaged_ds_config(GPU_DS[stage]), mix.samples, None, 1)
        cfg["zero_optimization"]["overlap_comm"] = False
    cfg["bf16"] = {"enabled": bf16}
    return cfg


def settings_of(ctx: Context, cfg: BEiT3Config, mix: BatchMix, ds_config, every: int = 1, mode: str = "full",
                warmup: int = 3, steps: int = 10, compare: tuple = ()):
    w, n = ctx.steps(warmup, steps)
    return Settings(cfg=cfg, device=ctx.device, mix=mix, warmup=w, steps=n, checkpoint_every=every,
                    checkpoint_mode=mode, ds_config=ds_config, num_visual_tokens=V, compare=compare)


def figures(m: Measurement, peak: float | None) -> dict:
    if not m.ok:
        return {"error": m.error or "no steps", "peak_mem_gb": m.peak_mem_gb}
    out = {"samples_per_s": m.samples_per_s, "tokens_per_s": m.tokens_per_s, "model_tflops": m.flops_per_s / 1e12,
           "step_ms_median": m.step_ms_median, "peak_mem_gb": m.peak_mem_gb, "samples_per_step": m.samples,
           "flops_per_step": m.flops, **m.info}
    if peak:
        out["mfu"] = m.flops_per_s / peak
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def measured_peak(ctx: Context) -> float | None:
    p = ctx.earlier.get("peak", {}).get("matmul_peak_tflops")
    return None if p is None else p * 1e12


def line(r: dict) -> str:
    if "error" in r:
        return r["error"]
    mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
    return (f"{r['samples_per_s']:.1f} samples/s, {r['model_tflops']:.1f} TFLOP/s{mfu}, "
            f"peak {r['peak_mem_gb']:.1f} GiB")


def init_dist(ctx: Context):
    ctx.dist = init_distributed(device=ctx.device.type)
    return ctx.dist


# -- the parts -----------------------------------------------------------------------------------
def part_peak(ctx: Context) -> None:
    """The device's matmul peak: bf16 8192^3 on a GPU (fp32 512^3 on the CPU), the best of 10."""
    peak = max(measure_matmul_peak(ctx.device) for _ in range(2))
    sheet = datasheet_peak(ctx.device)
    ctx.record(device_name=device_name(ctx.device), matmul_peak_tflops=peak / 1e12,
               dtype="bf16" if ctx.device.type == "cuda" else "fp32",
               datasheet_tflops=None if sheet is None else sheet / 1e12,
               memory_gb=torch.cuda.get_device_properties(ctx.device).total_memory / GiB
               if ctx.device.type == "cuda" else None)
    ctx.say(f"matmul peak {peak / 1e12:.1f} TFLOP/s")


def _prepared(cfg: BEiT3Config, mix: BatchMix, device: torch.device, dtype=torch.float32, seed: int = 0,
              prepare: bool = True):
    batch, targets = synthetic_batch(cfg, mix, V, seed)
    if prepare:
        batch = prepare_batch(batch, cfg.vocab_size)
    return to_device(batch, device, dtype), to_device(targets, device, dtype)


def part_sync(ctx: Context) -> None:
    """Forward + backward of the pretraining objective with the host never waiting for the device
    to read a value: run under ``torch.cuda.set_sync_debug_mode("error")``, which raises at the first
    synchronising call (on the CPU, ``HostReads`` lists the ops that would). The unprepared batch (boolean-mask gathers) is the check's control: it must
    fail, or the check proves nothing."""
    cfg = BEiT3Config.from_preset(ctx.preset("base"))
    torch.manual_seed(0)
    with torch.device(ctx.device):
        module = MaskedDataModeling(cfg, V).train()
    opt = build_optimizer(param_groups(module, 0.05), 1e-4)
    mix = mix_of(ctx, 4, padding=0.25)
    cuda = ctx.device.type == "cuda"

    def fwd_bwd(batch, targets):
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=cuda):
            loss, _ = module(batch, targets)
        loss.backward()

    def opt_step():
        torch.nn.utils.clip_grad_norm_(module.parameters(), 3.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def forward(batch, targets):
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=cuda):
            return module(batch, targets)[0]

    def checked(fn, *a):
        """(what happened, fn's result): "no sync", or "SYNC at <our line>: <message>". On the CPU,
        ``HostReads`` names the ops that would make a GPU wait."""
        if not cuda:
            with HostReads() as reads:
                result = fn(*a)
            counts = ", ".join(f"{n} x {op}" for op, n in Counter(reads.ops).items())
            return ("no host read" if not reads.ops else "HOST READS: " + counts), result
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return "no sync", fn(*a)
        except RuntimeError as e:
            ours = [f"{os.path.basename(f.filename)}:{f.lineno} {f.line}" for f in traceback.extract_tb(e.__traceback__)
                    if "beit3" in f.filename]
            return f"SYNC at {ours[-1] if ours else '?'}: " + str(e).strip().splitlines()[0][:200], None
        finally:
            torch.cuda.set_sync_debug_mode(0)

    batch, targets = _prepared(cfg, mix, ctx.device)
    for _ in range(2):  # library handles, workspaces and the allocator's first blocks
        fwd_bwd(batch, targets)
        opt_step()
    out = {"preset": cfg.preset, "batch": mix.describe()}
    for every, mode in ((0, "full"), (1, "full"), (1, "selective")):
        module.model.set_grad_checkpointing(every > 0, max(every, 1), mode)
        fwd_bwd(batch, targets)  # warm this path
        opt.zero_grad(set_to_none=True)
        name = "no checkpointing" if not every else f"{mode} checkpointing"
        status, loss = checked(forward, batch, targets)
        out[f"forward, {name}"] = status
        if loss is not None:
            out[f"backward, {name}"] = checked(loss.backward)[0]
        opt.zero_grad(set_to_none=True)
        ctx.say(f"{name}: forward {status}; backward {out.get(f'backward, {name}', 'not run')}")
    module.model.set_grad_checkpointing(False)
    fwd_bwd(batch, targets)
    out["optimizer step (clip + fused AdamW)"] = checked(opt_step)[0]
    raw, raw_targets = _prepared(cfg, mix, ctx.device, prepare=False)
    out["control: forward of an unprepared batch (boolean-mask gathers)"] = checked(forward, raw, raw_targets)[0]
    ctx.say("optimizer step: " + out["optimizer step (clip + fused AdamW)"] + "; control: "
            + out["control: forward of an unprepared batch (boolean-mask gathers)"])
    ctx.record(**out)


SDPA_OPS = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention", "attention_math")


def part_sdpa(ctx: Context) -> None:
    """Which scaled-dot-product-attention kernel runs (forward and backward), with and without text
    padding, at the giant's head size (88), from the profiler's op names."""
    cfg = BEiT3Config.from_preset(ctx.preset("giant"), depth=2, vl_layers=1)
    torch.manual_seed(0)
    with torch.device(ctx.device):
        module = MaskedDataModeling(cfg, V).train()
    cuda = ctx.device.type == "cuda"
    cases = {"images": BatchMix(4, 0, 0, 64), "texts, no padding": BatchMix(0, 4, 0, 64),
             "texts, 25% padding": BatchMix(0, 4, 0, 64, 0.25), "pairs, no padding": BatchMix(0, 0, 4, 64),
             "pairs, 25% padding": BatchMix(0, 0, 4, 64, 0.25)}
    out = {"head_dim": cfg.head_dim, "dtype": "bf16" if cuda else "fp32"}
    for name, mix in cases.items():
        batch, targets = _prepared(cfg, mix, ctx.device)

        def step():
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=cuda):
                loss, _ = module(batch, targets)
            loss.backward()
        step()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            step()
        ops = sorted({e.name for e in prof.events() if any(k in e.name for k in SDPA_OPS)
                      and e.name.startswith("aten::")})
        kernels = sorted({e.name[:80] for e in prof.events() if cuda and e.device_type.name == "CUDA"
                          and any(k in e.name.lower() for k in ("flash", "fmha", "attention", "sdpa"))})
        out[name] = {"ops": ops, "kernels": kernels[:6]}
        ctx.say(f"{name}: {', '.join(o.removeprefix('aten::') for o in ops)}")
        ctx.record(**out)


def part_numerics(ctx: Context) -> None:
    """20 steps of base through DeepSpeed ZeRO-3 in bf16 and in fp32 from the same weights on the
    same batches: the per-step losses and their difference."""
    init_dist(ctx)
    cfg = BEiT3Config.from_preset(ctx.preset("base"))
    mix = mix_of(ctx, 8)
    n = 6 if ctx.dry else 20
    # Four batches in turn, so the loss falls (random targets cannot be learnt, only remembered).
    data = [synthetic_batch(cfg, mix, V, seed=i % 4) for i in range(n)]
    losses = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        torch.manual_seed(0)
        with torch.device(ctx.device):
            module = MaskedDataModeling(cfg, V)
        trainer = deepspeed_trainer(module, ds_config_of(ctx, mix, bf16))
        run = []
        for batch, targets in data:
            b = to_device(prepare_batch(batch, cfg.vocab_size), ctx.device, trainer.input_dtype)
            t = to_device(targets, ctx.device, trainer.input_dtype)
            run.append(float(trainer.step(b, t)))
        trainer.close()
        release_memory(ctx.device)
        losses[name] = run
        ctx.record(preset=cfg.preset, batch=mix.describe(), steps=n, **{f"loss_{name}": run})
    diff = [abs(a - b) for a, b in zip(losses["bf16"], losses["fp32"])]
    rel = [d / abs(f) for d, f in zip(diff, losses["fp32"])]
    ctx.record(max_abs_diff=max(diff), mean_abs_diff=sum(diff) / n, max_rel_diff=max(rel),
               first_last_fp32=(losses["fp32"][0], losses["fp32"][-1]),
               first_last_bf16=(losses["bf16"][0], losses["bf16"][-1]))
    ctx.say(f"loss fp32 {losses['fp32'][0]:.4f} -> {losses['fp32'][-1]:.4f}, bf16 {losses['bf16'][0]:.4f} -> "
            f"{losses['bf16'][-1]:.4f}; max |diff| {max(diff):.4f} ({100 * max(rel):.2f}%)")


def part_peers(ctx: Context) -> None:
    """torchscale's BEiT3 at the giant size on the comparison batch (its own activation
    checkpointing), and timm's ViT-g/14 on the image-only batch, eager and torch.compile'd."""
    ctx.device = init_dist(ctx).device
    cfg = BEiT3Config.from_preset(ctx.preset("giant"))
    peak = measured_peak(ctx)
    w, n = ctx.steps(3, 10)
    cmp_mix = mix_of(ctx, 16)
    s = settings_of(ctx, cfg, cmp_mix, None, every=1, warmup=3, steps=10)
    batches = Batches(s)
    m = _measure_peer("torchscale", s, cmp_mix, batches, w, n)
    ctx.record(torchscale={"batch": cmp_mix.describe(), **figures(m, peak)})
    ctx.say(f"torchscale {cmp_mix.describe()}: " + line(figures(m, peak)))
    img_mix = BatchMix(2 if ctx.dry else 64, 0, 0, 64)
    s = settings_of(ctx, cfg, img_mix, None, every=0, warmup=3, steps=10)
    trainer = build_trainer("timm", s, 0)
    try:
        step = batches.step_fn(trainer, img_mix)
        m = measure("timm", step, batches.get(img_mix)[2], w, n, s.device)
        m.info.update(trainer.info)
        ctx.record(timm_eager={"batch": img_mix.describe(), **figures(m, peak)})
        ctx.say(f"timm ViT-g/14 eager {img_mix.describe()}: " + line(figures(m, peak)))
        t0 = time.monotonic()
        compile_layers(trainer.module.layers, backend="eager" if ctx.dry else "inductor")
        m = measure("timm", step, batches.get(img_mix)[2], w + 2, n, s.device)
        m.info.update(trainer.info)
        ctx.record(timm_compiled={"batch": img_mix.describe(), "compile_and_warmup_s": time.monotonic() - t0,
                                  "backend": "eager (dry run)" if ctx.dry else "inductor", **figures(m, peak)})
        ctx.say(f"timm ViT-g/14 compiled {img_mix.describe()}: " + line(figures(m, peak)))
    finally:
        trainer.close()


def _measure_peer(name: str, s, mix: BatchMix, batches, warmup: int, steps: int) -> Measurement:
    try:
        trainer = build_trainer(name, s, s.checkpoint_every)
    except RuntimeError as e:
        if not is_oom(e):
            raise
        return Measurement(name, error="out of memory")
    try:
        m = measure(name, batches.step_fn(trainer, mix), batches.get(mix)[2], warmup, steps, s.device)
        m.info.update(trainer.info)
        return m
    finally:
        trainer.close()
        release_memory(s.device)
