"""``run.log``: what the console shows, with timestamps, appended by each session; warnings and the
``beit3`` loggers' records are copied in and still reach the console."""
import logging
import re
import warnings

import torch

from beit3.trainer.metrics_log import MetricsLogger
from beit3.trainer.run_log import RunLog, session_header
from beit3.trainer.trackers import RunInfo

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "


def test_a_session_appends_its_header_lines_steps_and_warnings(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(logging.root, "handlers", [])  # no handler but logging's last resort (pytest adds one)
    shown = []  # what Python shows of a warning without run.log (pytest records them instead of printing)
    monkeypatch.setattr(warnings, "showwarning", lambda message, *a, **kw: shown.append(str(message)))
    for session in range(2):
        logger = MetricsLogger(str(tmp_path), True, 4, tensorboard=False)
        logger.open_session(session_header(1, torch.device("cpu")), RunInfo(str(tmp_path), "test", session > 0))
        logger.write(f"session {session}")
        logger.log(2 * session + 1, {"loss": 2.5, "note": "warmup"})
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a shard was skipped", UserWarning)
        logging.getLogger("beit3.data.sources").warning("retry %d of %d", 1, 3)
        logger.close()
    out, err = capsys.readouterr()
    assert out.splitlines() == ["session 0", "session 1"]
    assert shown == ["a shard was skipped"] * 2 and err.count("retry 1 of 3") == 2  # still shown as before
    lines = (tmp_path / "run.log").read_text().splitlines()
    assert all(re.match(STAMP, line) for line in lines)
    body = [line[20:] for line in lines]
    assert [b for b in body if b.startswith("----")][::2] == [b for b in body if "session started" in b]
    assert len([b for b in body if "session started" in b]) == 2
    assert body[1].startswith("beit3 ") and "torch " in body[1] and "git commit" in body[1]
    second = [i for i, b in enumerate(body) if "session started" in b][1]
    first = body[body.index("session 0"):second]
    assert first[:2] == ["session 0", "step 1/4: loss 2.5, note warmup"]
    assert any(b.startswith("warning: UserWarning: a shard was skipped (test_run_log.py:") for b in first)
    assert "warning: retry 1 of 3" in first and first[-1] == "---- session ended"
    assert "step 3/4: loss 2.5, note warmup" in body


def test_close_gives_the_hooks_back(tmp_path):
    before = warnings.showwarning
    log = RunLog(str(tmp_path), ["header"])
    assert warnings.showwarning != before and len(logging.getLogger("beit3").handlers) == 1
    log.close()
    assert warnings.showwarning == before and logging.getLogger("beit3").handlers == []
    log.write("after close")  # a late line is dropped, not an error
    assert (tmp_path / "run.log").read_text().splitlines()[0].endswith(" header")
