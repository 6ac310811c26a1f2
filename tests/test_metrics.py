"""Evaluation metrics: VQA, retrieval, captioning, classification, and results reporting."""
from __future__ import annotations

import itertools
import json
import logging
import math
import shutil

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from beit3.metrics import captioning as caption_metric
from beit3.metrics.captioning import caption_scores, load_coco_captions, simple_tokenize
from beit3.metrics.classification import accuracy_topk, classification_report, confusion_matrix, save_confusion_matrix_png
from beit3.trainer.gather import gather_features
from beit3.metrics.report import format_results_table, write_results_json
from beit3.metrics.retrieval import retrieval_recall
from beit3.metrics.vqa import vqa_accuracy, vqa_accuracy_by_type, vqa_soft_score, write_vqa_submission

HAS_JAVA = shutil.which("java") is not None


# ---------------------------------------------------------------- VQA

def _official_vqa_accuracy(pred: str, gts: list[str]) -> float:
    """vqaEval.py's loop, literally: every 9-of-10 subset scores min(1, matches / 3)."""
    subsets = list(itertools.combinations(range(len(gts)), len(gts) - 1))
    return sum(min(1.0, sum(gts[i] == pred for i in s) / 3) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n_match, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (9, 1.0)])
def test_vqa_accuracy_by_number_of_agreeing_annotators(n_match, expected):
    gts = ["yes"] * n_match + ["no"] * (10 - n_match)
    assert vqa_accuracy("yes", gts) == pytest.approx(expected, abs=1e-12)
    assert vqa_accuracy("yes", gts) == pytest.approx(_official_vqa_accuracy("yes", gts), abs=1e-12)


