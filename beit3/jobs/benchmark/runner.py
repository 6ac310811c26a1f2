"""What ``beit3 benchmark`` measures, and in which order.

A run measures one or more *configurations* (a batch mix and an activation-checkpointing
setting). Each model is built once and timed on every configuration it takes part in, then freed
before the next model is built, so on a GPU at most one model holds memory at a time:

    beit3       every configuration (the pretraining mix; image-only for the timm comparison;
                the same batch with checkpointing off, full and selective for the checkpointing cost)
    torchscale  the pretraining mix                (--compare torchscale)
    timm        image-only                         (--compare timm)

All models see the same batch tensors and the same number of warm-up and timed steps.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch

from beit3.model.config import BEiT3Config
from beit3.trainer.flops import pretrain_flops_breakdown
from beit3.trainer.trainer import to_device
from beit3.jobs.pretrain.objective import MaskedDataModeling, prepare_batch
from beit3.trainer.flops import batch_counts
from beit3.jobs.benchmark.batches import BatchMix, synthetic_batch
from beit3.jobs.benchmark.measure import Measurement, is_oom, measure, release_memory
from beit3.jobs.benchmark.peers import TimmMIM, TorchscaleMDM
from beit3.jobs.benchmark.search import largest_fitting
from beit3.jobs.benchmark.trainers import compile_layers, compile_support, deepspeed_trainer, plain_trainer, sdpa_context

PEERS = ("torchscale", "timm")


@dataclass
class Settings:
    """Everything a run needs: the model config, device, batch mix, step counts and options."""
    cfg: BEiT3Config
    device: torch.device
    mix: BatchMix
    warmup: int
    steps: int
    checkpoint_every: int = 0
    checkpoint_mode: str = "full"  # "full" or "selective" (see BEiT3.set_grad_checkpointing)
    ds_config: Optional[dict] = None  # None: plain PyTorch (bf16 autocast on CUDA)
    compile: bool = False
    sdpa: str = "auto"
    num_visual_tokens: int = 8192
    compare: tuple = ()
    checkpoint_cost: bool = False
    seed: int = 0
    compile_skipped: Optional[str] = field(default=None, init=False)  # why --compile was not applied

    def __post_init__(self):
        unknown = set(self.compare) - set(PEERS)
        if unknown:
            raise ValueError(f"--compare {sorted(unknown)}: expected {PEERS}")
        if self.compile:
            self.compile_skipped = compile_support(self.device)


@dataclass
class Config:
    """One measured configuration: a batch, a checkpointing setting, and the peers timed on it."""
    label: str
    mix: BatchMix
    checkpoint_every: int
    peers: tuple = ()
    checkpoint_mode: str = "full"


def plan(s: Settings) -> list[Config]:
    main_peers = tuple(p for p in PEERS if p in s.compare and (p == "torchscale" or s.mix.image_only))
    main = Config("image-only" if s.mix.image_only else "pretrain", s.mix, s.checkpoint_every, main_peers,
                  s.checkpoint_mode)
    configs = [main]
    if "timm" in s.compare and not s.mix.image_only:
        configs.append(Config("image-only", s.mix.as_image_only(), s.checkpoint_every, ("timm",), s.checkpoint_mode))
    if s.checkpoint_cost:  # the main batch with checkpointing off, full and selective (the main one once)
        every = s.checkpoint_every or 1
        for e, mode in ((0, "full"), (every, "full"), (every, "selective")):
            if _setting(e, mode) != _setting(main.checkpoint_every, main.checkpoint_mode):
                label = f"checkpoint_every={e}" + (",selective" if e and mode == "selective" else "")
                configs.append(Config(label, s.mix, e, (), mode))
    return configs


def _setting(every: int, mode: str) -> tuple:
    return (every, mode) if every else (0, "off")


def build_trainer(name: str, s: Settings, checkpoint_every: int):
    """A trainer for ``name`` ("beit3" or a peer), layers compiled if asked and possible."""
    torch.manual_seed(s.seed)
    with torch.device(s.device):  # built where it trains: a 1.9B model initialises in seconds there
        module, layers = _build_module(name, s, checkpoint_every)
    info = {"params": sum(p.numel() for p in module.parameters())}
    if name == "timm":
        info["fused_attn"] = module.fused_attn
    if name != "beit3":
        info["checkpointing"] = "every layer" if checkpoint_every > 0 else "off"
    if s.compile and s.compile_skipped is None:
        compile_layers(layers)
    if name == "beit3" and s.ds_config is not None:
        trainer = deepspeed_trainer(module, s.ds_config)
    else:
        trainer = plain_trainer(module, s.device)
    trainer.info = info
    return trainer


def _build_module(name: str, s: Settings, checkpoint_every: int):
    """(module, its repeated layers) of model ``name``."""
    if name == "beit3":
        module = MaskedDataModeling(s.cfg, s.num_visual_tokens)
        module.model.set_grad_checkpointing(checkpoint_every > 0, checkpoint_every, s.checkpoint_mode)
        return module, module.model.layers
    if name == "torchscale":
        module = TorchscaleMDM(s.cfg, s.num_visual_tokens, checkpoint_activations=checkpoint_every > 0)
        return module, module.layers
    if name == "timm":
        module = TimmMIM(s.cfg, s.num_visual_tokens, grad_checkpointing=checkpoint_every > 0)
        return module, module.layers
    raise ValueError(f"unknown model {name!r}")


def _set_checkpointing(trainer, name: str, c: Config) -> None:
    if name == "beit3":  # peers keep what they were built with (torchscale/timm: all or nothing)
        model = trainer.module.model
        model.set_grad_checkpointing(c.checkpoint_every > 0, c.checkpoint_every, c.checkpoint_mode)


class Batches:
    """The synthetic batch of each mix, built once on the CPU, and its work (samples, tokens, FLOPs)."""

    def __init__(self, s: Settings):
        self.s = s
        self._cache: dict[BatchMix, tuple] = {}

    def forget(self, mix: BatchMix) -> None:
        self._cache.pop(mix, None)

    def get(self, mix: BatchMix) -> tuple[dict, dict, tuple]:
        if mix not in self._cache:
            batch, targets = synthetic_batch(self.s.cfg, mix, self.s.num_visual_tokens, self.s.seed)
            flops = pretrain_flops_breakdown(self.s.cfg, batch, self.s.num_visual_tokens)["total"]
            work = (*batch_counts(self.s.cfg, batch), flops)
            self._cache[mix] = (prepare_batch(batch, self.s.cfg.vocab_size), targets, work)
        return self._cache[mix]

    def on_device(self, trainer, mix: BatchMix) -> tuple[dict, dict]:
        """Device-resident copies of the batch and targets, cast like the real loop."""
        batch, targets, _ = self.get(mix)
        return (to_device(batch, self.s.device, trainer.input_dtype),
                to_device(targets, self.s.device, trainer.input_dtype))

    def step_fn(self, trainer, mix: BatchMix):
        """The step closure on device-resident copies of the batch (cast like the real loop)."""
        batch, targets = self.on_device(trainer, mix)
        sdpa = self.s.sdpa

        def step():
            with sdpa_context(sdpa):
                trainer.step(batch, targets)
        return step


def measure_model(name: str, configs: list[Config], s: Settings, batches: Batches) -> dict:
    """{config label: Measurement} of model ``name`` on each of ``configs``, built once."""
    out = {}
    try:
        trainer = build_trainer(name, s, configs[0].checkpoint_every)
    except (RuntimeError, ImportError) as e:
        if isinstance(e, RuntimeError) and not is_oom(e):
            raise
        why = "out of memory" if isinstance(e, RuntimeError) else f"not installed: {e}"
        return {c.label: Measurement(name, *batches.get(c.mix)[2], error=why) for c in configs}
    try:
        for c in configs:
            _set_checkpointing(trainer, name, c)
            work = batches.get(c.mix)[2]
            try:
                step = batches.step_fn(trainer, c.mix)
            except RuntimeError as e:
                if not is_oom(e):
                    raise
                out[c.label] = Measurement(name, *work, error="out of memory")
                continue
            out[c.label] = measure(name, step, work, s.warmup, s.steps, s.device)
            out[c.label].info.update(trainer.info)
            del step
    finally:
        trainer.close()
        del trainer
        release_memory(s.device)
    return out


def run(s: Settings) -> list[tuple[Config, dict]]:
    """Measure every configuration of ``plan(s)``: [(config, {model name: Measurement})]."""
    configs = plan(s)
    batches = Batches(s)
    results = {c.label: {} for c in configs}
    for name in ("beit3", *PEERS):
        mine = [c for c in configs if name == "beit3" or name in c.peers]
        if mine:
            for label, m in measure_model(name, mine, s, batches).items():
                results[label][name] = m
    return [(c, results[c.label]) for c in configs]


def find_max_batch(s: Settings, limit: int) -> int:
    """Largest number of samples per part of ``s.mix`` (see ``BatchMix.scaled``) with which our
    model trains two steps without running out of CUDA memory; the engine is rebuilt after an OOM."""
    if s.device.type != "cuda":
        raise ValueError("--find-max-batch needs a CUDA device (it searches for out-of-memory errors)")
    state = {"trainer": None}
    batches = Batches(s)

    def fits(b: int) -> bool:
        mix = s.mix.scaled(b)
        if state["trainer"] is None:
            state["trainer"] = build_trainer("beit3", s, s.checkpoint_every)
        try:
            m = measure("beit3", batches.step_fn(state["trainer"], mix), batches.get(mix)[2], 1, 1, s.device)
        except RuntimeError as e:  # moving the batch to the device
            if not is_oom(e):
                raise
            m = Measurement("beit3", error="out of memory")
        if m.error not in (None, "out of memory"):
            raise RuntimeError(f"--find-max-batch: a step with {mix.describe()} failed: {m.error}")
        ok = m.ok
        batches.forget(mix)
        if not ok:  # a step that ran out of memory half-way can leave ZeRO-3 state behind
            state["trainer"].close()
            state["trainer"] = None
            release_memory(s.device)
        return ok

    try:
        return largest_fitting(fits, limit)
    finally:
        if state["trainer"] is not None:
            state["trainer"].close()
        release_memory(s.device)


def with_mix(s: Settings, mix: BatchMix) -> Settings:
    """``s`` with another batch mix; the DeepSpeed config's batch sizes follow it."""
    ds = None
    if s.ds_config is not None:
        ga = s.ds_config.get("gradient_accumulation_steps", 1)
        world = s.ds_config["train_batch_size"] // (s.ds_config["train_micro_batch_size_per_gpu"] * ga)
        ds = {**s.ds_config, "train_micro_batch_size_per_gpu": mix.samples,
              "train_batch_size": mix.samples * ga * world}
    return dataclasses.replace(s, mix=mix, ds_config=ds)
