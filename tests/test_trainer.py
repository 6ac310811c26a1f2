"""The Trainer every job shares: one non-finite policy, means over micro-batches and ranks, the run
folder released on failure. Fine-tuning is driven here; pretraining's side is tests/test_faults.py."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from beit3.jobs.finetune import tasks
from beit3.cli.finetune import main as finetune_main
from beit3.trainer.run_dir import RunDirError, check_run_folder, move_aside
from beit3.trainer.trainer import NonFiniteLossError, NonFiniteSteps, Trainer

from finetune_helpers import COMMON


def test_policy_counts_skips_and_stops_after_the_limit(tmp_path):
    lines = []
    policy = NonFiniteSteps(3, str(tmp_path), lines.append)
    policy.skipped(4)
    policy.finite()
    policy.skipped(6, "gradient")
    policy.skipped(7)
    with pytest.raises(NonFiniteLossError, match="3 non-finite steps in a row .*--max-bad-steps 3.*None"):
        policy.skipped(8)
    assert policy.total == 4 and lines[1] == "step 6: non-finite gradient; step skipped (1 in a row)"
    with pytest.raises(ValueError, match="max-bad-steps must be >= 1"):
        NonFiniteSteps(0, str(tmp_path), print)


def test_means_skip_missing_keys_per_micro_batch():
    t = Trainer()
    t.dist = type("D", (), {"world_size": 1, "device": torch.device("cpu")})()
    logs = [{"loss": torch.tensor(2.0), "acc": torch.tensor(0.5)}, {"loss": torch.tensor(4.0)}, {"loss": 3.0}]
    assert t.mean_over_ranks(logs) == {"acc": 0.5, "loss": 3.0}
    assert t.mean_over_ranks([]) == {}


def test_which_folders_a_new_run_may_start_in(tmp_path):
    """Empty: anything. Run files of a run stopped before its first checkpoint: --resume auto starts
    fresh there. Weights without a checkpoint (checkpoints removed): refused without --overwrite."""
    out = str(tmp_path)
    assert check_run_folder(out, None, False) == [] == check_run_folder(out, "auto", False)
    (tmp_path / "run_config.json").write_text("{}")
    assert check_run_folder(out, "auto", False) == ["run_config.json"]
    with pytest.raises(RunDirError, match=re.escape(f"{out} holds a run (run_config.json); continue it with")):
        check_run_folder(out, None, False)
    os.makedirs(tmp_path / "best.old")  # a kill between best/'s two renames: best/ is still held
    with pytest.raises(RunDirError, match=re.escape(f"--resume auto: {out} holds best/ but no complete checkpoint")):
        check_run_folder(out, "auto", False)
    assert check_run_folder(out, None, True) == ["best/", "run_config.json"]
    with pytest.raises(RunDirError, match="--overwrite replaces .* and --resume auto continues it: give one"):
        check_run_folder(out, "auto", True)
    (tmp_path / "replaced-1").mkdir()
    moved = move_aside(out)
    assert sorted(os.listdir(tmp_path)) == ["replaced-1", os.path.basename(moved)]
    assert sorted(os.listdir(moved)) == ["best.old", "run_config.json"] and check_run_folder(out, None, False) == []


def _poison(monkeypatch, calls: set[int]):
    """The classification loss of the micro-batches numbered in ``calls`` (1-based) becomes NaN."""
    real, seen = tasks.ClassificationTask.train_step, [0]

    def train_step(self, model, batch, step):
        loss, logs = real(self, model, batch, step)
        seen[0] += 1
        return (loss * float("nan") if seen[0] in calls else loss), logs
    monkeypatch.setattr(tasks.ClassificationTask, "train_step", train_step)


def _finetune(data, out, *flags):
    return finetune_main(["--task", "classification", "--preset", "tiny", "--data", data.world, "--spm", data.spm,
                          "--output", str(out), *COMMON, "--log-every", "1", "--img-size", "40", *flags])


def test_finetuning_skips_a_non_finite_step_as_pretraining_does(data, tmp_path, monkeypatch):
    _poison(monkeypatch, {2})
    assert _finetune(data, tmp_path / "run", "--max-steps", "4") == 0
    logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    train = [m for m in logged if "loss" in m]
    assert [m["step"] for m in train] == [1, 2, 3, 4]  # the skipped micro-batch formed no step
    assert [m["skipped_steps"] for m in train] == [0, 1, 1, 1]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in train)


def test_finetuning_stops_after_max_bad_steps_naming_the_checkpoint(data, tmp_path, monkeypatch, capsys):
    _poison(monkeypatch, set(range(3, 100)))
    rc = _finetune(data, tmp_path / "run", "--max-steps", "8", "--save-every", "1", "--max-bad-steps", "2")
    assert rc == 1
    err = capsys.readouterr().err
    assert "2 non-finite steps in a row (limit --max-bad-steps 2)" in err and "step_00000002" in err
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "step_00000003")
    assert _finetune(data, tmp_path / "other", "--max-bad-steps", "0") == 2


_AT_EXIT = """
import atexit, os, sys
import torch.distributed as dist
atexit.register(lambda: print("group at exit:", dist.is_initialized()))  # runs after the module's handler
os.environ.update(MASTER_PORT=sys.argv[1], RANK=sys.argv[3], WORLD_SIZE="2")
from beit3.trainer.distributed import DistInfo, finish_distributed, init_distributed
info = init_distributed(60.0, "cpu")
finish_distributed(info if sys.argv[2] == "clean" else DistInfo.single("cpu"))
"""


def test_the_group_ends_at_exit_only_after_a_clean_finish():
    # Left to interpreter finalization, a gloo group could abort a process whose job had succeeded.
    # Without a clean finish (a failure: destroying could wait on a failing peer; or only a job that
    # one rank ran alone inside the group finished) it is left alone. Two 2-rank worlds at once.
    from beit3.trainer.distributed import free_port
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    worlds = {finish: [str(free_port())] for finish in ("clean", "single")}
    ranks = {(finish, r): subprocess.Popen([sys.executable, "-c", _AT_EXIT, port, finish, str(r)],
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for finish, [port] in worlds.items() for r in range(2)}
    ended = {}
    for (finish, r), proc in ranks.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        ended[finish, r] = out.strip().splitlines()[-1] == "group at exit: False"
    assert ended == {("clean", 0): True, ("clean", 1): True, ("single", 0): False, ("single", 1): False}
