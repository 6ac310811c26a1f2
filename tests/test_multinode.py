"""Multi-node launches simulated on one machine (each "node" a launcher process of its own), resumes
on another number of ranks, a node lost mid-run, and DeepSpeed's own tools on our checkpoints.

Every job is the tiny preset on the small synthetic world, 2 + 2 + 2 samples per micro-batch, no
drop path (its masks come from each process's RNG, which differs by rank), a 6-step schedule
checkpointed at step 3, two micro-batches per optimizer step in all (2 ranks x 1 or 1 rank x 2
accumulated). The reference is one node with 2 ranks; every other way of running the same job must
give its losses. Launches and the reference match exactly here (same reductions); a change of
world size regroups the gradient sums, so the comparison allows 1e-4 relative.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from beit3.trainer.checkpoint import complete_checkpoints
from beit3.trainer.distributed import free_port
from beit3.trainer.universal import ensure_universal

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSSES = ("loss", "loss/image", "loss/text", "loss/pair")
TIMEOUT = 300  # per job: a hung rendezvous fails the test instead of CI


def _env(**extra) -> dict:
    # Not the rendezvous variables of an outer launcher; one thread per rank on two shared cores.
    skip = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"}
    env = {k: v for k, v in os.environ.items() if k not in skip and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    return {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **extra}


def _flags(world, out, *extra) -> list[str]:
    return ["--preset", "tiny", "--data", world.shards, "--spm", world.spm, "--tokenizer", world.tokenizer,
            "--steps", "6", "--save-every", "3", "--batch-images", "2", "--batch-texts", "2", "--batch-pairs", "2",
            "--log-every", "1", "--drop-path", "0", "--warmup-steps", "1", "--no-tensorboard",
            "--dist-timeout", "60", "--micro-batches-per-step", "2", "--output", str(out), *extra]


def _start(cmd: list[str], log, env: dict) -> subprocess.Popen:
    # A session of its own: the whole "node" (launcher and ranks) can be stopped at once.
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)


def _stop(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _run_nodes(tmp_path, name: str, cmds: list[list[str]], envs: list[dict], timeout: float = TIMEOUT) -> None:
    """Start every node's command together and wait for all; fail with their logs otherwise."""
    logs = [open(tmp_path / f"{name}-{i}.log", "w") for i in range(len(cmds))]
    procs = [_start(cmd, log, env) for cmd, log, env in zip(cmds, logs, envs)]
    deadline = time.monotonic() + timeout
    try:
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:
            _stop(p)
        for log in logs:
            log.close()
    text = "\n".join(f"--- {name} node {i}:\n" + (tmp_path / f"{name}-{i}.log").read_text()[-3000:]
                     for i in range(len(cmds)))
    assert codes == [0] * len(cmds), text


def _metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _assert_losses(out, reference: dict, steps, rel: float = 1e-4) -> None:
    got = {m["step"]: m for m in _metrics(out)}
    assert sorted(got) == list(steps)
    for step in steps:
        for k in LOSSES:
            assert got[step][k] == pytest.approx(reference[step][k], rel=rel, abs=1e-6), (step, k)


def _torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args, "-m", "beit3.cli.pretrain"]


@pytest.fixture(scope="module")
def reference(small_world, tmp_path_factory):
    """One node, two ranks, the whole 6 steps: (output folder, {step: metrics})."""
    tmp = tmp_path_factory.mktemp("reference")
    out = tmp / "run"
    cmd = _torchrun("--standalone", "--nproc-per-node", "2") + _flags(small_world, out)
    _run_nodes(tmp, "reference", [cmd], [_env()])
    metrics = {m["step"]: m for m in _metrics(out)}
    assert sorted(metrics) == [1, 2, 3, 4, 5, 6] and metrics[6]["loss"] < metrics[1]["loss"]
    return out, metrics


