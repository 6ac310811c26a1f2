"""The ``beit3`` console script: every command reaches its module's ``main`` and its own help, and
mistakes exit 2 with a line that names them. In-process: the dispatcher is a dict and an import, and
a subprocess would spend its time importing torch."""
import importlib
import os
import runpy
import sys

import pytest

from beit3.cli import COMMANDS, DATA_COMMANDS, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED = ["info", "pretrain", "train-tokenizer", "data", "export", "finetune", "evaluate", "predict",
            "embed", "search", "benchmark", "list-models", "download"]
EXPECTED_DATA = ["synthetic", "shards", "downstream", "spm", "cifar"]


def _target(module: str):
    name, _, func = module.partition(":")
    return getattr(importlib.import_module(name), func or "main")


def test_every_command_resolves_to_a_callable_main():
    assert list(COMMANDS) == EXPECTED and list(DATA_COMMANDS) == EXPECTED_DATA
    for cmd, (module, _) in COMMANDS.items():
        if cmd != "data":
            assert callable(_target(module)), cmd
    for module in DATA_COMMANDS.values():
        assert callable(_target(module)), module
    assert COMMANDS["data"][0] is None  # a second level, dispatched through DATA_COMMANDS


@pytest.mark.parametrize("argv", [[], ["-h"], ["--help"]], ids=["bare", "-h", "--help"])
def test_usage_lists_every_command_with_its_help(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: beit3 <command> [options]")
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert listed == EXPECTED
    for cmd, (_, help_) in COMMANDS.items():
        assert f"  {cmd:<16}{help_}" in out


def test_version(capsys):
    from beit3 import __version__
    assert main(["--version"]) == 0 and capsys.readouterr().out == f"beit3 {__version__}\n"
    assert main(["-V"]) == 0 and capsys.readouterr().out == f"beit3 {__version__}\n"


@pytest.mark.parametrize("argv", [[c] for c in EXPECTED if c != "data"] + [["data", d] for d in EXPECTED_DATA],
                         ids=lambda a: " ".join(a))
def test_each_command_prints_its_own_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: beit3 {' '.join(argv)} "), out[:200]
    assert "-h, --help" in out


def test_the_rest_of_the_line_reaches_the_command(monkeypatch):
    """The dispatcher strips the command words and passes the rest as they were; the command's
    return value becomes the exit status."""
    import beit3.cli.data
    import beit3.cli.list_models
    import beit3.cli.predict
    seen = []
    monkeypatch.setattr(beit3.cli.predict, "main", lambda argv: seen.append(("predict", argv)) or 7)
    monkeypatch.setattr(beit3.cli.list_models, "main", lambda argv: seen.append(("list", argv)))
    monkeypatch.setattr(beit3.cli.data, "shards_main", lambda argv: seen.append(("shards", argv)) or 0)
    assert main(["predict", "--image", "a b.png", "--top-k", "3"]) == 7
    assert main(["list-models", "--task", "vqa"]) == 0  # None -> 0
    assert main(["data", "shards", "--images", "x"]) == 0
    assert seen == [("predict", ["--image", "a b.png", "--top-k", "3"]), ("list", ["--task", "vqa"]),
                    ("shards", ["--images", "x"])]


@pytest.mark.parametrize("flag", [["--local_rank=3"], ["--local_rank", "3"], ["--local-rank=3"]], ids=" ".join)
def test_a_launchers_local_rank_before_the_command_is_passed_on(flag, monkeypatch):
    """DeepSpeed's launcher runs ``python -u -m beit3 --local_rank=N finetune ...``: the flag comes
    before the command, which gets it first, and the commands that launchers start accept it."""
    import beit3.cli.finetune
    from beit3.cli import benchmark, finetune
    seen = []
    monkeypatch.setattr(beit3.cli.finetune, "main", lambda argv: seen.append(argv) or 0)
    assert main([*flag, "finetune", "--task", "vqa"]) == 0
    assert seen == [[*flag, "--task", "vqa"]]
    assert finetune.build_parser().parse_args([*flag, "--task", "vqa"]).local_rank == 3
    assert benchmark.build_parser().parse_args(flag).local_rank == 3


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy, on imported modules
def test_python_m_beit3_runs_the_command_with_the_launchers_flag(monkeypatch, capsys):
    """``python -m beit3`` is the dispatcher (here run in-process, as runpy runs it), flag included:
    the command itself parses the line and reports the bad setting."""
    monkeypatch.setattr(sys, "argv", ["beit3", "--local_rank=0", "benchmark", "--num-visual-tokens", "0"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("beit3", run_name="__main__")
    assert e.value.code == 2
    assert capsys.readouterr().err == "beit3 benchmark: error: --num-visual-tokens must be >= 1, got 0\n"


COMMAND_MODULES = sorted({m.partition(":")[0] for m, _ in COMMANDS.values() if m} - {"beit3.cli.embed"})


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
@pytest.mark.parametrize("module", [*COMMAND_MODULES, "beit3.cli.data", "beit3.cli"])
def test_python_m_each_command_module_prints_its_help(module, monkeypatch, capsys):
    """``python -m beit3.cli.<command> --help`` (``python -m beit3.cli.data shards --help``,
    ``python -m beit3.cli embed --help``): what ``torchrun``/``deepspeed ... -m`` launch."""
    words = {"beit3.cli.data": ["shards"], "beit3.cli": ["embed"]}.get(module, [])
    monkeypatch.setattr(sys, "argv", [module, *words, "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module(module, run_name="__main__")
    assert e.value.code == 0
    command = {"beit3.cli.data": "data shards", "beit3.cli": "embed"}.get(module)
    command = command or next(c for c, (m, _) in COMMANDS.items() if m and m.partition(":")[0] == module)
    assert capsys.readouterr().out.startswith(f"usage: beit3 {command} ")


def test_the_public_api_names_resolve_at_import():
    """Every name of ``beit3.__all__`` is there after ``import beit3`` (``beit3.backbones`` is
    ``beit3.weights.backbones``)."""
    import beit3
    import beit3.weights.backbones
    assert [n for n in beit3.__all__ if not hasattr(beit3, n)] == []
    assert beit3.backbones is beit3.weights.backbones


def test_unknown_command_exits_2_naming_it(capsys):
    assert main(["pretrian", "--steps", "5"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("beit3: unknown command 'pretrian'\n")
    assert "  pretrain" in err  # followed by the usage, so the right spelling is on screen


@pytest.mark.parametrize("argv", [["data"], ["data", "tfrecords"]], ids=["missing", "unknown"])
def test_data_without_a_known_step_exits_2_with_the_choices(argv, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err == "usage: beit3 data {synthetic,shards,downstream,spm,cifar} [options]\n"


def test_the_console_script_exits_with_mains_status(capsys):
    """pyproject's ``beit3`` script is ``sys.exit(beit3.cli:main())``, as pip's generated wrapper
    runs it (``python -m beit3.cli`` does the same): a mistake is exit status 2 for the shell."""
    with open(os.path.join(ROOT, "pyproject.toml")) as f:  # no tomllib before Python 3.11
        scripts = f.read().split("[project.scripts]\n", 1)[1].split("\n\n", 1)[0]
    assert scripts == 'beit3 = "beit3.cli:main"'
    entry = _target("beit3.cli:main")
    argv = sys.argv
    try:
        sys.argv = ["beit3", "frobnicate"]  # main() with no arguments reads the command line
        with pytest.raises(SystemExit) as e:
            sys.exit(entry())
    finally:
        sys.argv = argv
    assert e.value.code == 2 and capsys.readouterr().err.startswith("beit3: unknown command 'frobnicate'")
