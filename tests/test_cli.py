"""The ``beit3`` console script: every command reaches its module's ``main`` and its own help, and
mistakes exit 2 with a line that names them. In-process: the dispatcher is a dict and an import, and
a subprocess would spend its time importing torch."""
import importlib
import os
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
    import beit3.data.shards
    import beit3.weights.hub
    import beit3.cli.predict
    seen = []
    monkeypatch.setattr(beit3.cli.predict, "main", lambda argv: seen.append(("predict", argv)) or 7)
    monkeypatch.setattr(beit3.weights.hub, "list_main", lambda argv: seen.append(("list", argv)))
    monkeypatch.setattr(beit3.data.shards, "main", lambda argv: seen.append(("shards", argv)) or 0)
    assert main(["predict", "--image", "a b.png", "--top-k", "3"]) == 7
    assert main(["list-models", "--task", "vqa"]) == 0  # None -> 0
    assert main(["data", "shards", "--images", "x"]) == 0
    assert seen == [("predict", ["--image", "a b.png", "--top-k", "3"]), ("list", ["--task", "vqa"]),
                    ("shards", ["--images", "x"])]


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