# ------------------------------------------------------------------------------------- launchers
@pytest.mark.slow
def test_torchrun_two_nodes(small_world, reference, tmp_path):
    port, out = free_port(), tmp_path / "run"
    cmds = [_torchrun("--nnodes", "2", "--node-rank", str(i), "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
                      "--master-port", str(port)) + _flags(small_world, out, "--stop-after-steps", "3")
            for i in range(2)]
    _run_nodes(tmp_path, "torchrun", cmds, [_env()] * 2)
    _assert_losses(out, reference[1], [1, 2, 3], rel=1e-6)


@pytest.mark.slow
def test_deepspeed_launcher_without_ssh(small_world, reference, tmp_path):
    """scripts/launch_multinode.sh's no-ssh way: one deepspeed launcher per node, each told its rank."""
    hostfile, out = tmp_path / "hostfile", tmp_path / "run"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    env = _env(HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               DEEPSPEED=f"{sys.executable} -m deepspeed.launcher.runner")
    cmd = ["bash", os.path.join(REPO, "scripts", "launch_multinode.sh")] + _flags(small_world, out, "--stop-after-steps", "3")
    _run_nodes(tmp_path, "deepspeed", [cmd] * 2, [{**env, "NODE_RANK": str(i)} for i in range(2)])
    _assert_losses(out, reference[1], [1, 2, 3], rel=1e-6)
    assert not os.path.exists(os.path.join(REPO, ".deepspeed_env"))  # only the ssh way writes it


@pytest.mark.slow
def test_slurm_rank_mapping(small_world, reference, tmp_path):
    """The sbatch's per-task script, given the variables srun sets for 2 tasks on 2 nodes."""
    sbatch = open(os.path.join(REPO, "scripts", "slurm_pretrain.sbatch")).read()
    assert "srun --kill-on-bad-exit=1 scripts/slurm_task.sh" in sbatch and "--requeue" in sbatch
    out, port = tmp_path / "run", free_port()
    cmd = ["bash", os.path.join(REPO, "scripts", "slurm_task.sh")] + _flags(small_world, out, "--stop-after-steps", "3")
    envs = [_env(SLURM_PROCID=str(i), SLURM_NTASKS="2", SLURM_LOCALID="0", SLURM_NODEID=str(i),
                 SLURM_JOB_NODELIST="node[0-1]", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                 PYTHON=sys.executable) for i in range(2)]
    _run_nodes(tmp_path, "slurm", [cmd] * 2, envs)
    _assert_losses(out, reference[1], [1, 2, 3], rel=1e-6)


# ------------------------------------------------------------------------------- elastic resume
def _from_step_3(source, out) -> str:
    """A new run folder holding ``source``'s step-3 checkpoint (as if that run had stopped there)."""
    path = os.path.join(out, "checkpoints", "step_00000003")
    shutil.copytree(os.path.join(source, "checkpoints", "step_00000003"), path)
    return path


@pytest.mark.slow
def test_resume_on_fewer_ranks(small_world, reference, tmp_path, monkeypatch):
    """2 ranks -> 1 rank accumulating 2 micro-batches: the run goes on with the same losses."""
    out = tmp_path / "run"
    ckpt = _from_step_3(reference[0], out)
    # What a conversion killed halfway leaves: neither refused as a damaged checkpoint nor kept.
    stale = os.path.join(ckpt, f".universal.tmp-{socket.gethostname()}-4194303", "zero", "w")
    os.makedirs(stale)
    open(os.path.join(stale, "fp32.pt"), "wb").write(b"half a file")
    cmd = [sys.executable, "-m", "beit3.cli.pretrain"] + _flags(small_world, out, "--resume", "auto")
    _run_nodes(tmp_path, "one", [cmd], [_env()])
    _assert_losses(out, reference[1], [4, 5, 6])
    log = (tmp_path / "one-0.log").read_text()
    assert "written by 2 ranks, resuming on 1" in log and "converting" in log
    assert os.path.isdir(os.path.join(ckpt, "universal", "zero"))
    assert [n for n in os.listdir(ckpt) if "universal" in n] == ["universal"]  # no temporary left

    # Cached: a second resume from this checkpoint (say, the resumed job died before its first
    # save) does not convert again.
    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")
    monkeypatch.setattr(subprocess, "run", no_conversion)
    assert ensure_universal(ckpt) == os.path.join(ckpt, "universal")


