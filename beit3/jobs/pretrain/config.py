"""The pretraining job's settings: one tree of dataclasses, its named recipes, and the checks that need no model.

    cfg = PretrainConfig.from_recipe("pretrain-base", steps=1000)     # or PretrainConfig.from_dict({...})
    cfg = cfg.resolved("cuda", world_size=8)  # device-, size- and rank-dependent defaults filled in
    ds_config = cfg.check(world_size=8)       # every check that needs no model, before any GPU time

As torchtitan's config tree, ``PretrainConfig`` nests the settings of each part: ``model``,
``tokenizers``, ``data`` (the loader's own ``PretrainDataConfig``, handed to it as it is), ``optim``,
``engine`` (the global batch and DeepSpeed) and ``run`` (the output folder, checkpoints, logging).
``beit3 pretrain`` generates a flag for every setting of the tree (``beit3.core.settings``); a flag
is named by its setting alone (``--lr``, not ``--optim.lr``), so a dict of settings may be flat
(``{"lr": 1e-3}``: the command line, recipes, an older run's ``run_config.json``) or nested
(``{"optim": {"lr": 1e-3}}``: ``to_dict``, ``--print-config``, ``run_config.json``).

The command applies a recipe, then a ``--config`` file (a saved ``run_config.json`` replays its run),
then the flags given. Fields left ``None`` get their value in ``resolved``; the resolved config is
what ``run_config.json`` keeps.

The global batch has one knob: ``--micro-batches-per-step`` N, the micro-batches (over all ranks)
that one optimizer step takes. ``--grad-accum`` K is its per-rank spelling (N = K x ranks); the
DeepSpeed config's ``gradient_accumulation_steps`` and ``train_batch_size`` are filled from it, and an
explicit value there that disagrees is refused.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Optional

from beit3.core.files import check_output_dir
from beit3.core.settings import (SettingError, build_tree, check_settings, check_values, flat_values, flatten,
                                 flag_name, leaves, part, setting as _f, tree_from_dict)
from beit3.data.pretrain_loader import PretrainDataConfig
from beit3.model.activation_checkpointing import CHECKPOINT_MODES
from beit3.model.config import PRESETS, BEiT3Config
from beit3.trainer.ds_config import ConfigError, default_ds_config, ds_config_path, resolve_ds_config
from beit3.trainer.engine import OptimConfig
from beit3.trainer.recompute import check_activation_checkpointing, fill_checkpoint_defaults
from beit3.trainer.trackers import report_to_setting, tensorboard_setting

SOURCE_FLAGS = {"images": "image_shards", "texts": "text_shards", "pairs": "pair_shards"}
ACCUMULATION = ("micro_batches_per_step", "grad_accum")  # one knob, two spellings


@dataclass
class ModelSettings:
    preset: str = _f("tiny", choices=sorted(PRESETS))
    layout: str = _f("paper", choices=["paper", "released"])
    init_scheme: str = _f("subln", "subln: torchscale's Sub-LN (Magneto) scaling of fc1/fc2/v/out by sqrt(log 2N) on "
                          "unilm's truncated normal (the reference); plain: the truncated normal alone",
                          choices=["subln", "plain"])
    patch_aggregation: bool = _f(False, "BEiT v2 CLS pretraining head")
    drop_path: float = _f(0.1, ge=0, lt=1)
    checkpoint_every: Optional[int] = _f(None, "activation checkpointing every k-th layer (0 = off; default 1 on "
                                         "GPU, 0 on CPU, 1 with --checkpoint-mode)", ge=0)
    checkpoint_mode: Optional[str] = _f(None, "what a checkpointed layer keeps: 'full' (default) only its input; "
                                        "'selective' also its matmul and attention outputs (more memory, no "
                                        "repeated matmuls)", choices=list(CHECKPOINT_MODES))

    def __post_init__(self):
        check_settings(self)

    def config(self, **overrides) -> BEiT3Config:
        return BEiT3Config.from_preset(self.preset, layout=self.layout, drop_path_rate=self.drop_path,
                                       subln_init_scale=self.init_scheme == "subln", **overrides)


@dataclass
class TokenizerSettings:
    spm: Optional[str] = _f(None, "SentencePiece model (default: the synthetic world's)")
    tokenizer: Optional[str] = _f(None, "VQ-KD: a train-tokenizer output dir, or an official beit2 checkpoint "
                                  "(with --tokenizer-preset)")
    tokenizer_preset: Optional[str] = _f(None, "VQKDConfig preset of an official checkpoint")

    def __post_init__(self):
        check_settings(self)


@dataclass
class OptimSettings:
    """BEiT-3 appendix: AdamW (0.9, 0.98), eps 1e-6, weight decay 0.05, warm-up then cosine decay."""
    steps: int = _f(200, "optimizer steps: the schedule's length", ge=1)
    lr: Optional[float] = _f(None, "peak lr (default 1e-3; 2e-3 for tiny)", gt=0)
    min_lr_ratio: float = _f(0.01, "the cosine ends at lr x this", ge=0, le=1)
    warmup_steps: Optional[int] = _f(None, "default min(10000, steps // 10)", ge=0)
    weight_decay: float = _f(0.05, ge=0)
    beta1: float = _f(0.9, "AdamW's first-moment decay", ge=0, lt=1)
    beta2: float = _f(0.98, "AdamW's second-moment decay", ge=0, lt=1)
    eps: float = _f(1e-6, "AdamW's eps", gt=0)
    grad_clip: Optional[float] = _f(None, "override the DeepSpeed config's gradient_clipping (3.0 in ours; 0 = "
                                    "none)", ge=0)

    def __post_init__(self):
        check_settings(self)

    def optim_config(self) -> OptimConfig:
        """The engine's optimizer and schedule (on a resolved config)."""
        return OptimConfig(lr=self.lr, weight_decay=self.weight_decay, betas=(self.beta1, self.beta2), eps=self.eps,
                           warmup_steps=self.warmup_steps, total_steps=self.steps, min_lr_ratio=self.min_lr_ratio,
                           grad_clip=self.grad_clip)


