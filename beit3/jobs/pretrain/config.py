"""The pretraining job's settings: one dataclass, its named recipes, and the checks that need no model.

    cfg = PretrainConfig.from_recipe("pretrain-base", steps=1000)     # or PretrainConfig(preset="tiny")
    cfg = cfg.resolved("cuda")          # device- and size-dependent defaults filled in
    ds_config = cfg.check(world_size)   # every check that needs no model, before any GPU time

``beit3 pretrain`` generates its flags from the fields (``beit3.core.settings``), applies a recipe, then a
``--config`` file (a saved ``run_config.json`` replays its run), then the flags given. Fields left
``None`` get their value in ``resolved``; the resolved config is what ``run_config.json`` keeps.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Optional

from beit3.model.config import PRESETS, BEiT3Config, checked_from_dict
from beit3.core.settings import SettingError, check_settings, flag_name, setting as _f
from beit3.model.activation_checkpointing import CHECKPOINT_MODES
from beit3.trainer.recompute import check_activation_checkpointing, fill_checkpoint_defaults
from beit3.trainer.ds_config import ConfigError, default_ds_config, ds_config_path, resolve_ds_config


SOURCE_FLAGS = {"images": "image_shards", "texts": "text_shards", "pairs": "pair_shards"}


@dataclass
class PretrainConfig:
    # -- model
    preset: str = _f("tiny", choices=sorted(PRESETS))
    layout: str = _f("paper", choices=["paper", "released"])
    init_scheme: str = _f("subln", "subln: torchscale's Sub-LN (Magneto) scaling of fc1/fc2/v/out by sqrt(log 2N) on "
                          "unilm's truncated normal (the reference); plain: the truncated normal alone",
                          choices=["subln", "plain"])
    patch_aggregation: bool = _f(False, "BEiT v2 CLS pretraining head")
    drop_path: float = _f(0.1, ge=0, lt=1)
    # -- data
    data: Optional[str] = _f(None, "'synthetic' (the embedded world, built and cached; the default without "
                             "sources) or a shards directory holding images-*/texts-*/pairs-*.tar and manifest.json")
    pair_shards: Optional[list] = _f(None, "image-text pairs: PATTERN[::WEIGHT] (repeat to mix; docs/data.md)",
                                     metavar="PATTERN[::WEIGHT]")
    image_shards: Optional[list] = _f(None, "images (pair shards' captions are ignored)", metavar="PATTERN[::WEIGHT]")
    text_shards: Optional[list] = _f(None, "texts", metavar="PATTERN[::WEIGHT]")
    shard_retries: int = _f(3, "further attempts at a remote shard whose open or read failed",
                           ge=0)
    retry_backoff: float = _f(1.0, "seconds before the first retry, doubled for each further one",
                                 ge=0)
    shard_connect_timeout: float = _f(30.0, "seconds to connect to a remote shard's server", gt=0)
    shard_read_timeout: float = _f(60.0, "seconds in which a remote shard must deliver --shard-min-rate bytes/s; "
                                   "a stalled or trickling read fails and is retried", gt=0)
    shard_min_rate: float = _f(1024.0, "bytes/s below which a remote read counts as stalled", ge=0)
    max_bad_shard_fraction: float = _f(0.1, "stop when a reader has given up on more than this share of a "
                                       "source's shards", ge=0, le=1)
    data_streams: Optional[int] = _f(None, "readers of the data stream over all ranks (default: ranks x max(1, "
                                     "--num-workers)); fixed for the run: a resume on another number of ranks keeps "
                                     "the exact stream, reading without waste when this is a multiple of its ranks "
                                     "(x workers)", ge=1)
    spm: Optional[str] = _f(None, "SentencePiece model (default: the synthetic world's)")
    tokenizer: Optional[str] = _f(None, "VQ-KD: a train-tokenizer output dir, or an official beit2 checkpoint "
                                  "(with --tokenizer-preset)")
    tokenizer_preset: Optional[str] = _f(None, "VQKDConfig preset of an official checkpoint")
    batch_images: Optional[int] = _f(None, "per rank per micro-step (default 16 for tiny, 32 otherwise; 0 without "
                                     "an image source)", ge=0)
    batch_texts: Optional[int] = _f(None, "per rank per micro-step", ge=0)
    batch_pairs: Optional[int] = _f(None, "per rank per micro-step", ge=0)
    max_text_len: Optional[int] = _f(None, "text tokens with <s> and </s>, at most the preset's position table "
                                     "(1022); default 32 for tiny, 64 otherwise", ge=3)
    text_padding: str = _f("longest", "pad each micro-batch's texts to its longest text rounded up to 8 (no compute "
                           "on padding) or always to --max-text-len (one shape every step)", choices=["longest", "max"])
    mask_pair_images: bool = _f(False, "also mask (and predict) pair images")
    num_workers: Optional[int] = _f(None, "data loader workers per rank (default 0 on CPU, 6 on GPU)", ge=0)
    # -- optimisation (BEiT-3 appendix: AdamW (0.9, 0.98), eps 1e-6, wd 0.05, cosine, drop path 0.1)
    steps: int = _f(200, "optimizer steps: the schedule's length", ge=1)
    lr: Optional[float] = _f(None, "peak lr (default 1e-3; 2e-3 for tiny)", gt=0)
    min_lr_ratio: float = _f(0.01, "the cosine ends at lr x this", ge=0, le=1)
    warmup_steps: Optional[int] = _f(None, "default min(10000, steps // 10)", ge=0)
    weight_decay: float = _f(0.05, ge=0)
    beta2: float = _f(0.98, "AdamW's second-moment decay", ge=0, lt=1)
    grad_clip: Optional[float] = _f(None, "override the DeepSpeed config's gradient_clipping (3.0 in ours; 0 = "
                                    "none)", ge=0)
    grad_accum: Optional[int] = _f(None, "gradient accumulation steps (default: the DeepSpeed config's)", ge=1)
    micro_batches_per_step: Optional[int] = _f(None, "micro-batches per optimizer step over all ranks (ranks x "
                                               "grad-accum): the accumulation follows the number of ranks, so a run "
                                               "resumed or re-formed on fewer or more ranks keeps its global batch", ge=1)
    ds_config: Optional[str] = _f(None, "DeepSpeed JSON (default: ds_configs/zero3_bf16.json on GPU, "
                                  "cpu_zero3.json on CPU)", flags=("--deepspeed",))
    checkpoint_every: Optional[int] = _f(None, "activation checkpointing every k-th layer (0 = off; default 1 on "
                                         "GPU, 0 on CPU, 1 with --checkpoint-mode)", ge=0)
    checkpoint_mode: Optional[str] = _f(None, "what a checkpointed layer keeps: 'full' (default) only its input; "
                                        "'selective' also its matmul and attention outputs (more memory, no "
                                        "repeated matmuls)", choices=list(CHECKPOINT_MODES))
    seed: int = _f(0, ge=0, lt=2**32)
    # -- run
    output: str = _f("runs/pretrain")
    save_every: int = _f(100, "optimizer steps between checkpoints", ge=1)
    keep_last: int = _f(3, "checkpoints kept (0: all)", ge=0)
    resume: Optional[str] = _f(None, "'auto' (newest complete checkpoint in --output) or a path")
    overwrite: bool = _f(False, "replace the run already in --output (refused otherwise, unless --resume): its "
                         "files are first moved into <output>/replaced-<time>/")
    allow_pickle: bool = _f(False, "resume from a checkpoint whose files need full unpickling (only one you "
                            "trust: unpickling can run code)")
    final_weights: bool = _f(True, "when the run stops, write <output>/final/: the backbone's fp32 weights as a saved "
                             "model (beit3.from_pretrained, finetune --init); every rank gathers them, one parameter "
                             "at a time")
    stop_after_steps: Optional[int] = _f(None, "leave after this many steps of this run with a checkpoint, as on "
                                         "SIGTERM (time-limited jobs; the schedule still spans --steps)", ge=1)
    log_every: int = _f(10, "optimizer steps between logged lines", ge=1)
    max_bad_steps: int = _f(5, "stop after this many non-finite steps in a row", ge=1)
    dist_timeout: float = _f(1800.0, "seconds a collective may wait for a peer before failing", gt=0)
    device: Optional[str] = _f(None, "default: cuda when available", choices=["cuda", "cpu"])
    tensorboard: bool = _f(True, "also write tensorboard/ beside metrics.jsonl")
    report_to: str = _f("", "where the metrics go besides metrics.jsonl: a comma list of tensorboard, wandb, "
                        "mlflow, or none (default: tensorboard; none with --no-tensorboard; docs/tracking.md)",
                        metavar="LIST")

    def __post_init__(self):
        check_settings(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PretrainConfig":
        return checked_from_dict(cls, d, flag_name)

    @classmethod
    def from_recipe(cls, name: str, **overrides) -> "PretrainConfig":
        if name not in RECIPES:
            raise ConfigError(f"unknown pretraining --recipe {name!r}; choices: {', '.join(RECIPES)}")
        return cls.from_dict({**RECIPES[name], **overrides})

    @classmethod
    def from_file(cls, path: str) -> dict:
        """The settings a ``--config`` file holds: a saved ``run_config.json`` (its ``"args"``) or a
        JSON object of fields. Returned as a checked dict, to go under the command line's flags."""
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"--config {path}: {e}") from None
        d = d.get("args", d) if isinstance(d, dict) else d
        if not isinstance(d, dict):
            raise ConfigError(f"--config {path}: expected a JSON object of settings, got {type(d).__name__}")
        d = {k: v for k, v in d.items() if k != "overwrite"}  # a replay replaces a run only when its command says so
        try:
            checked_from_dict(cls, d, lambda name: f'"{name}"')
        except (TypeError, SettingError) as e:
            raise ConfigError(f"--config {path}: {e}") from None
        return d

    def replace(self, **changes) -> "PretrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def has_sources(self) -> bool:
        return any(getattr(self, flag) for flag in SOURCE_FLAGS.values())

    def resolved(self, device: str) -> "PretrainConfig":
        """A copy with the device- and size-dependent defaults filled in."""
        c = self.replace()
        tiny = c.preset == "tiny"
        fill_checkpoint_defaults(c, device)
        if c.has_sources():  # a kind without a source trains on nothing unless its batch is asked for
            for kind, flag in SOURCE_FLAGS.items():
                if not getattr(c, flag) and getattr(c, f"batch_{kind}") is None:
                    setattr(c, f"batch_{kind}", 0)
        elif c.data is None:
            c.data = "synthetic"
        for name, value in (("batch_images", 16 if tiny else 32), ("batch_texts", 16 if tiny else 32),
                            ("batch_pairs", 16 if tiny else 32), ("max_text_len", 32 if tiny else 64),
                            ("lr", 2e-3 if tiny else 1e-3), ("num_workers", 0 if device == "cpu" else 6)):
            if getattr(c, name) is None:
                setattr(c, name, value)
        if c.warmup_steps is None:
            c.warmup_steps = min(10000, max(1, c.steps // 10))
        c.ds_config = default_ds_config(device) if c.ds_config is None else ds_config_path(c.ds_config)
        return c

    def check(self, world_size: int) -> dict:
        """Every check that needs no model (on a resolved config); returns the DeepSpeed config."""
        from beit3.core.files import check_output_dir
        check_activation_checkpointing(self)
        positions = BEiT3Config.from_preset(self.preset, layout=self.layout).max_text_len
        if self.max_text_len > positions:
            raise ConfigError(f"--max-text-len {self.max_text_len}: the {self.preset} preset's text position table "
                              f"holds {positions} tokens")
        micro = self.batch_images + self.batch_texts + self.batch_pairs
        if micro == 0:
            raise ConfigError("--batch-images, --batch-texts and --batch-pairs are all 0")
        self._check_data()
        if self.resume not in (None, "auto") and not os.path.isdir(self.resume):
            raise ConfigError(f"--resume {self.resume!r}: no such checkpoint directory")
        check_output_dir(self.output)
        return resolve_ds_config(self.ds_config, micro, self.accumulation(world_size), world_size)

    def accumulation(self, world_size: int) -> Optional[int]:
        """Gradient accumulation steps on ``world_size`` ranks: ``--micro-batches-per-step`` N gives
        N / ranks; else ``--grad-accum`` (None: the DeepSpeed config's)."""
        n = self.micro_batches_per_step
        if n is None:
            return self.grad_accum
        if n < 1 or n % world_size:
            raise ConfigError(f"--micro-batches-per-step {n} is not a positive multiple of the {world_size} ranks")
        if self.grad_accum is not None and self.grad_accum != n // world_size:
            raise ConfigError(f"--grad-accum {self.grad_accum} but --micro-batches-per-step {n} on {world_size} "
                              f"ranks means {n // world_size}: give one of them")
        return n // world_size

    def _check_data(self) -> None:
        sources = self.has_sources()
        if sources and self.data is not None:
            raise ConfigError("give --data or the --image/--text/--pair-shards sources, not both")
        for kind, flag in SOURCE_FLAGS.items():
            if sources and not getattr(self, flag) and getattr(self, f"batch_{kind}"):
                raise ConfigError(f"--batch-{kind} {getattr(self, f'batch_{kind}')} but no "
                                  f"--{flag.replace('_', '-')} source")
        if not sources and self.data != "synthetic" and not os.path.isdir(self.data):
            raise ConfigError(f"--data {self.data!r}: no such directory (expected shards, or 'synthetic')")
        if self.data != "synthetic" and (self.spm is None or self.tokenizer is None):
            raise ConfigError("real data (--data DIR or sources) needs --spm and --tokenizer")
        for name in ("spm", "tokenizer"):
            path = getattr(self, name)
            if path is not None and not os.path.exists(path):
                raise ConfigError(f"--{name} {path!r} does not exist")


# The BEiT-3 paper's pretraining (appendix, giant): 1M steps, 6144 samples a step (2048 images, 2048
# texts, 2048 pairs), AdamW (0.9, 0.98) eps 1e-6, peak lr 1e-3 with 10k warm-up steps and cosine decay
# to 1e-5, weight decay 0.05, stochastic depth 0.1, 224 px. Batches are per rank and micro-step: the
# values below give the global 2048 per kind on 128 GPUs (giant) and on 64 GPUs (base); on another
# cluster scale them, or --grad-accum, to keep the global batch.
_PAPER = dict(steps=1_000_000, lr=1e-3, min_lr_ratio=0.01, warmup_steps=10_000, weight_decay=0.05, beta2=0.98,
              drop_path=0.1, max_text_len=64, save_every=1000, resume="auto")
RECIPES: dict[str, dict] = {
    # The CPU demo of the README: the embedded synthetic world, ZeRO-3 over gloo.
    "pretrain-tiny": dict(preset="tiny", data="synthetic", steps=200, output="runs/demo"),
    "pretrain-base": dict(preset="base", **_PAPER, batch_images=32, batch_texts=32, batch_pairs=32,
                          ds_config="zero2_bf16.json", output="runs/pretrain-base"),
    "pretrain-large": dict(preset="large", **_PAPER, batch_images=32, batch_texts=32, batch_pairs=32,
                           ds_config="zero3_bf16.json", output="runs/pretrain-large"),
    "pretrain-giant": dict(preset="giant", **_PAPER, batch_images=16, batch_texts=16, batch_pairs=16,
                           ds_config="zero3_bf16.json", checkpoint_every=1, output="runs/pretrain-giant"),
}
