"""VQAv2 metrics: the official accuracy (``vqaEval.py``) with the server's breakdown by answer type,
the training-time soft score of unilm/beit3, and the test-dev submission file.

Two versions of the official ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` (GT-Vision-Lab/VQA)
are in use, with the same punctuation list and tables but different normalisation:

- ``"2016"`` (commit 458a8b2, 2016-10-08, also LAVIS's ``vqa_eval.py``; the default): the prediction
  is always whitespace-cleaned, ``processPunctuation``-ed and ``processDigitArticle``-d, as the
  evaluation server processes a submission; the answers are changed only when the annotators
  disagree, and then only by ``processPunctuation`` (no lower-casing, no number words), so "2"
  scores 0.6 against 2 x "2" + 8 x "two", and "Two" scores 1.0 against ten "2".
- ``"2021"`` (commit a013f00, 2021-03-11, the repository's latest): the prediction and the ten
  answers are whitespace-cleaned; only when the annotators disagree are both passed through
  ``processPunctuation`` then ``processDigitArticle``. A unanimous ground truth is compared raw, so
  "two" scores 0 against ten "2" (its maintainers' stated reason: answers read from the image, OCR,
  stay as written).

Both average, per question, ``min(1, matches / 3)`` over the ten leave-one-annotator-out subsets,
and per answer type the question averages (the August 2015 version appended the last subset's value
instead; both versions here fixed that).
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Optional

from torch import Tensor

from beit3.data.vqa_normalize import normalize_answer, process_punctuation
from beit3.metrics.report import atomic_write_json

VQA_EVAL_VERSIONS = ("2016", "2021")  # see the module docstring; the first is the default


def vqa_accuracy(pred_answer: str, gt_answers: Sequence[str], version: str = "2016") -> float:
    """Official VQA accuracy of one predicted answer against the (usually 10) human answers, as
    ``vqaEval.py`` of ``version`` computes it: the mean over the leave-one-annotator-out subsets of
    ``min(1, #matches / 3)``; with 10 answers, 1 match -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1.0.
    """
    if isinstance(gt_answers, str) or len(gt_answers) == 0:
        raise ValueError(f"gt_answers must be a non-empty list of strings, got {gt_answers!r}")
    pred, gts = _normalised(pred_answer, list(gt_answers), version)
    total = sum(gt == pred for gt in gts)
    # Leaving out annotator i removes one match exactly when annotator i agreed.
    return sum(min(1.0, (total - (gt == pred)) / 3.0) for gt in gts) / len(gts)


def _normalised(pred: str, gts: list[str], version: str) -> tuple[str, list[str]]:
    for a in (pred, *gts):
        if not isinstance(a, str):
            raise TypeError(f"VQA answers must be str, got {type(a).__name__}: {a!r}")
    if version == "2021":
        pred, gts = _clean_whitespace(pred), [_clean_whitespace(a) for a in gts]
        if len(set(gts)) > 1:
            return normalize_answer(pred), [normalize_answer(a) for a in gts]
        return pred, gts
    if version == "2016":
        gts = [process_punctuation(a) for a in gts] if len(set(gts)) > 1 else gts
        return normalize_answer(_clean_whitespace(pred)), gts
    raise ValueError(f"unknown vqaEval.py version {version!r}; expected one of {VQA_EVAL_VERSIONS}")


def vqa_accuracy_by_type(pred_answers: Sequence[str], gt_answers: Sequence[Sequence[str]],
                         answer_types: Optional[Sequence[str]] = None, version: str = "2016") -> dict[str, float]:
    """What the VQA server reports, as fractions (it prints 100x, rounded to 2 decimals):
    ``{"overall": mean over questions, "yes/no": ..., "number": ..., "other": ...}``, one entry per
    answer type of ``answer_types`` (the annotation file's ``answer_type`` of each question)."""
    if len(pred_answers) != len(gt_answers) or not pred_answers:
        raise ValueError(f"need one non-empty gt list per prediction, got {len(pred_answers)} "
                         f"predictions and {len(gt_answers)} gt lists")
    if answer_types is not None and len(answer_types) != len(pred_answers):
        raise ValueError(f"{len(answer_types)} answer types for {len(pred_answers)} predictions")
    accs = [vqa_accuracy(p, g, version) for p, g in zip(pred_answers, gt_answers)]
    out = {"overall": sum(accs) / len(accs)}
    by_type: dict[str, list[float]] = {}
    for t, acc in zip(answer_types or (), accs):
        by_type.setdefault(t, []).append(acc)
    out.update({t: sum(v) / len(v) for t, v in sorted(by_type.items())})
    return out


def vqa_soft_score(logits: Tensor, targets: Tensor) -> float:
    """Training-time VQA score of unilm/beit3 (``utils.VQAScore``): the soft target score of the
    arg-max answer, averaged over the batch. Returns a fraction (unilm logs it times 100).

    logits: (B, A) answer logits; targets: (B, A) soft scores in [0, 1] built from the annotators.
    """
    if logits.dim() != 2 or logits.shape != targets.shape:
        raise ValueError(f"logits and targets must both be (B, A), got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("vqa_soft_score got an empty batch")
    pred = logits.detach().argmax(dim=1, keepdim=True)  # (B, 1)
    return targets.detach().float().gather(1, pred).mean().item()


def write_vqa_submission(qids: Iterable[int], answers: Iterable[str], path: str | os.PathLike) -> Path:
    """Write the VQAv2 evaluation-server file ``[{"question_id": int, "answer": str}]`` atomically.

    Exact repeats of a question (the padding a ``DistributedSampler`` adds) are written once;
    one question with two different answers is an error.
    """
    qids = [int(q) for q in qids]
    answers = list(answers)
    if len(qids) != len(answers):
        raise ValueError(f"write_vqa_submission: {len(qids)} question ids but {len(answers)} answers")
    by_qid: dict[int, str] = {}
    for qid, answer in zip(qids, answers):
        if not isinstance(answer, str):
            raise TypeError(f"answer for question {qid} must be a str, got {type(answer).__name__}")
        if by_qid.setdefault(qid, answer) != answer:
            raise ValueError(f"question {qid} has two answers: {by_qid[qid]!r} and {answer!r}")
    rows = [{"question_id": q, "answer": a} for q, a in by_qid.items()]
    return atomic_write_json(path, rows)


def _clean_whitespace(answer: str) -> str:
    return answer.replace("\n", " ").replace("\t", " ").strip()
