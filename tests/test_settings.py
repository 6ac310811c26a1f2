"""Every job's settings: each number declares its valid range beside its definition, and a value of
the wrong type or outside it (from a flag, a --config file or a recipe) stops the command before any
work with one line naming the flag. In-process ``main(argv)`` calls: no subprocess imports."""
from __future__ import annotations

import importlib.util
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

from beit3.cli import benchmark, info, pretrain
from beit3.jobs.benchmark.config import BenchmarkConfig
from beit3.cli import data, embed, evaluate, finetune, predict
from beit3.jobs.finetune.options import RunOptions
from beit3.jobs.finetune.recipes import RECIPES, FinetuneConfig
from beit3.jobs.finetune.run import schedule_steps
from beit3.core.settings import (Range, SettingError, check_values, flag_ranges, flat_values, given, is_number,
                                 leaves, ranges_table)
from beit3.jobs.finetune.evaluate import config_for
from beit3.cli.info import InfoSettings
from beit3.cli import train_tokenizer
from beit3.jobs.tokenizer.config import TokenizerTrainConfig
from beit3.vqkd.vqkd import VQKDConfig
from beit3.trainer.optim import cosine_lr_lambda
from beit3.jobs.pretrain.config import RECIPES as PRETRAIN_RECIPES, PretrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = [PretrainConfig, FinetuneConfig, RunOptions, TokenizerTrainConfig, BenchmarkConfig, InfoSettings]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


init_probe = _script("init_probe")


def _data_step(step: str):
    """``beit3 data <step>``'s parser and entry point, as the other commands' modules hold them."""
    return SimpleNamespace(build_parser=getattr(data, f"{step}_parser"), main=getattr(data, f"{step}_main"))


PARSERS = {"info": info, "pretrain": pretrain, "train-tokenizer": train_tokenizer, "finetune": finetune,
           "evaluate": evaluate, "benchmark": benchmark, **{f"data {s}": _data_step(s) for s in
                                                            ("shards", "spm", "synthetic", "downstream", "cifar")},
           "predict": predict, "embed": SimpleNamespace(build_parser=embed.embed_parser, main=embed.main_embed),
           "search": SimpleNamespace(build_parser=embed.search_parser, main=embed.main_search),
           "scripts/init_probe.py": init_probe}


# -- every number declares its range -------------------------------------------------------------
@pytest.mark.parametrize("cls", SETTINGS, ids=lambda c: c.__name__)
def test_every_number_setting_declares_its_range(cls):
    numbers = [leaf for leaf in leaves(cls).values() if is_number(leaf.tp)]  # a tree's parts too
    assert numbers  # the walk sees them
    assert [leaf.key for leaf in numbers if Range.of(leaf.field.metadata) is None] == []


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_number_flag_declares_its_range_and_shows_it(command):
    parser = PARSERS[command].build_parser()
    ranges = flag_ranges(parser)
    assert [flag for flag, valid in ranges.items() if valid is None] == []
    for action in parser._actions:  # --help shows each range
        valid = getattr(action, "valid", None)
        if valid is not None:
            assert valid.describe() in action.help.replace("%%", "%"), action.option_strings


@pytest.mark.parametrize("command", sorted(set(PARSERS) - {"data cifar"}))  # cifar takes no numbers
def test_docs_list_every_commands_ranges_as_generated(command):
    with open(os.path.join(ROOT, "docs", "settings.md")) as f:
        doc = f.read()
    assert f"### {'' if command.startswith('scripts') else 'beit3 '}{command}\n" in doc
    assert ranges_table(PARSERS[command].build_parser()) in doc


def test_ranges_are_read_and_described():
    assert Range.of({"ge": 0, "lt": 1}).describe() == "in [0, 1)"
    assert Range.of({"gt": 0}).describe() == "> 0" and Range.of({"le": 1}).describe() == "<= 1"
    assert Range.of({"finite": True}).describe() == "a finite number" and Range.of({"help": "x"}) is None
    r = Range(gt=0, le=1)
    assert [r.holds(v) for v in (0, 1e-9, 1, 1.5, math.nan, math.inf)] == [False, True, True, False, False, False]


