"""A resumed run's progress bar starts at its step (tqdm ``initial=``), so its rate and ETA count
only the steps this process runs."""
import functools

from tqdm import tqdm

from beit3.trainer import metrics_log
from beit3.trainer.metrics_log import MetricsLogger


def test_resumed_bar_starts_at_its_step(tmp_path):
    log = MetricsLogger(str(tmp_path), True, 10, tensorboard=False)
    log.start_at(6)
    log.advance()
    d = log.bar.format_dict
    assert (d["n"], d["initial"], d["total"]) == (7, 6, 10)
    log.close()


def test_tqdm_disable_in_the_environment_leaves_a_run_without_a_bar(tmp_path, monkeypatch, capsys):
    """TQDM_DISABLE=1 overrides disable=False and gives a bar without its clock and counters; the
    run then logs as one without a bar (a resumed one too) instead of failing in start_at. tqdm
    reads the variable when it is imported, so here the override is applied as tqdm applies it."""
    monkeypatch.setattr(metrics_log, "tqdm", functools.partial(tqdm, disable=True))
    log = MetricsLogger(str(tmp_path), True, 10, tensorboard=False)
    log.start_at(6)
    log.advance()
    log.log(7, {"loss": 1.5})
    log.write("a line")
    log.close()
    assert log.bar is None
    assert capsys.readouterr().out == "a line\n"
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 7, "loss": 1.5}\n'
