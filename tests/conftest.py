"""Fixtures shared by the test files. The suite runs in two pytest-xdist workers (``-n 2 --dist
loadscope`` in pyproject.toml), one per core of the CI machine, each on one torch thread so that
the two do not fight over the cores. A module's tests stay on one worker, so its module fixtures
are built once; the session fixtures that train something are built once for both workers, under
a file lock, in the folder the workers share (``worker_cache.py``)."""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
if os.environ.get("PYTEST_XDIST_WORKER"):  # before torch is imported: its subprocesses' thread pools too
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from beit3.metrics import captioning
from worker_cache import WORKER, built_once, mark_built

if WORKER:
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _captions_scored_without_java(monkeypatch):
    """Fine-tuning and evaluation runs read CIDEr and BLEU, which need no Java; METEOR and the PTB
    tokenizer start a JVM per call (a third of a captioning test's time here). The tests of the
    Java path (tests/test_metrics.py) ask for it with ``use_java=True``."""
    monkeypatch.setattr(captioning, "java_available", lambda: False)


LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture(autouse=True)
def _launcher_variables_restored():
    """A job run in-process sets MASTER_PORT for its world of one and keeps that group (bound to the
    port) until exit; left in the environment, the variable would send every later subprocess's own
    world of one to the same, taken port (EADDRINUSE)."""
    before = {name: os.environ.get(name) for name in LAUNCHER_VARIABLES}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on two shared cores: intra-op threads spinning against other processes made a
    step 10-40x slower than one thread (measured), so modules that train them opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """(spm, VQ-KD dir): the 60-piece SentencePiece model and untrained tiny VQ-KD of
    ``pretrain_fixtures.make_assets`` that the pretraining mechanics tests (resume, faults, bad
    inputs, web sources) run on; built once, never written to by a test."""
    from pretrain_fixtures import make_assets

    with built_once(tmp_path_factory, "assets") as (path, _):
        return make_assets(str(path))  # builds what its folder lacks


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A 240-image synthetic world with its SentencePiece model and a briefly trained tiny VQ-KD
    (the same code path as the demo's cached assets), shared by pretraining and fine-tuning tests."""
    from beit3.jobs.demo_assets import demo_assets

    with built_once(tmp_path_factory, "beit3_cache") as (root, _):
        old = os.environ.get("BEIT3_CACHE")
        os.environ["BEIT3_CACHE"] = str(root)
        try:  # a second call finds the cache READY and builds nothing
            return demo_assets(seed=0, num_images=240, tokenizer_steps=60, tokenizer_batch=16, log=lambda *_: None)
        finally:
            if old is None:
                os.environ.pop("BEIT3_CACHE")
            else:
                os.environ["BEIT3_CACHE"] = old


@pytest.fixture(scope="session")
def pretrained_tiny(small_world, tmp_path_factory):
    """A tiny BEiT-3 pretrained for 60 steps on the small world through `beit3 pretrain`."""
    from beit3.cli.pretrain import main as pretrain_main

    with built_once(tmp_path_factory, "pretrained") as (path, built):
        out = path / "run"
        if not built:
            rc = pretrain_main(["--preset", "tiny", "--data", small_world.shards, "--spm", small_world.spm,
                                "--tokenizer", small_world.tokenizer, "--steps", "60", "--batch-images", "8",
                                "--batch-texts", "8", "--batch-pairs", "8", "--log-every", "5", "--save-every", "60",
                                "--warmup-steps", "6", "--output", str(out), "--no-tensorboard"])
            assert rc == 0
            mark_built(path)
        return out


@pytest.fixture(scope="session")
def data(small_world, tmp_path_factory):
    """The small world with its fine-tuning index files (VQA: every val image in rest_val)."""
    from beit3.data.downstream import build_all_indexes

    world = small_world.world
    with built_once(tmp_path_factory, "indexes") as (path, built):
        if not built:
            val_images = len(os.listdir(os.path.join(world, "images", "val")))
            build_all_indexes(os.path.join(world, "raw"), world, small_world.spm, min_answer_count=2,
                              rest_val_images=val_images)
            mark_built(path)
    return small_world


@pytest.fixture(scope="session")
def retrieval_run(data, tmp_path_factory):
    """A tiny retrieval model fine-tuned for 2 steps from random weights through `beit3 finetune`
    (its best/ is a saved model), shared by the prediction and embedding tests."""
    from finetune_helpers import finetune

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # see one_thread
    try:
        with built_once(tmp_path_factory, "retrieval") as (path, built):
            if not built:
                finetune("retrieval", data, None, path / "run", "--max-steps", "2")
                mark_built(path)
            return path / "run"
    finally:
        torch.set_num_threads(before)

