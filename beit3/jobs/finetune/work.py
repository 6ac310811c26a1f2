"""What a fine-tuning micro-batch costs, for the figures every job logs (``beit3.trainer.throughput``):
its samples, the tokens its backbone passes read and their model FLOPs (``flops.encoder_flops``),
from the batch's shapes. The task heads (a pooler and a classifier, a caption's MLM head, UperNet)
are not counted: the backbone is nearly all of a step's matmuls."""
from __future__ import annotations

from torch import Tensor

from beit3.model.config import BEiT3Config
from beit3.trainer.flops import encoder_flops

# The backbone passes of each task's training forward and the inputs each reads (model/heads.py):
# retrieval encodes images and texts apart; NLVR2 reads its text with each of the two images.
PASSES = {
    "classification": (("image",),), "segmentation": (("image",),),
    "vqa": (("image", "text"),), "captioning": (("image", "text"),),
    "retrieval": (("image",), ("text",)), "nlvr2": (("image", "text"), ("image2", "text")),
}


def image_tokens(cfg: BEiT3Config, image: Tensor) -> int:
    """CLS + patches of a (B, C, H, W) image batch."""
    return 1 + (image.shape[-2] // cfg.patch_size) * (image.shape[-1] // cfg.patch_size)


def batch_work(task: str, cfg: BEiT3Config, batch: dict) -> tuple[int, int, float]:
    """(samples, tokens, model FLOPs of forward + backward) of ``batch``. Tokens: CLS + patches of
    every image and the texts' tokens without their padding, once per pass that reads them; FLOPs
    count texts with their padding (the kernels compute it)."""
    size = batch["image" if "image" in batch else "text"].shape[0]
    tokens, flops = 0, 0.0
    for inputs in PASSES[task]:
        images = sum(image_tokens(cfg, batch[k]) for k in inputs if k.startswith("image"))
        text = batch["text"].shape[1] if "text" in inputs else 0
        if text:
            pad = batch.get("padding_mask")
            tokens += size * text if pad is None else int((~pad.bool()).sum())
        tokens += size * images
        flops += encoder_flops(cfg, size, images, text)
    return size, tokens, flops