def test_vqa_accuracy_normalises_digits_articles_punctuation():
    gts = ["2"] * 4 + ["3"] * 6
    assert vqa_accuracy("Two", gts) == pytest.approx(1.0)
    assert vqa_accuracy("  two\n", gts) == pytest.approx(1.0)
    assert vqa_accuracy("A Dog.", ["dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("three", gts) == pytest.approx(1.0)
    assert vqa_accuracy("four", gts) == 0.0


def test_vqa_accuracy_unanimous_answers_by_version():
    # The default (2016) vqaEval.py always normalises the prediction; the repository's latest (2021)
    # normalises only when the annotators disagree, so a unanimous "2" is compared raw there
    # (tests/test_vqa_official.py ports both).
    assert vqa_accuracy("two", ["2"] * 10) == 1.0
    assert vqa_accuracy("2", ["2"] * 2 + ["two"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("two", ["2"] * 10, version="2021") == 0.0
    assert vqa_accuracy("2", ["2"] * 10, version="2021") == 1.0


def test_vqa_accuracy_by_type_and_bad_input():
    preds = ["yes", "no"]
    gts = [["yes"] * 2 + ["no"] * 8, ["yes"] * 10]
    assert vqa_accuracy_by_type(preds, gts) == {"overall": pytest.approx(0.3)}
    with pytest.raises(ValueError, match="non-empty"):
        vqa_accuracy("yes", [])
    with pytest.raises(ValueError, match="gt lists"):
        vqa_accuracy_by_type(["yes"], [])
    with pytest.raises(TypeError, match="must be str"):
        vqa_accuracy(2, ["2"])


def test_vqa_soft_score_is_target_of_argmax():
    logits = torch.tensor([[0.1, 2.0, 0.3], [5.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    targets = torch.tensor([[0.0, 0.6, 1.0], [1.0, 0.0, 0.0], [0.3, 0.0, 0.0]])
    assert vqa_soft_score(logits, targets) == pytest.approx((0.6 + 1.0 + 0.0) / 3)
    with pytest.raises(ValueError, match="both be"):
        vqa_soft_score(logits, targets[:, :2])


def test_write_vqa_submission(tmp_path):
    path = tmp_path / "sub" / "vqa_test_dev.json"
    write_vqa_submission(torch.tensor([7, 3, 7]), ["yes", "2", "yes"], path)
    assert json.loads(path.read_text()) == [{"question_id": 7, "answer": "yes"}, {"question_id": 3, "answer": "2"}]
    assert sorted(p.name for p in path.parent.iterdir()) == ["vqa_test_dev.json"]  # no temp file left
    with pytest.raises(ValueError, match="question 7 has two answers"):
        write_vqa_submission([7, 7], ["yes", "no"], path)
    with pytest.raises(ValueError, match="2 question ids but 1 answers"):
        write_vqa_submission([1, 2], ["yes"], path)


# ---------------------------------------------------------------- retrieval

# sim[t, i] for 8 texts (two per image) and 4 images, all values distinct so ranks are known:
# text->image ranks of the right image: 0 3 0 1 0 2 0 3; image->text best ranks: 1 1 0 0.
SIM = torch.tensor([
    [0.90, 0.11, 0.21, 0.31], [0.12, 0.92, 0.22, 0.32],
    [0.23, 0.83, 0.13, 0.33], [0.94, 0.84, 0.14, 0.24],
    [0.35, 0.25, 0.75, 0.15], [0.66, 0.56, 0.46, 0.16],
    [0.17, 0.27, 0.37, 0.47], [0.58, 0.48, 0.38, 0.18],
])
TEXT_TO_IMAGE = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


@pytest.mark.parametrize("chunk_size", [1, 3, 100])
def test_retrieval_recall_on_crafted_similarity(chunk_size):
    # Identity image features make image_feats @ text_feats.T equal SIM.T.
    r = retrieval_recall(torch.eye(4), SIM, TEXT_TO_IMAGE, ks=(1, 2, 3), chunk_size=chunk_size)
    assert r["i2t_r1"] == 0.5 and r["i2t_r2"] == 1.0 and r["i2t_r3"] == 1.0
    assert r["t2i_r1"] == 0.5 and r["t2i_r2"] == 0.625 and r["t2i_r3"] == 0.75
    assert r["mean_recall"] == pytest.approx((0.5 + 1 + 1 + 0.5 + 0.625 + 0.75) / 6)
    # k beyond the gallery size ranks everything: recall 1.
    assert retrieval_recall(torch.eye(4), SIM, TEXT_TO_IMAGE, ks=(10,))["t2i_r10"] == 1.0


def _reference_recall(img, txt, t2i, k):
    sim = img @ txt.T  # (Ni, Nt), the full matrix
    i2t = [bool((t2i[sim[i].argsort(descending=True)[:k]] == i).any()) for i in range(len(img))]
    t2i_hit = [int(t2i[t]) in sim[:, t].argsort(descending=True)[:k].tolist() for t in range(len(txt))]
    return sum(i2t) / len(i2t), sum(t2i_hit) / len(t2i_hit)


def test_retrieval_recall_chunked_matches_full_matrix_reference():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(40, 16, generator=g), dim=1)
    t2i = torch.arange(40).repeat_interleave(5)[torch.randperm(200, generator=g)]
    txt = torch.nn.functional.normalize(img[t2i] + 1.5 * torch.randn(200, 16, generator=g), dim=1)
    full = retrieval_recall(img, txt, t2i, chunk_size=10_000)
    for chunk in (1, 7, 64):
        assert retrieval_recall(img, txt, t2i, chunk_size=chunk) == full
    for k in (1, 5, 10):
        assert (full[f"i2t_r{k}"], full[f"t2i_r{k}"]) == _reference_recall(img, txt, t2i, k)
    assert 0 < full["t2i_r1"] < full["t2i_r10"] < 1  # the noise leaves ranks to compare


def test_retrieval_recall_rejects_bad_inputs():
    with pytest.raises(ValueError, match="no text"):
        retrieval_recall(torch.eye(5), SIM.repeat(1, 2)[:, :5], TEXT_TO_IMAGE)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        retrieval_recall(torch.eye(4), SIM, TEXT_TO_IMAGE + 1)
    with pytest.raises(ValueError, match="long tensor"):
        retrieval_recall(torch.eye(4), SIM, TEXT_TO_IMAGE.int())


def test_gather_features_without_process_group_is_identity():
    t = torch.randn(3, 4)
    assert gather_features(t) is t


def _gather_worker(rank: int, world: int, init_file: str, out: dict) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        n = 3 if rank == 0 else 2  # uneven, like a last eval batch
        x = (torch.arange(n * 2, dtype=torch.float32).view(n, 2) + 100 * rank).requires_grad_()
        plain = gather_features(x)
        with_grad = gather_features(x, with_grad=True)
        weights = torch.arange(10, dtype=torch.float32).view(5, 2)
        (with_grad * weights).sum().backward()
        out[rank] = (plain.tolist(), with_grad.detach().tolist(), x.grad.tolist(), plain.requires_grad)
    finally:
        torch.distributed.destroy_process_group()


def test_gather_features_two_ranks_uneven_sizes_and_gradient(tmp_path):
    out = mp.Manager().dict()
    # forkserver: a clean server process (no process group inherited from in-process training
    # tests) imports torch once and forks both ranks from it.
    mp.start_processes(_gather_worker, args=(2, str(tmp_path / "store"), out), nprocs=2,
                       start_method="forkserver")
    expected = [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [100.0, 101.0], [102.0, 103.0]]
    weights = [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0], [8.0, 9.0]]
    for rank in (0, 1):
        plain, with_grad, grad, plain_requires_grad = out[rank]
        assert plain == expected and with_grad == expected and not plain_requires_grad
        # Both ranks' losses use every row: each input gets the sum of its rows' weights, twice.
        rows = weights[:3] if rank == 0 else weights[3:]
        assert grad == [[2 * w for w in row] for row in rows]


# ---------------------------------------------------------------- captioning

GT = {
    1: ["a man rides a horse on the beach", "a person riding a brown horse near the ocean"],
    2: ["two dogs play in the green grass", "a pair of dogs playing on a lawn"],
    3: ["a plate with pasta and broccoli", "a white plate of food on a table"],
    4: ["a red bus driving down a city street", "a double decker bus on the road"],
}


def test_caption_scores_identical_beats_wrong():
    exact = caption_scores({k: v[0] for k, v in GT.items()}, GT, use_java=False)
    wrong = caption_scores({1: "a plate of food", 2: "a bus on the road", 3: "a man on a horse",
                            4: "dogs in the grass"}, GT, use_java=False)
    assert exact["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert exact["CIDEr"] > 2.0 > 0.5 > wrong["CIDEr"]
    assert wrong["BLEU-4"] < 0.1
    assert set(exact) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr"}


def test_caption_bleu_matches_hand_computation():
    # Hypothesis tokens 5 + 2 = 7, clipped unigram matches 3 + 2, bigram matches 0 + 1 of 4 + 1;
    # closest reference lengths 6 + 3 = 9 > 7, so the brevity penalty is exp(1 - 9/7).
    preds = {"a": "A cat on a mat.", "b": "Two dogs"}
    gts = {"a": ["the cat sat on the mat"], "b": ["two dogs run"]}
    s = caption_scores(preds, gts, use_java=False)
    bp = math.exp(1 - 9 / 7)
    assert s["BLEU-1"] == pytest.approx(5 / 7 * bp, rel=1e-6)
    assert s["BLEU-2"] == pytest.approx(math.sqrt(5 / 7 * 1 / 5) * bp, rel=1e-6)


def test_caption_scores_rejects_mismatched_images():
    with pytest.raises(ValueError, match="1 images lack a prediction"):
        caption_scores({1: "a"}, {1: ["a"], 2: ["b"]}, use_java=False)
    with pytest.raises(ValueError, match="non-empty list of strings"):
        caption_scores({1: "a"}, {1: "a"}, use_java=False)


def test_load_coco_captions(tmp_path):
    path = tmp_path / "captions_val.json"
    path.write_text(json.dumps({"images": [], "annotations": [
        {"image_id": 5, "id": 1, "caption": "a cat"}, {"image_id": 9, "id": 2, "caption": "a dog"},
        {"image_id": 5, "id": 3, "caption": "a kitten"}]}))
    assert load_coco_captions(path) == {5: ["a cat", "a kitten"], 9: ["a dog"]}
    path.write_text(json.dumps({"annotations": [{"image_id": 5}]}))
    with pytest.raises(ValueError, match=r"captions_val.json: annotations\[0\]"):
        load_coco_captions(path)


def test_simple_tokenize():
    assert simple_tokenize("Someone's dog isn't on the T-shirt (red), 3.5%!") == \
        "someone 's dog is n't on the t-shirt -lrb- red -rrb- 3.5 %"


@pytest.mark.skipif(not HAS_JAVA, reason="needs java for PTBTokenizer")
def test_simple_tokenize_agrees_with_ptb_tokenizer():
    captions = ["A man riding a horse, on the beach.", "Someone's dog isn't here!",
                "Two cats -- sleeping; on a T-shirt?", "The 3.5 inch screen shows 1,000 items",
                'A "quoted" word and \'single\' quotes', "They're going, can't stop, we'll see",
                "A cat (small) sits on a [red] mat", "e-mail & stuff: 50% off", "Don\u2019t do that"]
    ptb = caption_metric._tokenize({i: [c] for i, c in enumerate(captions)}, use_java=True)
    assert [simple_tokenize(c) for c in captions] == [ptb[i][0] for i in range(len(captions))]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_JAVA, reason="needs java for METEOR")
def test_caption_scores_with_java_adds_meteor(caplog):
    preds = {k: v[0] for k, v in GT.items()}
    with caplog.at_level(logging.WARNING, logger="beit3.metrics.captioning"):
        java = caption_scores(preds, GT, use_java=True)
    plain = caption_scores(preds, GT, use_java=False)
    for key in plain:  # PTB and simple_tokenize agree on these captions
        assert java[key] == pytest.approx(plain[key])
    assert 0.9 < java["METEOR"] <= 1.0
    if not all(p.exists() for p in caption_metric.spice_corenlp_jars()):
        assert "SPICE" not in java and "SPICE skipped" in caplog.text


@pytest.mark.skipif(not HAS_JAVA, reason="exercises the Java fallbacks")
def test_caption_scores_survives_broken_java_tools(monkeypatch, caplog):
    import pycocoevalcap.meteor.meteor as meteor_mod
    import pycocoevalcap.tokenizer.ptbtokenizer as ptb_mod

    monkeypatch.setattr(ptb_mod, "STANFORD_CORENLP_3_4_1_JAR", "missing.jar")
    monkeypatch.setattr(meteor_mod.Meteor, "__init__", _broken_meteor_init)
    preds = {k: v[0] for k, v in GT.items()}
    with caplog.at_level(logging.WARNING, logger="beit3.metrics.captioning"):
        scores = caption_scores(preds, GT, use_java=True)
    assert scores == caption_scores(preds, GT, use_java=False)  # simple_tokenize, no METEOR
    assert "using simple_tokenize" in caplog.text and "METEOR skipped" in caplog.text


def _broken_meteor_init(self):
    """Meteor.__init__ pointed at a missing jar: Java exits at once and the scorer reads nothing."""
    import subprocess
    import threading

    self.meteor_p = subprocess.Popen(["java", "-jar", "missing-meteor.jar"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    self.lock = threading.Lock()


# ---------------------------------------------------------------- classification

def test_accuracy_topk_hand_example():
    logits = torch.tensor([[0.1, 0.5, 0.4, 0.0],   # target 1: top-1 hit
                           [0.6, 0.3, 0.1, 0.0],   # target 1: rank 2
                           [0.1, 0.2, 0.3, 0.4],   # target 0: rank 4
                           [0.0, 0.1, 0.7, 0.2]])  # target 3: rank 2
    targets = torch.tensor([1, 1, 0, 3])
    expected = {"top1": 0.25, "top2": 0.75, "top3": 0.75}
    assert accuracy_topk(logits, targets, ks=(1, 2, 3)) == pytest.approx(expected)
    assert accuracy_topk(logits, targets, ks=(5,)) == {"top5": 1.0}  # k past C counts all
    soft = torch.nn.functional.one_hot(targets, 4).float() * 0.9 + 0.025
    assert accuracy_topk(logits, soft, ks=(1,)) == {"top1": 0.25}


def test_classification_report_hand_confusion():
    targets = [0, 0, 0, 1, 1, 2]
    preds = [0, 0, 1, 1, 2, 2]
    r = classification_report(torch.tensor(preds), torch.tensor(targets), ["cat", "dog", "bird", "fish"])
    assert r["confusion_matrix"] == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    cat, dog, bird, fish = (r["per_class"][n] for n in ("cat", "dog", "bird", "fish"))
    assert (cat["precision"], cat["recall"], cat["f1"], cat["support"]) == pytest.approx((1.0, 2 / 3, 0.8, 3))
    assert (dog["precision"], dog["recall"], dog["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    assert (bird["precision"], bird["recall"], bird["f1"]) == pytest.approx((0.5, 1.0, 2 / 3))
    assert fish == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}  # absent class: 0, not NaN
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3 + 0) / 4)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 2\)"):
        confusion_matrix(torch.tensor([0]), torch.tensor([2]), 2)


def _blue_pixels(path) -> int:
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int((rgb[..., 2] - rgb[..., 0] > 80).sum())


def test_confusion_matrix_png(tmp_path):
    names = ["cat", "dog", "a_long_class_name"]
    diag, empty = tmp_path / "out" / "cm.png", tmp_path / "empty.png"
    save_confusion_matrix_png(torch.eye(3, dtype=torch.long) * 7, names, diag, title="ImageNet val")
    save_confusion_matrix_png([[0] * 3] * 3, names, empty)
    img = Image.open(diag)
    assert img.format == "PNG" and img.mode == "RGB"
    assert 300 <= img.width <= 1500 and 300 <= img.height <= 1500
    # Three full-share cells are dark blue (minus the count drawn in them); an empty matrix has only the legend.
    assert _blue_pixels(diag) - _blue_pixels(empty) > 3 * 0.5 * 64 * 64
    assert sorted(p.name for p in diag.parent.iterdir()) == ["cm.png"]
    with pytest.raises(ValueError, match="does not match 2 class names"):
        save_confusion_matrix_png(torch.eye(3), names[:2], empty)


def test_confusion_matrix_png_many_classes_is_a_heat_map(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 500, (5000,), generator=g)
    path = save_confusion_matrix_png(confusion_matrix(t, t, 500), [f"n{i:05d}" for i in range(500)],
                                     tmp_path / "cm.png")
    img = Image.open(path)
    assert 1000 <= img.width <= 2500 and 1000 <= img.height <= 2500


# ---------------------------------------------------------------- report

def test_results_table_and_json(tmp_path, capsys):
    results = {"task": "vqav2", "accuracy": torch.tensor(0.71234), "n": 3,
               "per_class": {"cat": {"f1": 0.5}}, "confusion_matrix": [[1, 0], [0, 1]]}
    table = format_results_table(results, "VQAv2 val")
    lines = table.splitlines()
    assert lines[0] == "VQAv2 val"
    rows = [ln for ln in lines if " | " in ln]
    assert len({ln.index("|") for ln in rows}) == 1 and len({len(ln) for ln in rows}) == 1  # aligned
    assert any(ln.startswith("accuracy ") and ln.endswith("0.7123") for ln in rows)
    assert any(ln.startswith("per_class.cat.f1 ") and ln.endswith("0.5000") for ln in rows)
    assert any(ln.startswith("confusion_matrix ") and ln.endswith("<2 items>") for ln in rows)
    path = write_results_json(results, tmp_path / "run")
    assert path == tmp_path / "run" / "results.json"
    assert json.loads(path.read_text()) == {**results, "accuracy": pytest.approx(0.71234)}
    write_results_json({"accuracy": 0.8}, tmp_path / "run")  # overwrites in place
    assert json.loads(path.read_text()) == {"accuracy": 0.8}
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        write_results_json({"x": object()}, tmp_path / "run")