@pytest.mark.parametrize("values, message", [
    ({"steps": "ten"}, "--steps must be an integer, got 'ten'"),
    ({"steps": 10.0}, "--steps must be an integer, got 10.0"),
    ({"steps": True}, "--steps must be an integer, got True"),
    ({"lr": "1e-3"}, "--lr must be a number, got '1e-3'"),
    ({"lr": math.inf}, "--lr must be > 0, got inf"),
    ({"tensorboard": "yes"}, "--tensorboard must be true or false, got 'yes'"),
    ({"pair_shards": "a.tar"}, "--pair-shards must be a list of strings, got 'a.tar'"),
    ({"seed": None}, "--seed must be given (it cannot be null)"),
    ({"seed": 2**32}, "--seed must be in [0, 4294967296), got 4294967296"),
])
def test_values_of_the_wrong_type_or_range_are_named(values, message):
    with pytest.raises(SettingError) as e:
        check_values(PretrainConfig, values)
    assert str(e.value) == message
    check_values(PretrainConfig, {"lr": 1, "grad_clip": None, "pair_shards": ["a.tar"]})  # int for float; None
    with pytest.raises(SettingError, match=r"--betas must be in \[0, 1\) each, got 0.9, 1"):
        FinetuneConfig(task="vqa", betas=(0.9, 1.0))


def _out_of_range(cls, values: dict) -> list[str]:
    """The settings among ``values`` (flat, by key) whose number lies outside the range it declares."""
    bad = []
    for key, leaf in leaves(cls).items():
        valid, value = Range.of(leaf.field.metadata), values.get(key)
        if valid is None or value is None or not is_number(leaf.tp):
            continue
        if not all(valid.holds(v) for v in (value if isinstance(value, (list, tuple)) else [value])):
            bad.append(key)
    return bad


def test_every_recipe_is_within_the_ranges():
    for name, values in RECIPES.items():
        cfg = FinetuneConfig(**values)  # would raise on a value outside its range
        assert cfg.task == values["task"] and _out_of_range(FinetuneConfig, vars(cfg)) == [], name
    for name in PRETRAIN_RECIPES:
        flat = flat_values(PretrainConfig.from_recipe(name))
        assert _out_of_range(PretrainConfig, flat) == [], name
    # and the check can fail: a value outside its range is found
    assert _out_of_range(FinetuneConfig, {**vars(FinetuneConfig(task="vqa")), "lr": -1.0}) == ["lr"]


def test_a_recipe_alone_sets_the_task_and_the_flags_go_on_top():
    """``--recipe NAME`` without ``--task`` (the docs' launches) fine-tunes and evaluates the
    recipe's task, with the flags given on top."""
    args = finetune.build_parser().parse_args(["--recipe", "retrieval-tiny", "--lr", "2e-4"])
    cfg = finetune.resolve_config(args)
    assert (cfg.task, cfg.lr, cfg.epochs) == ("retrieval", 2e-4, RECIPES["retrieval-tiny"]["epochs"])
    args = evaluate.build_parser().parse_args(["--checkpoint", "x", "--recipe", "nlvr2-tiny", "--batch-size", "3"])
    cfg = config_for({}, args.task, args.recipe, given(args, FinetuneConfig))
    assert (cfg.task, cfg.batch_size) == ("nlvr2", 3)


