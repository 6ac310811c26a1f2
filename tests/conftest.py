import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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

    return make_assets(str(tmp_path_factory.mktemp("assets")))


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A 240-image synthetic world with its SentencePiece model and a briefly trained tiny VQ-KD
    (the same code path as the demo's cached assets), shared by pretraining and fine-tuning tests."""
    from beit3.jobs.demo_assets import demo_assets

    root = tmp_path_factory.mktemp("beit3_cache")
    old = os.environ.get("BEIT3_CACHE")
    os.environ["BEIT3_CACHE"] = str(root)
    try:
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

    out = tmp_path_factory.mktemp("pretrained") / "run"
    rc = pretrain_main(["--preset", "tiny", "--data", small_world.shards, "--spm", small_world.spm,
                        "--tokenizer", small_world.tokenizer, "--steps", "60", "--batch-images", "8",
                        "--batch-texts", "8", "--batch-pairs", "8", "--log-every", "5", "--save-every", "60",
                        "--warmup-steps", "6", "--output", str(out), "--no-tensorboard"])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def data(small_world):
    """The small world with its fine-tuning index files (VQA: every val image in rest_val)."""
    from beit3.data.downstream import build_all_indexes

    world = small_world.world
    val_images = len(os.listdir(os.path.join(world, "images", "val")))
    build_all_indexes(os.path.join(world, "raw"), world, small_world.spm, min_answer_count=2,
                      rest_val_images=val_images)
    return small_world


@pytest.fixture(scope="session")
def retrieval_run(data, tmp_path_factory):
    """A tiny retrieval model fine-tuned for 2 steps from random weights through `beit3 finetune`
    (its best/ is a saved model), shared by the prediction and embedding tests."""
    from finetune_helpers import finetune

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # see one_thread
    try:
        return finetune("retrieval", data, None, tmp_path_factory.mktemp("retrieval") / "run", "--max-steps", "2")
    finally:
        torch.set_num_threads(before)
