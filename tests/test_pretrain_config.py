"""The pretraining settings: flags generated from PretrainConfig, recipes, --config replay, --print-config."""
import argparse
import json
from dataclasses import dataclass, field
from typing import Optional

import pytest

from beit3.core.settings import add_dataclass_flags, given
from beit3.cli.pretrain import build_parser, config_from_args, main as pretrain_main
from beit3.jobs.pretrain.config import RECIPES, PretrainConfig


def parse(*argv) -> PretrainConfig:
    return config_from_args(build_parser().parse_args(list(argv)))


def test_every_field_has_a_flag_and_defaults_hide_nothing():
    ns = build_parser().parse_args([])
    assert given(ns, PretrainConfig) == {}  # nothing set: a recipe or a file keeps its values
    cfg = parse("--preset", "base", "--deepspeed", "x.json", "--no-tensorboard", "--mask-pair-images",
                "--pair-shards", "a/{0..3}.tar::2", "--pair-shards", "b.tar", "--lr", "3e-4", "--grad-clip", "none")
    assert (cfg.preset, cfg.ds_config, cfg.tensorboard, cfg.mask_pair_images) == ("base", "x.json", False, True)
    assert cfg.pair_shards == ["a/{0..3}.tar::2", "b.tar"] and cfg.lr == 3e-4 and cfg.grad_clip is None
    assert parse("--ds-config", "y.json").ds_config == "y.json"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--preset", "huge"])  # choices come from the field


def test_recipes_hold_the_papers_settings():
    giant = PretrainConfig.from_recipe("pretrain-giant").resolved("cuda")
    assert (giant.preset, giant.steps, giant.lr, giant.warmup_steps, giant.weight_decay, giant.beta2) == \
        ("giant", 1_000_000, 1e-3, 10_000, 0.05, 0.98)
    assert giant.lr * giant.min_lr_ratio == pytest.approx(1e-5) and giant.drop_path == 0.1
    # 2048 samples of each kind a step on 128 GPUs, as the paper
    assert 128 * giant.batch_images == 128 * giant.batch_texts == 128 * giant.batch_pairs == 2048
    assert giant.ds_config.endswith("zero3_bf16.json") and giant.checkpoint_every == 1
    import os
    assert os.path.isfile(giant.ds_config)  # the packaged copy: works from an installed wheel
    tiny = PretrainConfig.from_recipe("pretrain-tiny").resolved("cpu")
    assert tiny == PretrainConfig(output="runs/demo", data="synthetic").resolved("cpu")
    assert set(RECIPES) >= {"pretrain-tiny", "pretrain-base", "pretrain-giant"}
    with pytest.raises(ValueError, match="unknown pretraining --recipe"):
        PretrainConfig.from_recipe("pretrain-huge")


def test_config_file_replays_a_run_and_flags_override_it(tmp_path, capsys):
    saved = PretrainConfig(preset="tiny", steps=77, lr=5e-4, batch_pairs=3, seed=4).resolved("cpu")
    run_config = tmp_path / "run_config.json"
    run_config.write_text(json.dumps({"args": saved.to_dict(), "model": {}, "deepspeed": {}}))
    assert parse("--config", str(run_config)) == saved
    changed = parse("--recipe", "pretrain-base", "--config", str(run_config), "--steps", "9")
    assert changed == saved.replace(steps=9)  # the file over the recipe, the flag over the file

    assert pretrain_main(["--config", str(run_config), "--seed", "5", "--print-config",
                          "--output", str(tmp_path / "never")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {**saved.to_dict(), "seed": 5, "output": str(tmp_path / "never")}
    assert not (tmp_path / "never").exists()  # printing runs nothing


@pytest.mark.parametrize("content, message", [
    ('{"args": {"steps": 5, "stepz": 6}}', "no field(s) ['stepz']"),
    ("[1, 2]", "expected a JSON object"),
    ('{"steps": ', "Expecting value"),
])
def test_bad_config_file_is_one_line_before_anything_runs(tmp_path, capsys, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert pretrain_main(["--config", str(path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and message in err
    assert not (tmp_path / "out").exists()


def test_flag_generator_types():
    @dataclass
    class Demo:
        n: int = 1
        x: Optional[float] = None
        name: str = field(default="a", metadata={"choices": ["a", "b"], "help": "which"})
        on: bool = False
        items: Optional[list] = None
        pair: tuple = (0.5, 1.0)

    ap = argparse.ArgumentParser()
    add_dataclass_flags(ap, Demo)
    ns = ap.parse_args(["--n", "3", "--x", "none", "--name", "b", "--on", "--items", "p", "--items", "q",
                        "--pair", "0.1", "0.9"])
    assert given(ns, Demo) == dict(n=3, x=None, name="b", on=True, items=["p", "q"], pair=[0.1, 0.9])
    assert given(ap.parse_args(["--no-on"]), Demo) == {"on": False}
    with pytest.raises(SystemExit):
        ap.parse_args(["--n", "three"])