# -- one line naming the flag, exit 2, before any work ---------------------------------------------
def _tokenizer_files(root) -> dict[str, str]:
    """A zero-byte and a truncated trained-tokenizer folder, and a pickle that runs code when loaded."""
    from safetensors.torch import save_file

    class Planted:
        def __reduce__(self):
            return (os.system, ("touch " + str(root / "ran"),))
    out = {}
    for name in ("empty", "truncated"):
        os.makedirs(root / name)
        out[name] = str(root / name)
    save_file({"w": torch.zeros(64, 64)}, str(root / "truncated" / "model.safetensors"))
    data = (root / "truncated" / "model.safetensors").read_bytes()
    (root / "truncated" / "model.safetensors").write_bytes(data[:len(data) // 2])
    (root / "empty" / "model.safetensors").write_bytes(b"")
    for name in ("empty", "truncated"):  # as train-tokenizer writes it
        (root / name / "tokenizer_config.json").write_text(json.dumps(VQKDConfig.from_preset("tiny").to_dict()))
    torch.save({"encoder.pos_embed": Planted()}, str(root / "planted.pth"))
    out["pickle"] = str(root / "planted.pth")
    return out


def _case_files(tmp_path) -> dict[str, str]:
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "ten.json").write_text(json.dumps({"steps": "ten"}))
    (tmp_path / "teacher.pth").write_bytes(b"")
    os.makedirs(tmp_path / "images")
    (tmp_path / "texts.txt").write_text("a line\n")
    return {**_tokenizer_files(tmp_path), "list": str(tmp_path / "list.json"), "ten": str(tmp_path / "ten.json"),
            "teacher": str(tmp_path / "teacher.pth"), "images": str(tmp_path / "images"),
            "texts": str(tmp_path / "texts.txt")}


CASES = [  # (command, argv with {file} placeholders, what the line must say)
    ("pretrain", ["--weight-decay", "-1"], "--weight-decay must be >= 0, got -1"),
    ("pretrain", ["--warmup-steps", "-5"], "--warmup-steps must be >= 0, got -5"),
    ("pretrain", ["--min-lr-ratio", "-1"], "--min-lr-ratio must be in [0, 1], got -1"),
    ("pretrain", ["--max-text-len", "100000"], "--max-text-len 100000: the tiny preset's text position table "
                                               "holds 1022 tokens"),
    ("pretrain", ["--keep-last", "-1"], "--keep-last must be >= 0, got -1"),
    ("pretrain", ["--grad-clip", "-1"], "--grad-clip must be >= 0, got -1"),
    ("pretrain", ["--stop-after-steps", "0"], "--stop-after-steps must be >= 1, got 0"),
    ("pretrain", ["--grad-accum", "0"], "--grad-accum must be >= 1, got 0"),
    ("pretrain", ["--lr", "nan"], "--lr must be > 0, got nan"),
    ("pretrain", ["--ds-config", "{list}"], "{list}' holds a JSON list, not an object of settings"),
    ("pretrain", ["--config", "{ten}"], "--config {ten}: \"steps\" must be an integer, got 'ten'"),
    ("pretrain", ["--tokenizer", "{empty}"], "{empty}/model.safetensors (0 bytes): not a complete safetensors "
                                             "file (empty file)"),
    ("pretrain", ["--tokenizer", "{truncated}"], "{truncated}/model.safetensors ("),
    ("pretrain", ["--tokenizer", "{pickle}", "--tokenizer-preset", "tiny"],
     "holds pickled Python objects besides tensors; a VQ-KD tokenizer is read as tensors only"),
    ("finetune", ["--task", "vqa", "--eval-every", "0"], "--eval-every must be >= 1, got 0"),
    ("finetune", ["--task", "vqa", "--hflip", "2"], "--hflip must be in [0, 1], got 2"),
    ("finetune", ["--task", "vqa", "--eval-batch-size", "0"], "--eval-batch-size must be >= 1, got 0"),
    ("finetune", ["--task", "vqa", "--log-every", "0"], "--log-every must be >= 1, got 0"),
    ("finetune", ["--task", "vqa", "--label-smoothing", "2"], "--label-smoothing must be in [0, 1), got 2"),
    ("finetune", ["--task", "vqa", "--keep-last", "-1"], "--keep-last must be >= 0, got -1"),
    ("finetune", ["--task", "vqa", "--max-bad-fraction", "1"], "--max-bad-fraction must be in [0, 1), got 1"),
    ("finetune", ["--task", "vqa", "--head-lr-scale", "20"], "--head-lr-scale 20 with --layer-decay 0.9"),
    ("finetune", ["--task", "vqa", "--warmup-epochs", "9"], "--warmup-epochs 9 is longer than --epochs 6"),
    ("evaluate", ["--checkpoint", "{empty}", "--num-workers", "-1"], "--num-workers must be >= 0, got -1"),
    ("info", ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ("info", ["--batch-size", "-1"], "--batch-size must be >= 1, got -1"),
    ("info", ["--text-len", "5000"], "--text-len 5000: the tiny preset's text position table holds 1022 tokens"),
    ("benchmark", ["--num-visual-tokens", "0"], "--num-visual-tokens must be >= 1, got 0"),
    ("train-tokenizer", ["--images", "{images}", "--steps", "2", "--teacher", "vit_tiny_patch16_224",
                         "--teacher-weights", "{teacher}"], "{teacher} (0 bytes): empty file, not the weights of "
                                                            "teacher 'vit_tiny_patch16_224' (--teacher-weights)"),
    ("train-tokenizer", ["--images", "{images}", "--steps", "0"], "--steps must be >= 1, got 0"),
    ("data shards", ["--texts", "{texts}", "--max-bytes", "nan"], "--max-bytes must be > 0, got nan"),
    ("data shards", ["--texts", "{texts}", "--shard-size", "0"], "--shard-size must be >= 1, got 0"),
    ("data spm", ["--input", "{texts}", "--character-coverage", "0"], "--character-coverage must be in (0, 1], got 0"),
    ("data synthetic", ["--image-size", "8"], "--image-size must be >= 32, got 8"),
    ("data downstream", ["all", "--raw", "{images}", "--data-root", "{images}", "--spm", "{texts}",
                         "--min-answer-count", "0"], "--min-answer-count must be >= 1, got 0"),
    ("scripts/init_probe.py", ["--steps", "0"], "--steps must be >= 1, got 0"),
]
if not torch.cuda.is_available():
    CASES.append(("pretrain", ["--device", "cuda"], "--device cuda but no CUDA device is visible"))
    CASES.append(("finetune", ["--task", "vqa", "--device", "cuda"], "--device cuda but no CUDA device is visible"))


@pytest.mark.parametrize("command, argv, message", CASES, ids=[f"{c} {' '.join(a)}" for c, a, _ in CASES])
def test_bad_settings_are_one_line_naming_the_flag_before_any_work(command, argv, message, tmp_path, capsys,
                                                                    monkeypatch):
    files = _case_files(tmp_path)
    out = tmp_path / "out"
    needs_output = command not in ("info", "benchmark", "evaluate", "scripts/init_probe.py")
    argv = [a.format(**files) for a in argv] + (["--output", str(out)] if needs_output else [])
    if command == "data spm":
        argv[-1] = str(out / "spm")
    monkeypatch.chdir(tmp_path)  # a default output folder would land here
    assert PARSERS[command].main(argv) == 2
    err = capsys.readouterr().err
    prog = "init_probe.py" if command.startswith("scripts") else f"beit3 {command}"
    assert err.startswith(f"{prog}: error: ") and len(err.strip().splitlines()) == 1, err
    assert message.format(**files) in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == sorted(["list.json", "ten.json", "teacher.pth", "images", "texts.txt",
                                                   "empty", "truncated", "planted.pth"])  # nothing written
    assert not (tmp_path / "ran").exists()  # the planted pickle never ran


# -- the fine-tuning schedule follows --max-steps ---------------------------------------------------
def test_max_steps_scales_warmup_and_decay_to_the_steps_that_run():
    """20 epochs of 26 steps with 4 of warm-up are 520 steps, 104 of them warm-up; with --max-steps 20
    the warm-up keeps its fifth (4 steps) and the cosine ends at step 20 (before: 20 steps of a
    104-step warm-up, never above 0.2 of the peak)."""
    cfg = FinetuneConfig(task="vqa", epochs=20, warmup_epochs=4, max_steps=20, lr=1e-3, min_lr=1e-5)
    total, warmup, note = schedule_steps(cfg, 26)
    assert (total, warmup) == (20, 4)
    assert note == "--max-steps 20 < the 520 steps of 20 epochs: warm-up (104 -> 4 steps) and cosine decay scaled " \
                   "to 20 steps"
    lr = [1e-3 * cosine_lr_lambda(warmup, total, cfg.min_lr / cfg.lr)(s) for s in range(21)]
    want = [2.5e-4, 5e-4, 7.5e-4, 1e-3] + [1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * t / 16))
                                           for t in range(0, 17)]
    assert lr == pytest.approx(want, rel=1e-12)
    assert lr[19] == pytest.approx(1e-5 + 0.99e-3 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert lr[20] == pytest.approx(1e-5)  # the end of the decay
    assert schedule_steps(cfg.replace(max_steps=None), 26) == (520, 104, None)
    assert schedule_steps(cfg.replace(max_steps=600), 26) == (520, 104, None)  # more than the epochs: no change
