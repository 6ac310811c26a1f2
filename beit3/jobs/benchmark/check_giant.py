"""The ``giant`` part of the GPU check: our 1.9B model (paper layout, bf16, DeepSpeed) on one GPU.

What GPU time must buy first comes first, and every figure is recorded the moment it exists (a
time-out later keeps it):

1. ZeRO-3: the engine's build time, the first step's time, then the torchscale comparison batch
   (16 images + 16 texts + 16 pairs, text 64, full checkpointing) timed;
2. the same under ZeRO-2, same weights, same batch. On one GPU ZeRO-3 saves no memory and its
   per-module gathers cost; the faster stage is kept for the rest and named in the report;
3. the largest micro-batch (selective checkpointing), then selective against full there, eager and
   with every block ``torch.compile``d (the compiled runs get what time the steps after them leave);
4. image-only at timm's batch (64 images), eager and compiled;
5. when MFU misses the target, a profile of one step: the trace, and its five largest costs.
"""
from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import signal
import time

import torch

from beit3.model.config import BEiT3Config
from beit3.jobs.benchmark.batches import BatchMix
from beit3.jobs.benchmark.check_parts import MFU_TARGET, Context, ds_config_of, figures, init_dist, line, measured_peak, mix_of, settings_of
from beit3.jobs.benchmark.measure import GiB, Measurement, PeakMemory, is_oom, measure, release_memory, sync, time_steps
from beit3.jobs.benchmark.profile import profile_steps
from beit3.jobs.benchmark.runner import Batches, build_trainer
from beit3.jobs.benchmark.trainers import compile_layers, compile_stats, uncompile_layers

STAGES = (3, 2)  # in the order measured; ZeRO-3 is the recipe's until a GPU says otherwise
# Seconds kept, when a compiled run starts, for what follows it: image-only and the profile
# (plus an engine rebuild should the compiled run be stopped); and for the profile alone (a warm
# step, a profiled one, the trace written and gzipped).
RESERVE_S, PROFILE_S = 75.0, 50.0


class Overrun(Exception):
    """A measurement stopped at its time allowance (not a RuntimeError: ``measure`` lets it pass)."""


@contextlib.contextmanager
def allowance(seconds: float):
    """Raise ``Overrun`` in the main thread once ``seconds`` have passed (at the next Python line:
    a running kernel or compile worker finishes first)."""
    def stop(signum, frame):
        raise Overrun(f"stopped at its {seconds:.0f} s allowance")
    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class GiantRun:
    """One trainer at a time on the device, and what the part has recorded so far."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.cfg = BEiT3Config.from_preset(ctx.preset("giant"))
        self.peak = measured_peak(ctx)
        self.cmp_mix = mix_of(ctx, 16)
        self.stage = 3
        self.s = self._settings(self.cmp_mix, "full")
        self.batches = Batches(self.s)
        self.trainer = None
        self.build_s: dict[int, float] = {}
        self.compiled = False
        self.broken = False  # a step was cut half-way: the engine's state is not to be trusted

    def _settings(self, mix: BatchMix, mode: str):
        return settings_of(self.ctx, self.cfg, mix, ds_config_of(self.ctx, mix, stage=self.stage), every=1,
                           mode=mode)

    def build(self, stage: int, mode: str = "full") -> float:
        """A fresh trainer of ``stage`` (the previous one freed first); returns its build seconds."""
        self.close()
        self.stage = stage
        self.s = self._settings(self.cmp_mix, mode)
        sync(self.ctx.device)
        t0 = time.perf_counter()
        self.trainer = build_trainer("beit3", self.s, 1)
        sync(self.ctx.device)
        self.build_s[stage] = time.perf_counter() - t0
        self.compiled = self.broken = False
        return self.build_s[stage]

    def set_compiled(self, on: bool) -> None:
        """Every block compiled (inductor; eager in a dry run, which traces the same graphs) or not.
        Graphs already compiled are kept by dynamo's cache, so switching back costs nothing."""
        if on != self.compiled:
            if on:
                compile_layers(self.model.layers, backend="eager" if self.ctx.dry else "inductor")
            else:
                uncompile_layers(self.model.layers)
            self.compiled = on

    @property
    def model(self):
        return self.trainer.module.model

    def close(self) -> None:
        if self.trainer is not None:
            self.trainer.close()
            self.trainer = None
            release_memory(self.ctx.device)

    def timed(self, mix: BatchMix, warmup: int, steps: int) -> dict:
        w, n = (1, 1) if self.ctx.dry else (warmup, steps)  # a dry run needs figures, not good ones
        m = measure("beit3", self.batches.step_fn(self.trainer, mix), self.batches.get(mix)[2], w, n,
                    self.ctx.device)
        return figures(m, self.peak)

    def first_step(self, mix: BatchMix) -> dict:
        """The first step alone (allocations, library handles, ZeRO's first trace): its seconds and
        its loss, which equal weights on an equal batch make the same for every stage."""
        batch, targets = self.batches.on_device(self.trainer, mix)
        torch.manual_seed(0)
        sync(self.ctx.device)
        t0 = time.perf_counter()
        loss = self.trainer.step(batch, targets)
        sync(self.ctx.device)
        return {"first_step_s": time.perf_counter() - t0, "first_loss": float(loss)}


