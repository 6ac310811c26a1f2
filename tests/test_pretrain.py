"""Pretraining through DeepSpeed ZeRO-3 on CPU (gloo): resume, data parallelism, consolidation."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from pretrain_fixtures import IndexedBatches, exported_backbone, run_args
from pretrain_worker import in_this_process

from beit3 import BEiT3, from_pretrained
from beit3.cli.pretrain import check_args, main as pretrain_main
from beit3.trainer.checkpoint import complete_checkpoints
from beit3.jobs.pretrain.loop import PretrainRun

HERE = os.path.dirname(__file__)


def _run(out, assets, **kw):
    spm, tok = assets
    kw = {"batch_images": 3, "batch_texts": 3, "batch_pairs": 3, "log_every": 1, **kw}
    args = run_args(str(out), spm, tok, **kw)
    run = PretrainRun(args, check_args(args, 1), "cpu", data=IndexedBatches(spm, 0, 1, 1, sizes=(3, 3, 3)))
    assert run.train() == 0
    return run


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _consolidated(out):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    step, path = complete_checkpoints(os.path.join(out, "checkpoints"))[-1]
    return step, get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(path), tag=os.path.basename(path))


def test_stop_and_resume_equals_uninterrupted_run(assets, tmp_path):
    common = dict(steps=6, save_every=3, drop_path=0.1)
    full = _run(tmp_path / "full", assets, **common)
    _run(tmp_path / "split", assets, stop_after_steps=3, **common)
    assert [s for s, _ in complete_checkpoints(str(tmp_path / "split" / "checkpoints"))] == [3]
    _run(tmp_path / "split", assets, resume="auto", **common)

    a, b = _metrics(tmp_path / "full"), _metrics(tmp_path / "split")
    assert [m["step"] for m in a] == [1, 2, 3, 4, 5, 6] == [m["step"] for m in b]
    for x, y in zip(a, b):
        for k in ("loss", "loss/image", "loss/text", "loss/pair", "lr"):
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), (x["step"], k)
    sa, wa = _consolidated(str(tmp_path / "full"))
    sb, wb = _consolidated(str(tmp_path / "split"))
    assert sa == sb == 6 and wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)

    # ZeRO-3 checkpoint -> consolidated fp32 weights -> a plain BEiT3 with the engine's outputs.
    cfg = full.cfg
    plain = BEiT3(cfg).eval()
    plain.load_state_dict({k[len("model."):]: v for k, v in wa.items() if k.startswith("model.")})
    batch = IndexedBatches(assets[0], 0, 1, 1, sizes=(2, 2, 2)).batch(99)["pairs"]
    inputs = dict(image=batch["image"], text=batch["text"], text_padding_mask=batch["padding_mask"])
    engine_model = full.engine.module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs), engine_model(**inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_accumulation(assets, tmp_path):
    spm, tok = assets
    # Not the rendezvous variables of this process's own (in-process) runs.
    skip = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"}
    env = {k: v for k, v in os.environ.items() if k not in skip}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    worker = os.path.join(HERE, "pretrain_worker.py")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--standalone", worker, str(tmp_path / "two"), spm, tok, "1", "3"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert in_this_process(str(tmp_path / "one"), spm, tok, 2, 3) == 0  # one rank needs no launcher
    a, b = _metrics(tmp_path / "two"), _metrics(tmp_path / "one")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for k in ("loss", "loss/image", "loss/text", "loss/pair", "grad_norm"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-5), (x["step"], k, x[k], y[k])
    assert a[-1]["loss"] != a[0]["loss"]  # the model moved
    # Their final/: both ranks' ZeRO-3 partitions of the fp32 masters gathered (the export of the
    # 2-rank checkpoint, to the bit), and the 1-rank run's weights within the losses' tolerance.
    two_final, one_final = (from_pretrained(str(tmp_path / r / "final")).state_dict() for r in ("two", "one"))
    [(_, checkpoint)] = complete_checkpoints(str(tmp_path / "two" / "checkpoints"))
    exported = exported_backbone(checkpoint, tmp_path)
    assert two_final.keys() == exported.keys() == one_final.keys()
    for k, v in two_final.items():
        assert v.dtype == torch.float32 and torch.equal(v, exported[k]), k
        torch.testing.assert_close(v, one_final[k], rtol=1e-4, atol=1e-5)


def test_bad_config_fails_before_building(tmp_path, capsys):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 5, "zero_optimization": {"stage": 3}}))
    rc = pretrain_main(["--preset", "tiny", "--deepspeed", str(bad), "--batch-images", "2",
                        "--batch-texts", "2", "--batch-pairs", "2", "--output", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "train_micro_batch_size_per_gpu=5" in err and "6 samples" in err
    assert not (tmp_path / "o").exists()
    rc = pretrain_main(["--preset", "tiny", "--data", str(tmp_path / "missing"), "--output", str(tmp_path / "o")])
    assert rc == 2 and "no such directory" in capsys.readouterr().err


def test_pretraining_losses_fall_on_the_synthetic_world(pretrained_tiny, small_world):
    lines = _metrics(pretrained_tiny)
    assert [m["step"] for m in lines] == list(range(5, 61, 5))
    def mean(ms, key):
        return sum(m[key] for m in ms) / len(ms)

    first, last = lines[:2], lines[-2:]  # steps 1-10 and 51-60
    # Measured: image 5.46 -> 5.07 (log 256 = 5.55), text 4.8 -> 3.5, pair 5.1 -> 3.1.
    assert mean(last, "loss/image") < 0.96 * mean(first, "loss/image")
    for part in ("text", "pair"):
        assert mean(last, f"loss/{part}") < 0.8 * mean(first, f"loss/{part}"), part
    from beit3.data.text_tokenizer import TextTokenizer
    vocab = TextTokenizer(small_world.spm).vocab_size
    codes = 256  # the tiny VQ-KD codebook
    assert mean(last, "acc/image") > 5 / codes  # chance 1 / 256
    assert mean(last, "acc/text") > 10 / vocab and mean(last, "acc/pair") > 10 / vocab  # chance 1 / ~400
    assert complete_checkpoints(os.path.join(pretrained_tiny, "checkpoints"))[-1][0] == 60


def test_pretraining_lr_is_the_warmup_cosine_schedule(pretrained_tiny):
    """The lr the engine reports after each logged step (the one the next step uses): tiny's peak
    2e-3, 6 warmup steps climbing (k + 1) / 6, cosine over the remaining 54 to 1% of the peak."""
    with open(os.path.join(pretrained_tiny, "run_config.json")) as f:
        optim = json.load(f)["args"]["optim"]
    assert (optim["lr"], optim["warmup_steps"], optim["steps"], optim["min_lr_ratio"]) == (2e-3, 6, 60, 0.01)

    def lr(k):
        if k < 6:
            return 2e-3 * (k + 1) / 6
        return 2e-5 + (2e-3 - 2e-5) * 0.5 * (1 + math.cos(math.pi * (k - 6) / 54))
    lines = _metrics(pretrained_tiny)
    assert [m["step"] for m in lines] == list(range(5, 61, 5))
    for m in lines:
        assert m["lr"] == pytest.approx(lr(m["step"]), rel=1e-9), m["step"]
    assert lines[0]["lr"] == pytest.approx(2e-3, rel=1e-9)  # the peak, at the end of the warmup
    assert lines[-1]["lr"] == pytest.approx(2e-5, rel=1e-9)  # the floor, at the last step


def test_activation_checkpointing_under_zero3_and_patch_aggregation(assets, tmp_path):
    """Checkpointing every layer inside the ZeRO-3 engine recomputes the same routing: the same
    losses as without; BEiT v2's patch aggregation adds its CLS loss through the shared MIM head."""
    runs = {}
    for every in (0, 1):
        out = tmp_path / f"ckpt{every}"
        _run(out, assets, steps=3, save_every=3, drop_path=0.0, checkpoint_every=every, patch_aggregation=True)
        runs[every] = _metrics(out)
    for a, b in zip(runs[0], runs[1]):
        for k in ("loss", "loss/image", "loss/image_cls", "loss/text", "loss/pair"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k)
    # beit2 adds the CLS loss to the image part's loss, which counts as one part of the mean.
    for m in runs[0] + runs[1]:
        image = m["loss/image"] + m["loss/image_cls"]
        parts = [image, m["loss/text"], m["loss/pair"]] + [m[k] for k in ("loss/pair_image",) if k in m]
        assert m["loss"] == pytest.approx(sum(parts) / len(parts), rel=1e-5), m["step"]
