"""Shared by the fine-tuning test files: run ``beit3 finetune`` / ``beit3 evaluate`` in-process on
the synthetic world and compute the exact chance levels of its validation split."""
import json
import math
import os

import pytest
import torch

from beit3.data.downstream.datasets import VQADataset, read_jsonl
from beit3.cli.evaluate import main as evaluate_main
from beit3.cli.finetune import main as finetune_main

# Short runs for 2 CPU cores: 32 px images (4 x 4 patches; the pretrained 8 x 8 position table is
# interpolated), micro-batches of 16.
COMMON = ["--img-size", "32", "--batch-size", "16", "--log-every", "5", "--no-tensorboard", "--eval-every", "100"]


def finetune(task, data, init, out, *flags):
    """``beit3 finetune`` from ``init`` (a checkpoint; None: a random tiny model) into ``out``."""
    start = ["--init", str(init)] if init is not None else ["--preset", "tiny"]
    rc = finetune_main(["--task", task, *start, "--data", data.world, "--spm", data.spm,
                        "--output", str(out), *COMMON, *flags])
    assert rc == 0
    return out


def evaluate(task, data, checkpoint, out, *flags):
    """``beit3 evaluate`` on the val split; returns its results.json."""
    rc = evaluate_main(["--task", task, "--checkpoint", str(checkpoint), "--data", data.world, "--spm", data.spm,
                        "--split", "val", "--output", str(out), *flags])
    assert rc == 0
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def val_lines(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [m for m in map(json.loads, f) if any(k.startswith("val/") for k in m)]


def best_is_tracked(run, metric):
    """best/meta.json names ``metric`` and holds the best validation value the run logged."""
    with open(os.path.join(run, "best", "meta.json")) as f:
        meta = json.load(f)
    values = [m[f"val/{metric}"] for m in val_lines(run)]
    assert meta["metric"] == metric and meta["value"] == pytest.approx(max(values))
    return meta


# -- chance levels -----------------------------------------------------------------------------
def vqa_chance(world):
    """(uniform, best constant): the expected VQA score of a uniformly random answer, and of the
    single answer that scores best on the split without looking at image or question."""
    ds = VQADataset(world, "val")
    scores = torch.zeros(len(ds.items), ds.num_answers)
    for i, item in enumerate(ds.items):
        scores[i, item["labels"]] = torch.tensor(item["scores"])
    return scores.sum(1).mean().item() / ds.num_answers, scores.mean(0).max().item()


def retrieval_chance(world, ks=(1, 5, 10)):
    """Expected recall@k of a random ranking: text->image k / images; image->text the chance that
    one of the image's n captions is among k of T captions drawn at random, 1 - C(T-n, k) / C(T, k)."""
    items = read_jsonl(os.path.join(world, "coco_retrieval.val.jsonl"))
    per_image = torch.bincount(torch.tensor([it["image_id"] for it in items])).tolist()
    T = len(items)
    out = {}
    for k in ks:
        out[f"t2i_r{k}"] = min(k, len(per_image)) / len(per_image)
        out[f"i2t_r{k}"] = sum(1 - math.comb(T - n, k) / math.comb(T, k) for n in per_image) / len(per_image)
    out["mean_recall"] = sum(out.values()) / len(out)
    return out
