"""Faults: kill -9 anywhere, SIGTERM, non-finite steps, a full disk, a dead peer.

Each test prints the counts it verified; scripts/chaos.sh loops the kill test for longer.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from pretrain_fixtures import IndexedBatches, run_args
from pretrain_worker import in_this_process

from beit3.cli.pretrain import check_args, run_with_errors
from beit3.trainer import checkpoint as ckpt_mod
from beit3.trainer.checkpoint import MARKER, complete_checkpoints
from beit3.jobs.pretrain.loop import PretrainRun

HERE = os.path.dirname(__file__)
WORKER = os.path.join(HERE, "pretrain_worker.py")
SKIP = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"}


def _env(**kw):
    env = {k: v for k, v in os.environ.items() if k not in SKIP}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **kw)
    return env


def _start(out, assets, steps, *extra, env=None, log=None):
    spm, tok = assets
    log = open(log or os.path.join(str(out) + ".log"), "ab")
    return subprocess.Popen([sys.executable, WORKER, str(out), spm, tok, "1", str(steps), *extra],
                            env=env or _env(), stdout=log, stderr=subprocess.STDOUT)


def _lines(out):
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _weights(out):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    step, path = complete_checkpoints(os.path.join(out, "checkpoints"))[-1]
    return step, get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(path), tag=os.path.basename(path))


def _partial_checkpoint(out):
    d = os.path.join(out, "checkpoints")
    if not os.path.isdir(d):
        return None
    for name in os.listdir(d):
        p = os.path.join(d, name)
        if name.startswith("step_") and os.path.isdir(p) and not os.path.exists(os.path.join(p, MARKER)):
            if os.listdir(p):  # DeepSpeed has started writing into it
                return p
    return None


def chaos(out, assets, steps, kills, seed=0, log=print):
    """Kill -9 a resuming run ``kills`` times (the first while a checkpoint is being written, the
    rest at random moments), then let it finish. Returns counts."""
    rng = random.Random(seed)
    counts = {"kills": 0, "kills_during_save": 0, "checkpoints_verified": 0}
    for attempt in range(kills + 3):
        if counts["kills"] >= kills:
            break
        before = complete_checkpoints(os.path.join(out, "checkpoints"))
        proc = _start(out, assets, steps, "--save-every", "1", "--resume", "auto")
        during_save = counts["kills_during_save"] == 0
        done_lines = len(_lines(out))
        target = rng.uniform(0.0, 1.5)
        t0, seen_progress = time.time(), None
        while proc.poll() is None and time.time() - t0 < 240:
            if during_save:
                partial = _partial_checkpoint(out)
                if partial is not None:
                    proc.send_signal(signal.SIGKILL)
                    counts["kills_during_save"] += 1
                    break
                time.sleep(0.002)
            else:
                if seen_progress is None and len(_lines(out)) > done_lines:
                    seen_progress = time.time()
                if seen_progress is not None and time.time() - seen_progress > target:
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.01)
        rc = proc.wait()
        if rc == -signal.SIGKILL:
            counts["kills"] += 1
        elif rc == 0:
            break  # it finished before the kill landed
        else:
            raise AssertionError(f"run failed with exit code {rc}; see {out}.log")
        # Whatever the moment of the kill, the newest complete checkpoint is loadable.
        after = complete_checkpoints(os.path.join(out, "checkpoints"))
        if before:
            assert after and after[-1][0] >= before[-1][0]
        if after:
            step, _ = _weights(out)
            assert step == after[-1][0]
            counts["checkpoints_verified"] += 1
    rc = _start(out, assets, steps, "--save-every", "1", "--resume", "auto").wait(timeout=600)
    assert rc == 0
    return counts


@pytest.mark.slow
def test_kill9_at_any_moment_then_resume_matches_uninterrupted(assets, tmp_path):
    steps = 6
    ref = tmp_path / "ref"
    assert in_this_process(str(ref), *assets, 1, steps, ["--save-every", "1"]) == 0  # the reference needs no kills
    counts = chaos(str(tmp_path / "chaos"), assets, steps, kills=3)
    print(f"chaos: {counts}")
    assert counts["kills"] >= 2 and counts["kills_during_save"] >= 1
    with open(str(tmp_path / "chaos") + ".log") as f:
        log = f.read()
    assert log.count("resumed from") >= counts["checkpoints_verified"]
    (sa, wa), (sb, wb) = _weights(str(ref)), _weights(str(tmp_path / "chaos"))
    assert sa == sb == steps
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=1e-5)


def test_sigterm_writes_a_checkpoint_before_exit(assets, tmp_path):
    out = str(tmp_path / "run")
    proc = _start(out, assets, 500, "--save-every", "1000")
    t0 = time.time()
    while len(_lines(out)) < 2 and proc.poll() is None and time.time() - t0 < 240:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    found = complete_checkpoints(os.path.join(out, "checkpoints"))
    assert len(found) == 1 and found[0][0] >= 2 and found[0][0] < 500
    with open(out + ".log") as f:
        assert f"stopped by signal at step {found[0][0]}" in f.read()


class PoisonedBatches(IndexedBatches):
    """NaN images in the micro-batches whose global index is in ``poison``."""

    def __init__(self, *a, poison=(), **kw):
        super().__init__(*a, **kw)
        self.poison = set(poison)

    def batch(self, index):
        b = super().batch(index)
        if index in self.poison:
            b["images"]["image"] = torch.full_like(b["images"]["image"], float("nan"))
        return b


def _run_poisoned(out, assets, poison, **kw):
    spm, tok = assets
    args = run_args(str(out), spm, tok, steps=6, batch_images=2, batch_texts=2, batch_pairs=2, log_every=1,
                    save_every=2, drop_path=0.0, **kw)
    run = PretrainRun(args, check_args(args, 1), "cpu",
                      data=PoisonedBatches(spm, 0, 1, 1, sizes=(2, 2, 2), poison=poison))
    return run_with_errors(run, args)


def test_non_finite_loss_skips_the_step(assets, tmp_path):
    assert _run_poisoned(tmp_path / "one", assets, poison={2}) == 0
    lines = _lines(str(tmp_path / "one"))
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    assert lines[-1]["skipped_steps"] == 1 and lines[1]["skipped_steps"] == 0
    assert all(m["loss"] == m["loss"] for m in lines)  # no NaN was ever applied


def test_non_finite_steps_in_a_row_stop_the_run_with_last_checkpoint_intact(assets, tmp_path, capsys):
    out = str(tmp_path / "many")
    rc = _run_poisoned(out, assets, poison=set(range(3, 100)), max_bad_steps=3)
    assert rc == 1
    err = capsys.readouterr().err
    assert "3 non-finite steps in a row" in err and "step_00000002" in err
    step, weights = _weights(out)
    assert step == 2 and all(torch.isfinite(v).all() for v in weights.values())


def test_disk_full_while_saving_keeps_previous_checkpoint(assets, tmp_path, monkeypatch, capsys):
    real, calls = ckpt_mod.atomic_torch_save, []

    def full_disk(obj, path):
        calls.append(path)
        if len(calls) >= 2:
            raise OSError(28, "No space left on device")
        return real(obj, path)

    monkeypatch.setattr(ckpt_mod, "atomic_torch_save", full_disk)
    out = str(tmp_path / "full")
    assert _run_poisoned(out, assets, poison=()) == 1
    err = capsys.readouterr().err
    assert "could not write checkpoint" in err and "No space left on device" in err
    assert "step_00000002" in err  # the kept checkpoint is named
    found = complete_checkpoints(os.path.join(out, "checkpoints"))
    assert [s for s, _ in found] == [2]
    assert not os.path.exists(os.path.join(out, "checkpoints", "step_00000004"))
    step, weights = _weights(out)
    assert step == 2 and len(weights) > 10


@pytest.mark.slow
def test_a_dead_peer_does_not_hang_the_other_rank(assets, tmp_path):
    out = str(tmp_path / "pair")
    port = str(29000 + random.Random(os.getpid()).randint(0, 900))
    procs = []
    for rank in range(2):
        env = _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        procs.append(_start(out, assets, 500, "--save-every", "1000", "--dist-timeout", "20", env=env,
                            log=f"{out}.rank{rank}.log"))
    t0 = time.time()
    while len(_lines(out)) < 2 and time.time() - t0 < 240 and procs[0].poll() is None:
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    t_kill = time.time()
    rc = procs[0].wait(timeout=120)
    waited = time.time() - t_kill
    assert rc != 0 and waited < 90
    with open(f"{out}.rank0.log") as f:
        assert "peer process died or a collective timed out" in f.read()


def test_bad_shards_are_skipped_counted_and_the_run_goes_on(assets, tmp_path, capsys):
    from bad_shards import BAD_PER_EPOCH, write_bad_shards

    from beit3.cli.pretrain import main as pretrain_main
    spm, tok = assets
    shards = write_bad_shards(tmp_path / "shards")
    out = str(tmp_path / "run")
    rc = pretrain_main(["--preset", "tiny", "--data", str(shards), "--spm", spm, "--tokenizer", tok,
                        "--steps", "6", "--batch-images", "3", "--batch-texts", "2", "--batch-pairs", "2",
                        "--log-every", "1", "--save-every", "6", "--output", out, "--no-tensorboard",
                        # one of the three image shards is truncated: given up on each epoch
                        "--max-bad-shard-fraction", "0.5"])
    assert rc == 0
    lines = _lines(out)
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    # 6 steps x 3 images = 2 epochs of the 9 usable images: every bad sample met at least once.
    tried = lines[-1]["skipped_samples"]
    assert tried >= sum(BAD_PER_EPOCH.values())
    print(f"bad samples skipped and counted: {tried}")
