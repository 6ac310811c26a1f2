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

from ..config import check_fields

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
    dataset: str = ""  # "" = the task's first (see DATASETS)
    # model (used when --init does not fix them)
    preset: str = "tiny"
    layout: str = "paper"
    img_size: int = 224
    max_text_len: int = 64  # tokens including <s> and </s> (--num_max_bpe_tokens)
    drop_path: float = 0.1
    checkpoint_every: Optional[int] = None  # activation checkpointing; None = 1 on GPU, 0 on CPU
    # schedule
    epochs: float = 20
    warmup_epochs: float = 5
    max_steps: Optional[int] = None  # stop after this many optimizer steps (the schedule too)
    batch_size: int = 64  # per rank and micro-step
    eval_batch_size: Optional[int] = None  # default 1.5 x batch_size, as unilm/beit3
    # optimizer
    lr: float = 5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    layer_decay: float = 1.0  # lr of layer l times layer_decay ** (depth + 1 - l)
    head_lr_scale: float = 1.0  # lr multiplier of ``head.*`` (unilm --task_head_lr_weight)
    grad_clip: float = 0.0  # max gradient norm; 0 = none (unilm's --clip_grad default), replaces the DeepSpeed config's
    # augmentation and loss
    randaug: bool = False  # vision-language tasks
    hflip: float = 0.5
    crop_scale: tuple = (0.5, 1.0)  # vision-language tasks: RandomResizedCrop area range

    label_smoothing: float = 0.1  # classification (without mixup) and captioning
    mixup: float = 0.0
    cutmix: float = 0.0
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"  # classification
    color_jitter: float = 0.4
    re_prob: float = 0.25
    crop_pct: float = 1.0
    linear_probe: bool = False  # classification: frozen backbone, BatchNorm + linear head
    # captioning
    mask_prob: float = 0.6
    drop_worst_ratio: float = 0.2
    drop_worst_after: int = 12000
    num_beams: int = 3
    length_penalty: float = 0.6
    ban_special: bool = True  # decoding never generates <s>, <pad>, [MASK] (unilm/beit3 bans nothing)
    logit_scale_max: Optional[float] = None  # retrieval: clamp of exp(logit_scale); None = unilm (none), 100 = CLIP
    vqa_eval: str = "2016"  # vqaEval.py version of vqa_accuracy: "2016" (server) or "2021" (beit3.eval.vqa_metric)
    # segmentation (BEiT's ADE20K pipeline; docs/segmentation.md). img_size is the crop.
    seg_scale: tuple = (2048, 512)  # images rescaled to fit (long, short) x a ratio drawn in seg_ratio_range
    seg_ratio_range: tuple = (0.5, 2.0)
    cat_max_ratio: float = 0.75  # crops redrawn while one class covers this share of the scored pixels
    photometric: bool = True  # mmseg's PhotoMetricDistortion
    slide_stride: Optional[int] = None  # sliding-window evaluation; None = 2/3 of img_size (341 at 512)
    decoder_channels: int = 512  # UperNet width
    aux_channels: int = 256  # auxiliary FCN head width; 0 = no auxiliary head
    aux_weight: float = 0.4
    lr_schedule: str = "cosine"  # after the linear warmup: "cosine", or "poly" (power 1, mmseg's)
    # EMA of the weights (timm ModelEmaV3), validated beside the model
    model_ema: bool = False
    ema_decay: float = 0.9999
    seed: int = 0

    def __post_init__(self):
        self.betas, self.crop_scale = tuple(self.betas), tuple(self.crop_scale)
        self.seg_scale, self.seg_ratio_range = tuple(self.seg_scale), tuple(self.seg_ratio_range)
        if not self.dataset and self.task in DATASETS:
            self.dataset = DATASETS[self.task][0]
        self.validate()

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choices: {', '.join(TASKS)}")
        if self.dataset not in DATASETS[self.task]:
            raise ValueError(f"task {self.task} has no dataset {self.dataset!r}; choices: "
                             f"{', '.join(DATASETS[self.task])}")
        for name in ("epochs", "batch_size", "lr", "img_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.warmup_epochs < 0 or self.layer_decay <= 0 or self.head_lr_scale <= 0:
            raise ValueError("warmup_epochs must be >= 0 and layer_decay, head_lr_scale > 0")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")
        if self.max_text_len < 3:
            raise ValueError(f"max_text_len={self.max_text_len} leaves no token between <s> and </s>")
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise ValueError(f"mixup/cutmix need an even batch_size, got {self.batch_size}")
        if self.linear_probe and self.task != "classification":
            raise ValueError("linear_probe is a classification mode")
        from ..eval.vqa_metric import VQA_EVAL_VERSIONS
        if self.vqa_eval not in VQA_EVAL_VERSIONS:
            raise ValueError(f"vqa_eval {self.vqa_eval!r}: expected one of {VQA_EVAL_VERSIONS}")
        if self.logit_scale_max is not None and self.logit_scale_max <= 0:
            raise ValueError(f"logit_scale_max must be positive (or None), got {self.logit_scale_max}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule {self.lr_schedule!r}: expected one of {', '.join(LR_SCHEDULES)}")
        if self.task == "segmentation":
            self.validate_segmentation()

    def validate_segmentation(self) -> None:
        lo, hi = self.seg_ratio_range
        if not 0 < lo <= hi or min(self.seg_scale) <= 0:
            raise ValueError(f"seg_ratio_range {self.seg_ratio_range} and seg_scale {self.seg_scale} must be positive, "
                             f"the range (low, high)")
        if not 0 < self.cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {self.cat_max_ratio}")
        if self.slide_stride is not None and not 0 < self.slide_stride <= self.img_size:
            raise ValueError(f"slide_stride must be in [1, img_size={self.img_size}], got {self.slide_stride}")
        if self.decoder_channels < 1 or self.aux_channels < 0 or self.aux_weight < 0:
            raise ValueError("decoder_channels must be >= 1, aux_channels and aux_weight >= 0")
        if self.batch_size < 2:  # a BatchNorm over the 1 x 1 pooled map needs two values per channel
            raise ValueError(f"segmentation trains BatchNorm heads: batch_size must be >= 2, got {self.batch_size}")
        if self.eval_batch_size not in (None, 1):
            raise ValueError("segmentation evaluates one image at a time (its windows are the batch): "
                             f"eval_batch_size must be 1, got {self.eval_batch_size}")

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
        raise ValueError(f"unknown recipe {name!r}; choices:\n" + "\n".join(lines))
    check_fields(FinetuneConfig, overrides)
    return FinetuneConfig(**{**RECIPES[name], **overrides})
