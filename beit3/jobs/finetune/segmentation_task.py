"""Semantic segmentation as a fine-tuning task: ADE20K as distributed (or the synthetic world's masks in
its layout), BEiT-3 + UperNet (``segmentation_model.py``), per-pixel cross entropy plus 0.4 x the
auxiliary head's, and mIoU / mAcc / aAcc over the whole split from single-scale sliding windows.

Each evaluated image is one batch: its windows go through the model together, and it returns the
four per-class pixel counts of ``eval.segmentation_metric`` as its row, which the evaluator gathers
from every rank before they are summed and scored.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.data import Dataset

from beit3.model.config import BEiT3Config
from beit3.data.ade20k import IGNORE_INDEX, ADE20KDataset
from beit3.data.seg_transforms import SegEvalTransform, SegTrainTransform, seg_preprocess
from beit3.metrics.segmentation import COUNTS, area_counts, format_class_table, segmentation_scores
from beit3.model.heads import TaskModel
from beit3.model.segmentation import SegmentationModel, segmentation_loss, slide_logits, sync_batchnorm
from beit3.jobs.finetune.task_base import EvalPass, Rows, Task
from beit3.model.upernet import resize


def several_cuda_ranks() -> bool:
    dist = torch.distributed
    return (torch.cuda.is_available() and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1 and dist.get_backend() == "nccl")


class SegmentationTask(Task):
    """ADE20K-style semantic segmentation; the best checkpoint by mIoU."""

    name, main_metric = "segmentation", "mIoU"

    def transform(self, train: bool):
        c = self.cfg
        if train:
            return SegTrainTransform(c.img_size, c.seg_scale, c.seg_ratio_range, c.cat_max_ratio, c.hflip,
                                     c.photometric)
        return SegEvalTransform(c.seg_scale)

    def preprocess(self) -> dict:
        return seg_preprocess(self.cfg.img_size, self.cfg.seg_scale)

    def labels(self, train_set: Dataset) -> list[str]:
        return list(train_set.classes)

    def inference(self) -> dict:
        return {"slide_crop": self.cfg.img_size, "slide_stride": self.cfg.stride, "ignore_index": IGNORE_INDEX}

    def dataset(self, root: str, split: str, train: bool) -> Dataset:
        return ADE20KDataset(root, split, self.transform(train))

    def build_model(self, model_cfg: BEiT3Config, train_set: Dataset) -> TaskModel:
        c = self.cfg
        model = SegmentationModel(model_cfg, train_set.num_classes, c.decoder_channels, c.aux_channels)
        return sync_batchnorm(model) if several_cuda_ranks() else model

    def train_step(self, model, batch: dict, step: int) -> tuple[Tensor, dict]:
        target = batch["label"]  # (B, S, S), IGNORE_INDEX where not scored
        out = model(image=batch["image"], aux=True)
        loss = segmentation_loss(out["logits"], target)
        logs = {"loss_seg": loss.detach()}
        if "aux" in out:
            aux = segmentation_loss(out["aux"], target)
            loss = loss + self.cfg.aux_weight * aux
            logs["loss_aux"] = aux.detach()
        with torch.no_grad():
            pred = resize(out["logits"].detach().float(), target.shape[-2:]).argmax(1)
            scored = target != IGNORE_INDEX
            logs["pixel_acc"] = (pred[scored] == target[scored]).float().mean()
        return loss, logs

    def eval_passes(self, dataset: Dataset) -> list[EvalPass]:
        crop, stride, n = self.cfg.img_size, self.cfg.stride, dataset.num_classes

        def run(model, batch):
            target = batch["label"]  # (1, H, W) at the annotation's size
            logits = slide_logits(model, batch["image"], crop, stride)
            pred = resize(logits, target.shape[-2:]).argmax(1)  # mmseg: logits back to the original size
            return {k: v[None] for k, v in area_counts(pred, target, n, IGNORE_INDEX).items()}
        return [EvalPass("images", dataset, run)]

    def metrics(self, rows: dict[str, Rows], dataset: Dataset, output_dir: Optional[str] = None) -> dict:
        r = rows["images"]
        scores = segmentation_scores({k: r[k].sum(0) for k in COUNTS}, dataset.classes)
        return {"images": len(r["intersect"]), **scores}

    def report(self, metrics: dict) -> Optional[str]:
        return format_class_table(metrics) if "per_class" in metrics else None


__all__ = ["SegmentationTask"]
