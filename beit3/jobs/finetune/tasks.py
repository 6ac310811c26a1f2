"""The fine-tuning tasks: each names its datasets, builds its model, computes its loss and its metric
(the base ``Task`` and how a task is used: ``task_base.py``; segmentation: ``segmentation_task.py``).
The trainer (``trainer.py``) and the evaluator treat them alike.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import Tensor
from torch.utils.data import Dataset

from beit3.model.config import BEiT3Config
from beit3.data.downstream import datasets as dd
from beit3.data.text_tokenizer import TextTokenizer
from beit3.data.transforms import build_cls_transform, cls_preprocess
from beit3.metrics.captioning import caption_scores, load_coco_captions
from beit3.metrics.classification import classification_report, save_confusion_matrix_png
from beit3.trainer.gather import gather_features
from beit3.metrics.retrieval import retrieval_recall
from beit3.metrics.vqa import vqa_accuracy_by_type
from beit3.jobs.finetune.captioning import caption_loss, mask_caption
from beit3.model.generation import DecodeConfig, generate
from beit3.model.heads import CaptioningModel, ImageClassifier, NLVR2Model, RetrievalModel, TaskModel, VQAModel
from beit3.jobs.finetune.recipes import FinetuneConfig
from beit3.jobs.finetune.segmentation_task import SegmentationTask
from beit3.jobs.finetune.task_base import EvalPass, Rows, Task, unwrap

__all__ = ["CaptioningTask", "ClassificationTask", "EvalPass", "NLVR2Task", "RetrievalTask", "Rows",
           "SegmentationTask", "TASK_CLASSES", "Task", "VQATask", "build_task", "unwrap"]


# -- classification ------------------------------------------------------------------------------
class ClassificationTask(Task):
    """ImageNet-style (index files or an ImageFolder tree) or CIFAR-10/100. Soft-target cross
    entropy under Mixup/CutMix, label smoothing otherwise; acc@1 / acc@5, per-class report."""

    name, main_metric = "classification", "acc1"

    def __init__(self, cfg: FinetuneConfig, tokenizer=None):
        super().__init__(cfg, tokenizer)
        self.mixup = None

    def transform(self, train: bool):
        c = self.cfg
        return build_cls_transform(c.img_size, train, auto_augment=c.auto_augment, color_jitter=c.color_jitter,
                                   re_prob=c.re_prob, crop_pct=c.crop_pct)

    def preprocess(self) -> dict:
        return cls_preprocess(self.cfg.img_size, self.cfg.crop_pct)

    def labels(self, train_set: Dataset) -> list[str]:
        return class_names(train_set)

    def dataset(self, root: str, split: str, train: bool) -> Dataset:
        if self.cfg.dataset.startswith("cifar"):
            return dd.CIFARDataset(root, train=split == "train", transform=self.transform(train))
        return dd.ClassificationDataset(root, split, transform=self.transform(train))

    def build_model(self, model_cfg: BEiT3Config, train_set: Dataset) -> TaskModel:
        num_classes = _num_classes(train_set)
        c = self.cfg
        if c.mixup > 0 or c.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=c.mixup, cutmix_alpha=c.cutmix, label_smoothing=c.label_smoothing,
                               num_classes=num_classes)
        return ImageClassifier(model_cfg, num_classes, linear_probe=c.linear_probe)

    def criterion(self, logits: Tensor, target: Tensor) -> Tensor:
        if target.dim() == 2:
            return SoftTargetCrossEntropy()(logits, target)
        if self.cfg.label_smoothing > 0:
            return LabelSmoothingCrossEntropy(self.cfg.label_smoothing)(logits, target)
        return F.cross_entropy(logits, target)

    def train_step(self, model, batch: dict, step: int) -> tuple[Tensor, dict]:
        image, label = batch["image"], batch["label"]
        if self.mixup is not None:
            image, label = self.mixup(image, label)  # label -> (B, C) soft targets
        logits = model(image=image).float()
        logs = {} if label.dim() == 2 else {"acc": (logits.argmax(-1) == label).float().mean()}
        return self.criterion(logits, label), logs

    def eval_passes(self, dataset: Dataset) -> list[EvalPass]:
        def run(model, batch):
            logits = model(image=batch["image"]).float()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            return {"top5": top, "label": batch["label"]}
        return [EvalPass("images", dataset, run)]

    def metrics(self, rows: dict[str, Rows], dataset: Dataset, output_dir: Optional[str] = None) -> dict:
        top, label = rows["images"]["top5"], rows["images"]["label"]
        out = {"acc1": (top[:, 0] == label).double().mean().item(),
               "acc5": (top == label[:, None]).any(dim=1).double().mean().item(), "samples": len(label)}
        if output_dir is not None:
            names = class_names(dataset)
            report = classification_report(top[:, 0], label, names)
            save_confusion_matrix_png(report["confusion_matrix"], names, Path(output_dir) / "confusion_matrix.png")
            out["report"] = report
        return out


def _num_classes(ds: Dataset) -> int:
    if hasattr(ds, "num_classes"):
        return ds.num_classes
    return 1 + max(ds.targets)  # CIFAR


def class_names(ds: Dataset) -> list[str]:
    """Class names of a classification dataset; from an index file, the image folder names."""
    if getattr(ds, "classes", None):
        return list(ds.classes)
    names: dict[int, str] = {}
    for path, label in ds.samples:
        names.setdefault(label, os.path.basename(os.path.dirname(path)))
    n = _num_classes(ds)
    named = [names.get(i, str(i)) for i in range(n)]
    return named if len(set(named)) == n else [str(i) for i in range(n)]


# -- VQA -----------------------------------------------------------------------------------------
class VQATask(Task):
    """VQAv2: BCE on the soft answer scores times the number of answers (as unilm/beit3); the
    metric is the VQA score (the soft score of the predicted answer, which is the official
    accuracy of the annotators' answers) and, given the raw annotations, ``vqa_accuracy`` as the
    official ``vqaEval.py`` (version ``cfg.vqa_eval``) computes it, with the server's breakdown by
    answer type (``vqa_accuracy_yes_no``, ``_number``, ``_other``)."""

    name, main_metric = "vqa", "vqa_score"

    def __init__(self, cfg: FinetuneConfig, tokenizer=None, annotations: Optional[str] = None):
        super().__init__(cfg, tokenizer)
        self.annotations = annotations

    def labels(self, train_set: Dataset) -> list[str]:
        return list(train_set.label2ans)

    def dataset(self, root: str, split: str, train: bool) -> Dataset:
        return dd.VQADataset(root, split, transform=self.transform(train), tokenizer=self.tokenizer,
                             max_len=self.cfg.max_text_len)

    def build_model(self, model_cfg: BEiT3Config, train_set: Dataset) -> TaskModel:
        return VQAModel(model_cfg, train_set.num_answers)

    def train_step(self, model, batch: dict, step: int) -> tuple[Tensor, dict]:
        logits = model(image=batch["image"], text=batch["text"], padding_mask=batch["padding_mask"]).float()
        labels = batch["labels"].float()
        loss = F.binary_cross_entropy_with_logits(logits, labels) * labels.shape[1]
        score = labels.gather(1, logits.argmax(-1, keepdim=True)).mean()
        return loss, {"vqa_score": score.detach()}

    def eval_passes(self, dataset: Dataset) -> list[EvalPass]:
        def run(model, batch):
            logits = model(image=batch["image"], text=batch["text"], padding_mask=batch["padding_mask"])
            pred = logits.float().argmax(-1)
            rows = {"pred": pred, "qid": batch["qid"]}
            if "labels" in batch:
                rows["score"] = batch["labels"].float().gather(1, pred[:, None])[:, 0]
            return rows
        return [EvalPass("questions", dataset, run)]

    def metrics(self, rows: dict[str, Rows], dataset: Dataset, output_dir: Optional[str] = None) -> dict:
        r = rows["questions"]
        answers = [dataset.label2ans[i] for i in r["pred"].tolist()]
        out: dict[str, Any] = {"questions": len(answers)}
        if "score" in r:
            out["vqa_score"] = r["score"].double().mean().item()
        if self.annotations:
            gts, types = _vqa_answers(self.annotations)
            qids = r["qid"].tolist()
            missing = [q for q in qids if q not in gts]
            if missing:
                raise ValueError(f"{self.annotations} has no answers for question ids {missing[:5]}")
            qtypes = [types[q] for q in qids]
            acc = vqa_accuracy_by_type(answers, [gts[q] for q in qids], None if None in qtypes else qtypes,
                                       self.cfg.vqa_eval)
            out["vqa_accuracy"] = acc.pop("overall")
            out.update({f"vqa_accuracy_{t.replace('/', '_')}": v for t, v in acc.items()})
        out["predictions"] = [{"question_id": q, "answer": a} for q, a in zip(r["qid"].tolist(), answers)]
        return out


def _vqa_answers(path: str) -> tuple[dict[int, list[str]], dict[int, str]]:
    """question id -> the annotators' raw answers, and -> its answer type, from a VQA v2 annotation file."""
    with open(path, encoding="utf-8") as f:
        anns = json.load(f).get("annotations")
    if not isinstance(anns, list):
        raise ValueError(f"{path}: expected a VQA v2 annotation file with an 'annotations' list")
    answers = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in anns}
    return answers, {a["question_id"]: a.get("answer_type") for a in anns}