@dataclass
class EngineSettings:
    micro_batches_per_step: Optional[int] = _f(None, "THE global batch: micro-batches per optimizer step over all "
                                               "ranks (default: one per rank). A run resumed or re-formed on another "
                                               "number of ranks keeps it, accumulating N / ranks per rank", ge=1)
    grad_accum: Optional[int] = _f(None, "the same knob per rank: --micro-batches-per-step = this x ranks",
                                   ge=1)
    ds_config: Optional[str] = _f(None, "DeepSpeed JSON (default: ds_configs/zero3_bf16.json on GPU, "
                                  "cpu_zero3.json on CPU); its batch sizes are filled from the command line "
                                  "(\"auto\"), an explicit one must agree", flags=("--deepspeed",))
    device: Optional[str] = _f(None, "default: cuda when available", choices=["cuda", "cpu"])
    dist_timeout: float = _f(1800.0, "seconds a collective may wait for a peer before failing", gt=0)

    def __post_init__(self):
        check_settings(self)

    def accumulation(self, world_size: int) -> tuple[int, int]:
        """(micro-batches per optimizer step over all ranks, per rank) on ``world_size`` ranks."""
        n, k = self.micro_batches_per_step, self.grad_accum
        if n is None:
            n = world_size * (k or 1)
        if n % world_size:
            raise ConfigError(f"--micro-batches-per-step {n} is not a multiple of the {world_size} ranks: give "
                              f"a multiple, or --grad-accum K for K x {world_size}")
        if k is not None and k != n // world_size:
            raise ConfigError(f"--grad-accum {k} but --micro-batches-per-step {n} on {world_size} ranks means "
                              f"{n // world_size}: give one of them")
        return n, n // world_size


@dataclass
class RunSettings:
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
    tensorboard: bool = tensorboard_setting()
    report_to: str = report_to_setting()

    def __post_init__(self):
        check_settings(self)


