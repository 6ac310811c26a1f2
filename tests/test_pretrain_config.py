"""The pretraining settings: one tree (model, tokenizers, data, optim, engine, run) with a flag per
setting, recipes, --config replay (nested, and the flat run_config.json of older runs), --print-config,
the one knob of the global batch."""
import argparse
import json
import os
from dataclasses import dataclass, field
from typing import Optional

import pytest

from beit3.cli import pretrain as pretrain_cli
from beit3.cli.pretrain import build_parser, config_from_args, main as pretrain_main
from beit3.core.settings import add_dataclass_flags, flat_values, given, leaves, part, setting, tree_from_dict
from beit3.jobs.pretrain.config import RECIPES, PretrainConfig
from beit3.jobs.pretrain.loop import resume_identity
from beit3.model.config import BEiT3Config
from beit3.trainer.checkpoint import CheckpointError
from beit3.trainer.run_dir import check_same_run

# `beit3 pretrain`'s flags before its settings became a tree: every one still works.
FLAT_FLAGS = """--allow-pickle --batch-images --batch-pairs --batch-texts --beta2 --checkpoint-every --checkpoint-mode
--config --data --data-streams --deepspeed --device --dist-timeout --drop-path --ds-config --final-weights --grad-accum
--grad-clip --help --image-shards --init-scheme --keep-last --layout --local-rank --local_rank --log-every --lr
--mask-pair-images --max-bad-shard-fraction --max-bad-steps --max-text-len --micro-batches-per-step --min-lr-ratio
--no-allow-pickle --no-final-weights --no-mask-pair-images --no-overwrite --no-patch-aggregation --no-tensorboard
--num-workers --output --overwrite --pair-shards --patch-aggregation --preset --print-config --recipe --resume
--retry-backoff --save-every --seed --shard-connect-timeout --shard-min-rate --shard-read-timeout --shard-retries --spm
--steps --stop-after-steps --tensorboard --text-padding --text-shards --tokenizer --tokenizer-preset --warmup-steps
--weight-decay -h""".split()

# The "args" of a run_config.json as runs wrote them before the tree: one flat object.
FLAT_RUN_ARGS = {
    "preset": "tiny", "layout": "paper", "init_scheme": "subln", "patch_aggregation": False, "drop_path": 0.1,
    "data": "synthetic", "pair_shards": None, "image_shards": None, "text_shards": None, "shard_retries": 3,
    "retry_backoff": 1.0, "shard_connect_timeout": 30.0, "shard_read_timeout": 60.0, "shard_min_rate": 1024.0,
    "max_bad_shard_fraction": 0.1, "data_streams": None, "spm": None, "tokenizer": None, "tokenizer_preset": None,
    "batch_images": 16, "batch_texts": 16, "batch_pairs": 16, "max_text_len": 32, "text_padding": "longest",
    "mask_pair_images": False, "num_workers": 0, "steps": 200, "lr": 0.002, "min_lr_ratio": 0.01, "warmup_steps": 20,
    "weight_decay": 0.05, "beta2": 0.98, "grad_clip": None, "grad_accum": None, "micro_batches_per_step": None,
    "ds_config": "cpu_zero3.json", "checkpoint_every": 0, "checkpoint_mode": "full", "seed": 0,
    "output": "runs/pretrain", "save_every": 100, "keep_last": 3, "resume": None, "overwrite": False,
    "allow_pickle": False, "final_weights": True, "stop_after_steps": None, "log_every": 10, "max_bad_steps": 5,
    "dist_timeout": 1800.0, "device": None, "tensorboard": True}


def parse(*argv) -> PretrainConfig:
    return config_from_args(build_parser().parse_args(list(argv)))


def _write_run_config(path, args: dict) -> str:
    path.write_text(json.dumps({"args": args, "model": {}, "deepspeed": {}}))
    return str(path)