# -- retrieval -----------------------------------------------------------------------------------
class RetrievalTask(Task):
    """COCO / Flickr30k: contrastive loss over the features of every rank (gathered with their
    gradients); recall@1/5/10 both ways, each distinct image encoded once."""

    name, main_metric = "retrieval", "mean_recall"

    def dataset(self, root: str, split: str, train: bool) -> Dataset:
        return dd.RetrievalDataset(root, split, transform=self.transform(train), tokenizer=self.tokenizer,
                                   max_len=self.cfg.max_text_len, task=self.cfg.dataset)

    def build_model(self, model_cfg: BEiT3Config, train_set: Dataset) -> TaskModel:
        return RetrievalModel(model_cfg, logit_scale_max=self.cfg.logit_scale_max)

    def train_step(self, model, batch: dict, step: int) -> tuple[Tensor, dict]:
        out = model(image=batch["image"], text=batch["text"], padding_mask=batch["padding_mask"])
        loss, acc = contrastive_loss(out["image"].float(), out["text"].float(), out["scale"].float())
        return loss, {"acc": acc, "logit_scale": out["scale"].detach()}

    def eval_passes(self, dataset: Dataset) -> list[EvalPass]:
        def images(model, batch):
            return {"feat": model(image=batch["image"])["image"].float(), "image_id": batch["image_id"]}

        def texts(model, batch):
            out = model(text=batch["text"], padding_mask=batch["padding_mask"])
            return {"feat": out["text"].float(), "image_id": batch["image_id"]}
        return [EvalPass("images", DistinctImages(dataset, by_id=True), images),
                EvalPass("texts", RetrievalTexts(dataset), texts)]

    def metrics(self, rows: dict[str, Rows], dataset: Dataset, output_dir: Optional[str] = None) -> dict:
        img, txt = rows["images"], rows["texts"]
        row_of = {int(i): r for r, i in enumerate(img["image_id"].tolist())}
        text_to_image = torch.tensor([row_of[int(i)] for i in txt["image_id"].tolist()], dtype=torch.long)
        out = retrieval_recall(img["feat"], txt["feat"], text_to_image)
        out.update(images=len(img["feat"]), texts=len(txt["feat"]))
        return out