@pytest.mark.slow
def test_resume_on_more_ranks(small_world, reference, tmp_path):
    """1 rank (2 data streams, accumulating 2) -> 2 ranks: same losses as the 2-rank run throughout."""
    first, out = tmp_path / "first", tmp_path / "run"
    cmd = [sys.executable, "-m", "beit3.cli.pretrain"] + _flags(small_world, first, "--data-streams", "2",
                                                            "--stop-after-steps", "3")
    _run_nodes(tmp_path, "first", [cmd], [_env()])
    _assert_losses(first, reference[1], [1, 2, 3])
    _from_step_3(first, out)
    cmd = _torchrun("--standalone", "--nproc-per-node", "2") + _flags(small_world, out, "--resume", "auto")
    _run_nodes(tmp_path, "two", [cmd], [_env()])
    _assert_losses(out, reference[1], [4, 5, 6])


# ----------------------------------------------------------------------------- DeepSpeed's tools
@pytest.mark.slow
def test_deepspeeds_zero_to_fp32_reads_our_checkpoints(reference, tmp_path):
    from beit3.core.weight_files import load_zero_checkpoint

    ckpt_dir = os.path.join(reference[0], "checkpoints")
    assert open(os.path.join(ckpt_dir, "latest")).read() == "step_00000006"
    done = subprocess.run([sys.executable, os.path.join(ckpt_dir, "zero_to_fp32.py"), ckpt_dir, str(tmp_path / "fp32"),
                           "--safe_serialization"], env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    from safetensors.torch import load_file
    files = [f for f in os.listdir(tmp_path / "fp32") if f.endswith(".safetensors")]
    got = {k: v for f in files for k, v in load_file(str(tmp_path / "fp32" / f)).items()}
    expected = load_zero_checkpoint(os.path.join(ckpt_dir, "step_00000006"))
    assert got.keys() == expected.keys() and len(got) > 50
    for k in expected:
        assert got[k].equal(expected[k]), k


def test_latest_names_only_a_complete_checkpoint(tmp_path):
    """DeepSpeed's ``latest`` follows the COMPLETE markers: a step being rewritten (marker removed)
    is not named, and with no complete checkpoint there is no ``latest``."""
    from beit3.trainer.checkpoint import LATEST, MARKER, point_latest

    for step in (1, 2):
        os.makedirs(tmp_path / f"step_0000000{step}")
        (tmp_path / f"step_0000000{step}" / MARKER).write_text("{}")
    point_latest(str(tmp_path))
    assert (tmp_path / LATEST).read_text() == "step_00000002"
    os.remove(tmp_path / "step_00000002" / MARKER)
    point_latest(str(tmp_path))
    assert (tmp_path / LATEST).read_text() == "step_00000001"
    os.remove(tmp_path / "step_00000001" / MARKER)
    point_latest(str(tmp_path))
    assert not (tmp_path / LATEST).exists()


# ---------------------------------------------------------------------------- losing a node
def _kill_node(proc: subprocess.Popen) -> None:
    """A node lost at once: its launcher and every rank it started (torchrun gives each rank a
    session of its own, so the launcher's process group alone would leave them running)."""
    import psutil
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    _stop(proc)
    for child in family:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def _wait_for_step(out, step: int, procs, deadline: float) -> None:
    path = os.path.join(out, "metrics.jsonl")
    while time.monotonic() < deadline:
        if os.path.isfile(path) and any(m["step"] >= step for m in _metrics(out)):
            return
        assert all(p.poll() is None for p in procs), "a node ended before the kill"
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within the time limit")


@pytest.mark.slow
def test_elastic_job_survives_a_lost_node(small_world, tmp_path):
    """torchrun --nnodes 1:2 with a c10d rendezvous: node 1's launcher and rank are killed mid-run;
    node 0's agent restarts its rank, the job re-forms on 1 rank, resumes from the last complete
    checkpoint (converted for the new world size, accumulating 2 micro-batches to keep the global
    batch) and finishes. No step before that checkpoint is lost, none after it is skipped."""
    out, port, steps = tmp_path / "run", free_port(), 16
    flags = _flags(small_world, out, "--steps", str(steps), "--save-every", "4", "--resume", "auto")
    logs = [open(tmp_path / f"node-{i}.log", "w") for i in range(2)]
    procs = []
    try:
        for i in range(2):  # node 0 hosts the rendezvous store, so it is the one to survive
            rdzv = f"is_host={1 - i},join_timeout=120,last_call_timeout=3,read_timeout=60"
            cmd = _torchrun("--nnodes", "1:2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "lost-node", "--rdzv-conf", rdzv,
                            "--max-restarts", "3", "--monitor-interval", "1") + flags
            procs.append(_start(cmd, logs[i], _env()))
        deadline = time.monotonic() + TIMEOUT
        _wait_for_step(out, 6, procs, deadline)
        _kill_node(procs[1])
        kept = [s for s, _ in complete_checkpoints(str(out / "checkpoints"))][-1]
        code = procs[0].wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            _kill_node(p)
        for log in logs:
            log.close()
    log = (tmp_path / "node-0.log").read_text()
    assert code == 0, log[-4000:]
    assert "written by 2 ranks, resuming on 1" in log, log[-4000:]
    # The checkpoint the job came back from: the newest complete one when the node died (or one
    # completed in that instant, if the lost node had passed the save's last barrier).
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", log).group(1))
    metrics = [m["step"] for m in _metrics(out)]
    cut = next(i for i in range(1, len(metrics)) if metrics[i] <= metrics[i - 1])
    before, after = metrics[:cut], metrics[cut:]
    assert before == list(range(1, len(before) + 1)) and len(before) >= 6
    assert kept <= resumed <= len(before) and resumed % 4 == 0
    assert after == list(range(resumed + 1, steps + 1))  # nothing lost beyond the checkpoint, nothing skipped
    assert complete_checkpoints(str(out / "checkpoints"))[-1][0] == steps


# ---------------------------------------------------------------------------------- ZeRO++
@pytest.mark.slow
def test_zero3pp_config_parses_and_its_hierarchical_partition_trains_on_cpu(small_world, reference, tmp_path):
    """The shipped config validates in DeepSpeed's own schema. Its quantisation needs DeepSpeed's
    QuantizerBuilder, a CUDA op ("This op had not been implemented on CPU backend": quantised
    weights at engine construction, quantised gradients at the first reduction), so on the CPU
    only the hierarchical partition runs: 2 ranks, secondary partition of 2, the reference's losses."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from beit3.trainer.ds_config import packaged_ds_config, resolve_ds_config

    cfg = resolve_ds_config(packaged_ds_config("zero3pp_multinode.json"), micro_batch=96, grad_accum=None,
                            world_size=32)
    zero = DeepSpeedZeroConfig(**cfg["zero_optimization"])
    assert (zero.stage, zero.zero_hpz_partition_size, zero.zero_quantized_weights,
            zero.zero_quantized_gradients) == (3, 8, True, True)
    cfg["zero_optimization"].update(zero_hpz_partition_size=2, zero_quantized_weights=False,
                                    zero_quantized_gradients=False)
    cfg["bf16"]["enabled"] = False  # the CPU path is fp32
    for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        cfg[k] = "auto"
    path = tmp_path / "hpz_cpu.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    cmd = _torchrun("--standalone", "--nproc-per-node", "2") + _flags(small_world, out, "--deepspeed", str(path),
                                                                      "--stop-after-steps", "2")
    _run_nodes(tmp_path, "hpz", [cmd], [_env()])
    _assert_losses(out, reference[1], [1, 2], rel=1e-5)
