"""Fine-tuning and evaluation on 2 ranks (gloo, ZeRO-3 on the CPU) against 1 rank.

Two ranks x micro-batch b must train exactly as one rank x 2b (retrieval: the contrastive loss over
features gathered with their gradients is the same loss) or one rank x b with 2 accumulation steps
(VQA), and ``beit3 evaluate`` on 2 ranks must score every sample once. The validation splits are cut
to odd sizes so that the second rank's eval shard wraps around. Both ranks start once (tests/
finetune_worker.py) and run all their jobs; the 1-rank references run in this process.
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from finetune_worker import fixed_augment

from beit3.data.downstream.datasets import read_jsonl
from beit3.cli.evaluate import main as evaluate_main
from beit3.cli.finetune import main as finetune_main
from beit3.jobs.finetune.batches import epoch_batches

HERE = os.path.dirname(__file__)
# 3 steps of 32 px images; eval batches of 8 leave a short last batch on every shard.
COMMON = ["--preset", "tiny", "--img-size", "32", "--max-steps", "3", "--log-every", "1", "--eval-batch-size", "8",
          "--no-tensorboard", "--dist-timeout", "120"]
RANK_ENV = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"}


def odd_val_root(world: str, root: str) -> str:
    """The data root ``world`` with its retrieval and VQA val splits cut to odd sizes: 23 images
    with 115 captions (the last image dropped) and 95 questions. Everything else is linked."""
    os.makedirs(root)
    cut = {"coco_retrieval.val.jsonl": lambda items: [it for it in items if it["image_id"] != items[-1]["image_id"]],
           "vqa.rest_val.jsonl": lambda items: items[:-1]}
    for name in os.listdir(world):
        if name in cut:
            with open(os.path.join(root, name), "w") as f:
                f.writelines(json.dumps(it) + "\n" for it in cut[name](read_jsonl(os.path.join(world, name))))
        else:
            os.symlink(os.path.join(world, name), os.path.join(root, name))
    return root


def launch(jobs: list[dict], out: str, world: int = 2, timeout: float = 300) -> None:
    """Run ``jobs`` on ``world`` rank processes of tests/finetune_worker.py; fail with their logs."""
    path = os.path.join(out, "jobs.json")
    with open(path, "w") as f:
        json.dump(jobs, f)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Not the rendezvous variables of this process's own (in-process) runs.
    env = {k: v for k, v in os.environ.items() if k not in RANK_ENV}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               WORLD_SIZE=str(world))
    logs = [os.path.join(out, f"rank{r}.log") for r in range(world)]
    procs = []
    for r in range(world):
        with open(logs[r], "w") as log:  # files, not pipes: a full pipe would block its rank
            procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "finetune_worker.py"), path],
                                          env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                          stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.returncode not in (None, 0) for p in procs):
            break  # a rank failed: the others would wait for it until the collective timeout
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    if any(p.returncode != 0 for p in procs):
        tails = "\n".join(f"--- rank {r} (exit {p.returncode}):\n{open(logs[r]).read()[-3000:]}"
                          for r, p in enumerate(procs))
        pytest.fail(f"{world}-rank run failed:\n{tails}")


def finetune_args(task: str, data_root: str, spm: str, out: str, *flags: str) -> list[str]:
    return ["--task", task, "--data", data_root, "--spm", spm, "--output", out, *COMMON, *flags]


def evaluate_args(task: str, data_root: str, spm: str, checkpoint: str, out: str, *flags: str) -> list[str]:
    return ["--task", task, "--checkpoint", checkpoint, "--data", data_root, "--spm", spm, "--split", "val",
            "--output", out, "--eval-batch-size", "8", *flags]


@pytest.fixture(scope="module")
def two_ranks(data, tmp_path_factory):
    """The 2-rank runs: retrieval and VQA fine-tuning (micro-batch 8 per rank), then ``beit3
    evaluate`` of each result. Returns (data root with odd val splits, output directory)."""
    base = tmp_path_factory.mktemp("finetune_2ranks")
    root, out = odd_val_root(data.world, str(base / "data")), str(base / "two")
    os.makedirs(out)
    annotations = os.path.join(data.world, "raw", "vqa", "v2_mscoco_val_annotations.json")
    jobs = [
        {"command": "finetune", "fixed_augment": True,
         "argv": finetune_args("retrieval", root, data.spm, f"{out}/retrieval", "--batch-size", "8")},
        {"command": "finetune", "fixed_augment": True,
         "argv": finetune_args("vqa", root, data.spm, f"{out}/vqa", "--batch-size", "8")},
        {"command": "evaluate", "argv": evaluate_args("retrieval", root, data.spm, f"{out}/retrieval",
                                                      f"{out}/eval-retrieval")},
        {"command": "evaluate", "argv": evaluate_args("vqa", root, data.spm, f"{out}/vqa", f"{out}/eval-vqa",
                                                      "--vqa-annotations", annotations)},
    ]
    launch(jobs, out)
    return root, out


def metrics(run: str) -> tuple[list[dict], list[dict]]:
    """(training lines, validation lines) of a run's metrics.jsonl."""
    with open(os.path.join(run, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    val = [m for m in lines if any(k.startswith("val/") for k in m)]
    return [m for m in lines if "loss" in m], val


def assert_same_training(two: str, one: str, keys: tuple[str, ...]) -> list[dict]:
    (train2, val2), (train1, val1) = metrics(two), metrics(one)
    assert [m["step"] for m in train2] == [m["step"] for m in train1] == [1, 2, 3]
    for a, b in zip(train2, train1):
        for k in keys:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (a["step"], k, a[k], b[k])
    assert len(val2) == len(val1) == 1
    for k, v in val1[0].items():
        if k.startswith("val/"):
            assert val2[0][k] == pytest.approx(v, rel=1e-6), k
    assert len({m["loss"] for m in train2}) == 3  # the model moved
    return val2


def test_epoch_batches_are_global_batches_cut_by_rank():
    """Rank r's micro-batch i is the r-th slice of the global batch i: the same samples per step
    on 2 ranks x 4 as on 1 rank x 8, and as 1 rank x 4 with 2 accumulation steps."""
    two = [epoch_batches(50, 4, r, 2, seed=3, epoch=1) for r in (0, 1)]
    one = epoch_batches(50, 8, 0, 1, seed=3, epoch=1)
    accum = epoch_batches(50, 4, 0, 1, seed=3, epoch=1)
    assert len(one) == len(two[0]) == len(two[1]) == 6  # 50 // 8; the last 2 samples wait for the next epoch
    for i in range(6):
        assert two[0][i] + two[1][i] == one[i] == accum[2 * i] + accum[2 * i + 1]


@pytest.mark.slow
def test_retrieval_two_ranks_equal_one_rank_with_the_double_batch(two_ranks, data, tmp_path):
    root, out = two_ranks
    with fixed_augment():
        rc = finetune_main(finetune_args("retrieval", root, data.spm, str(tmp_path / "one"), "--batch-size", "16"))
    assert rc == 0
    val = assert_same_training(f"{out}/retrieval", str(tmp_path / "one"),
                               ("loss", "train/acc", "train/logit_scale", "grad_norm", "lr"))
    assert val[0]["val/images"] == 23 and val[0]["val/texts"] == 115


@pytest.mark.slow
def test_vqa_two_ranks_equal_one_rank_with_accumulation(two_ranks, data, tmp_path):
    root, out = two_ranks
    with fixed_augment():
        rc = finetune_main(finetune_args("vqa", root, data.spm, str(tmp_path / "one"), "--batch-size", "8",
                                         "--grad-accum", "2"))
    assert rc == 0
    val = assert_same_training(f"{out}/vqa", str(tmp_path / "one"), ("loss", "train/vqa_score", "grad_norm", "lr"))
    assert val[0]["val/questions"] == 95


def evaluate_one_rank(task: str, two_ranks, data, out, *flags) -> tuple[dict, dict]:
    """results.json of ``beit3 evaluate`` on 1 rank (here) and on the 2 ranks, same checkpoint."""
    root, two = two_ranks
    rc = evaluate_main(evaluate_args(task, root, data.spm, f"{two}/{task}", str(out), *flags))
    assert rc == 0
    results = []
    for d in (str(out), f"{two}/eval-{task}"):
        with open(os.path.join(d, "results.json")) as f:
            results.append(json.load(f))
    return results[0], results[1]


@pytest.mark.slow
def test_evaluate_retrieval_two_ranks_gather_every_feature_once(two_ranks, data, tmp_path):
    one, two = evaluate_one_rank("retrieval", two_ranks, data, tmp_path / "one")
    assert one["images"] == two["images"] == 23 and one["texts"] == two["texts"] == 115
    keys = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)] + ["mean_recall"]
    for k in keys:
        assert two[k] == pytest.approx(one[k], abs=1e-12), k
    # A model trained 3 steps is far from perfect: the recalls are not all 0 or 1 either way.
    assert 0 < one["i2t_r10"] < 1 and 0 < one["t2i_r10"] < 1


@pytest.mark.slow
def test_evaluate_vqa_two_ranks_predict_every_question_once(two_ranks, data, tmp_path):
    root, two_dir = two_ranks
    annotations = os.path.join(data.world, "raw", "vqa", "v2_mscoco_val_annotations.json")
    one, two = evaluate_one_rank("vqa", two_ranks, data, tmp_path / "one", "--vqa-annotations", annotations)
    assert one["questions"] == two["questions"] == 95
    for k in ("vqa_score", "vqa_accuracy"):
        assert two[k] == pytest.approx(one[k], abs=1e-12), k
    with open(one["submission"]) as f1, open(two["submission"]) as f2:
        sub1, sub2 = json.load(f1), json.load(f2)
    qids = [it["qid"] for it in read_jsonl(os.path.join(root, "vqa.rest_val.jsonl"))]
    assert [s["question_id"] for s in sub2] == qids  # in order, none twice, none missing
    assert sub2 == sub1