def contrastive_loss(image: Tensor, text: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """CLIP loss of this rank's (B, D) features against every rank's (gathered with gradients, as
    unilm/beit3 ``ClipLoss``); returns the loss and the image->text top-1 accuracy of this batch."""
    all_image, all_text = gather_features(image, with_grad=True), gather_features(text, with_grad=True)
    offset = 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        offset = torch.distributed.get_rank() * image.shape[0]  # training batches are equal on all ranks
    labels = torch.arange(image.shape[0], device=image.device) + offset
    logits_i = scale * image @ all_text.T  # (B, world * B)
    logits_t = scale * text @ all_image.T
    loss = (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels)) / 2
    return loss, (logits_i.detach().argmax(-1) == labels).float().mean()


class DistinctImages(Dataset):
    """Each distinct image of a split once (its first line: retrieval and captioning train indexes
    hold one line per caption), ordered by ``image_id`` with ``by_id``, else as the index lists them."""

    def __init__(self, ds, by_id: bool = False):
        self.ds = ds
        first: dict[int, int] = {}
        for i, item in enumerate(ds.items):
            first.setdefault(int(item["image_id"]), i)
        self.index = [first[k] for k in sorted(first)] if by_id else list(first.values())

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        item = self.ds.items[self.index[i]]
        image = dd.load_image(self.ds.data_root / item["image_path"], str(self.ds.index_paths))
        return {"image": self.ds.transform(image), "image_id": int(item["image_id"])}


