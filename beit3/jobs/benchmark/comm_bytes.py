"""The bytes ZeRO-3 moves in one micro-step, counted where they are moved (run under torchrun).

    torchrun --nproc-per-node 2 scripts/zero3_comm.py --json out.json     # giant's layout, 1/22 width
    torchrun --nproc-per-node 2 scripts/zero3_comm.py --preset tiny --steps 3

Two counters, installed before DeepSpeed captures any function:

* ``CollectiveBytes`` wraps every torch.distributed collective under both names it is reachable by
  (``torch.distributed.X`` and ``torch.distributed.distributed_c10d.X``) and adds up the bytes of its
  whole tensor: an all-gather's output, a reduce-scatter's input, an all-reduce's tensor. Each rank's
  link carries (N - 1) / N of that with N ranks.
* ``GatheredParams`` wraps the one method through which ZeRO-3's parameter coordinator starts every
  fetch and prefetch, and records the parameters it gathers (those not yet available): so the
  bytes can be told apart by phase and compared with the parameters that exist.

A micro-step is split into phases (forward, backward, optimizer step) so each count says where it
happened. DeepSpeed records the order of its modules during the second step and uses it from the
third on (prefetching, and keeping a parameter gathered when it is used again within
``stage3_max_reuse_distance`` parameters): steps 1-2 and the steady state are reported apart.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from beit3.model.config import BEiT3Config
from beit3.core.errors import UserError, report
from beit3.core.files import atomic_write_bytes, check_output_file
from beit3.trainer.distributed import finish_distributed, init_distributed
from beit3.trainer.ds_config import default_ds_config, resolve_ds_config
from beit3.trainer.trainer import to_device
from beit3.jobs.pretrain.objective import MaskedDataModeling, prepare_batch
from beit3.jobs.benchmark.batches import BatchMix, synthetic_batch
from beit3.jobs.benchmark.trainers import deepspeed_trainer

GIANT_WIDTH = 1408
# ZeRO-3's settings counted in parameters (numel): scaled with the model, so a narrow model keeps
# the giant's proportions (which parameters persist, how far a reuse may be).
NUMEL_KNOBS = ("stage3_max_reuse_distance", "stage3_max_live_parameters", "stage3_prefetch_bucket_size",
               "stage3_param_persistence_threshold", "reduce_bucket_size")
# Collective -> (kind, which argument holds the whole tensor, by position and by keyword).
COLLECTIVES = {
    "all_gather_into_tensor": ("all_gather", 0, "output_tensor"),
    "_all_gather_base": ("all_gather", 0, "output_tensor"),
    "all_gather": ("all_gather", 0, "tensor_list"),
    "reduce_scatter_tensor": ("reduce_scatter", 1, "input"),
    "_reduce_scatter_base": ("reduce_scatter", 1, "input"),
    "reduce_scatter": ("reduce_scatter", 1, "input_list"),
    "all_reduce": ("all_reduce", 0, "tensor"),
    "broadcast": ("broadcast", 0, "tensor"),
}


def _nbytes(t) -> int:
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


class Phases:
    """The phase of the step now running, and a count per (phase, what)."""

    def __init__(self):
        self.now = "setup"
        self.counts: dict = defaultdict(lambda: defaultdict(float))

    def add(self, what: str, amount: float) -> None:
        self.counts[self.now][what] += amount

    def take(self) -> dict:
        out = {p: dict(c) for p, c in self.counts.items()}
        self.counts.clear()
        return out


class CollectiveBytes:
    """Counts the bytes of every collective call (see the module's docstring) into ``phases``. A
    call made by another collective (gloo lacks some and torch composes them) counts once, at the
    outermost."""

    def __init__(self, phases: Phases):
        self.phases, self._saved, self._depth = phases, [], 0

    def install(self) -> None:
        for name, (kind, pos, key) in COLLECTIVES.items():
            for mod in (dist, c10d):
                fn = getattr(mod, name, None)
                if fn is not None and not getattr(fn, "_counted", False):
                    self._saved.append((mod, name, fn))
                    setattr(mod, name, self._wrap(fn, kind, pos, key))

    def uninstall(self) -> None:
        for mod, name, fn in reversed(self._saved):
            setattr(mod, name, fn)
        self._saved.clear()

    def _wrap(self, fn, kind: str, pos: int, key: str):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self._depth == 0:
                t = args[pos] if len(args) > pos else kwargs.get(key)
                self.phases.add(f"{kind}_bytes", _nbytes(t))
                self.phases.add(f"{kind}_calls", 1)
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
        counted._counted = True
        return counted


class GatheredParams:
    """Records the parameters each ZeRO-3 fetch gathers (numel, and which), into ``phases``."""

    METHOD = "_PartitionedParameterCoordinator__all_gather_params_"

    def __init__(self, phases: Phases):
        self.phases, self.seen, self._orig = phases, defaultdict(set), None

    def install(self) -> None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus  # heavy: deepspeed, ~2 s to import
        from deepspeed.runtime.zero.partitioned_param_coordinator import (  # heavy: deepspeed, ~2 s to import
            PartitionedParameterCoordinator as C)
        orig = self._orig = getattr(C, self.METHOD)

        def recorded(coordinator, params, forward, quantize=False):
            for p in params:
                if p.ds_status == ZeroParamStatus.NOT_AVAILABLE:
                    self.phases.add("gathered_numel", p.ds_numel)
                    self.seen[self.phases.now].add(p.ds_id)
            return orig(coordinator, params, forward, quantize)
        setattr(C, self.METHOD, recorded)

    def uninstall(self) -> None:
        from deepspeed.runtime.zero.partitioned_param_coordinator import (  # heavy: deepspeed, ~2 s to import
            PartitionedParameterCoordinator as C)
        if self._orig is not None:
            setattr(C, self.METHOD, self._orig)

    def take_distinct(self) -> set:
        ids = set().union(*self.seen.values()) if self.seen else set()
        self.seen.clear()
        return ids


@dataclass
class Model:
    cfg: BEiT3Config
    num_visual_tokens: int
    scale: float  # numel of a D x D matrix relative to giant's: (D / 1408)^2

    @classmethod
    def narrow_giant(cls, width: int) -> "Model":
        """Giant's layout (40 layers, 3 VL layers, its image and text lengths) at ``width``: every
        matrix and every vocabulary scaled by width / 1408, so every matrix's numel, and the
        model's, is giant's x (width / 1408)^2 (the vectors, <0.1%, scale less)."""
        s = width / GIANT_WIDTH
        heads = max(1, round(16 * s))
        while width % heads:
            heads -= 1
        cfg = BEiT3Config.from_preset("giant", embed_dim=width, num_heads=heads, ffn_dim=round(6144 * s),
                                      vocab_size=round(64010 * s))
        return cls(cfg, round(8192 * s), s * s)

    @classmethod
    def preset(cls, name: str) -> "Model":
        cfg = BEiT3Config.from_preset(name)
        return cls(cfg, 8192, (cfg.embed_dim / GIANT_WIDTH) ** 2)


# Short names of the settings a variant may change (``--variants``), in giant's numel.
VARIANT_KEYS = {"reuse": "stage3_max_reuse_distance", "live": "stage3_max_live_parameters",
                "prefetch": "stage3_prefetch_bucket_size"}


def parse_variant(text: str) -> dict:
    """"config" (zero3_bf16.json as it is) or "reuse=0,live=1e9": settings in giant's numel."""
    if text == "config":
        return {}
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in VARIANT_KEYS:
            raise ValueError(f"--variants {text!r}: {key!r} is not one of {sorted(VARIANT_KEYS)}")
        try:
            out[VARIANT_KEYS[key]] = float(value)
        except ValueError:
            raise ValueError(f"--variants {text!r}: {key}={value!r} is not a number") from None
    return out


def scaled_ds_config(model: Model, mix: BatchMix, variant: dict) -> dict:
    """The GPU config (``zero3_bf16.json``) for one rank's micro-batch on this CPU, with the
    ``variant``'s settings: its numel settings x ``model.scale``; no overlap stream (there is none
    on the CPU)."""
    cfg = resolve_ds_config(default_ds_config("cuda"), mix.samples, None, dist.get_world_size())
    zero = cfg["zero_optimization"]
    zero.update(variant)
    for k in NUMEL_KNOBS:
        if k in zero:
            zero[k] = int(zero[k] * model.scale)
    zero["overlap_comm"] = False
    return cfg


def param_numels(engine) -> dict:
    """Partitioned (gathered when used) and persistent numel of the engine's parameters."""
    part = sum(p.ds_numel for p in engine.module.parameters() if not p.ds_persist)
    keep = sum(p.ds_numel for p in engine.module.parameters() if p.ds_persist)
    return {"partitioned_numel": part, "persistent_numel": keep}


def count_steps(model: Model, mix: BatchMix, ds_config: dict, steps: int, phases: Phases,
                params: GatheredParams, checkpoint_every: int) -> dict:
    """Build an engine for ``mix``, train ``steps`` micro-steps, count each."""
    torch.manual_seed(0)
    module = MaskedDataModeling(model.cfg, model.num_visual_tokens)
    module.model.set_grad_checkpointing(checkpoint_every > 0, max(1, checkpoint_every))
    phases.now = "setup"
    trainer = deepspeed_trainer(module, ds_config)
    batch, targets = synthetic_batch(model.cfg, mix, model.num_visual_tokens, seed=dist.get_rank())
    batch = to_device(prepare_batch(batch, model.cfg.vocab_size), torch.device("cpu"), trainer.input_dtype)
    targets = to_device(targets, torch.device("cpu"), trainer.input_dtype)
    out = {**param_numels(trainer.engine), "setup": phases.take(), "steps": []}
    params.take_distinct()
    engine = trainer.engine
    for _ in range(steps):
        phases.now = "forward"
        loss, _ = engine(batch, targets)
        phases.now = "backward"
        engine.backward(loss)
        phases.now = "optimizer step"
        engine.step()
        phases.now = "setup"
        distinct = params.take_distinct()
        out["steps"].append({"loss": float(loss.detach()), **phases.take(),
                             "distinct_gathered_numel": _numel_of(engine, distinct)})
    trainer.close()
    return out


def _numel_of(engine, ds_ids: set) -> int:
    return sum(p.ds_numel for p in engine.module.parameters() if p.ds_id in ds_ids)


MIXES = {"mixed": (2, 2, 2), "images": (2, 0, 0), "texts": (0, 2, 0), "pairs": (0, 0, 2)}


def copies(run: dict, bytes_per_param: int) -> dict:
    """The last (steady-state) step of ``run`` in model copies: gathered bytes / (bytes_per_param x
    partitioned numel), forward and backward (only partitioned parameters are gathered); and
    reduce-scattered bytes / (bytes_per_param x all parameters) (every gradient is reduced)."""
    last, whole = run["steps"][-1], bytes_per_param * run["partitioned_numel"]
    fwd, bwd = last.get("forward", {}), last.get("backward", {})
    every = bytes_per_param * (run["partitioned_numel"] + run["persistent_numel"])
    return {"gathered_copies_forward": fwd.get("all_gather_bytes", 0) / whole,
            "gathered_copies_backward": bwd.get("all_gather_bytes", 0) / whole,
            "reduce_scattered_copies": sum(p.get("reduce_scatter_bytes", 0) for p in last.values()
                                           if isinstance(p, dict)) / every,
            "distinct_gathered_share": last["distinct_gathered_numel"] / run["partitioned_numel"]}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="scripts/zero3_comm.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="a preset (tiny, base, ...); default: giant's layout narrowed")
    ap.add_argument("--width", type=int, default=64, help="the narrowed giant's width (default 64)")
    ap.add_argument("--mixes", default=",".join(MIXES), help=f"comma-separated subset of {','.join(MIXES)}")
    ap.add_argument("--steps", type=int, default=3, help="micro-steps per engine (the third is steady)")
    ap.add_argument("--variants", default="config;reuse=0",
                    help="';'-separated ZeRO-3 settings to count under: 'config' (zero3_bf16.json's) or "
                         "changes such as 'reuse=0,live=1e9' (stage3_max_reuse_distance, _max_live_parameters, "
                         "_prefetch_bucket_size), in giant's numel: scaled with the model like the config's")
    ap.add_argument("--checkpoint-every", type=int, default=1, help="activation checkpointing, as the giant recipe")
    ap.add_argument("--json", default=None, help="write the counts here (rank 0)")
    return ap


def giant_numels(threshold: float = 1e6) -> dict:
    """Giant's parameters (pretraining module, paper layout), and those ZeRO-3 partitions: more than
    ``zero3_bf16.json``'s ``stage3_param_persistence_threshold`` elements (the rest persist)."""
    with torch.device("meta"):  # shapes only
        module = MaskedDataModeling(BEiT3Config.from_preset("giant"), 8192)
    sizes = [p.numel() for p in module.parameters()]
    return {"params": sum(sizes), "partitioned_numel": sum(n for n in sizes if n > threshold)}


def for_giant(c: dict, giant: dict, bytes_per_param: int) -> dict:
    """The counts in model copies, applied to giant: GB per rank and micro-step (whole tensors; a
    rank's link carries (N - 1) / N of them). The narrowed model's copies are giant's because every
    numel, its parameters' and ZeRO-3's settings', was scaled by the same factor."""
    gather = (c["gathered_copies_forward"] + c["gathered_copies_backward"]) * giant["partitioned_numel"]
    return {"all_gather_gb": bytes_per_param * gather / 1e9,
            "reduce_scatter_gb": bytes_per_param * c["reduce_scattered_copies"] * giant["params"] / 1e9}


def _check_args(args) -> tuple[list[str], dict]:
    mixes = [m for m in args.mixes.split(",") if m]
    bad = [m for m in mixes if m not in MIXES]
    if bad:
        raise UserError(f"--mixes {bad}: expected some of {list(MIXES)}")
    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: expected >= 1")
    try:
        variants = {v: parse_variant(v) for v in args.variants.split(";") if v}
    except ValueError as e:
        raise UserError(str(e)) from e
    if args.json:
        check_output_file(args.json, "--json")
    return mixes, variants


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        mixes, variants = _check_args(args)
    except UserError as e:
        return report("zero3_comm", e, 2)
    phases = Phases()
    coll, params = CollectiveBytes(phases), GatheredParams(phases)
    coll.install()  # before DeepSpeed's backend captures torch.distributed's functions
    params.install()
    info = init_distributed(device="cpu")
    model = Model.preset(args.preset) if args.preset else Model.narrow_giant(args.width)
    result = {"model": {"preset": model.cfg.preset, "embed_dim": model.cfg.embed_dim, "depth": model.cfg.depth,
                        "vocab_size": model.cfg.vocab_size, "num_visual_tokens": model.num_visual_tokens,
                        "scale": model.scale},
              "giant": giant_numels(), "world_size": info.world_size, "checkpoint_every": args.checkpoint_every,
              "runs": {}}
    for text, variant in variants.items():
        for name in mixes:
            run = count_mix(model, name, variant, args, phases, params)
            run["giant"] = for_giant(run["copies"], result["giant"], run["bytes_per_param"])
            result["runs"][f"{text}, {name}"] = run
            if info.is_main:
                print(f"{text}, {name}: " + summary_line(run), flush=True)
    if info.is_main and args.json:
        atomic_write_bytes(args.json, json.dumps(result, indent=1).encode())
    params.uninstall()
    coll.uninstall()
    finish_distributed(info)
    return 0


def count_mix(model: Model, name: str, variant: dict, args, phases: Phases, params: GatheredParams) -> dict:
    mix = BatchMix(*MIXES[name], text_len=64)
    ds = scaled_ds_config(model, mix, variant)
    run = count_steps(model, mix, ds, args.steps, phases, params, args.checkpoint_every)
    run["bytes_per_param"] = 2 if ds.get("bf16", {}).get("enabled") else 4
    run["zero_optimization"] = ds["zero_optimization"]
    run["copies"] = copies(run, run["bytes_per_param"])
    return run


def summary_line(run: dict) -> str:
    s, g = run["copies"], run["giant"]
    return (f"gathered {s['gathered_copies_forward']:.2f} + {s['gathered_copies_backward']:.2f} copies (forward + "
            f"backward), gradients reduce-scattered {s['reduce_scattered_copies']:.2f}; "
            f"{100 * s['distinct_gathered_share']:.0f}% of the partitioned parameters used; giant: {g['all_gather_gb']:.2f} GB gathered, "
            f"{g['reduce_scatter_gb']:.2f} GB reduce-scattered per rank and micro-step")


if __name__ == "__main__":
    sys.exit(main())
