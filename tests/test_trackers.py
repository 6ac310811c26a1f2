"""``--report-to``: every tracker gets what metrics.jsonl holds (read back from wandb's offline run
files and MLflow's file store), a resumed run continues the same tracker runs and run.log, a tracker
that is missing or cannot start is one line before any work, one that fails mid-run is reported
once and dropped; every job logs the same throughput figures."""
import glob
import json
import math
import os
import struct
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from pretrain_fixtures import IndexedBatches, run_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from beit3.cli.finetune import main as finetune_main
from beit3.cli.pretrain import check_args, run_with_errors
from beit3.cli.pretrain import main as pretrain_main
from beit3.jobs.finetune.recipes import TASKS
from beit3.jobs.finetune.work import PASSES, batch_work
from beit3.jobs.pretrain.loop import PretrainRun
from beit3.cli.train_tokenizer import main as tokenizer_main
from beit3.model.config import BEiT3Config
from beit3.trainer.flops import encoder_flops
from beit3.trainer.mlflow_tracker import MlflowTracker
from beit3.trainer.trackers import TrackerError, requested

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def offline(monkeypatch):
    """wandb and MLflow on disk only, in the run folder."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_DIR", "WANDB_PROJECT", "WANDB_NAME"):
        monkeypatch.delenv(name, raising=False)


def pretrain(out, assets, *flags, **settings):
    """``beit3 pretrain`` on IndexedBatches in this process; returns the exit code."""
    spm, tok = assets
    args = run_args(str(out), spm, tok, extra=flags, **dict(
        steps=4, batch_images=2, batch_texts=2, batch_pairs=2, log_every=1, save_every=2, drop_path=0.0,
        final_weights=False, tensorboard=True, **settings))
    return run_with_errors(PretrainRun(args, check_args(args, 1), "cpu",
                                       data=IndexedBatches(spm, 0, 1, 1, sizes=(2, 2, 2))), args)


def jsonl(out) -> dict[int, dict]:
    """metrics.jsonl's numbers that trackers plot (finite ones), by step."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return {m["step"]: {k: v for k, v in m.items() if k != "step" and isinstance(v, (int, float))
                        and math.isfinite(v)} for m in lines}


