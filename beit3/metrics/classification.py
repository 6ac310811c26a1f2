"""Classification metrics (ImageNet, NLVR2): top-k accuracy, per-class precision / recall / F1,
the confusion matrix, and a PNG of it drawn with PIL."""
from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from timm.utils import accuracy as timm_accuracy
from torch import Tensor

from beit3.metrics.report import atomic_write_bytes


@torch.no_grad()
def accuracy_topk(logits: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy as fractions, ``{"top1": ..., "top5": ...}``.

    logits: (B, C); targets: (B,) class indices, or (B, C) soft targets (mixup / label
    smoothing), whose arg-max is the class. A k of C or more counts every sample correct.
    """
    if targets.dim() == 2:
        targets = targets.argmax(dim=1)
    if logits.dim() != 2 or targets.shape != (logits.shape[0],) or logits.shape[0] == 0:
        raise ValueError(f"need logits (B, C) with B > 0 and targets (B,) or (B, C), got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive, got {ks}")
    accs = timm_accuracy(logits.float(), targets, topk=tuple(ks))  # percentages
    return {f"top{k}": acc.item() / 100.0 for k, acc in zip(ks, accs)}


def confusion_matrix(preds: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """(C, C) long counts; row = true class, column = predicted class."""
    preds, targets = torch.as_tensor(preds).long().flatten(), torch.as_tensor(targets).long().flatten()
    if preds.shape != targets.shape:
        raise ValueError(f"preds and targets differ in length: {preds.numel()} vs {targets.numel()}")
    for name, t in (("preds", preds), ("targets", targets)):
        if t.numel() and (t.min() < 0 or t.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes}), got [{t.min().item()}, {t.max().item()}]")
    flat = torch.bincount(targets * num_classes + preds, minlength=num_classes * num_classes)
    return flat.view(num_classes, num_classes)


def classification_report(preds: Tensor | Sequence[int], targets: Tensor | Sequence[int],
                          class_names: Sequence[str]) -> dict:
    """Per-class precision, recall, F1 and support, their macro means, accuracy, and the
    confusion matrix (list of rows, row = true class). A ratio with a zero denominator is 0.0."""
    if len(class_names) == 0 or len(set(class_names)) != len(class_names):
        raise ValueError(f"class_names must be non-empty and unique, got {list(class_names)[:10]}")
    cm = confusion_matrix(preds, targets, len(class_names)).double()
    tp = cm.diag()
    precision = _safe_div(tp, cm.sum(dim=0))  # over predicted
    recall = _safe_div(tp, cm.sum(dim=1))  # over true
    f1 = _safe_div(2 * precision * recall, precision + recall)
    per_class = {
        name: {"precision": p, "recall": r, "f1": f, "support": int(s)}
        for name, p, r, f, s in zip(class_names, precision.tolist(), recall.tolist(), f1.tolist(),
                                    cm.sum(dim=1).tolist())
    }
    return {
        "accuracy": _safe_div(tp.sum(), cm.sum()).item(),
        "macro_precision": precision.mean().item(),
        "macro_recall": recall.mean().item(),
        "macro_f1": f1.mean().item(),
        "per_class": per_class,
        "confusion_matrix": cm.long().tolist(),
    }


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, num / den.clamp(min=1e-12), torch.zeros_like(num))


def save_confusion_matrix_png(cm: Tensor | Sequence[Sequence[int]], class_names: Sequence[str],
                              path: str | os.PathLike, title: str = "Confusion matrix") -> Path:
    """Draw ``cm`` (C, C; row = true class) to a PNG, atomically: cells shaded by the
    row-normalised value (the recall of each true class), counts in the cells and class names on
    both axes while they fit. Drawn with PIL so no plotting library is needed."""
    cm = torch.as_tensor(cm, dtype=torch.long)
    n = len(class_names)
    if cm.shape != (n, n):
        raise ValueError(f"confusion matrix of shape {tuple(cm.shape)} does not match {n} class names")
    image = _ConfusionMatrixPainter(cm, list(class_names), title).paint()
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


_LEGEND = "share of the true class (row-normalised)"


class _ConfusionMatrixPainter:
    """Layout: title on top, predicted-class names (rotated) above the grid, true-class names on
    its left, a colour legend below. Cells shrink with the class count; text is dropped once a
    cell is too small to hold it (ImageNet's 1000 classes become a heat map)."""

    def __init__(self, cm: Tensor, names: list[str], title: str):
        self.cm, self.names, self.title = cm, names, title
        n = len(names)
        self.cell = max(2, min(64, 1400 // n))
        self.show_text = self.cell >= 28
        self.font = ImageFont.load_default(size=max(10, min(16, self.cell // 3)))
        self.big_font = ImageFont.load_default(size=20)
        label_w = max(self._text_w(s) for s in names) + 12 if self.show_text else 12
        self.left, self.top = label_w + 30, label_w + 70
        self.width = max(self.left + n * self.cell + 20, self._text_w(title, self.big_font) + 40,
                         self.left + 250 + self._text_w(_LEGEND))
        self.height = self.top + n * self.cell + 60

    def paint(self) -> Image.Image:
        img = Image.new("RGB", (self.width, self.height), "white")
        draw = ImageDraw.Draw(img)
        draw.text((self.width // 2, 12), self.title, fill="black", font=self.big_font, anchor="mt")
        self._grid(img, draw)
        if self.show_text:
            self._labels(img, draw)
        self._axis_titles(img, draw)
        return img

    def _grid(self, img: Image.Image, draw: ImageDraw.ImageDraw) -> None:
        n, cell = len(self.names), self.cell
        rows = self.cm.double()
        norm = rows / rows.sum(dim=1, keepdim=True).clamp(min=1)  # (C, C) share of each true class
        # One pixel per cell, scaled up: a 1000-class matrix costs one resize, not 1e6 rectangles.
        grid = _shade_image(norm).resize((n * cell, n * cell), Image.Resampling.NEAREST)
        img.paste(grid, (self.left, self.top))
        if not self.show_text:
            return
        x0, y0, side = self.left, self.top, n * cell
        for i in range(n + 1):
            draw.line([(x0 + i * cell, y0), (x0 + i * cell, y0 + side)], fill="#bbbbbb")
            draw.line([(x0, y0 + i * cell), (x0 + side, y0 + i * cell)], fill="#bbbbbb")
        for i in range(n):
            for j in range(n):
                centre = (self.left + j * cell + cell // 2, self.top + i * cell + cell // 2)
                draw.text(centre, str(int(self.cm[i, j])), font=self.font, anchor="mm",
                          fill="white" if norm[i, j] > 0.5 else "black")

    def _labels(self, img: Image.Image, draw: ImageDraw.ImageDraw) -> None:
        for i, name in enumerate(self.names):
            mid = self.top + i * self.cell + self.cell // 2
            draw.text((self.left - 6, mid), name, fill="black", font=self.font, anchor="rm")
            # Column names read bottom-to-top: draw on a strip and rotate it.
            strip = Image.new("RGB", (self._text_w(name) + 4, self.cell), "white")
            ImageDraw.Draw(strip).text((2, self.cell // 2), name, fill="black", font=self.font, anchor="lm")
            rotated = strip.rotate(90, expand=True)
            img.paste(rotated, (self.left + i * self.cell, self.top - 6 - rotated.height))

    def _axis_titles(self, img: Image.Image, draw: ImageDraw.ImageDraw) -> None:
        grid_w = len(self.names) * self.cell
        draw.text((self.left + grid_w // 2, 42), "predicted", fill="black", font=self.font, anchor="mt")
        strip = Image.new("RGB", (self._text_w("true") + 4, 20), "white")
        ImageDraw.Draw(strip).text((2, 10), "true", fill="black", font=self.font, anchor="lm")
        rotated = strip.rotate(90, expand=True)
        img.paste(rotated, (4, self.top + grid_w // 2 - rotated.height // 2))
        legend_y = self.top + grid_w + 20
        img.paste(_shade_image(torch.linspace(0, 1, 200).expand(12, 200)), (self.left + 14, legend_y))
        draw.text((self.left + 10, legend_y + 6), "0", fill="black", font=self.font, anchor="rm")
        draw.text((self.left + 218, legend_y + 6), f"1   {_LEGEND}", fill="black", font=self.font, anchor="lm")

    def _text_w(self, text: str, font: ImageFont.FreeTypeFont | None = None) -> int:
        left, _, right, _ = (font or self.font).getbbox(text)
        return int(right - left)


def _shade_image(v: Tensor) -> Image.Image:
    """(H, W) values in [0, 1] -> an H x W RGB image going from white (0) to dark blue (1)."""
    v = v.clamp(0, 1)
    rgb = torch.stack([255 - 247 * v, 255 - 207 * v, 255 - 148 * v], dim=-1).round().to(torch.uint8)
    return Image.frombytes("RGB", (v.shape[1], v.shape[0]), rgb.contiguous().numpy().tobytes())
