"""Semantic segmentation metrics as the ADE20K benchmark (and mmsegmentation's ``mean_iou``) defines them.

Per image, four per-class pixel counts over the scored pixels (target != ignore index): the
intersection (predicted c where the target is c), the prediction's and the target's area, and the
union (prediction + target - intersection). The counts are summed over the whole set; then, per class,
IoU = intersection / union and accuracy = intersection / target area. A class absent from both the
targets and the predictions of the whole set has no IoU (nan) and is left out of mIoU, one absent
from the targets has no accuracy and is left out of mAcc. aAcc is every class's intersection over
every scored pixel. (mIoU is not the mean of per-image IoUs.)
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

COUNTS = ("intersect", "union", "pred", "label")


def area_counts(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> dict[str, Tensor]:
    """The four (num_classes,) int64 pixel counts of one image (or of a batch taken as one), on
    ``pred``'s device. ``pred`` and ``target``: class ids of the same shape."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    keep = target != ignore_index
    p, t = pred[keep].long(), target[keep].long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"target ids outside 0..{num_classes - 1} (and {ignore_index}, ignored)")
    inter = torch.bincount(p[p == t], minlength=num_classes)[:num_classes]
    area_p = torch.bincount(p, minlength=num_classes)[:num_classes]
    area_t = torch.bincount(t, minlength=num_classes)[:num_classes]
    return {"intersect": inter, "union": area_p + area_t - inter, "pred": area_p, "label": area_t}


def segmentation_scores(totals: dict[str, Tensor], class_names: Sequence[str]) -> dict:
    """mIoU, mAcc, aAcc and per-class IoU / accuracy from counts summed over a set (see the module
    docstring); nan where a class has none. ``classes_scored``: the classes in mIoU."""
    inter, union, label = (totals[k].double() for k in ("intersect", "union", "label"))
    if len(class_names) != len(inter):
        raise ValueError(f"{len(class_names)} class names for counts of {len(inter)} classes")
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(union > 0, inter / union.clamp(min=1), nan)
    acc = torch.where(label > 0, inter / label.clamp(min=1), nan)
    total = label.sum()
    return {
        "mIoU": _nanmean(iou), "mAcc": _nanmean(acc),
        "aAcc": (inter.sum() / total).item() if total > 0 else float("nan"),
        "classes_scored": int((union > 0).sum()), "pixels": int(total),
        "per_class": {name: {"iou": i, "acc": a} for name, i, a in zip(class_names, iou.tolist(), acc.tolist())},
    }


def _nanmean(x: Tensor) -> float:
    ok = ~torch.isnan(x)
    return x[ok].mean().item() if ok.any() else float("nan")


def format_class_table(scores: dict, title: str = "per-class IoU") -> str:
    """One row per class: IoU and accuracy in percent (mmseg's table), '-' where undefined."""
    rows = scores["per_class"]
    width = max([len("class")] + [len(n) for n in rows])

    def pct(v: float) -> str:
        return "-" if math.isnan(v) else f"{100 * v:.2f}"

    lines = [title, f"{'class':<{width}} | {'IoU':>6} | {'Acc':>6}", "-" * (width + 18)]
    lines += [f"{name:<{width}} | {pct(r['iou']):>6} | {pct(r['acc']):>6}" for name, r in rows.items()]
    means = f"{pct(scores['mIoU']):>6} | {pct(scores['mAcc']):>6}"
    lines.append(f"{'mean':<{width}} | {means}   aAcc {pct(scores['aAcc'])}")
    return "\n".join(lines)


__all__ = ["COUNTS", "area_counts", "format_class_table", "segmentation_scores"]