@dataclass
class PretrainConfig:
    model: ModelSettings = part(ModelSettings, "the model")
    tokenizers: TokenizerSettings = part(TokenizerSettings, "the text and visual tokenizers")
    data: PretrainDataConfig = part(PretrainDataConfig, "the data: sources (docs/data.md), batches, texts, reading, "
                                    "masking, augmentation")
    optim: OptimSettings = part(OptimSettings, "optimisation")
    engine: EngineSettings = part(EngineSettings, "the global batch and DeepSpeed")
    run: RunSettings = part(RunSettings, "the run folder: checkpoints, resume, logging")

    def __post_init__(self):
        check_settings(self)

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "PretrainConfig":
        """From the nested form, flat keys, or both."""
        return tree_from_dict(cls, d)

    @classmethod
    def from_recipe(cls, name: str, **overrides) -> "PretrainConfig":
        if name not in RECIPES:
            raise ConfigError(f"unknown pretraining --recipe {name!r}; choices: {', '.join(RECIPES)}")
        return cls.from_dict({**RECIPES[name], **overrides})

    @classmethod
    def from_layers(cls, *layers: dict) -> "PretrainConfig":
        """The flat dicts ``layers`` applied in order, each over the ones before. The two spellings of
        the accumulation are one setting: a layer giving either replaces both from the layers below."""
        merged: dict = {}
        for layer in layers:
            if any(k in layer for k in ACCUMULATION):
                for k in ACCUMULATION:
                    merged.pop(k, None)
            merged.update(layer)
        return cls.from_dict(merged)

    @classmethod
    def from_file(cls, path: str) -> dict:
        """The settings a ``--config`` file holds, as a checked flat dict to go under the command line's
        flags: a saved ``run_config.json`` (its ``"args"``, nested, or flat as older runs wrote them)
        or a JSON object of settings."""
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"--config {path}: {e}") from None
        d = d.get("args", d) if isinstance(d, dict) else d
        if not isinstance(d, dict):
            raise ConfigError(f"--config {path}: expected a JSON object of settings, got {type(d).__name__}")
        try:
            flat = flatten(cls, d)
            check_values(cls, flat, lambda key: f'"{key}"')
            build_tree(cls, flat)  # the checks across a part's fields
        except (TypeError, SettingError) as e:
            raise ConfigError(f"--config {path}: {e}") from None
        flat.pop("overwrite", None)  # a replay replaces a run only when its command says so
        for key, leaf in leaves(cls).items():  # sizes are the model's and the tokenizer's, found again
            if not leaf.field.metadata.get("flag", True):
                flat.pop(key, None)
        if flat.get("micro_batches_per_step") is not None:  # a run's grad_accum is derived from it:
            flat.pop("grad_accum", None)  # the global batch replays on any number of ranks
        return flat

    def replace(self, **changes) -> "PretrainConfig":
        """A copy with the settings ``changes`` (by key, as the flags: ``replace(lr=1e-4, steps=9)``)."""
        return type(self).from_dict({**flat_values(self), **changes})

    def to_dict(self) -> dict:
        """The nested form: a part's name holds an object of its fields."""
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples as the JSON files hold them

    def flat(self) -> dict:
        """``{key: value}`` of every setting, the form of older runs' ``run_config.json``."""
        return flat_values(self)

    # -- resolving and checking ----------------------------------------------------------------
    def has_sources(self) -> bool:
        return any(getattr(self.data, flag) for flag in SOURCE_FLAGS.values())

    def resolved(self, device: str, world_size: int = 1) -> "PretrainConfig":
        """A copy with the device-, size- and rank-dependent defaults filled in."""
        c = copy.deepcopy(self)
        model, data, optim, engine = c.model, c.data, c.optim, c.engine
        tiny = model.preset == "tiny"
        fill_checkpoint_defaults(model, device)
        preset = BEiT3Config.from_preset(model.preset, layout=model.layout)
        data.img_size, data.patch_size = preset.img_size, preset.patch_size
        if c.has_sources():  # a kind without a source trains on nothing unless its batch is asked for
            for kind, flag in SOURCE_FLAGS.items():
                if not getattr(data, flag) and getattr(data, f"batch_{kind}") is None:
                    setattr(data, f"batch_{kind}", 0)
        elif data.shards_dir is None:
            data.shards_dir = "synthetic"
        for name, value in (("batch_images", 16 if tiny else 32), ("batch_texts", 16 if tiny else 32),
                            ("batch_pairs", 16 if tiny else 32), ("max_text_len", 32 if tiny else 64),
                            ("num_workers", 0 if device == "cpu" else 6)):
            if getattr(data, name) is None:
                setattr(data, name, value)
        if optim.lr is None:
            optim.lr = 2e-3 if tiny else 1e-3
        if optim.warmup_steps is None:
            optim.warmup_steps = min(10000, max(1, optim.steps // 10))
        engine.ds_config = default_ds_config(device) if engine.ds_config is None else ds_config_path(engine.ds_config)
        engine.micro_batches_per_step, engine.grad_accum = engine.accumulation(world_size)
        return c

    def check(self, world_size: int) -> dict:
        """Every check that needs no model (on a resolved config); returns the DeepSpeed config."""
        data, engine = self.data, self.engine
        check_activation_checkpointing(self.model)
        positions = BEiT3Config.from_preset(self.model.preset, layout=self.model.layout).max_text_len
        if data.max_text_len > positions:
            raise ConfigError(f"--max-text-len {data.max_text_len}: the {self.model.preset} preset's text position "
                              f"table holds {positions} tokens")
        micro = data.batch_images + data.batch_texts + data.batch_pairs
        if micro == 0:
            raise ConfigError("--batch-images, --batch-texts and --batch-pairs are all 0")
        self._check_data()
        if self.run.resume not in (None, "auto") and not os.path.isdir(self.run.resume):
            raise ConfigError(f"--resume {self.run.resume!r}: no such checkpoint directory")
        check_output_dir(self.run.output)
        total, per_rank = engine.accumulation(world_size)
        return resolve_ds_config(engine.ds_config, micro, per_rank, world_size,
                                 accum_source=f"--micro-batches-per-step {total} on {world_size} rank(s)")

    def _check_data(self) -> None:
        data, sources = self.data, self.has_sources()
        if sources and data.shards_dir is not None:
            raise ConfigError("give --data or the --image/--text/--pair-shards sources, not both")
        for kind, flag in SOURCE_FLAGS.items():
            if sources and not getattr(data, flag) and getattr(data, f"batch_{kind}"):
                raise ConfigError(f"--batch-{kind} {getattr(data, f'batch_{kind}')} but no "
                                  f"{flag_name(flag)} source")
        if not sources and data.shards_dir != "synthetic" and not os.path.isdir(data.shards_dir):
            raise ConfigError(f"--data {data.shards_dir!r}: no such directory (expected shards, or 'synthetic')")
        tokenizers = self.tokenizers
        if data.shards_dir != "synthetic" and (tokenizers.spm is None or tokenizers.tokenizer is None):
            raise ConfigError("real data (--data DIR or sources) needs --spm and --tokenizer")
        for name in ("spm", "tokenizer"):
            path = getattr(tokenizers, name)
            if path is not None and not os.path.exists(path):
                raise ConfigError(f"--{name} {path!r} does not exist")


# The BEiT-3 paper's pretraining (appendix, giant): 1M steps, 6144 samples a step (2048 images, 2048
# texts, 2048 pairs), AdamW (0.9, 0.98) eps 1e-6, peak lr 1e-3 with 10k warm-up steps and cosine decay
# to 1e-5, weight decay 0.05, stochastic depth 0.1, 224 px; masking 40% of patches, 15% of text tokens,
# 50% of pair-text tokens (the data part's defaults). Batches are per rank and micro-step: the values
# below give the global 2048 per kind on 128 GPUs (giant) and on 64 GPUs (base); on another cluster
# scale them, or --micro-batches-per-step, to keep the global batch.
_PAPER = dict(steps=1_000_000, lr=1e-3, min_lr_ratio=0.01, warmup_steps=10_000, weight_decay=0.05, beta1=0.9,
              beta2=0.98, eps=1e-6, drop_path=0.1, max_text_len=64, save_every=1000, resume="auto")
RECIPES: dict[str, dict] = {  # flat: settings by key
    # The CPU demo of the README: the embedded synthetic world, ZeRO-3 over gloo.
    "pretrain-tiny": dict(preset="tiny", data="synthetic", steps=200, output="runs/demo"),
    "pretrain-base": dict(preset="base", **_PAPER, batch_images=32, batch_texts=32, batch_pairs=32,
                          ds_config="zero2_bf16.json", output="runs/pretrain-base"),
    "pretrain-large": dict(preset="large", **_PAPER, batch_images=32, batch_texts=32, batch_pairs=32,
                           ds_config="zero3_bf16.json", output="runs/pretrain-large"),
    "pretrain-giant": dict(preset="giant", **_PAPER, batch_images=16, batch_texts=16, batch_pairs=16,
                           ds_config="zero3_bf16.json", checkpoint_every=1, output="runs/pretrain-giant"),
}