# -- reading the trackers back ----------------------------------------------------------------------
def wandb_records(path: str):
    """The records of a wandb run file (``run-<id>.wandb``): LevelDB's log format, 32 KiB blocks of
    chunks with a 7-byte header (crc32, length, type: full/first/middle/last) after a 7-byte file
    header (``:W&B``, magic, version)."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", path
    pos, pending, block = 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_run(out, run_id: str) -> tuple[int, dict[int, dict], dict]:
    """(sessions, scalars by step, config) of the offline wandb run ``run_id`` in ``out/wandb``."""
    files = sorted(glob.glob(os.path.join(out, "wandb", f"offline-run-*-{run_id}", f"run-{run_id}.wandb")))
    steps, config = {}, {}
    for path in files:
        records = list(wandb_records(path))
        deadline = time.monotonic() + 30
        while records[-1].WhichOneof("record_type") != "exit" and time.monotonic() < deadline:
            time.sleep(0.2)  # wandb's service may still be writing the run's last records after finish()
            records = list(wandb_records(path))
        for r in records:
            kind = r.WhichOneof("record_type")
            if kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                steps.setdefault(r.history.step.num, {}).update(
                    {k: v for k, v in items.items() if not k.startswith("_")})
            elif kind in ("run", "config"):
                updates = r.run.config.update if kind == "run" else r.config.update
                config.update({u.key: json.loads(u.value_json) for u in updates})
    return len(files), steps, config


def mlflow_run(out, run_id: str):
    """(run, scalars by step with metrics.jsonl's names, client) of the MLflow run ``run_id`` in the
    file store ``out/mlruns`` (where ``loss/image`` is ``loss.image``)."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri="file:" + os.path.join(str(out), "mlruns"))
    run = client.get_run(run_id)
    steps = {}
    for key in run.data.metrics:
        for m in client.get_metric_history(run_id, key):
            steps.setdefault(m.step, {})[key.replace(".", "/")] = m.value
    return run, steps, client


def tensorboard_steps(out) -> dict[int, dict]:
    acc = EventAccumulator(os.path.join(str(out), "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    steps = {}
    for tag in acc.Tags()["scalars"]:
        for e in acc.Scalars(tag):
            steps.setdefault(e.step, {})[tag] = e.value
    return steps


def same_numbers(got: dict[int, dict], want: dict[int, dict], rel: float) -> None:
    assert sorted(got) == sorted(want)
    for step, values in want.items():
        assert sorted(got[step]) == sorted(values), step
        for k, v in values.items():
            assert got[step][k] == pytest.approx(v, rel=rel, abs=1e-30), (step, k)


# -- the flags ----------------------------------------------------------------------------------------
def test_report_to_names_the_trackers_and_tensorboard_flags_are_its_old_spelling():
    assert requested("", True) == ("tensorboard",) and requested(None, False) == ()
    assert requested("wandb,mlflow", True) == ("wandb", "mlflow")  # --tensorboard is the default: the list decides
    assert requested("wandb, tensorboard,wandb", True) == ("wandb", "tensorboard")
    assert requested("none", False) == () and requested("mlflow", False) == ("mlflow",)
    with pytest.raises(TrackerError, match="--no-tensorboard and --report-to wandb,tensorboard"):
        requested("wandb,tensorboard", False)
    with pytest.raises(TrackerError, match="--tensorboard and --report-to wandb"):
        requested("wandb", True, tensorboard_flag=True)
    with pytest.raises(TrackerError, match="unknown tracker 'comet'"):
        requested("wandb,comet")
    with pytest.raises(TrackerError, match="'none' with trackers"):
        requested("none,wandb")


def _commands(tmp_path, images):
    out = str(tmp_path / "out")
    return {"pretrain": (pretrain_main, ["--preset", "tiny", "--output", out]),
            "finetune": (finetune_main, ["--task", "vqa", "--output", out]),
            "train-tokenizer": (tokenizer_main, ["--images", str(images), "--output", out, "--steps", "2"])}


@pytest.mark.parametrize("command", ["pretrain", "finetune", "train-tokenizer"])
@pytest.mark.parametrize("flags, needle", [
    (["--no-tensorboard", "--report-to", "tensorboard,wandb"], "--no-tensorboard and --report-to tensorboard,wandb"),
    (["--tensorboard", "--report-to", "mlflow"], "--tensorboard and --report-to mlflow"),
    (["--report-to", "wandb,nope"], "unknown tracker 'nope'"),
    (["--report-to", "wandb"], "--report-to wandb: cannot import wandb (import of wandb halted; None in "
                               "sys.modules); install it with pip install wandb"),
])
def test_a_refused_or_missing_tracker_is_one_line_before_any_work(command, flags, needle, tmp_path, monkeypatch,
                                                                   capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    images = tmp_path / "images"
    images.mkdir()
    main, argv = _commands(tmp_path, images)[command]
    assert main(argv + flags) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"beit3 {command}: error: " + err.split("error: ", 1)[1].strip()], err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# -- pretraining into every tracker, resumed ---------------------------------------------------------
def test_every_tracker_holds_metrics_jsonl_and_a_resume_continues_the_same_runs(assets, tmp_path, offline,
                                                                                 capsys):
    out = tmp_path / "run"
    flags = ("--report-to", "tensorboard,wandb,mlflow")
    assert pretrain(out, assets, *flags, stop_after_steps=2) == 0
    first = json.loads((out / "trackers.json").read_text())
    assert pretrain(out, assets, *flags, "--resume", "auto") == 0
    ids = json.loads((out / "trackers.json").read_text())
    assert ids == first  # the resumed session reported into the same runs
    want = jsonl(out)
    assert sorted(want) == [1, 2, 3, 4] and {"loss", "lr", "mfu", "tokens_per_s", "memory_gb"} <= set(want[4])

    sessions, got, config = wandb_run(out, ids["wandb"]["run_id"])
    assert sessions == 2
    same_numbers(got, want, rel=1e-12)
    assert config["args"]["model"]["preset"] == "tiny" and config["output"] == str(out) and "git_commit" in config

    run, got, client = mlflow_run(out, ids["mlflow"]["run_id"])
    same_numbers(got, want, rel=1e-12)
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["args.model.preset"] == "tiny" and run.data.params["args.run.resume"] == "null"  # the first's
    assert run.data.tags["beit3.output"] == str(out)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"run.log", "run_config.json"}

    same_numbers(tensorboard_steps(out), want, rel=1e-6)  # float32

    log = (out / "run.log").read_text().splitlines()
    starts = [i for i, line in enumerate(log) if "---- session started:" in line]
    assert len(starts) == 2
    assert "torch " in log[starts[1] + 1] and "deepspeed " in log[starts[1] + 1] and "git commit" in log[starts[1] + 1]
    assert [int(line.split("step ")[1].split("/")[0]) for line in log if " step " in line and "/4: " in line] == \
        [1, 2, 3, 4]
    assert any("resumed from" in line for line in log[starts[1]:])
    assert any("mlflow: continuing run" in line for line in log[starts[1]:])


@pytest.fixture
def images(tmp_path):
    """Eight random 64 px images for a VQ-KD run."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_a_tracker_failing_mid_run_is_reported_once_and_the_run_finishes(images, tmp_path, offline, monkeypatch,
                                                                         capsys):
    calls = []
    real = MlflowTracker.log

    def flaky(self, step, scalars):
        calls.append(step)
        if step >= 2:
            raise ConnectionError("tracking server unreachable")
        real(self, step, scalars)
    monkeypatch.setattr(MlflowTracker, "log", flaky)
    out = tmp_path / "run"
    assert tokenizer_main(["--images", str(images), "--output", str(out), "--steps", "4", "--batch-size", "4",
                           "--log-every", "1", "--report-to", "mlflow"]) == 0
    assert calls == [1, 2]  # dropped once it failed
    said = [line for line in capsys.readouterr().out.splitlines() if "--report-to mlflow" in line]
    assert said == ["--report-to mlflow: ConnectionError: tracking server unreachable; no longer reporting to it, "
                    "the run goes on (metrics.jsonl keeps every step)"]
    assert sorted(jsonl(out)) == [1, 2, 3, 4] and (out / "model.safetensors").is_file()
    run, got, _ = mlflow_run(out, json.loads((out / "trackers.json").read_text())["mlflow"]["run_id"])
    assert sorted(got) == [1] and got[1] == pytest.approx(jsonl(out)[1], rel=1e-12)
    assert run.data.params["job"] == "train-tokenizer"
    assert run.info.status == "FAILED"  # its run misses steps 2 to 4
    assert sum("tracking server unreachable" in line for line in (out / "run.log").read_text().splitlines()) == 1


def test_a_tracker_that_cannot_start_stops_the_run_before_the_model(assets, tmp_path, offline, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unknownscheme://nowhere")

    def no_model(*a, **kw):
        raise AssertionError("a model was built")
    monkeypatch.setattr("beit3.jobs.pretrain.loop.MaskedDataModeling", no_model)
    assert pretrain(tmp_path / "run", assets, "--report-to", "mlflow") == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("beit3 pretrain: error: --report-to mlflow: could not start its run: ")
    assert "stopped: TrackerError" in (tmp_path / "run" / "run.log").read_text()


# -- the same figures for every job -------------------------------------------------------------------
def test_finetuning_logs_mfu_tokens_samples_and_memory(data, tmp_path):
    out = tmp_path / "run"
    assert finetune_main(["--task", "vqa", "--preset", "tiny", "--data", data.world, "--spm", data.spm,
                          "--output", str(out), "--img-size", "32", "--batch-size", "8", "--max-steps", "3",
                          "--log-every", "1", "--eval-every", "100", "--report-to", "none"]) == 0
    train = [m for m in map(json.loads, open(out / "metrics.jsonl")) if "loss" in m]
    assert [m["step"] for m in train] == [1, 2, 3]
    cfg = BEiT3Config.from_preset("tiny", img_size=32)
    for m in train:
        assert m["mfu"] > 0 and m["model_tflops"] > 0 and m["memory_gb"] > 0.1
        # 8 questions a step, each read with its image's 1 + 4 x 4 tokens: FLOPs follow the padded texts.
        per_sample_tokens = m["tokens_per_s"] / m["samples_per_s"]
        assert 17 + 3 <= per_sample_tokens <= 17 + cfg.max_text_len
        flops_per_sample = m["model_tflops"] * 1e12 / m["samples_per_s"]
        assert encoder_flops(cfg, 1, 17, 3) < flops_per_sample < encoder_flops(cfg, 1, 17, 64)
    assert not (out / "tensorboard").exists() and "---- session started" in (out / "run.log").read_text()


def test_a_batch_costs_its_backbone_passes():
    assert sorted(PASSES) == sorted(TASKS)
    cfg = BEiT3Config.from_preset("tiny", img_size=32)
    pad = torch.tensor([[False] * 5 + [True] * 3, [False] * 8])
    batch = {"image": torch.zeros(2, 3, 32, 32), "image2": torch.zeros(2, 3, 32, 32),
             "text": torch.zeros(2, 8, dtype=torch.long), "padding_mask": pad}
    assert batch_work("vqa", cfg, batch) == (2, 2 * 17 + 13, encoder_flops(cfg, 2, 17, 8))
    assert batch_work("retrieval", cfg, batch) == (2, 2 * 17 + 13, encoder_flops(cfg, 2, 17, 0)
                                                   + encoder_flops(cfg, 2, 0, 8))
    assert batch_work("nlvr2", cfg, batch) == (2, 2 * (2 * 17 + 13), 2 * encoder_flops(cfg, 2, 17, 8))
    assert batch_work("classification", cfg, batch) == (2, 2 * 17, encoder_flops(cfg, 2, 17, 0))