def part_giant(ctx: Context) -> None:
    """Giant, paper layout, bf16, DeepSpeed, activation checkpointing (see the module's docstring)."""
    ctx.device = init_dist(ctx).device
    run = GiantRun(ctx)
    ctx.record(preset=run.cfg.preset, layout=run.cfg.layout, precision="bf16", text_len=run.cmp_mix.text_len)
    try:
        compare_stages(run)
        big = largest_batch(run)
        checkpointing_at(run, big)
        compiled_at(run, big)
        image_only(run)
        best = max((r.get("mfu") or 0.0) for r in ctx.results["max_batch"].values() if isinstance(r, dict))
        wanted = ctx.profile == "always" or (ctx.profile == "auto" and best < MFU_TARGET)
        if wanted and ctx.left() > PROFILE_S - 5 and not run.broken:
            try:
                profile_best(run, big)
            except RuntimeError as e:  # the measurements above stand without it
                ctx.record(profile_error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
                ctx.say(f"profile failed: {ctx.results['profile_error']}")
    finally:
        run.close()


def compare_stages(run: GiantRun) -> None:
    """The comparison batch under each ZeRO stage in turn, from the same weights; the faster one's
    trainer is kept (rebuilt if it was not the last)."""
    ctx, mix = run.ctx, run.cmp_mix
    out = {"batch": mix.describe(), "checkpointing": "full"}
    for stage in STAGES:
        key = f"zero{stage}"
        out[key] = {"engine_build_s": run.build(stage), "params": run.trainer.info["params"]}
        if stage == 3:  # the first figures any GPU sees, under the recipe's settings
            ctx.record(params=out[key]["params"], engine_build_s=out[key]["engine_build_s"])
        ctx.record(stages=out)
        ctx.say(f"ZeRO-{stage}: engine built in {out[key]['engine_build_s']:.1f} s")
        out[key].update(run.first_step(mix))
        if stage == 3:
            ctx.record(first_step_s=out[key]["first_step_s"])
        ctx.record(stages=out)
        ctx.say(f"ZeRO-{stage}: first step {out[key]['first_step_s']:.1f} s, loss {out[key]['first_loss']:.4f}")
        out[key].update(run.timed(mix, 1, 5))
        ctx.record(stages=out)
        ctx.say(f"ZeRO-{stage}, {mix.describe()}, full checkpointing: {line(out[key])}")
    rates = {s: out[f"zero{s}"].get("samples_per_s") or 0.0 for s in STAGES}
    chosen = max(STAGES, key=lambda s: rates[s])
    # A dry run's timings are noise: it goes on with ZeRO-2, so it always takes the compiled path.
    kept = 2 if ctx.dry else chosen
    out.update(chosen=chosen, kept=kept, zero2_over_zero3=rates[2] / rates[3] if rates[3] else None,
               first_loss_difference=abs(out["zero2"]["first_loss"] - out["zero3"]["first_loss"]))
    ctx.record(stages=out, zero_stage=kept,
               torchscale_batch={"batch": mix.describe(), "checkpointing": "full", "zero_stage": chosen,
                                 **{k: v for k, v in out[f"zero{chosen}"].items() if k not in ("first_loss",)}})
    ctx.say(f"ZeRO-2 / ZeRO-3 samples/s: {out['zero2_over_zero3'] or float('nan'):.2f}; ZeRO-{kept} from here on")
    if run.stage != kept:
        ctx.record(rebuild_s=run.build(kept))
    run.batches.forget(mix)


def largest_batch(run: GiantRun) -> BatchMix:
    """The largest micro-batch with selective checkpointing (full keeps less, so fits there too)."""
    ctx = run.ctx
    run.model.set_grad_checkpointing(True, 1, "selective")
    run.s = run._settings(run.cmp_mix, "selective")  # a rebuild after an out-of-memory step keeps it
    t0 = time.monotonic()
    b, run.trainer, search = fast_max_batch(ctx, run.s, run.trainer, limit=4 if ctx.dry else 256)
    ctx.record(max_batch_per_part=b, max_batch_search={**search, "seconds": time.monotonic() - t0})
    return run.s.mix.scaled(b)


def checkpointing_at(run: GiantRun, big: BatchMix) -> None:
    ctx = run.ctx
    results = {"batch": big.describe(), "zero_stage": run.stage}
    for mode in ("selective", "full"):
        run.model.set_grad_checkpointing(True, 1, mode)
        results[mode] = run.timed(big, 1, 3)
        ctx.record(max_batch=results)
        ctx.say(f"{big.describe()}, {mode} checkpointing: " + line(results[mode]))


def compiled_at(run: GiantRun, big: BatchMix) -> None:
    """Selective and full checkpointing again with every block compiled (inductor; eager in a dry
    run, which traces the same graphs). Compiling takes what time is left past ``RESERVE_S`` and a
    rebuild: a compiled run that fails or is stopped half-way leaves the engine's state behind, so
    the engine is rebuilt (uncompiled) for the steps after it."""
    ctx, results = run.ctx, run.ctx.results["max_batch"]
    budget = ctx.left() - RESERVE_S - run.build_s.get(run.stage, 0.0)
    why = (f"{ctx.left():.0f} s left" if budget < 30 else
           "under ZeRO-3, whose hooks on every submodule break each compiled block into one graph per "
           "submodule (docs/benchmark.md; on the CPU, tracing them outlasted a 175 s allowance)"
           if run.stage == 3 else None)
    if why:
        results["compile"] = f"not run: {why}"
        ctx.record(max_batch=results)
        return
    t0 = time.monotonic()
    run.set_compiled(True)
    results["compile"] = {"backend": "eager (dry run)" if ctx.dry else "inductor"}
    broken = False
    # The faster eager mode first: if compiling outlasts its time, the more useful figure exists.
    modes = sorted(("selective", "full"), key=lambda m: -(results[m].get("samples_per_s") or 0.0))
    for mode in modes:
        run.model.set_grad_checkpointing(True, 1, mode)
        key = f"{mode}, compiled"
        try:
            with allowance(budget - (time.monotonic() - t0)):
                t1 = time.monotonic()
                # The warm-up compiles (dynamo traces each kind of input once); a dry run times one step.
                results[key] = {**run.timed(big, 2, 1 if ctx.dry else 3), "with_warmup_s": time.monotonic() - t1}
        except Overrun as e:
            results[key] = {"error": str(e)}
        results[key]["dynamo"] = compile_stats()
        broken = "error" in results[key]
        ctx.record(max_batch=results)
        ctx.say(f"{big.describe()}, {mode} checkpointing, compiled: " + line(results[key]))
        if broken:
            break
    if broken:
        ctx.say("rebuilding the engine after the failed compiled run")
        ctx.record(rebuild_after_compile_s=run.build(run.stage))


def image_only(run: GiantRun) -> None:
    """Image-only at timm's batch: without checkpointing, as timm ran, if it fits; eager, then
    compiled if the compiled runs above worked and time allows. The faster counts."""
    ctx = run.ctx
    mix = BatchMix(2 if ctx.dry else 64, 0, 0, 64)
    run.set_compiled(False)
    variants = {}
    for every, mode in ((0, "full"), (1, "selective"), (1, "full")):
        run.model.set_grad_checkpointing(every > 0, 1, mode)
        ckpt = f"{mode} checkpointing" if every else "no checkpointing"
        variants[ckpt] = run.timed(mix, 2, 5)
        if variants[ckpt].get("error") != "out of memory":
            break
    _record_image_only(ctx, mix, variants, ckpt)
    results = ctx.results["max_batch"]
    worked = any("samples_per_s" in results.get(f"{m}, compiled", {}) for m in ("selective", "full"))
    if worked and ctx.left() > PROFILE_S + 30:
        run.set_compiled(True)
        try:
            with allowance(ctx.left() - PROFILE_S):
                variants[f"{ckpt}, compiled"] = run.timed(mix, 2, 5)
        except Overrun as e:
            variants[f"{ckpt}, compiled"] = {"error": str(e)}
        run.broken = "error" in variants[f"{ckpt}, compiled"]  # no profile on an engine cut mid-step
        _record_image_only(ctx, mix, variants, f"{ckpt}, compiled")


def _record_image_only(ctx: Context, mix: BatchMix, variants: dict, new: str) -> None:
    best = max(variants, key=lambda k: variants[k].get("samples_per_s") or 0.0)
    ctx.record(image_only={"batch": mix.describe(), "checkpointing": best, **variants[best]},
               image_only_variants=variants)
    ctx.say(f"{mix.describe()}, {new}: " + line(variants[new]))


def profile_best(run: GiantRun, big: BatchMix) -> None:
    """One profiled step of the fastest configuration at the largest batch: the Chrome trace
    (gzipped), the time by kind of work and the five largest costs."""
    ctx = run.ctx
    results = ctx.results["max_batch"]
    best = max((k for k in results if isinstance(results[k], dict) and "samples_per_s" in results[k]),
               key=lambda k: results[k]["samples_per_s"])
    mode = best.split(",")[0]
    run.model.set_grad_checkpointing(True, 1, mode)
    run.set_compiled(best.endswith("compiled"))
    step = run.batches.step_fn(run.trainer, big)
    time_steps(step, 1, 0, ctx.device)
    trace_dir = os.path.join(ctx.out_dir, "profile")
    prof = profile_steps(step, 1, ctx.device, trace_dir, row_limit=25, top=5)
    trace = os.path.join(trace_dir, "trace.json")
    if os.path.exists(trace):
        with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
        os.remove(trace)
        trace += ".gz"
    ctx.record(profile={"configuration": best, "checkpointing": mode, "batch": big.describe(),
                        "step_ms": prof.wall_ms, "device_busy": prof.busy, "top_costs": prof.top,
                        "time_by_kind": prof.shares, "op_table": prof.table,
                        "trace": trace if os.path.exists(trace) else None})
    ctx.say("profile: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in list(prof.shares.items())[:8]))


def fast_max_batch(ctx: Context, s, trainer, limit: int) -> tuple[int, object, dict]:
    """Largest samples-per-part of ``s.mix`` that trains, in a few steps and at most two
    out-of-memory errors (after one, the engine is rebuilt: ZeRO state is not trusted).

    The peak memory of forward + backward alone (the optimizer's transient peak, which does not grow
    with the batch, would hide the activations at small batches) at two probe sizes gives a line;
    its crossing with 90% of the device's memory is the candidate, verified by a whole step. Returns
    (size, the trainer, what was tried). ``s`` runs through DeepSpeed (``trainer.engine``)."""
    batches, tries, mem = Batches(s), [], PeakMemory(s.device)

    def probe(b: int) -> float:
        mix = s.mix.scaled(b)
        batches.step_fn(trainer, mix)()  # a whole step first: the optimizer state exists after it
        batch, targets = batches.on_device(trainer, mix)
        release_memory(s.device)
        mem.reset()
        loss, _ = trainer.engine(batch, targets)
        trainer.engine.backward(loss)
        sync(s.device)
        peak = mem.read_gb()
        trainer.engine.step()
        del loss, batch, targets
        batches.forget(mix)
        tries.append({"per_part": b, "forward_backward_peak_gb": peak})
        ctx.say(f"probe {b} per part: forward + backward peak {peak:.1f} GiB")
        return peak

    def verify(b: int) -> bool:
        nonlocal trainer
        mix = s.mix.scaled(b)
        try:
            m = measure("beit3", batches.step_fn(trainer, mix), batches.get(mix)[2], 0, 1, s.device)
        except RuntimeError as e:
            if not is_oom(e):
                raise
            m = Measurement("beit3", error="out of memory")
        batches.forget(mix)
        tries.append({"per_part": b, "step_peak_gb": m.peak_mem_gb, "error": m.error})
        ctx.say(f"try {b} per part: " + (f"peak {m.peak_mem_gb:.1f} GiB" if m.ok else m.error))
        if m.error not in (None, "out of memory"):
            raise RuntimeError(f"a step with {mix.describe()} failed: {m.error}")
        if not m.ok:
            trainer.close()
            release_memory(s.device)
            trainer = build_trainer("beit3", s, s.checkpoint_every)
            if s.device.type == "cuda":
                tries[-1]["allocated_after_rebuild_gb"] = torch.cuda.memory_allocated(s.device) / GiB
        return m.ok

    b0 = 1 if ctx.dry else 8
    p1, p2 = probe(b0), probe(2 * b0)
    if s.device.type == "cuda":
        capacity = torch.cuda.get_device_properties(s.device).total_memory / GiB
    else:  # a dry run: pretend the device holds twice the second probe's batch
        capacity = (p2 + max(p2 - p1, 0.01) * 2) / 0.9
    slope = max((p2 - p1) / b0, 1e-6)
    candidate = min(limit, int((0.9 * capacity - p2) / slope) + 2 * b0)
    info = {"probes": tries[:2], "capacity_gb": capacity, "gb_per_sample_per_part": slope, "candidate": candidate}
    for b in (candidate, int(0.75 * candidate)):
        if b <= 2 * b0:
            break
        if verify(b):
            return b, trainer, {**info, "tries": tries}
    return 2 * b0, trainer, {**info, "tries": tries}
