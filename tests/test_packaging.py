"""The package as users install it: a wheel built from the repository runs outside the checkout,
with its DeepSpeed configs inside; ``beit3 --version``."""
import filecmp
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_packaged_ds_configs_equal_the_ones_users_copy():
    top, packaged = os.path.join(ROOT, "ds_configs"), os.path.join(ROOT, "beit3", "ds_configs")
    names = sorted(n for n in os.listdir(top) if n.endswith(".json"))
    assert names == sorted(n for n in os.listdir(packaged) if n.endswith(".json")) and names
    match, mismatch, errors = filecmp.cmpfiles(top, packaged, names, shallow=False)
    assert mismatch == [] and errors == []


@pytest.mark.slow
def test_wheel_installs_and_pretrains_outside_the_checkout(tmp_path):
    """pip wheel -> install into a folder -> `beit3 pretrain --preset tiny --steps 5` run from another
    folder, with that folder alone on the path: the DeepSpeed config comes from the package."""
    from test_web_sources import write_img2dataset
    from pretrain_fixtures import make_assets
    spm, tok = make_assets(str(tmp_path))
    write_img2dataset(tmp_path / "data", shards=2, per_shard=8)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), ROOT], check=True, capture_output=True, timeout=300)
    [wheel] = list((tmp_path / "dist").glob("beit3-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items()  # not this process's process-group address
           if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(tmp_path / "site"), DS_ACCELERATOR="cpu")
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=tmp_path, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=600)
    where = run("-c", "import beit3, beit3.trainer.ds_config as d; print(beit3.__file__); "
                      "print(d.default_ds_config('cpu'))")
    lib, cfg = where.stdout.split()
    assert lib.startswith(str(tmp_path / "site")) and cfg.startswith(str(tmp_path / "site")) and os.path.isfile(cfg)
    r = run("-m", "beit3.cli", "pretrain", "--preset", "tiny", "--steps", "5", "--output", "out", "--spm", spm,
            "--tokenizer", tok, "--pair-shards", str(tmp_path / "data/{00000..00001}.tar"), "--batch-pairs", "4",
            "--no-tensorboard", "--log-every", "5", "--save-every", "5")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "out" / "metrics.jsonl").read_text().count('"step": 5') == 1
    assert run("-m", "beit3.cli", "--version").stdout.strip() == "beit3 0.1.0"
