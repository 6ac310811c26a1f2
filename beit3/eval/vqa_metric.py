"""VQAv2 metrics: the official accuracy (``vqaEval.py``), the training-time soft score of
unilm/beit3, and the test-dev submission file."""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from torch import Tensor

from beit3.data.vqa_normalize import normalize_answer
from beit3.eval.report import atomic_write_json


def vqa_accuracy(pred_answer: str, gt_answers: Sequence[str]) -> float:
    """Official VQA accuracy of one predicted answer against the (usually 10) human answers.

    As in ``vqaEval.py``: the accuracy is averaged over the leave-one-annotator-out subsets,
    each scoring ``min(1, #matches / 3)``. With 10 answers, 1 match -> 0.3, 2 -> 0.6, 3 -> 0.9,
    4 or more -> 1.0. Also as there, answers are normalised (punctuation, digits, articles)
    only when the annotators disagree; a unanimous ground truth is compared after whitespace
    clean-up alone.
    """
    if isinstance(gt_answers, str) or len(gt_answers) == 0:
        raise ValueError(f"gt_answers must be a non-empty list of strings, got {gt_answers!r}")
    pred = _clean_whitespace(pred_answer)
    gts = [_clean_whitespace(a) for a in gt_answers]
    if len(set(gts)) > 1:
        gts = [normalize_answer(a) for a in gts]
        pred = normalize_answer(pred)
    matches = [gt == pred for gt in gts]
    total = sum(matches)
    # Leaving out annotator i removes one match exactly when annotator i agreed.
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(gts)


def mean_vqa_accuracy(pred_answers: Sequence[str], gt_answers: Sequence[Sequence[str]]) -> float:
    """Mean of :func:`vqa_accuracy` over questions (the number the VQA server reports, as a fraction)."""
    if len(pred_answers) != len(gt_answers) or not pred_answers:
        raise ValueError(f"need one non-empty gt list per prediction, got {len(pred_answers)} "
                         f"predictions and {len(gt_answers)} gt lists")
    return sum(vqa_accuracy(p, g) for p, g in zip(pred_answers, gt_answers)) / len(pred_answers)


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
    if not isinstance(answer, str):
        raise TypeError(f"VQA answers must be str, got {type(answer).__name__}: {answer!r}")
    return answer.replace("\n", " ").replace("\t", " ").strip()
