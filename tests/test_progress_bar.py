"""A resumed run's progress bar starts at its step (tqdm ``initial=``), so its rate and ETA count
only the steps this process runs."""
from beit3.train.metrics_log import MetricsLogger


def test_resumed_bar_starts_at_its_step(tmp_path):
    log = MetricsLogger(str(tmp_path), True, 10, tensorboard=False)
    log.start_at(6)
    log.advance()
    d = log.bar.format_dict
    assert (d["n"], d["initial"], d["total"]) == (7, 6, 10)
    log.close()