class RetrievalTexts(Dataset):
    """Every caption of a retrieval split, without its image."""

    def __init__(self, ds: dd.RetrievalDataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds.items)

    def __getitem__(self, i: int) -> dict:
        item = self.ds.items[i]
        segment = item["text_segment"]
        if isinstance(segment, str):
            segment = self.ds.tokenizer.encode(segment)[1:-1]
        tok = TextTokenizer
        text, pad = dd.text_segment_to_input(segment, self.ds.max_len, tok.bos_id, tok.eos_id, tok.pad_id)
        return {"text": text, "padding_mask": pad, "image_id": int(item["image_id"])}


# -- captioning ----------------------------------------------------------------------------------
class CaptioningTask(Task):
    """COCO captioning / NoCaps: UniLM masked-caption training, beam-search decoding; BLEU-4 and
    CIDEr (METEOR where Java runs) against the split's reference captions in the data root."""

    name, main_metric = "captioning", "CIDEr"
    GT_FILES = {"coco_captioning": "coco_karpathy_{split}_gt.json", "nocaps": "nocaps_{split}_gt.json"}

    def dataset(self, root: str, split: str, train: bool) -> Dataset:
        return dd.CaptioningDataset(root, split, transform=self.transform(train), tokenizer=self.tokenizer,
                                    max_len=self.cfg.max_text_len, task=self.cfg.dataset)

    def build_model(self, model_cfg: BEiT3Config, train_set: Dataset) -> TaskModel:
        if self.tokenizer is None:
            raise ValueError("captioning needs the text tokenizer (its [MASK] id and decoding)")
        return CaptioningModel(model_cfg)

    def train_step(self, model, batch: dict, step: int) -> tuple[Tensor, dict]:
        c, tok = self.cfg, self.tokenizer
        text, pad = batch["text"], batch["padding_mask"]
        gen = torch.Generator(device=text.device).manual_seed(c.seed * 1_000_003 + step * 7919 + _rank())
        inputs, masked = mask_caption(text, pad, c.mask_prob, tok.mask_id, unwrap(model).cfg.vocab_size, gen)
        logits = model(image=batch["image"], text=inputs, padding_mask=pad, masked_pos=masked).float()
        targets = text[masked]
        drop = c.drop_worst_ratio if step > c.drop_worst_after else 0.0
        loss = caption_loss(logits, targets, c.label_smoothing, drop)
        return loss, {"acc": (logits.detach().argmax(-1) == targets).float().mean()}

    def inference(self) -> dict:
        c = self.cfg
        return {"max_text_len": c.max_text_len, "num_beams": c.num_beams, "length_penalty": c.length_penalty,
                "ban_special": c.ban_special}

    def decode_config(self) -> DecodeConfig:
        tok = self.tokenizer
        return DecodeConfig(num_beams=self.cfg.num_beams, max_len=self.cfg.max_text_len,
                            length_penalty=self.cfg.length_penalty, bos_id=tok.bos_id, eos_id=tok.eos_id,
                            pad_id=tok.pad_id, mask_id=tok.mask_id, ban_special=self.cfg.ban_special)

    def eval_passes(self, dataset: Dataset) -> list[EvalPass]:
        dc = self.decode_config()

        def run(model, batch):
            tokens, _ = generate(model, batch["image"], unwrap(model).cfg.depth, dc, stop=_all_ranks)
            return {"tokens": tokens, "image_id": batch["image_id"]}
        return [EvalPass("images", DistinctImages(dataset), run)]

    def metrics(self, rows: dict[str, Rows], dataset: Dataset, output_dir: Optional[str] = None) -> dict:
        r = rows["images"]
        preds = {int(i): self.tokenizer.decode(t) for i, t in zip(r["image_id"].tolist(), r["tokens"])}
        out: dict[str, Any] = {"images": len(preds)}
        split = dataset.index_paths[0].name.split(".")[1]  # coco_captioning.val.jsonl -> val
        gt_path = Path(dataset.data_root) / self.GT_FILES[self.cfg.dataset].format(split=split)
        if gt_path.is_file():
            gts = load_coco_captions(gt_path)
            out.update(caption_scores(preds, {k: gts[k] for k in preds}))
        out["predictions"] = [{"image_id": k, "caption": v} for k, v in preds.items()]
        return out


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _all_ranks(done: bool) -> bool:
    """True once every rank is done: under ZeRO-3 each forward is a collective, so all ranks decode
    the same number of steps."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return done
    flag = torch.tensor([0.0 if done else 1.0], device=_device())
    torch.distributed.all_reduce(flag)
    return flag.item() == 0


def _device() -> torch.device:
    if torch.cuda.is_available() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# -- NLVR2 ---------------------------------------------------------------------------------------
class NLVR2Task(Task):
    """NLVR2: is the sentence true of the image pair? Cross entropy, accuracy."""

    name, main_metric = "nlvr2", "acc"

    def dataset(self, root: str, split: str, train: bool) -> Dataset:
        return dd.NLVR2Dataset(root, split, transform=self.transform(train), tokenizer=self.tokenizer,
                               max_len=self.cfg.max_text_len)

    def build_model(self, model_cfg: BEiT3Config, train_set: Dataset) -> TaskModel:
        return NLVR2Model(model_cfg)

    def _logits(self, model, batch) -> Tensor:
        return model(image=batch["image"], image2=batch["image2"], text=batch["text"],
                     padding_mask=batch["padding_mask"]).float()

    def train_step(self, model, batch: dict, step: int) -> tuple[Tensor, dict]:
        logits = self._logits(model, batch)
        return F.cross_entropy(logits, batch["label"]), {"acc": (logits.argmax(-1) == batch["label"]).float().mean()}

    def eval_passes(self, dataset: Dataset) -> list[EvalPass]:
        def run(model, batch):
            return {"pred": self._logits(model, batch).argmax(-1), "label": batch["label"]}
        return [EvalPass("pairs", dataset, run)]

    def metrics(self, rows: dict[str, Rows], dataset: Dataset, output_dir: Optional[str] = None) -> dict:
        r = rows["pairs"]
        return {"acc": (r["pred"] == r["label"]).double().mean().item(), "pairs": len(r["label"])}


TASK_CLASSES = {t.name: t for t in (VQATask, RetrievalTask, CaptioningTask, ClassificationTask, NLVR2Task,
                                     SegmentationTask)}


def build_task(cfg: FinetuneConfig, tokenizer: Optional[TextTokenizer] = None, **kwargs) -> Task:
    return TASK_CLASSES[cfg.task](cfg, tokenizer, **kwargs)
