"""mIoU / mAcc / aAcc as the ADE20K benchmark defines them, against hand-counted and independent numbers."""
import math

import numpy as np
import pytest
import torch

from beit3.metrics.segmentation import COUNTS, area_counts, format_class_table, segmentation_scores

NAMES = ["wall", "sky", "tree", "car"]
X = 255  # ignored

# Two images, 3 x 4 pixels each; class 3 (car) is in neither targets nor predictions.
TARGETS = [np.array([[0, 0, 1, 1],
                     [0, 0, 1, 1],
                     [2, 2, X, X]]),
           np.array([[1, 1, 1, 1],
                     [2, 2, 2, 2],
                     [X, 0, 0, 0]])]
PREDS = [np.array([[0, 0, 1, 2],
                   [0, 1, 1, 1],
                   [2, 0, 3, 3]]),
         np.array([[1, 1, 1, 1],
                   [2, 2, 0, 0],
                   [0, 0, 0, 2]])]


def scores(preds, targets, names=NAMES):
    totals = {k: 0 for k in COUNTS}
    for p, t in zip(preds, targets):
        counts = area_counts(torch.from_numpy(p), torch.from_numpy(t), len(names))
        totals = {k: totals[k] + counts[k] for k in COUNTS}
    return segmentation_scores(totals, names)


def test_hand_counted_example():
    """Counted by hand over the scored pixels (10 + 11; the X pixels and the 3s predicted there are
    left out), as (intersection, predicted, target) per image:
        wall  image 1 (3, 4, 4), image 2 (2, 4, 3): I 5, P 8, T 7, union 10
        sky   image 1 (3, 4, 4), image 2 (4, 4, 4): I 7, P 8, T 8, union 9
        tree  image 1 (1, 2, 2), image 2 (2, 3, 4): I 3, P 5, T 6, union 8
        car   nowhere: IoU and accuracy undefined."""
    s = scores(PREDS, TARGETS)
    iou = {n: r["iou"] for n, r in s["per_class"].items()}
    acc = {n: r["acc"] for n, r in s["per_class"].items()}
    assert iou["wall"] == pytest.approx(5 / 10) and iou["sky"] == pytest.approx(7 / 9)
    assert iou["tree"] == pytest.approx(3 / 8) and math.isnan(iou["car"])
    assert (acc["wall"], acc["sky"], acc["tree"]) == pytest.approx((5 / 7, 7 / 8, 3 / 6))
    assert s["mIoU"] == pytest.approx((5 / 10 + 7 / 9 + 3 / 8) / 3)  # car (nan) left out, not counted as 0
    assert s["mAcc"] == pytest.approx((5 / 7 + 7 / 8 + 3 / 6) / 3)
    assert s["aAcc"] == pytest.approx(15 / 21)
    assert s["pixels"] == 21 and s["classes_scored"] == 3


def test_predicted_but_absent_class_counts_zero_iou():
    """A class only predicted (never in the targets) has IoU 0 (it enters mIoU) and no accuracy."""
    preds = [p.copy() for p in PREDS]
    preds[0][0, 0] = 3  # scored pixel, target wall, predicted car
    s = scores(preds, TARGETS)
    assert s["per_class"]["car"]["iou"] == 0.0 and math.isnan(s["per_class"]["car"]["acc"])
    assert s["classes_scored"] == 4
    assert s["mIoU"] == pytest.approx((4 / 10 + 7 / 9 + 3 / 8 + 0) / 4)


def test_accumulated_over_the_set_not_averaged_per_image():
    s = scores(PREDS, TARGETS)
    per_image = [scores([p], [t])["mIoU"] for p, t in zip(PREDS, TARGETS)]
    assert s["mIoU"] != pytest.approx(sum(per_image) / 2)


def confusion_reference(preds, targets, n, ignore=255):
    """An independent computation: one confusion matrix over every scored pixel (rows = target)."""
    cm = np.zeros((n, n), dtype=np.int64)
    for p, t in zip(preds, targets):
        keep = t != ignore
        np.add.at(cm, (t[keep], p[keep]), 1)
    diag = np.diag(cm).astype(float)
    rows, cols = cm.sum(1), cm.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = diag / (rows + cols - diag)
        acc = diag / rows
    return np.nanmean(iou), np.nanmean(acc), diag.sum() / cm.sum(), iou


def test_matches_a_confusion_matrix_on_random_maps():
    rng = np.random.default_rng(0)
    n = 12
    targets = [rng.integers(0, n - 2, size=(37, 53)) for _ in range(5)]  # classes 10, 11 never in the targets
    for t in targets:
        t[rng.random(t.shape) < 0.2] = 255
    preds = [np.where(rng.random(t.shape) < 0.6, np.where(t == 255, 0, t), rng.integers(0, n - 1, size=t.shape))
             for t in targets]  # 11 is never predicted either: its IoU is nan
    s = scores(preds, targets, [str(i) for i in range(n)])
    miou, macc, aacc, iou = confusion_reference(preds, targets, n)
    assert s["mIoU"] == pytest.approx(miou, rel=1e-12) and s["mAcc"] == pytest.approx(macc, rel=1e-12)
    assert s["aAcc"] == pytest.approx(aacc, rel=1e-12)
    assert np.allclose([r["iou"] for r in s["per_class"].values()], iou, equal_nan=True)
    assert math.isnan(s["per_class"]["11"]["iou"]) and s["per_class"]["10"]["iou"] == 0.0


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="differ in shape"):
        area_counts(torch.zeros(2, 3), torch.zeros(3, 2), 4)
    with pytest.raises(ValueError, match="outside 0..3"):
        area_counts(torch.zeros(2, 2), torch.full((2, 2), 7), 4)


def test_class_table_lists_every_class():
    table = format_class_table(scores(PREDS, TARGETS))
    lines = table.splitlines()
    assert lines[1].split() == ["class", "|", "IoU", "|", "Acc"]
    assert "wall  |  50.00 |  71.43" in table and "car   |      - |      -" in table
    assert lines[-1].startswith("mean") and "aAcc 71.43" in lines[-1]