# -- the tree and its flags ---------------------------------------------------------------------
def test_every_setting_of_the_tree_has_its_flag_and_defaults_hide_nothing():
    ns = build_parser().parse_args([])
    assert given(ns, PretrainConfig) == {}  # nothing set: a recipe or a file keeps its values
    cfg = parse("--preset", "base", "--deepspeed", "x.json", "--no-tensorboard", "--mask-pair-images",
                "--pair-shards", "a/{0..3}.tar::2", "--pair-shards", "b.tar", "--lr", "3e-4", "--grad-clip", "none",
                "--data", "shards/", "--crop-scale", "0.2", "0.9", "--micro-batches-per-step", "8")
    assert (cfg.model.preset, cfg.engine.ds_config, cfg.run.tensorboard, cfg.data.mask_pair_images) == \
        ("base", "x.json", False, True)
    assert cfg.data.pair_shards == ["a/{0..3}.tar::2", "b.tar"] and cfg.optim.lr == 3e-4 and cfg.optim.grad_clip is None
    assert cfg.data.shards_dir == "shards/" and cfg.data.crop_scale == (0.2, 0.9)
    assert cfg.engine.micro_batches_per_step == 8
    assert parse("--ds-config", "y.json").engine.ds_config == "y.json"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--preset", "huge"])  # choices come from the field
    flags = {s for a in build_parser()._actions for s in a.option_strings}
    assert sorted(set(FLAT_FLAGS) - flags) == []  # no flag lost or renamed
    no_flag = {k for k, leaf in leaves(PretrainConfig).items() if not leaf.field.metadata.get("flag", True)}
    assert no_flag == {"img_size", "patch_size", "tokenizer_img_size", "tokenizer_patch_size"}  # the model's sizes
    assert all(f"--{k.replace('_', '-')}" in flags for k in set(leaves(PretrainConfig)) - no_flag)


def test_recipes_hold_the_papers_settings():
    giant = PretrainConfig.from_recipe("pretrain-giant").resolved("cuda", world_size=128)
    o = giant.optim
    assert (giant.model.preset, o.steps, o.lr, o.warmup_steps, o.weight_decay, o.beta1, o.beta2, o.eps) == \
        ("giant", 1_000_000, 1e-3, 10_000, 0.05, 0.9, 0.98, 1e-6)
    assert o.lr * o.min_lr_ratio == pytest.approx(1e-5) and giant.model.drop_path == 0.1
    d = giant.data  # 2048 samples of each kind a step on 128 GPUs, as the paper
    assert 128 * d.batch_images == 128 * d.batch_texts == 128 * d.batch_pairs == 2048
    assert (giant.engine.micro_batches_per_step, giant.engine.grad_accum) == (128, 1)
    assert (d.image_mask_ratio, d.text_mask_prob, d.pair_text_mask_prob) == (0.4, 0.15, 0.5)  # Sec. 2.3
    assert (d.crop_scale, d.pair_crop_scale, d.img_size, d.patch_size) == ((0.08, 1.0), (0.5, 1.0), 224, 14)
    assert giant.engine.ds_config.endswith("zero3_bf16.json") and giant.model.checkpoint_every == 1
    assert os.path.isfile(giant.engine.ds_config)  # the packaged copy: works from an installed wheel
    tiny = PretrainConfig.from_recipe("pretrain-tiny").resolved("cpu")
    assert tiny == PretrainConfig.from_dict({"output": "runs/demo", "data": "synthetic"}).resolved("cpu")
    assert set(RECIPES) >= {"pretrain-tiny", "pretrain-base", "pretrain-giant"}
    with pytest.raises(ValueError, match="unknown pretraining --recipe"):
        PretrainConfig.from_recipe("pretrain-huge")


