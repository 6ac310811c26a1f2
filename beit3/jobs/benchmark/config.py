"""The benchmark's settings: one dataclass whose fields are ``beit3 benchmark``'s flags
(``beit3.core.settings``), its device-dependent defaults and the checks that need no model."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from beit3.model.config import PRESETS, BEiT3Config
from beit3.core.files import check_output_dir, check_output_file
from beit3.core.settings import check_settings, setting as _f
from beit3.model.activation_checkpointing import CHECKPOINT_MODES
from beit3.trainer.recompute import check_activation_checkpointing, fill_checkpoint_defaults
from beit3.trainer.ds_config import default_ds_config, ds_config_path, resolve_ds_config
from beit3.jobs.benchmark.batches import BatchMix


@dataclass
class BenchmarkConfig:
    # -- the model and its DeepSpeed config
    preset: str = _f("tiny", choices=sorted(PRESETS))
    layout: str = _f("paper", choices=["paper", "released"])
    # str, not Optional: "none" is a value here (plain PyTorch), not the flag parser's None.
    ds_config: str = _f("", "DeepSpeed JSON for our model (default: zero3_bf16.json on GPU, cpu_zero3.json on CPU), "
                        "or 'none' for plain PyTorch (bf16 autocast, fused AdamW)", flags=("--deepspeed",))
    # -- the batch (per device, per step; default 4 of each for tiny, 16 otherwise)
    batch_images: Optional[int] = _f(None, "per device and step", ge=0)
    batch_texts: Optional[int] = _f(None, "per device and step", ge=0)
    batch_pairs: Optional[int] = _f(None, "per device and step", ge=0)
    image_only: bool = _f(False, "images only (--batch-images of them)")
    text_len: Optional[int] = _f(None, "text tokens, at most the preset's position table (1022; default 32 tiny, "
                                                  "64 otherwise)", ge=2)
    text_padding: float = _f(0.0, "fraction of every text that is padding (0: no mask, SDPA may use flash)",
                             ge=0, lt=1)
    mask_pair_images: bool = _f(False, "also mask and predict pair images")
    num_visual_tokens: int = _f(8192, "MIM classes (VQ-KD codebook)", ge=1)
    # -- what is timed
    warmup: Optional[int] = _f(None, "untimed steps (default 3)", ge=0)
    steps: Optional[int] = _f(None, "timed steps (default 10 on GPU, 5 on CPU)", ge=1)
    checkpoint_every: Optional[int] = _f(None, "activation checkpointing every k-th layer (0 = off; default 1 on "
                                         "GPU, 0 on CPU, 1 with --checkpoint-mode)", ge=0)
    checkpoint_mode: Optional[str] = _f(None, "'full' (default) or 'selective' activation checkpointing",
                                        choices=list(CHECKPOINT_MODES))
    checkpoint_cost: bool = _f(False, "also time the same batch with checkpointing off, full and selective, and "
                               "report what each costs against off")
    compile: bool = _f(False, "torch.compile every backbone layer (if supported)")
    sdpa: str = _f("auto", "restrict scaled_dot_product_attention to one kernel",
                   choices=["auto", "flash", "efficient", "cudnn", "math"])
    find_max_batch: bool = _f(False, "CUDA: find the largest per-part micro-batch that fits, then measure it")
    max_batch_limit: int = _f(1024, "--find-max-batch: the largest per-part micro-batch tried", ge=1)
    compare: Optional[list] = _f(None, "also time torchscale's BEiT3 (same batch) or timm's ViT (image-only batch)",
                                 choices=["torchscale", "timm"])
    profile: Optional[str] = _f(None, "profile our model's steps (torch.profiler): op table, time by kind, trace in "
                                "DIR", metavar="DIR")
    # -- the data loader instead of the model
    data_loader: bool = _f(False, "time the real pretraining data loader on the synthetic world instead")
    num_workers: Optional[int] = _f(None, "--data-loader workers (default 0 CPU, 6 GPU)", ge=0)
    data: Optional[str] = _f(None, "--data-loader: a shards directory (default: the synthetic world)")
    spm: Optional[str] = _f(None, "--data-loader: the SentencePiece model of --data")
    pair_shards: Optional[list] = _f(None, "--data-loader: pair sources, as beit3 pretrain takes them",
                                     metavar="PATTERN[::WEIGHT]")
    image_shards: Optional[list] = _f(None, "--data-loader: image sources", metavar="PATTERN[::WEIGHT]")
    text_shards: Optional[list] = _f(None, "--data-loader: text sources", metavar="PATTERN[::WEIGHT]")
    image_decoder: str = _f("both", "--data-loader: decode with PIL, torchvision.io, or time both side by side",
                            choices=["pil", "torchvision", "both"])
    # -- output and the machine
    json: bool = _f(False, "one JSON object per configuration on stdout")
    markdown: Optional[str] = _f(None, "also write a dated Markdown result file (e.g. benchmarks/2025-01-01-h100.md)",
                                 metavar="FILE")
    device: Optional[str] = _f(None, "default: cuda when available", choices=["cuda", "cpu"])
    threads: Optional[int] = _f(None, "CPU threads for torch (default: torch's; 1 gives steadier numbers on a "
                                "shared machine)", ge=1)
    seed: int = _f(0, ge=0, lt=2**32)
    command: str = _f("", "the command line, recorded in the reports (set by beit3 benchmark)")

    def __post_init__(self):
        check_settings(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def resolved(self, device: str) -> "BenchmarkConfig":
        """A copy with the device- and size-dependent defaults filled in."""
        c = dataclasses.replace(self)
        tiny, gpu = c.preset == "tiny", device == "cuda"
        n = 4 if tiny else 16
        fill_checkpoint_defaults(c, device)
        if c.image_only:
            c.batch_texts = c.batch_texts or 0
            c.batch_pairs = c.batch_pairs or 0
        for name, value in (("batch_images", n), ("batch_texts", n), ("batch_pairs", n),
                            ("text_len", 32 if tiny else 64), ("warmup", 3), ("steps", 10 if gpu else 5),
                            ("num_workers", 6 if gpu else 0)):
            if getattr(c, name) is None:
                setattr(c, name, value)
        c.compare = list(dict.fromkeys(c.compare or []))
        if not c.ds_config:
            c.ds_config = default_ds_config(device)
        elif c.ds_config != "none":
            c.ds_config = ds_config_path(c.ds_config)
        return c

    def check(self, world: int):
        """Every check that needs no model (on a resolved config). Returns (BatchMix, resolved
        DeepSpeed config or None)."""
        if self.image_only and (self.batch_texts or self.batch_pairs):
            raise ValueError("--image-only with --batch-texts/--batch-pairs > 0")
        check_activation_checkpointing(self)
        if world > 1 and self.compare:
            raise ValueError("--compare runs the reference models on one process; start it without a launcher")
        mix = BatchMix(self.batch_images, self.batch_texts, self.batch_pairs, self.text_len,
                       self.text_padding, self.mask_pair_images)
        cfg = BEiT3Config.from_preset(self.preset, layout=self.layout)
        if not mix.image_only and self.text_len > cfg.max_text_len:
            raise ValueError(f"--text-len {self.text_len}: the {self.preset} preset's text position table holds "
                             f"{cfg.max_text_len} tokens")
        if self.markdown:  # checked now, not after minutes of measuring
            check_output_file(self.markdown, "--markdown")
        if self.profile:
            check_output_dir(self.profile, "--profile")
        if self.ds_config == "none":
            return mix, None
        return mix, resolve_ds_config(self.ds_config, mix.samples, None, world)
