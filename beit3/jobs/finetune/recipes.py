"""Fine-tuning hyperparameters: one dataclass, and the official unilm/beit3 recipes by name.

The ``*-base`` / ``*-large`` recipes are the commands of unilm/beit3 ``get_started/*.md`` (8 GPUs
unless noted; ``batch_size`` is per GPU as there, so the effective batch is GPUs x batch_size x
grad-accum). Values not on those command lines are ``run_beit3_finetuning.py`` defaults: AdamW
betas (0.9, 0.999) and eps 1e-8, min lr 1e-6, 64 text tokens, label smoothing 0.1, captioning
mask probability 0.6, beam 3, length penalty 0.6.

The ``*-tiny`` recipes fine-tune the tiny preset on the synthetic world on a CPU in minutes. The
world's texts say "left" and "right", so they never flip images; its classes are colours, so the
classification demo uses no colour-changing augmentation.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from beit3.model.config import LAYOUTS, PRESETS, check_fields
from beit3.metrics.vqa import VQA_EVAL_VERSIONS
from beit3.core.settings import SettingError, check_settings, setting as _f
from beit3.trainer.ds_config import ConfigError

TASKS = ("vqa", "retrieval", "captioning", "classification", "nlvr2", "segmentation")
DATASETS = {
    "vqa": ("vqav2",),
    "retrieval": ("coco_retrieval", "flickr30k"),
    "captioning": ("coco_captioning", "nocaps"),
    "classification": ("imagenet", "cifar10", "cifar100"),
    "nlvr2": ("nlvr2",),
    "segmentation": ("ade20k",),
}
TEXTLESS_TASKS = ("segmentation",)  # read no text: no SentencePiece model needed
LR_SCHEDULES = ("cosine", "poly")


@dataclass
class FinetuneConfig:
    task: str
    dataset: str = _f("", "the task's dataset (default: its first, see DATASETS)")
    # model (used when --init does not fix them)
    preset: str = _f("tiny", choices=sorted(PRESETS))
    layout: str = _f("paper", choices=list(LAYOUTS))
    img_size: int = _f(224, "image side in pixels (a multiple of the patch size)", ge=1)
    max_text_len: int = _f(64, "tokens including <s> and </s> (unilm --num_max_bpe_tokens)", ge=3)
    drop_path: float = _f(0.1, ge=0, lt=1)
    checkpoint_every: Optional[int] = _f(None, "activation checkpointing every k-th layer (0 = off; default 1 on "
                                         "GPU, 0 on CPU)", ge=0)
    # schedule
    epochs: float = _f(20, gt=0)
    warmup_epochs: float = _f(5, ge=0)
    max_steps: Optional[int] = _f(None, "stop after this many optimizer steps; warm-up and decay are scaled to "
                                  "them when they are fewer than the epochs' steps", ge=1)
    batch_size: int = _f(64, "per rank and micro-step", ge=1)
    eval_batch_size: Optional[int] = _f(None, "default 1.5 x --batch-size, as unilm/beit3", ge=1)
    # optimizer
    lr: float = _f(5e-4, "peak lr", gt=0)
    min_lr: float = _f(1e-6, "the cosine's end", ge=0)
    weight_decay: float = _f(0.05, ge=0)
    betas: tuple = _f((0.9, 0.999), "AdamW betas", ge=0, lt=1)
    eps: float = _f(1e-8, "AdamW eps", gt=0)
    layer_decay: float = _f(1.0, "lr of layer l times layer_decay ** (depth + 1 - l); 1 = none", gt=0, le=1)
    head_lr_scale: float = _f(1.0, "lr multiplier of head.* (unilm --task_head_lr_weight), only without layer "
                              "decay, as there", ge=1)
    grad_clip: float = _f(0.0, "max gradient norm; 0 = none (unilm's --clip_grad default); replaces the DeepSpeed "
                          "config's", ge=0)
    # augmentation and loss
    randaug: bool = _f(False, "RandAugment (vision-language tasks)")
    hflip: float = _f(0.5, "probability of a horizontal flip", ge=0, le=1)
    crop_scale: tuple = _f((0.5, 1.0), "RandomResizedCrop area range (vision-language tasks)", gt=0, le=1)
    label_smoothing: float = _f(0.1, "classification (without mixup) and captioning", ge=0, lt=1)
    mixup: float = _f(0.0, "mixup alpha (classification; 0 = off)", ge=0)
    cutmix: float = _f(0.0, "cutmix alpha (classification; 0 = off)", ge=0)
    auto_augment: Optional[str] = _f("rand-m9-mstd0.5-inc1", "timm auto-augment policy (classification)")
    color_jitter: float = _f(0.4, "classification", ge=0)
    re_prob: float = _f(0.25, "random erasing probability (classification)", ge=0, le=1)
    crop_pct: float = _f(1.0, "eval centre-crop fraction (classification)", gt=0, le=1)
    linear_probe: bool = _f(False, "classification: frozen backbone, BatchNorm + linear head")
    # captioning
    mask_prob: float = _f(0.6, "share of caption tokens masked", gt=0, le=1)
    drop_worst_ratio: float = _f(0.2, "share of the worst token losses dropped", ge=0, lt=1)
    drop_worst_after: int = _f(12000, "optimizer steps before the worst losses are dropped", ge=0)
    num_beams: int = _f(3, ge=1)
    length_penalty: float = _f(0.6, "beam search: score / length ** this", finite=True)
    ban_special: bool = _f(True, "decoding never generates <s>, <pad>, [MASK] (unilm/beit3 bans nothing)")
    logit_scale_max: Optional[float] = _f(None, "retrieval: clamp of exp(logit_scale); none = unilm (no clamp), "
                                          "100 = CLIP's", gt=0)
    vqa_eval: str = _f("2016", "vqaEval.py version of vqa_accuracy: 2016 (the server's) or 2021 "
                       "(beit3.metrics.vqa)", choices=list(VQA_EVAL_VERSIONS))
    # segmentation (BEiT's ADE20K pipeline; docs/segmentation.md). img_size is the crop.
    seg_scale: tuple = _f((2048, 512), "images rescaled to fit (long, short) x a ratio drawn in --seg-ratio-range",
                          gt=0)
    seg_ratio_range: tuple = _f((0.5, 2.0), "range of the random rescale ratio", gt=0)
    cat_max_ratio: float = _f(0.75, "crops redrawn while one class covers this share of the scored pixels",
                              gt=0, le=1)
    photometric: bool = _f(True, "mmseg's PhotoMetricDistortion")
    slide_stride: Optional[int] = _f(None, "sliding-window evaluation step; none = 2/3 of --img-size (341 at 512)",
                                     ge=1)
    decoder_channels: int = _f(512, "UperNet width", ge=1)
    aux_channels: int = _f(256, "auxiliary FCN head width; 0 = no auxiliary head", ge=0)
    aux_weight: float = _f(0.4, "auxiliary loss weight", ge=0)
    lr_schedule: str = _f("cosine", "after the linear warm-up: cosine, or poly (power 1, mmseg's)",
                          choices=list(LR_SCHEDULES))
    # EMA of the weights (timm ModelEmaV3), validated beside the model
    model_ema: bool = _f(False, "also keep and validate an EMA of the weights")
    ema_decay: float = _f(0.9999, ge=0, le=1)
    seed: int = _f(0, ge=0, lt=2**32)

    def __post_init__(self):
        check_settings(self)
        self.betas, self.crop_scale = tuple(self.betas), tuple(self.crop_scale)
        self.seg_scale, self.seg_ratio_range = tuple(self.seg_scale), tuple(self.seg_ratio_range)
        if not self.dataset and self.task in DATASETS:
            self.dataset = DATASETS[self.task][0]
        self.validate()

    def validate(self) -> None:
        """The checks across fields (each field's type and range: ``check_settings``)."""
        if self.task not in TASKS:
            raise SettingError(f"unknown --task {self.task!r}; choices: {', '.join(TASKS)}")
        if self.dataset not in DATASETS[self.task]:
            raise SettingError(f"task {self.task} has no --dataset {self.dataset!r}; choices: "
                               f"{', '.join(DATASETS[self.task])}")
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise SettingError(f"--mixup/--cutmix need an even --batch-size, got {self.batch_size}")
        if self.linear_probe and self.task != "classification":
            raise SettingError("--linear-probe is a classification mode")
        if self.warmup_epochs > self.epochs:
            raise SettingError(f"--warmup-epochs {self.warmup_epochs:g} is longer than --epochs {self.epochs:g}")
        if self.min_lr > self.lr:
            raise SettingError(f"--min-lr {self.min_lr:g} is above the peak --lr {self.lr:g}")
        if self.crop_scale[0] > self.crop_scale[1]:
            raise SettingError(f"--crop-scale {self.crop_scale[0]:g} {self.crop_scale[1]:g}: the smallest area "
                               f"comes first")
        if self.task == "segmentation":
            self.validate_segmentation()

    def validate_segmentation(self) -> None:
        lo, hi = self.seg_ratio_range
        if lo > hi:
            raise SettingError(f"--seg-ratio-range {lo:g} {hi:g}: the low end comes first")
        if self.slide_stride is not None and self.slide_stride > self.img_size:
            raise SettingError(f"--slide-stride {self.slide_stride} is beyond the --img-size {self.img_size} window")
        if self.batch_size < 2:  # a BatchNorm over the 1 x 1 pooled map needs two values per channel
            raise SettingError(f"segmentation trains BatchNorm heads: --batch-size must be >= 2, got {self.batch_size}")
        if self.eval_batch_size not in (None, 1):
            raise SettingError("segmentation evaluates one image at a time (its windows are the batch): "
                               f"--eval-batch-size must be 1, got {self.eval_batch_size}")

    @property
    def eval_batch(self) -> int:
        if self.task == "segmentation":
            return 1
        return self.eval_batch_size or max(1, int(self.batch_size * 1.5))

    @property
    def stride(self) -> int:
        """Sliding-window step of segmentation's evaluation (mmseg: 341 for 512 crops)."""
        return self.slide_stride or max(1, self.img_size * 2 // 3)

    def replace(self, **changes) -> "FinetuneConfig":
        check_fields(FinetuneConfig, changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_VL_BASE = dict(randaug=True, weight_decay=0.05, seed=42)
RECIPES: dict[str, dict] = {
    # get_started_for_vqav2.md (lr 3e-5 base, 2e-5 large; head lr x20)
    "vqa-base": dict(task="vqa", preset="base", img_size=480, batch_size=16, layer_decay=1.0, lr=3e-5,
                     epochs=10, warmup_epochs=1, drop_path=0.1, head_lr_scale=20, betas=(0.9, 0.98),
                     **{**_VL_BASE, "weight_decay": 0.01}),
    "vqa-large": dict(task="vqa", preset="large", img_size=480, batch_size=16, layer_decay=1.0, lr=2e-5,
                      epochs=10, warmup_epochs=1, drop_path=0.15, head_lr_scale=20, betas=(0.9, 0.98),
                      **{**_VL_BASE, "weight_decay": 0.01}),
    # get_started_for_retrieval.md: 16 GPUs (base, batch 192) / 32 GPUs (large, batch 96); init from
    # the *_itc_* checkpoints. COCO 15 epochs, 3 warmup; Flickr30k 20 and 5.
    "retrieval-coco-base": dict(task="retrieval", dataset="coco_retrieval", preset="base", img_size=384,
                                batch_size=192, layer_decay=0.65, lr=2e-4, epochs=15, warmup_epochs=3,
                                drop_path=0.2, weight_decay=0.05, seed=42),
    "retrieval-coco-large": dict(task="retrieval", dataset="coco_retrieval", preset="large", img_size=384,
                                 batch_size=96, layer_decay=0.85, lr=5e-5, epochs=15, warmup_epochs=3,
                                 drop_path=0.2, weight_decay=0.05, seed=42),
    "retrieval-flickr30k-base": dict(task="retrieval", dataset="flickr30k", preset="base", img_size=384,
                                     batch_size=192, layer_decay=0.65, lr=1e-4, epochs=20, warmup_epochs=5,
                                     drop_path=0.2, weight_decay=0.05, seed=42),
    "retrieval-flickr30k-large": dict(task="retrieval", dataset="flickr30k", preset="large", img_size=384,
                                      batch_size=96, layer_decay=0.85, lr=5e-5, epochs=20, warmup_epochs=5,
                                      drop_path=0.2, weight_decay=0.05, seed=42),
    # get_started_for_captioning.md (COCO lr 4e-5 base / 8e-6 large; NoCaps 1e-5 base / 8e-6 large)
    "captioning-coco-base": dict(task="captioning", dataset="coco_captioning", preset="base", img_size=480,
                                 batch_size=32, layer_decay=1.0, lr=4e-5, epochs=10, warmup_epochs=1,
                                 drop_path=0.1, max_text_len=32, mask_prob=0.7, drop_worst_after=12000,
                                 **_VL_BASE),
    "captioning-coco-large": dict(task="captioning", dataset="coco_captioning", preset="large", img_size=480,
                                  batch_size=32, layer_decay=1.0, lr=8e-6, epochs=10, warmup_epochs=1,
                                  drop_path=0.1, max_text_len=32, mask_prob=0.7, drop_worst_after=12000,
                                  **_VL_BASE),
    "captioning-nocaps-base": dict(task="captioning", dataset="nocaps", preset="base", img_size=480,
                                   batch_size=32, layer_decay=1.0, lr=1e-5, epochs=10, warmup_epochs=1,
                                   drop_path=0.1, max_text_len=32, mask_prob=0.7, drop_worst_after=12000,
                                   **_VL_BASE),
    "captioning-nocaps-large": dict(task="captioning", dataset="nocaps", preset="large", img_size=480,
                                    batch_size=32, layer_decay=1.0, lr=8e-6, epochs=10, warmup_epochs=1,
                                    drop_path=0.1, max_text_len=32, mask_prob=0.7, drop_worst_after=12000,
                                    **_VL_BASE),
    # get_started_for_image_classification.md (mixup 0.8, cutmix 1.0, RandAugment, random erasing)
    "imagenet-base": dict(task="classification", dataset="imagenet", preset="base", img_size=224,
                          batch_size=128, layer_decay=0.65, lr=7e-4, epochs=50, warmup_epochs=5,
                          drop_path=0.15, weight_decay=0.05, mixup=0.8, cutmix=1.0, seed=42),
    "imagenet-large": dict(task="classification", dataset="imagenet", preset="large", img_size=224,
                           batch_size=128, layer_decay=0.8, lr=2e-4, epochs=50, warmup_epochs=5,
                           drop_path=0.25, weight_decay=0.05, mixup=0.8, cutmix=1.0, seed=42),
    # get_started_for_nlvr2.md (lr 7e-4 base, 3e-4 large)
    "nlvr2-base": dict(task="nlvr2", preset="base", img_size=224, batch_size=32, layer_decay=0.65, lr=7e-4,
                       epochs=20, warmup_epochs=5, drop_path=0.2, weight_decay=0.2, seed=42),
    "nlvr2-large": dict(task="nlvr2", preset="large", img_size=224, batch_size=32, layer_decay=0.85, lr=3e-4,
                        epochs=20, warmup_epochs=5, drop_path=0.2, weight_decay=0.2, seed=42),
}

_TINY = dict(preset="tiny", img_size=64, max_text_len=32, drop_path=0.0, hflip=0.0, betas=(0.9, 0.98),
             weight_decay=0.01, layer_decay=0.9)
RECIPES.update({
    # The fusion tasks start from a briefly pretrained model; unclipped they diverge at these lr.
    "vqa-tiny": dict(task="vqa", batch_size=32, lr=5e-4, epochs=6, warmup_epochs=0.5, grad_clip=3.0, **_TINY),
    # contrastive learning of the tiny model collapses (constant features) at lr 1e-3
    "retrieval-tiny": dict(task="retrieval", dataset="coco_retrieval", batch_size=32, lr=5e-4, epochs=5,
                           warmup_epochs=0.2, **{**_TINY, "layer_decay": 1.0}),
    "captioning-tiny": dict(task="captioning", dataset="coco_captioning", batch_size=32, lr=1e-3, epochs=3,
                            warmup_epochs=0.2, mask_prob=0.6, drop_worst_ratio=0.0, num_beams=3, grad_clip=3.0,
                            **{**_TINY, "max_text_len": 24}),
    "classification-tiny": dict(task="classification", dataset="imagenet", batch_size=32, lr=1e-3, epochs=15,
                                warmup_epochs=1, auto_augment=None, color_jitter=0.0, re_prob=0.0,
                                label_smoothing=0.0, **_TINY),
    "linprobe-tiny": dict(task="classification", dataset="imagenet", batch_size=32, lr=1e-2, epochs=20,
                          warmup_epochs=1, auto_augment=None, color_jitter=0.0, re_prob=0.0,
                          label_smoothing=0.0, linear_probe=True, **{**_TINY, "weight_decay": 0.0}),
    "nlvr2-tiny": dict(task="nlvr2", batch_size=16, lr=5e-4, epochs=10, warmup_epochs=1, grad_clip=3.0, **_TINY),
})
# BEiT v2's ADE20K fine-tuning (unilm beit2/semantic_segmentation/configs/beit/upernet/
# upernet_beit_{base_12,large_24}_512_slide_160k_ade20k.py): UperNet on 512 x 512 crops, 8 GPUs x 2
# images, AdamW betas (0.9, 0.999), weight decay 0.05, layer decay 0.75 / 0.9, lr 5e-5 / 4e-5,
# 160k iterations of poly decay (power 1, to 0) after 1500 linear warmup iterations, drop path
# 0.15 / 0.2, UperNet channels 768 / 1024, auxiliary FCN (256 channels, weight 0.4), sliding-window
# test (crop 512, stride 341). 20,210 training images / 16 = 1263 steps an epoch: 127 epochs cut at
# 160,000 steps, and a warmup of 1.1877 epochs = 1500 steps.
_ADE20K = dict(task="segmentation", dataset="ade20k", img_size=512, batch_size=2, epochs=127, max_steps=160_000,
               warmup_epochs=1.1877, lr_schedule="poly", min_lr=0.0, betas=(0.9, 0.999), weight_decay=0.05,
               seg_scale=(2048, 512), seg_ratio_range=(0.5, 2.0), cat_max_ratio=0.75, hflip=0.5,
               photometric=True, slide_stride=341, aux_channels=256, aux_weight=0.4, seed=0)
RECIPES.update({
    "ade20k-base": dict(preset="base", lr=5e-5, layer_decay=0.75, drop_path=0.15, decoder_channels=768, **_ADE20K),
    "ade20k-large": dict(preset="large", lr=4e-5, layer_decay=0.9, drop_path=0.2, decoder_channels=1024,
                         **_ADE20K),
    # The synthetic world's masks (class = colour + shape): 64 px crops of its 64-96 px scenes rescaled
    # by 0.75-1.5 (at 0.5 most of a crop is padding), no photometric distortion (its hue shifts turn
    # red into orange), a small UperNet. On the 240-image world lr 3e-3 reached mIoU 0.13-0.19 in 60
    # steps of 16, 1e-3 0.07.
    "segmentation-tiny": dict(task="segmentation", dataset="ade20k", preset="tiny", img_size=64, batch_size=16,
                              lr=3e-3, epochs=3, warmup_epochs=0.2, lr_schedule="poly", min_lr=0.0, drop_path=0.0,
                              betas=(0.9, 0.999), weight_decay=0.01, layer_decay=0.9, seg_scale=(256, 64),
                              seg_ratio_range=(0.75, 1.5), hflip=0.5, photometric=False, decoder_channels=64,
                              aux_channels=32),
})
DEFAULT_RECIPE = {task: f"{task}-tiny" for task in TASKS}


def recipe_names(task: Optional[str] = None) -> list[str]:
    return [n for n, r in RECIPES.items() if task is None or r["task"] == task]


def get_recipe(name: str, **overrides) -> FinetuneConfig:
    """The named recipe with ``overrides`` (FinetuneConfig fields) applied."""
    if name not in RECIPES:
        lines = [f"  {t}: {', '.join(recipe_names(t))}" for t in TASKS]
        raise SettingError(f"unknown --recipe {name!r}; choices:\n" + "\n".join(lines))
    check_fields(FinetuneConfig, overrides)
    return FinetuneConfig(**{**RECIPES[name], **overrides})


def resolve_recipe(recipe: Optional[str], task: Optional[str], flags: dict) -> FinetuneConfig:
    """The recipe (``--recipe``, else the task's demo recipe) with ``flags`` (the FinetuneConfig
    fields the command line set) on top."""
    if recipe is None and task is None:
        raise ConfigError(f"give --task ({', '.join(TASKS)}) or --recipe")
    name = recipe or DEFAULT_RECIPE[task]
    if name not in RECIPES:
        lines = [f"  {t}: {', '.join(recipe_names(t))}" for t in TASKS]
        raise ConfigError(f"unknown --recipe {name!r}; choices:\n" + "\n".join(lines))
    if task is not None and RECIPES[name]["task"] != task:
        raise ConfigError(f"--recipe {name} is a {RECIPES[name]['task']} recipe, not {task}; "
                          f"{task} recipes: {', '.join(recipe_names(task))}")
    cfg = get_recipe(name, **{k: v for k, v in flags.items() if k != "task"})  # the task is the recipe's
    if cfg.layer_decay != 1.0 and cfg.head_lr_scale != 1.0:  # unilm takes the head's weight only without decay
        raise SettingError(f"--head-lr-scale {cfg.head_lr_scale:g} with --layer-decay {cfg.layer_decay:g} (given, or "
                           f"--recipe {name}'s): the head's factor applies only without layer decay, as unilm's "
                           f"--task_head_lr_weight; give --layer-decay 1 or leave --head-lr-scale at 1")
    return cfg