# -- --config, --print-config -------------------------------------------------------------------
def test_config_file_replays_a_run_and_flags_override_it(tmp_path, capsys):
    saved = PretrainConfig.from_dict({"preset": "tiny", "steps": 77, "lr": 5e-4, "batch_pairs": 3, "seed": 4,
                                      "text_mask_prob": 0.3}).resolved("cpu")
    run_config = _write_run_config(tmp_path / "run_config.json", saved.to_dict())
    assert set(saved.to_dict()) == {"model", "tokenizers", "data", "optim", "engine", "run"}
    assert parse("--config", run_config).resolved("cpu") == saved
    changed = parse("--recipe", "pretrain-base", "--config", run_config, "--steps", "9")
    assert changed.resolved("cpu") == saved.replace(steps=9)  # the file over the recipe, the flag over the file

    assert pretrain_main(["--config", run_config, "--seed", "5", "--print-config",
                          "--output", str(tmp_path / "never")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == saved.replace(seed=5, output=str(tmp_path / "never")).to_dict()
    assert printed["data"]["text_mask_prob"] == 0.3 and printed["optim"]["steps"] == 77
    assert not (tmp_path / "never").exists()  # printing runs nothing


def test_print_config_shows_every_setting(capsys):
    assert pretrain_main(["--print-config", "--image-mask-ratio", "0.5", "--pair-crop-scale", "0.6", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    flat = flat_values(PretrainConfig.from_dict(printed))
    assert set(flat) == set(leaves(PretrainConfig))  # every setting, the flag-less sizes too
    assert printed["data"]["image_mask_ratio"] == 0.5 and printed["data"]["pair_crop_scale"] == [0.6, 1.0]
    assert (printed["data"]["text_mask_prob"], printed["data"]["pair_text_mask_prob"]) == (0.15, 0.5)
    assert (printed["data"]["img_size"], printed["data"]["patch_size"]) == (64, 8)  # tiny's, from the preset
    assert printed["engine"]["micro_batches_per_step"] == printed["engine"]["grad_accum"] == 1
    assert None not in (flat["batch_images"], flat["lr"], flat["warmup_steps"], flat["num_workers"])


def test_an_older_runs_flat_run_config_replays_and_resumes_its_checkpoints(tmp_path):
    path = _write_run_config(tmp_path / "run_config.json", FLAT_RUN_ARGS)
    replayed = parse("--config", path).resolved("cpu")
    assert flat_values(replayed) == {**flat_values(PretrainConfig().resolved("cpu")), **FLAT_RUN_ARGS,
                                     "ds_config": replayed.engine.ds_config, "micro_batches_per_step": 1,
                                     "grad_accum": 1, "overwrite": False}
    assert PretrainConfig.from_dict(FLAT_RUN_ARGS) == tree_from_dict(PretrainConfig, FLAT_RUN_ARGS)

    # What its checkpoints recorded (the loop's meta of then): the flat settings' preset, layout, model.
    model = BEiT3Config.from_preset("tiny", layout="paper", drop_path_rate=0.1, vocab_size=96,
                                    subln_init_scale=True).to_dict()
    meta = {"step": 2, "preset": "tiny", "layout": "paper", "patch_aggregation": False, "model": model,
            "num_visual_tokens": 256, "micro_batches_per_step": 1}
    check_same_run("ckpt", meta, resume_identity(replayed))  # passes
    other = parse("--config", path, "--layout", "released").resolved("cpu")
    with pytest.raises(CheckpointError, match="layout 'paper' in the checkpoint, 'released' now"):
        check_same_run("ckpt", meta, resume_identity(other))


@pytest.mark.parametrize("content, message", [
    ('{"args": {"steps": 5, "stepz": 6}}', "no field(s) ['stepz']"),
    ('{"args": {"optim": {"steps": 5, "stepz": 6}}}', "no field(s) ['optim.stepz']"),
    ('{"args": {"optim": {"steps": 5}, "steps": 6}}', "is given twice"),
    ('{"args": {"crop_scale": [0.9, 0.2]}}', "--crop-scale 0.9 0.2: the smallest area comes first"),
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


# -- the global batch: one knob -------------------------------------------------------------------
def _ds(tmp_path, **values) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                "train_batch_size": "auto", "zero_optimization": {"stage": 2}, **values}))
    return str(path)


def test_micro_batches_per_step_is_the_one_knob_of_the_global_batch(tmp_path):
    small = ("--batch-images", "2", "--batch-texts", "2", "--batch-pairs", "2", "--output", str(tmp_path / "o"))
    cfg = parse("--micro-batches-per-step", "8", "--deepspeed", _ds(tmp_path), *small).resolved("cpu", world_size=2)
    assert (cfg.engine.micro_batches_per_step, cfg.engine.grad_accum) == (8, 4)
    ds = cfg.check(world_size=2)  # the DeepSpeed config's "auto" values, filled from the knob
    assert (ds["gradient_accumulation_steps"], ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"]) == \
        (4, 6, 6 * 4 * 2)
    per_rank = parse("--grad-accum", "3", *small).resolved("cpu", world_size=2)  # the per-rank spelling
    assert (per_rank.engine.micro_batches_per_step, per_rank.engine.grad_accum) == (6, 3)
    default = parse(*small).resolved("cpu", world_size=4)  # one micro-batch per rank
    assert (default.engine.micro_batches_per_step, default.engine.grad_accum) == (4, 1)
    agreeing = parse("--grad-accum", "4", "--deepspeed", _ds(tmp_path, gradient_accumulation_steps=4), *small)
    assert agreeing.resolved("cpu").check(1)["gradient_accumulation_steps"] == 4  # an explicit value that agrees


def test_a_replay_keeps_the_global_batch_on_another_number_of_ranks(tmp_path):
    run = parse("--micro-batches-per-step", "4").resolved("cpu", world_size=2)  # recorded: 4 in all, 2 per rank
    path = _write_run_config(tmp_path / "run_config.json", run.to_dict())
    on_four = parse("--config", path).resolved("cpu", world_size=4)
    assert (on_four.engine.micro_batches_per_step, on_four.engine.grad_accum) == (4, 1)
    # a flag of either spelling replaces the file's knob (instead of contradicting it)
    assert parse("--config", path, "--grad-accum", "3").resolved("cpu", world_size=4).engine.micro_batches_per_step \
        == 12
    assert parse("--config", path, "--micro-batches-per-step", "8").resolved("cpu", world_size=4).engine.grad_accum \
        == 2


@pytest.mark.parametrize("flags, ds, world, message", [
    (["--micro-batches-per-step", "4", "--grad-accum", "1"], {}, "2",
     "--grad-accum 1 but --micro-batches-per-step 4 on 2 ranks means 2: give one of them"),
    (["--micro-batches-per-step", "3"], {}, "2", "--micro-batches-per-step 3 is not a multiple of the 2 ranks"),
    ([], {"gradient_accumulation_steps": 4}, "1",
     "gradient_accumulation_steps=4 but --micro-batches-per-step 1 on 1 rank(s) accumulates 1 micro-batches per "
     "rank; set it to \"auto\""),
    (["--grad-accum", "2"], {"train_batch_size": 24}, "1",
     "train_batch_size=24 but micro-batch 6 x grad-accum 2 x 1 ranks = 12"),
])
def test_a_conflicting_accumulation_is_refused_in_one_line_before_any_work(tmp_path, capsys, monkeypatch, flags,
                                                                             ds, world, message):
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setattr(pretrain_cli, "PretrainRun", None)  # a run that was not refused fails at once
    out = tmp_path / "out"
    rc = pretrain_main(["--batch-images", "2", "--batch-texts", "2", "--batch-pairs", "2", "--output", str(out),
                        "--deepspeed", _ds(tmp_path, **ds), *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


# -- the generator --------------------------------------------------------------------------------
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


def test_flag_generator_walks_nested_settings():
    @dataclass
    class Inner:
        rate: float = setting(0.5, "a rate", ge=0, le=1)
        folder: Optional[str] = setting(None, "renamed", name="where")
        size: int = setting(8, ge=1, flag=False)

    @dataclass
    class Outer:
        steps: int = setting(3, ge=1)
        inner: Inner = part(Inner, "the inner part")

    ap = argparse.ArgumentParser()
    add_dataclass_flags(ap, Outer)
    ns = ap.parse_args(["--rate", "0.25", "--where", "x", "--steps", "4"])
    assert given(ns, Outer) == {"rate": 0.25, "where": "x", "steps": 4}
    built = tree_from_dict(Outer, given(ns, Outer))
    assert built == Outer(steps=4, inner=Inner(rate=0.25, folder="x"))
    assert tree_from_dict(Outer, {"inner": {"rate": 0.25, "folder": "x"}, "steps": 4}) == built  # nested
    assert any(g.title == "inner: the inner part" for g in ap._action_groups)
    with pytest.raises(SystemExit):
        ap.parse_args(["--size", "3"])  # no flag
    with pytest.raises(ValueError, match=r"--rate must be in \[0, 1\], got 2"):
        tree_from_dict(Outer, {"rate": 2})

    @dataclass
    class Twice:
        steps: int = setting(3, ge=1)
        outer: Outer = part(Outer)
    with pytest.raises(TypeError, match="two settings named 'steps'"):
        add_dataclass_flags(argparse.ArgumentParser(), Twice)
