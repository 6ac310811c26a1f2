"""``MetricsLogger``: what a run logs reaches metrics.jsonl and the TensorBoard event files with
the same tags, steps and values; only rank 0 writes; nothing is created before the first log."""
import json
import math
import os

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from beit3.trainer.metrics_log import MetricsLogger

LOGGED = [
    (1, {"loss": 2.5, "loss/image": torch.tensor(1.25), "lr": 1e-4, "skipped_steps": 0, "note": "warmup"}),
    (2, {"loss": 2.0, "loss/image": torch.tensor(1.0), "lr": 2e-4, "skipped_steps": 1, "grad_norm": float("nan")}),
    (4, {"loss": 1.5, "lr": 3e-4, "skipped_steps": 1, "grad_norm": 0.75}),
]


def _log_all(logger):
    for step, metrics in LOGGED:
        logger.log(step, metrics)
    logger.close()


def _scalars(folder):
    acc = EventAccumulator(folder, size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _lines(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_tensorboard_holds_every_finite_number_as_logged(tmp_path):
    out = tmp_path / "run"
    _log_all(MetricsLogger(str(out), enabled=True, total_steps=4, tensorboard=True))
    assert sorted(os.listdir(out)) == ["metrics.jsonl", "tensorboard"]
    got = _scalars(str(out / "tensorboard"))
    # Strings are not scalars, NaN is left out of the plots (it stays in metrics.jsonl).
    assert sorted(got) == ["grad_norm", "loss", "loss/image", "lr", "skipped_steps"]
    assert [s for s, _ in got["loss"]] == [1, 2, 4] and [s for s, _ in got["loss/image"]] == [1, 2]
    assert got["grad_norm"] == [(4, 0.75)]
    for tag in ("loss", "loss/image", "lr", "skipped_steps"):
        want = [(step, float(m[tag])) for step, m in LOGGED if tag in m]
        assert [s for s, _ in got[tag]] == [s for s, _ in want], tag
        # TensorBoard stores float32.
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in want], rel=1e-6), tag


def test_jsonl_matches_what_was_logged(tmp_path):
    out = tmp_path / "run"
    _log_all(MetricsLogger(str(out), enabled=True, total_steps=4, tensorboard=True))
    lines = _lines(out)
    assert [m["step"] for m in lines] == [1, 2, 4]
    assert lines[0] == {"step": 1, "loss": 2.5, "loss/image": 1.25, "lr": 1e-4, "skipped_steps": 0, "note": "warmup"}
    assert isinstance(lines[1]["skipped_steps"], int) and math.isnan(lines[1]["grad_norm"])
    assert lines[2] == {"step": 4, "loss": 1.5, "lr": 3e-4, "skipped_steps": 1, "grad_norm": 0.75}
    # The same numbers as the event files, to float32.
    tb = _scalars(str(out / "tensorboard"))
    for tag, events in tb.items():
        by_step = {m["step"]: m[tag] for m in lines if tag in m}
        assert [(s, pytest.approx(by_step[s], rel=1e-6)) for s, _ in events] == events, tag


def test_a_resumed_run_appends(tmp_path):
    out = tmp_path / "run"
    first = MetricsLogger(str(out), enabled=True, total_steps=4, tensorboard=True)
    first.log(1, {"loss": 3.0})
    first.close()
    again = MetricsLogger(str(out), enabled=True, total_steps=4, tensorboard=True)
    again.log(2, {"loss": 2.0})
    again.close()
    assert [(m["step"], m["loss"]) for m in _lines(out)] == [(1, 3.0), (2, 2.0)]
    assert _scalars(str(out / "tensorboard"))["loss"] == [(1, 3.0), (2, 2.0)]  # both event files are read


def test_without_tensorboard_only_jsonl(tmp_path):
    out = tmp_path / "run"
    _log_all(MetricsLogger(str(out), enabled=True, total_steps=4, tensorboard=False))
    assert os.listdir(out) == ["metrics.jsonl"]
    assert [m["step"] for m in _lines(out)] == [1, 2, 4]


def test_other_ranks_write_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    logger = MetricsLogger(str(out), enabled=False, total_steps=4, tensorboard=True)
    assert logger.bar is None
    logger.start_at(2)
    logger.advance()
    logger.write("only rank 0 speaks")
    _log_all(logger)
    assert not out.exists()
    assert capsys.readouterr() == ("", "")


def test_nothing_is_created_before_the_first_log(tmp_path, capsys):
    """A run refused while it is still being checked leaves its output folder as it found it."""
    out = tmp_path / "run"
    logger = MetricsLogger(str(out), enabled=True, total_steps=4, tensorboard=True)
    logger.write("checking")
    logger.close()
    assert not out.exists()
    assert "checking" in capsys.readouterr().out


def test_the_bar_shows_the_losses_and_throughput(tmp_path):
    logger = MetricsLogger(str(tmp_path / "run"), enabled=True, total_steps=4, tensorboard=False)
    logger.log(1, {"loss": 2.5, "loss/image": 1.25, "loss/text": 3.0, "lr": 1e-4, "samples_per_s": 123.4})
    assert logger.bar.postfix == "loss=2.5, image=1.25, text=3, samples_per_s=123"
    logger.close()
