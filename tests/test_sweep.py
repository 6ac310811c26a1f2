"""The project's sweep: bad inputs and faults tried on every command as a careless or unlucky user
would, through the real command line, each in a process of its own (``sweep_harness.ForkServer``).

For every case: the exit code (never 0), exactly one ``beit3 <command>: error: ...`` line on stderr
naming the flag or file at fault, no traceback, an end within the case's time bound (a hang fails the
case; the harness kills it), nothing written where the command was told to write (exit 2: refused
before any work; exit 1: the work began and stopped, leaving at most a run folder's released lock),
and every piece of data the command was aimed at byte-identical afterwards.

Five pieces are built once, through the command line, and aimed at again and again: a finished
pretraining run, a finished fine-tuning run (its ``best/``), a shard set, a saved model and a
downloaded checkpoint, plus damaged copies for the cases that need one. Their digests (every file's
bytes and the file list) are compared after each case aimed at them and once more at the end.

The classes: run folders, shard sets, exports, downloads, network reads (local servers that answer
503, go silent after 1 KiB or trickle), number settings (values that once ran or crashed, then every
number flag of every command just outside its declared range), bad files, predict requests; and a
reading of the source for network reads and waits on programs without a timeout. Run it alone with

    python -m pytest -q tests/test_sweep.py        (~1 minute on 2 idle cores)
"""
from __future__ import annotations

import ast
import csv
import functools
import http.server
import io
import json
import os
import re
import shlex
import shutil
import socket
import tarfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import pytest
import torch
from PIL import Image

from sweep_harness import ForkServer, Result, digest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "beit3_base_patch16_224"  # the downloaded checkpoint's registry name
OTHER = "beit3_large_patch16_224"  # a name the cache does not hold
RUN = ("pretrain --data {shards} --spm {spm} --tokenizer {vqkd} --steps 2 --batch-images 2 --batch-texts 2 "
       "--batch-pairs 2 --save-every 2 --log-every 1 --warmup-steps 1 --no-tensorboard --output {run}")
FINETUNE = ("finetune --task classification --data {world} --spm {spm} --batch-size 2 --max-steps 2 --epochs 1 "
            "--no-tensorboard --output {finetuned}")
ASSETS = " --spm {spm} --tokenizer {vqkd} --output {out}"  # what pretraining on real data needs
QUICK = " --batch-images 0 --batch-texts 0" + ASSETS  # pretraining on pairs alone


# -- local servers -----------------------------------------------------------------------------------
class Net(http.server.BaseHTTPRequestHandler):
    """``/files/<name>``: a file with its length; ``/cut/<name>``: half of it, no length, then the
    connection closes; ``/503/...``: Service Unavailable; ``/stall/...``: 1 KiB, then silence;
    ``/stall-head/...``: silence before the headers; ``/trickle/...``: a byte every 0.1 s;
    ``/img/N.png``: a picture; ``/trickle-img/...``, ``/stall-img/...`` likewise for pictures."""

    files: str
    release: threading.Event
    protocol_version = "HTTP/1.0"  # a body without a length ends when the connection closes

    def log_message(self, *args):
        pass

    def do_GET(self):
        try:
            self.answer()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up: what the cases want
            pass

    def answer(self):
        kind, name = self.path.strip("/").split("/", 1)
        if kind.startswith("503"):
            return self.send_error(503)
        if kind == "stall-head":
            self.release.wait(60)
            return
        body = _png(7) if kind.endswith("img") else \
            open(os.path.join(self.files, name), "rb").read() if kind in ("files", "cut") else TAR
        self.send_response(200)
        if kind != "cut":
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if kind.startswith("stall"):
            self.wfile.write(body[:1024])
            self.wfile.flush()
            self.release.wait(60)
        elif kind.startswith("trickle"):
            for b in body:
                if self.release.wait(0.1):
                    return
                self.wfile.write(bytes([b]))
                self.wfile.flush()
        else:
            self.wfile.write(body[:len(body) // 2] if kind == "cut" else body)


def _tar() -> bytes:
    """A shard whose one member is 4 KiB: a reader given its first 1 KiB waits for the rest."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("000000000.jpg")
        info.size = 4096
        tar.addfile(info, io.BytesIO(_png(3, (64, 64))[:4096].ljust(4096, b"\0")))
    return buf.getvalue()


def _png(seed: int, size=(24, 20)) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


TAR = _tar()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ForkServer(str(tmp_path_factory.mktemp("streams"))) as s:
        yield s


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("sweep")


@pytest.fixture(scope="module")
def net(root):
    release = threading.Event()
    handler = type("Handler", (Net,), {"files": str(root), "release": release})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    release.set()
    httpd.shutdown()


def ok(r: Result) -> Result:
    assert r.code == 0 and not r.timed_out and "Traceback" not in r.err, r
    return r


# -- the pieces ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pieces(server, root, net):
    """(Pieces, {name: path}): the finished pretraining and fine-tuning runs, the shard set, the saved
    model, the download and the tokenizer the run used, built through the command line (the saved
    model and the tokenizer by ``sweep_builders``); their digests taken once."""
    ok(server.run(shlex.split(f"data synthetic --num-images 12 --shards-per-kind 1 --output {root}/world")))
    spm = f"{root}/world/spm/synthetic.model"
    ok(server.run([str(root), spm], entry="sweep_builders:build"))
    ok(server.run(shlex.split(f"data downstream imagenet --raw {root}/world/classification --data-root {root}/world")))
    for name in (NAME, OTHER):  # what the local mirror serves
        shutil.copy(f"{root}/official.pth", f"{root}/{name}.pth")
    paths = {"shards": f"{root}/world/shards", "spm": spm, "vqkd": f"{root}/vqkd", "run": f"{root}/run",
             "saved": f"{root}/saved", "cache": f"{root}/cache", "world": f"{root}/world",
             "finetuned": f"{root}/finetuned"}
    # Without a progress bar (TQDM_DISABLE=1 once made every run a traceback), as a batch job would log;
    # in an interpreter of its own: tqdm reads the variable when it is imported.
    r = ok(server.run([a.format(**paths) for a in shlex.split(RUN)], env={"TQDM_DISABLE": "1"}, timeout=120,
                      fresh=True))
    assert "it/s" not in r.err and "wrote " in r.err + r.out, r
    assert os.path.isfile(f"{root}/run/checkpoints/step_00000002/COMPLETE")
    ok(server.run([a.format(**paths) for a in shlex.split(FINETUNE)], timeout=120))
    assert os.path.isfile(f"{root}/finetuned/best/model.safetensors")
    ok(server.run(["download", NAME], env={"BEIT3_CACHE": paths["cache"], "BEIT3_MIRROR": f"{net}/files"}))
    paths["dl"] = f"{root}/cache/checkpoints/{NAME}.pth"
    assert open(paths["dl"], "rb").read() == open(f"{root}/{NAME}.pth", "rb").read()
    return Pieces({k: paths[k] for k in ("run", "finetuned", "shards", "saved", "dl", "vqkd")}), paths


class Pieces:
    """Data the sweep aims at, with the digest each must keep."""

    def __init__(self, paths: dict):
        self.paths, self.digests = {}, {}
        for name, path in paths.items():
            self.add(name, path)

    def add(self, name: str, path: str) -> str:
        self.paths[name] = path
        self.digests[name] = _digest(path)
        return path

    def changed(self, names) -> list[str]:
        return [n for n in names if _digest(self.paths[n]) != self.digests[n]]


def _digest(path: str) -> dict:
    return {**digest(path), "a .part beside it": os.path.exists(path + ".part")}


# -- bad inputs and damaged copies ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def places(pieces, root, net):
    """Every placeholder a case may name: the pieces, damaged copies of them (each a piece too),
    the bad input files of ``{bad}``, the local servers' addresses."""
    aimed, paths = pieces
    bad = root / "bad"
    bad.mkdir()
    _bad_files(bad, paths)
    places = {**paths, "bad": str(bad), "net": net, "texts": str(bad / "texts.txt"), "final": f"{paths['run']}/final",
              "images": f"{root}/world/images/train", "p0": str(bad / "p0.png"),
              "closed": f"http://127.0.0.1:{_closed_port()}", "root": str(root)}
    for name, path in _damaged_copies(root, paths).items():
        places[name] = aimed.add(name, path)
    return places


def _bad_files(bad, paths) -> None:
    (bad / "empty_dir").mkdir()
    (bad / "imgs").mkdir()
    (bad / "imgs" / "a.png").write_bytes(_png(0))
    (bad / "p0.png").write_bytes(_png(1, (40, 56)))
    (bad / "notimages").mkdir()
    (bad / "notimages" / "a.png").write_bytes(b"not an image at all")
    (bad / "undecodable").mkdir()
    (bad / "undecodable" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (bad / "zero.txt").write_bytes(b"")
    (bad / "texts.txt").write_text("a red circle\n")
    (bad / "latin1-only.txt").write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    (bad / "cut.json").write_text('{"images": [{"filename": "a.png", "sentences": [{"raw": "a"}')
    (bad / "karpathy.json").write_text(json.dumps({"images": [
        {"filepath": "imgs", "filename": "a.png", "sentences": [{"raw": "x"}]},
        {"filepath": "imgs", "sentences": [{"raw": "no file name"}]}]}))
    (bad / "coco.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "imgs/a.png"},
                                                          {"file_name": "imgs/b.jpg"}],
                                               "annotations": [{"image_id": 1, "caption": "a"}]}))
    (bad / "nocaption.csv").write_text("url,title\nimgs/a.png,a red circle\n")
    (bad / "latin1.csv").write_bytes("url,caption\nimgs/a.png,a red circle\nimgs/a.png,caf\u00e9\n".encode("latin-1"))
    (bad / "notjson.jsonl").write_text("{image: a.png}\nnot json either\n")
    (bad / "list.json").write_text("[1, 2]")
    (bad / "ten.json").write_text(json.dumps({"steps": "ten"}))
    (bad / "garbled.json").write_text('{"steps": 2,')
    (bad / "teacher.pth").write_bytes(b"")
    (bad / "zero.pth").write_bytes(b"")
    (bad / "text.pth").write_text("these are not weights\n" * 20)
    (bad / "random.pth").write_bytes(np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes())
    weights = open(f"{paths['saved']}/model.safetensors", "rb").read()
    (bad / "cut.safetensors").write_bytes(weights[:len(weights) // 2])
    os.symlink(paths["saved"], bad / "link-to-saved")
    shutil.copytree(f"{os.path.dirname(paths['shards'])}/classification", bad / "cifar")
    (bad / "cifar" / "train" / os.listdir(bad / "cifar" / "train")[0] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    for name, content in {"utf16": '{"image": "p0.png"}\n'.encode("utf-16"),
                          "many": b'{"image": "p0.png", "top_k": "many"}\n',
                          "negative": b'{"image": "p0.png", "top_k": -1}\n', "numbers": b'{"images": [1, 2]}\n',
                          "unknown": b'{"image": "p0.png", "colour": "red"}\n', "broken": b'{"image": "p0.png"\n',
                          "array": b'["p0.png"]\n', "missing": b'{"image": "nowhere.png"}\n',
                          "textimage": b'{"image": "texts.txt"}\n'}.items():
        (bad / f"{name}.jsonl").write_bytes(content)


def _damaged_copies(root, paths) -> dict:
    """A run whose optimizer file has 4 KiB of noise (same size), shard sets with a nameless entry and
    a garbled manifest, saved models that do not hold together, VQ-KD folders with empty or cut weights."""
    out = {}
    run = shutil.copytree(paths["run"], root / "corrupt_run", symlinks=True)
    ckpt = run / "checkpoints" / "step_00000002"
    optim = next(ckpt / n for n in os.listdir(ckpt) if n.endswith("optim_states.pt"))
    with open(optim, "r+b") as f:
        f.seek(os.path.getsize(optim) // 2 - 2048)
        f.write(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    out["corrupt_run"] = str(run)
    out["weights_only_run"] = str(shutil.copytree(paths["run"], root / "weights_only_run",
                                                  ignore=shutil.ignore_patterns("checkpoints")))
    for name, change in {"nameless_shards": lambda m: m["kinds"]["pairs"]["shards"][0].pop("name"),
                         "garbled_shards": None}.items():
        copy = shutil.copytree(paths["shards"], root / name)
        if change is None:
            (copy / "manifest.json").write_text('{"format": 1, "kinds": {')
        else:
            manifest = json.loads((copy / "manifest.json").read_text())
            change(manifest)
            (copy / "manifest.json").write_text(json.dumps(manifest))
        out[name] = str(copy)
    for name, change in {"no_model": lambda c: c.pop("model"), "no_preprocess": lambda c: c.pop("preprocess"),
                         "wrong_labels": lambda c: c.update(labels=["a", "b", "c"]), "bad_spm": None,
                         "empty_weights": None, "cut_weights": None}.items():
        copy = shutil.copytree(paths["saved"], root / name)
        if change is not None:
            config = json.loads((copy / "config.json").read_text())
            change(config)
            (copy / "config.json").write_text(json.dumps(config))
        out[name] = str(copy)
    (root / "bad_spm" / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    weights = (root / "saved" / "model.safetensors").read_bytes()
    (root / "empty_weights" / "model.safetensors").write_bytes(b"")
    (root / "cut_weights" / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    for name in ("tok_empty", "tok_cut"):
        copy = shutil.copytree(paths["vqkd"], root / name)
        data = (copy / "model.safetensors").read_bytes()
        (copy / "model.safetensors").write_bytes(b"" if name == "tok_empty" else data[:len(data) // 2])
        out[name] = str(copy)
    return out


def _closed_port() -> int:
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- one case ---------------------------------------------------------------------------------------------
@dataclass
class Case:
    argv: str  # the command line after ``beit3``, with {placeholders}
    code: int  # the exit code (1 or 2)
    says: tuple = ()  # what the error line holds
    aims: tuple = ()  # pieces it is aimed at: byte-identical afterwards
    env: dict = field(default_factory=dict)
    bound: float = 30.0  # seconds: a command still running then is a hang
    quiet: bool = True  # stderr holds the error line alone (else: also what the work logged before)
    after: Optional[Callable[[dict], None]] = None  # further checks, given the places
    entry: Optional[str] = None  # a script instead of the console script

    @property
    def prog(self) -> str:
        if self.entry:  # a script under scripts/, or the harness's own fake commands
            return os.path.basename(self.entry) if self.entry.startswith("script:") else "beit3 fake"
        words = self.argv.split()
        return "beit3 " + " ".join(words[:2] if words[0] == "data" else words[:1])


def ids(cases) -> list[str]:
    return [re.sub(r"\{(\w+)\}", r"\1", c.argv)[:80] for c in cases]


RAW_EXCEPTION = re.compile(r"^\s*[\w.]*(Error|Exception|Exit|Interrupt)\b.*:", re.M)


def error_line(r: Result, prog: str, quiet: bool) -> str:
    """The one ``<prog>: error:`` line of stderr; argparse's usage may come before it, and with
    ``quiet`` nothing else may."""
    lines = [line for line in r.err.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if ": error:" in line]
    assert len(errors) == 1 and lines[errors[0]].startswith(f"{prog}: error: "), r
    assert "Traceback" not in r.err and not RAW_EXCEPTION.search(r.err), r
    if quiet:
        rest = lines[:errors[0]] + lines[errors[0] + 1:]
        usage = rest and rest[0].startswith("usage: ") and all(line.startswith(" ") for line in rest[1:])
        assert not rest or usage, r
    return lines[errors[0]]


def sweep(server: ForkServer, places: dict, pieces, case: Case, out: str) -> Result:
    """Run one failing case; assert its exit, its line, its bound, what it left at ``out`` and that
    the pieces it aims at are as they were."""
    fill = {**places, "out": out}
    argv = [word.format(**fill) for word in shlex.split(case.argv)]
    env = {k: v if v is None else v.format(**fill) for k, v in case.env.items()}
    r = server.run(argv, env=env, cwd=places["root"], timeout=case.bound, entry=case.entry)
    assert not r.timed_out, f"still running after {case.bound} s (killed): {r}"
    assert r.code == case.code != 0, r
    line = error_line(r, case.prog, case.quiet)
    for text in case.says:
        assert text.format(**fill) in line, (text.format(**fill), line)
    # exit 2: refused before any work, nothing written; exit 1: the work began and stopped, which may
    # leave the output folder of a run holding its released (empty) lock and the run.log that records
    # the error (neither makes the folder a run that a next start must resume or replace)
    left = sorted(os.listdir(out)) if os.path.isdir(out) else [out] if os.path.exists(out) else None
    assert left is None or (case.code == 1 and left in ([], [".lock"], [".lock", "run.log"])), \
        f"{out} was written: {left}"
    assert not left or ".lock" not in left or os.path.getsize(os.path.join(out, ".lock")) == 0
    if left and "run.log" in left:
        with open(os.path.join(out, "run.log")) as f:
            assert line.split(": error: ", 1)[1] in f.read(), line
    assert pieces.changed(case.aims) == [], r
    if case.after:
        case.after(fill)
    return r


@pytest.fixture
def check(server, places, pieces, tmp_path):
    return functools.partial(sweep, server, places, pieces[0], out=str(tmp_path / "out"))


# -- run folders ---------------------------------------------------------------------------------------
RUN_FOLDERS = [
    Case(RUN, 1, ("{run} holds a run (checkpoint checkpoints/step_00000002, final/, run_config.json, metrics.jsonl)",
                  "--resume auto", "--overwrite"), aims=("run",), quiet=False),
    Case(RUN + " --overwrite --resume auto", 1, ("--overwrite", "--resume auto", "give one"), aims=("run",),
         quiet=False),
    Case("pretrain --config {run}/run_config.json", 1, ("{run} holds a run",), aims=("run",), quiet=False),
    Case(RUN + " --resume auto --layout released", 1, ("belongs to another run", "layout"), aims=("run",),
         quiet=False),
    Case(RUN.replace("{run}", "{corrupt_run}") + " --resume auto --steps 3", 1,
         ("is damaged", "optim_states.pt does not hold the bytes written (crc32:"), aims=("corrupt_run",),
         quiet=False),
    Case(RUN.replace("{run}", "{weights_only_run}") + " --resume auto", 1,
         ("--resume auto: {weights_only_run} holds final/", "but no complete checkpoint"), aims=("weights_only_run",),
         quiet=False),
    Case(RUN + " --resume {run}/checkpoints/step_00000099", 2, ("--resume", "no such checkpoint directory"),
         aims=("run",)),
    Case("finetune --task classification --data {world} --spm {spm} --output {run}", 1, ("{run} holds a run",),
         aims=("run",), quiet=False),
    Case("train-tokenizer --images {images} --steps 2 --output {run}", 2, ("{run} holds a run",), aims=("run",)),
    Case("train-tokenizer --images {images} --steps 2 --output {vqkd}", 2, ("{vqkd} holds a run",
                                                                            "model.safetensors"), aims=("vqkd",)),
    Case("export --to timm {final} -o {run}", 2, ("-o/--output {run} contains the input {final}",), aims=("run",)),
    Case("export --to safetensors {final}/model.safetensors -o {final}/model.safetensors", 2,
         ("is the input",), aims=("run",)),
    Case("predict {final} --image {p0}", 2, ("backbone",), aims=("run",)),
    # a finished fine-tuning run: the same command again once replaced its best/
    Case(FINETUNE, 1, ("{finetuned} holds a run (checkpoint checkpoints/step_00000002, best/, run_config.json, "
                       "metrics.jsonl)", "--resume auto", "--overwrite"), aims=("finetuned",), quiet=False),
    Case(FINETUNE + " --overwrite --resume auto", 1, ("give one",), aims=("finetuned",), quiet=False),
    Case(RUN.replace("{run}", "{finetuned}"), 1, ("{finetuned} holds a run",), aims=("finetuned",), quiet=False),
    Case("export --to timm {finetuned}/best -o {finetuned}/best", 2, ("is the input",), aims=("finetuned",)),
]


@pytest.mark.parametrize("case", RUN_FOLDERS, ids=ids(RUN_FOLDERS))
def test_run_folders(check, case):
    check(case)


# -- shard sets -----------------------------------------------------------------------------------------
SHARD_SETS = [
    Case("data shards --images {bad}/empty_dir --output {shards}", 2, ("empty_dir: no .jpg/.jpeg/.png/.webp files",)),
    Case("data shards --texts {bad}/zero.txt --output {shards}", 2, ("zero.txt (0 bytes): an empty file",)),
    Case("data shards --captions {bad}/cut.json --output {shards}", 2, ("cut.json (60 bytes): not valid JSON",)),
    Case("data shards --captions {bad}/karpathy.json --output {shards}", 2,
         ("karpathy.json: images[1] has no 'filename'",)),
    Case("data shards --captions {bad}/coco.json --output {shards}", 2, ("coco.json: images[1] has no 'id'",)),
    Case("data shards --captions {bad}/nocaption.csv --output {shards}", 2, ("nocaption.csv: no caption column",)),
    Case("data shards --captions {bad}/latin1.csv --output {shards}", 2, ("latin1.csv: line 3 is not UTF-8 text",)),
    Case("data shards --captions {bad}/notjson.jsonl --output {shards}", 2,
         ("no pairs samples in {bad}/notjson.jsonl (2 inputs skipped); nothing written",), quiet=False),
    Case("data shards --images {bad}/notimages --output {shards}", 2,
         ("no images samples in {bad}/notimages (1 inputs skipped); nothing written",), quiet=False),
    Case("data shards --texts {bad}/latin1-only.txt --output {shards}", 2, ("no texts samples in", "latin1-only.txt"),
         quiet=False),
    Case("data shards --images {bad}/nowhere --output {shards}", 2, ("{bad}/nowhere",)),
    Case("data shards --captions {bad}/nowhere.jsonl --output {shards}", 2, ("nowhere.jsonl",)),
    Case("data shards --texts {texts} --output {shards} --max-bytes nan", 2, ("--max-bytes must be > 0, got nan",)),
    Case("data shards --texts {texts} --output {shards} --shard-size 0", 2, ("--shard-size must be >= 1, got 0",)),
    Case("data shards --texts {texts} --output {shards}/manifest.json", 2, ("manifest.json", "not a folder")),
    Case("data shards --texts {texts} --output {shards} --kind ../escaped", 2,
         ("kind '../escaped' must be letters, digits or '_'",)),
    Case("pretrain --data {nameless_shards}" + ASSETS, 2,
         ("manifest.json: kinds.pairs.shards[0] has no 'name'",), aims=("nameless_shards",)),
    Case("pretrain --data {garbled_shards}" + ASSETS, 2,
         ("manifest.json (", "not valid JSON"), aims=("garbled_shards",)),
    Case("pretrain --data {bad}/empty_dir" + ASSETS, 2,
         ("empty_dir",)),
]
for _case in SHARD_SETS:
    _case.aims = _case.aims or ("shards",)


@pytest.mark.parametrize("case", SHARD_SETS, ids=ids(SHARD_SETS))
def test_shard_sets(check, case):
    check(case)


# -- exports ----------------------------------------------------------------------------------------------
EXPORTS = [
    Case("export --to timm {saved} -o {saved}", 2, ("-o/--output {saved} is the input {saved}",
                                                    "nothing was written")),
    Case("export --to safetensors {saved}/model.safetensors -o {saved}/model.safetensors", 2, ("is the input",)),
    Case("export --to safetensors {saved} -o {saved}/model.safetensors", 2, ("lies inside the input {saved}",)),
    Case("export --to official {saved} -o {saved}/config.json", 2, ("lies inside the input",)),
    Case("export --to onnx {saved} -o {saved}", 2, ("is the input",)),
    Case("export --to timm {saved}/model.safetensors --config {saved}/config.json -o {saved}/config.json", 2,
         ("is the input",)),
    Case("export --to timm {saved} -o {bad}/link-to-saved", 2, ("link-to-saved is the input {saved}",)),
    Case("export --to safetensors {dl} -o {dl}", 2, ("is the input",), aims=("dl",)),
    Case("export --to official {dl} -o {dl}", 2, ("is the input",), aims=("dl",)),
    Case("export --to timm {saved} -o {out} --img-size 0", 2, ("--img-size must be positive, got 0",)),
    Case("export --to timm {saved} -o {out} --img-size -3", 2, ("--img-size must be positive, got -3",)),
    Case("export --to timm {bad}/nowhere.pth -o {out}", 2, ("nowhere.pth: no such file",)),
]
for _case in EXPORTS:
    _case.aims = _case.aims or ("saved",)


@pytest.mark.parametrize("case", EXPORTS, ids=ids(EXPORTS))
def test_exports(check, case):
    check(case)


# -- downloads --------------------------------------------------------------------------------------------
def _cut_short(fill):
    part = f"{fill['cache']}/checkpoints/{OTHER}.pth.part"
    whole = os.path.getsize(f"{fill['root']}/{OTHER}.pth")
    assert os.path.getsize(part) == whole // 2 and not os.path.exists(part[:-5])
    os.remove(part)


CACHED = {"BEIT3_CACHE": "{cache}", "BEIT3_MIRROR": "{net}/files"}
FRESH = {"BEIT3_CACHE": "{out}-cache"}  # a cache of its own (its folder may be created)
DOWNLOADS = [
    Case(f"download {NAME} --sha256 {'0' * 64}", 1, ("{dl} (", "does not match the expected 000",
                                                       "kept in the cache"), env=CACHED),
    Case(f"download {NAME} --sha256 {'0' * 64} --offline", 1, ("does not match", "kept"), env=CACHED),
    Case(f"download {OTHER}", 1, (f"{OTHER}.pth.part (", "incomplete or corrupted download",
                                  "the server announced no length"),
         env={"BEIT3_CACHE": "{cache}", "BEIT3_MIRROR": "{net}/cut"}, after=_cut_short, quiet=False),
    Case(f"download {OTHER}", 1, ("HTTP 503",), env={**FRESH, "BEIT3_MIRROR": "{net}/503"}),
    Case(f"download {OTHER} --timeout 0.5", 1, ("broke off after 1,024 bytes (timed out)",),
         env={**FRESH, "BEIT3_MIRROR": "{net}/stall"}, bound=10, quiet=False),
    Case(f"download {OTHER} --timeout 0.5", 1, ("timed out", "BEIT3_MIRROR"),
         env={**FRESH, "BEIT3_MIRROR": "{net}/stall-head"}, bound=10),
    Case(f"download {OTHER}", 1, ("Connection refused", "BEIT3_MIRROR"), env={**FRESH, "BEIT3_MIRROR": "{closed}"}),
    Case(f"download {OTHER} --offline", 1, (f"{OTHER}.pth is not in the cache",), env=CACHED),
    Case(f"download {NAME} --timeout 0", 2, ("--timeout must be positive, got 0",), env=FRESH),
    Case(f"download {NAME} --timeout nan", 2, ("--timeout must be positive, got nan",), env=FRESH),
    Case("download beit3_huge", 2, ("unknown model 'beit3_huge'",), env=FRESH),
    Case(f"download {NAME}", 2, ("BEIT3_MIRROR ftp://example.org", "not a ftp:// URL"),
         env={**FRESH, "BEIT3_MIRROR": "ftp://example.org"}),
    Case(f"download {NAME}", 1, ("BEIT3_MIRROR {bad}/nowhere (does not exist): not a folder",),
         env={**FRESH, "BEIT3_MIRROR": "{bad}/nowhere"}),
    Case("list-models --task ocr", 2, ("unknown task 'ocr'; the registry's tasks: backbone",)),
]
for _case in DOWNLOADS:
    _case.aims = ("dl",)


@pytest.mark.parametrize("case", DOWNLOADS, ids=ids(DOWNLOADS))
def test_downloads(check, case):
    check(case)


# -- network reads end ---------------------------------------------------------------------------------------
def _urls_table(fill, kinds=("img", "trickle-img", "stall-img", "503-img")):
    path = f"{fill['out']}.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["url", "caption"]] + [[f"{fill['net']}/{k}/{i}.png", f"picture {i}"]
                                                        for i, k in enumerate(kinds)])
    return path


NETWORK = [  # each a server that would have kept a read waiting forever
    Case("pretrain --pair-shards {net}/503/0.tar --retry-backoff 0.1" + QUICK, 2,  # 3 retries, each logged
         ("no usable sample in its first", "curl exit 22"), bound=20, quiet=False),
    Case("pretrain --pair-shards {net}/stall/0.tar --shard-read-timeout 1 --shard-retries 1 --retry-backoff 0.1"
         + QUICK,
         2, ("no usable sample", "read timed out: no data for 1 s"), bound=20, quiet=False),
    Case("pretrain --pair-shards {net}/trickle/0.tar --shard-read-timeout 1 --shard-min-rate 100 --shard-retries 0"
         + QUICK, 2, ("no usable sample", "slower than 100 bytes/s"), bound=20),
    Case("predict {saved} --image {net}/503-img/0.png", 2, ("HTTP 503",), aims=("saved",)),
    Case("predict {saved} --image {net}/stall-img/0.png --download-timeout 1", 2,
         ("image {net}/stall-img/0.png: cannot be read (no data for 1 s)",), aims=("saved",), bound=15),
    Case("predict {saved} --image {net}/trickle-img/0.png --download-timeout 1", 2,
         ("image {net}/trickle-img/0.png: cannot be read (download not complete after 1 s (",), aims=("saved",),
         bound=15),
]


@pytest.mark.parametrize("case", NETWORK, ids=ids(NETWORK))
def test_network_reads_end(check, case):
    check(case)


def test_caption_urls_that_stall_or_trickle_are_skipped_within_the_deadline(server, places, tmp_path):
    fill = {**places, "out": str(tmp_path / "out")}
    start = time.monotonic()
    r = ok(server.run(["data", "shards", "--captions", _urls_table(fill), "--output", fill["out"],
                       "--download-timeout", "1"], timeout=30))
    assert "1 pairs samples in 1 shards" in r.out and "3 inputs skipped" in r.out, r
    assert time.monotonic() - start < 15, r  # one 1 s deadline each for the stall and the trickle
    r = server.run(["data", "shards", "--captions", _urls_table(fill, ("stall-img", "trickle-img")), "--output",
                    fill["out"] + "2", "--download-timeout", "1"], timeout=30)
    assert r.code == 2 and "no pairs samples in" in error_line(r, "beit3 data shards", quiet=False), r


def test_a_shard_write_killed_midway_keeps_the_set(server, places, pieces, root, tmp_path):
    """``kill -9`` while the new pairs are downloaded: the old shards and manifest stay as they were,
    beside the dead writer's hidden staging folder, which the next write of that kind removes."""
    folder = shutil.copytree(places["shards"], root / "killed_shards")
    before = digest(str(folder))
    fill = {**places, "out": str(tmp_path / "urls")}
    r = server.run(["data", "shards", "--captions", _urls_table(fill, ("img", "trickle-img")), "--output", folder,
                    "--download-timeout", "60"], timeout=3)
    assert r.timed_out, r  # killed by the harness, in the middle of the trickle
    after = digest(str(folder))
    staging = {k for k in after if k not in before}
    assert {k: v for k, v in after.items() if k not in staging} == before and staging, staging
    assert all(k.startswith(".pairs-shards.tmp-") for k in staging), staging
    ok(server.run(["data", "shards", "--captions", _urls_table(fill, ("img",)), "--output", folder]))
    assert not any(k.startswith(".") for k in digest(str(folder)))


# -- number settings --------------------------------------------------------------------------------------
SETTINGS = [  # the values that ran anyway, or ended in a traceback
    Case("pretrain --weight-decay -1 --output {out}", 2, ("--weight-decay must be >= 0, got -1",)),
    Case("pretrain --warmup-steps -5 --output {out}", 2, ("--warmup-steps must be >= 0, got -5",)),
    Case("pretrain --min-lr-ratio -1 --output {out}", 2, ("--min-lr-ratio must be in [0, 1], got -1",)),
    Case("pretrain --max-text-len 100000 --output {out}", 2, ("--max-text-len 100000: the tiny preset's text position "
                                                              "table holds 1022 tokens",)),
    Case("pretrain --keep-last -1 --output {out}", 2, ("--keep-last must be >= 0, got -1",)),
    Case("pretrain --grad-clip -1 --output {out}", 2, ("--grad-clip must be >= 0, got -1",)),
    Case("pretrain --stop-after-steps 0 --output {out}", 2, ("--stop-after-steps must be >= 1, got 0",)),
    Case("pretrain --grad-accum 0 --output {out}", 2, ("--grad-accum must be >= 1, got 0",)),
    Case("pretrain --lr nan --output {out}", 2, ("--lr must be > 0, got nan",)),
    Case("pretrain --steps ten --output {out}", 2, ("argument --steps: invalid int value: 'ten'",)),
    Case("pretrain --config {bad}/ten.json --output {out}", 2, ("--config {bad}/ten.json: \"steps\" must be an "
                                                                "integer, got 'ten'",)),
    Case("pretrain --config {bad}/garbled.json --output {out}", 2, ("--config {bad}/garbled.json",)),
    Case("pretrain --config {bad}/list.json --output {out}", 2, ("--config {bad}/list.json", "JSON object")),
    Case("pretrain --ds-config {bad}/list.json --output {out}", 2, ("{bad}/list.json' holds a JSON list",)),
    Case("finetune --task vqa --eval-every 0 --output {out}", 2, ("--eval-every must be >= 1, got 0",)),
    Case("finetune --task vqa --hflip 2 --output {out}", 2, ("--hflip must be in [0, 1], got 2",)),
    Case("finetune --task vqa --eval-batch-size 0 --output {out}", 2, ("--eval-batch-size must be >= 1, got 0",)),
    Case("finetune --task vqa --log-every 0 --output {out}", 2, ("--log-every must be >= 1, got 0",)),
    Case("finetune --task vqa --label-smoothing 2 --output {out}", 2, ("--label-smoothing must be in [0, 1), got 2",)),
    Case("finetune --task vqa --head-lr-scale 20 --output {out}", 2, ("--head-lr-scale 20 with --layer-decay 0.9",)),
    Case("finetune --task vqa --ds-config {bad}/list.json --output {out}", 2, ("holds a JSON list",)),
    Case("finetune --recipe vqa-huge --output {out}", 2, ("unknown --recipe 'vqa-huge'",), quiet=False),
    Case("info --batch-size 0", 2, ("--batch-size must be >= 1, got 0",)),
    Case("info --batch-size -1", 2, ("--batch-size must be >= 1, got -1",)),
    Case("info --text-len 5000", 2, ("--text-len 5000: the tiny preset's text position table holds 1022 tokens",)),
    Case("benchmark --num-visual-tokens 0", 2, ("--num-visual-tokens must be >= 1, got 0",)),
    Case("train-tokenizer --images {images} --steps 0 --output {out}", 2, ("--steps must be >= 1, got 0",)),
    Case("data spm --input {texts} --vocab-size 0 --output {out}/spm", 2, ("--vocab-size must be >= 8, got 0",)),
    Case("data spm --input {texts} --character-coverage 2 --output {out}/spm", 2,
         ("--character-coverage must be in (0, 1], got 2",)),
    Case("data synthetic --shards-per-kind 0 --output {out}", 2, ("--shards-per-kind must be >= 1, got 0",)),
    Case("--steps 0", 2, ("--steps must be >= 1, got 0",), entry="script:scripts/init_probe.py"),
]
if not torch.cuda.is_available():
    SETTINGS += [Case("pretrain --device cuda --output {out}", 2, ("--device cuda but no CUDA device is visible",)),
                 Case("finetune --task vqa --device cuda --output {out}", 2, ("--device cuda but no CUDA device",)),
                 Case("predict {saved} --image {p0} --device cuda", 2, ("--device cuda but no CUDA device",),
                      aims=("saved",))]
SETTINGS += [Case("predict {saved} --image {p0} --device tpu9", 2, ("--device tpu9: ",), aims=("saved",))]


@pytest.mark.parametrize("case", SETTINGS, ids=ids(SETTINGS))
def test_settings(check, case):
    check(case)


# Every number flag of every command, just outside the range it declares: (command line before the
# flag, what each command needs to reach its checks).
RANGE_COMMANDS = {
    "info": "info", "pretrain": "pretrain --output {out}", "finetune": "finetune --task vqa --output {out}",
    "evaluate": "evaluate --checkpoint {saved}", "train-tokenizer": "train-tokenizer --images {images} --output {out}",
    "benchmark": "benchmark", "data synthetic": "data synthetic --output {out}",
    "data shards": "data shards --texts {texts} --output {out}",
    "data spm": "data spm --input {texts} --output {out}/spm",
    "data downstream": "data downstream all --raw {bad}/empty_dir --data-root {bad}/empty_dir --spm {spm}",
    "predict": "predict {saved} --image {p0}", "scripts/init_probe.py": "",
}


@pytest.fixture(scope="module")
def number_flags(server):
    """{command: [(flag, values just outside its range, the error's start)]} as the commands declare them."""
    r = ok(server.run(sorted(RANGE_COMMANDS), entry="sweep_builders:number_flags"))
    return json.loads(r.out)


@pytest.mark.parametrize("command", sorted(RANGE_COMMANDS))
def test_every_number_flag_outside_its_range_is_one_line(command, number_flags, server, places, pieces, tmp_path):
    flags = number_flags[command]
    assert flags
    entry = "script:scripts/init_probe.py" if command.startswith("scripts/") else None
    failures = []
    for flag, values, says in flags:
        case = Case(f"{RANGE_COMMANDS[command]} {flag} {' '.join(values)}", 2, (says,), entry=entry,
                    aims=("saved",) if command in ("predict", "evaluate") else ())
        try:
            sweep(server, places, pieces[0], case, out=str(tmp_path / "out"))
        except AssertionError as e:
            failures.append(f"{flag} {values}: {str(e)[:600]}")
    assert failures == [], "\n".join(failures)


def _never_ran(fill):
    assert not os.path.exists(f"{fill['root']}/pickle-ran")  # the planted payload


# -- bad files --------------------------------------------------------------------------------------------------
BAD_FILES = [
    Case("pretrain --tokenizer {tok_empty} --output {out}", 2, ("{tok_empty}/model.safetensors (0 bytes): not a "
                                                              "complete safetensors file (empty file)",),
         aims=("tok_empty",)),
    Case("pretrain --tokenizer {tok_cut} --output {out}", 2, ("{tok_cut}/model.safetensors (",), aims=("tok_cut",)),
    Case("pretrain --tokenizer {root}/planted.pth --tokenizer-preset tiny --output {out}", 2,
         ("holds pickled Python objects besides tensors",), after=_never_ran),
    Case("train-tokenizer --images {images} --steps 2 --teacher vit_tiny_patch16_224 --teacher-weights "
         "{bad}/teacher.pth --output {out}", 2, ("{bad}/teacher.pth (0 bytes): empty file",)),
    Case("data spm --input {bad}/zero.txt --output {out}/spm", 2, ("zero.txt",)),
    Case("data cifar --src {bad}/cifar --output {out}", 2, ("broken.png (8 bytes): not a decodable image",)),
    Case("evaluate --checkpoint {bad_spm} --task classification --data {bad} --spm {bad_spm}/tokenizer.model "
         "--output {out}", 2, ("is not a sentencepiece model",), aims=("bad_spm",)),
    Case("evaluate --checkpoint {bad}/empty_dir --output {out}", 2, ("empty_dir",)),
    Case("predict {bad_spm} --image {p0}", 2, ("{bad_spm}/tokenizer.model (25 bytes): not a usable SentencePiece "
                                               "model",), aims=("bad_spm",)),
    Case("predict {no_model} --image {p0}", 2, ("{no_model}/config.json (", "has no 'model' entry"),
         aims=("no_model",)),
    Case("predict {no_preprocess} --image {p0}", 2, ("has no 'preprocess' entry",), aims=("no_preprocess",)),
    Case("predict {wrong_labels} --image {p0}", 2, ("3 labels for a classification head of 5 outputs",),
         aims=("wrong_labels",)),
    Case("predict {empty_weights} --image {p0}", 2, ("{empty_weights}/model.safetensors (0 bytes)",),
         aims=("empty_weights",)),
    Case("predict {cut_weights} --image {p0}", 2, ("{cut_weights}/model.safetensors (",), aims=("cut_weights",)),
    Case("predict {bad}/empty_dir --image {p0}", 2, ("empty_dir",)),
    Case("export --to safetensors {bad}/zero.pth -o {out}", 2, ("{bad}/zero.pth (0 bytes)",)),
    Case("export --to safetensors {bad}/text.pth -o {out}", 2, ("{bad}/text.pth (",)),
    Case("export --to safetensors {bad}/random.pth -o {out}", 2, ("{bad}/random.pth (300,000 bytes): not a torch "
                                                                "checkpoint",)),
    Case("export --to safetensors {bad}/cut.safetensors -o {out}", 2, ("{bad}/cut.safetensors (",)),
    Case("export --to timm {saved}/model.safetensors --config {bad}/garbled.json -o {out}", 2,
         ("{bad}/garbled.json (",), aims=("saved",)),
    Case("finetune --task classification --data {world} --spm {spm} --batch-size 2 --init {bad}/random.pth "
         "--output {out}", 1,
         ("{bad}/random.pth",), quiet=False),
    Case("data downstream vqa --raw {bad}/empty_dir --data-root {bad} --spm {spm} --images-dir nowhere", 2,
         ("--images-dir expects SPLIT=DIR",)),
]


@pytest.mark.parametrize("case", BAD_FILES, ids=ids(BAD_FILES))
def test_bad_files(check, case):
    check(case)


# -- predict requests -----------------------------------------------------------------------------------------
PREDICT = [
    Case("predict {saved} --requests {bad}/utf16.jsonl", 2, ("utf16.jsonl (42 bytes): line 1 is not UTF-8 text",)),
    Case("predict {saved} --requests {bad}/many.jsonl", 2, ("many.jsonl line 1: top_k must be a positive integer, "
                                                            "got 'many'",)),
    Case("predict {saved} --requests {bad}/negative.jsonl", 2, ("top_k must be a positive integer, got -1",)),
    Case("predict {saved} --requests {bad}/numbers.jsonl", 2, ("images must be a list of image paths or URLs, "
                                                               "got [1, 2]",)),
    Case("predict {saved} --requests {bad}/unknown.jsonl", 2, ("unknown request keys ['colour']",)),
    Case("predict {saved} --requests {bad}/broken.jsonl", 2, ("broken.jsonl line 1: not JSON",)),
    Case("predict {saved} --requests {bad}/array.jsonl", 2, ("array.jsonl line 1: expected a JSON object",)),
    Case("predict {saved} --requests {bad}/missing.jsonl", 2, ("nowhere.png",)),
    Case("predict {saved} --requests {bad}/textimage.jsonl", 2, ("texts.txt",)),
    Case("predict {saved} --requests {bad}/nowhere.jsonl", 2, ("nowhere.jsonl (does not exist): no such requests "
                                                               "file",)),
    Case("predict {saved} --requests {bad}/many.jsonl --image {p0}", 2, ("give --requests or --image",)),
    Case("predict {saved} --image {p0} --top-k 0", 2, ("--top-k must be >= 1, got 0",)),
    Case("predict {saved} --image {p0} --num-beams 0", 2, ("--num-beams must be >= 1, got 0",)),
    Case("predict {saved}", 2, ("no image given",)),
    Case("predict {saved} --image {bad}/empty_dir", 2, ("empty_dir: no image files",)),
    Case("predict {saved} --image {bad}/undecodable/broken.png", 2, ("broken.png",)),
    Case("predict {saved} --image {p0} --question 'what colour?'", 2, ("vqa",)),
]
for _case in PREDICT:
    _case.aims = ("saved",)


@pytest.mark.parametrize("case", PREDICT, ids=ids(PREDICT))
def test_predict_requests(check, case):
    check(case)


# -- the harness catches what it is here to catch ---------------------------------------------------------------
def test_the_harness_reports_a_traceback_a_hang_and_a_thread_left_running(server, tmp_path):
    r = server.run(["x"], entry="sweep_harness:fake_raise")
    assert r.code == 1 and "Traceback" in r.err and "RuntimeError: a fault no command caught" in r.err
    with pytest.raises(AssertionError):
        error_line(r, "beit3 x", quiet=True)
    start = time.monotonic()
    r = server.run(["x"], entry="sweep_harness:fake_hang", timeout=1)
    assert r.timed_out and r.code is None and 1 <= time.monotonic() - start < 5
    r = server.run(["x"], entry="sweep_harness:fake_thread", timeout=1)  # the interpreter would wait for it
    assert r.timed_out
    with pytest.raises(AssertionError, match="still running after 1"):
        sweep(server, {"root": str(tmp_path)}, Pieces({}), Case("x", 0, bound=1, entry="sweep_harness:fake_hang"),
              out=str(tmp_path / "out"))
    target = tmp_path / "piece.bin"
    target.write_bytes(b"data")
    with pytest.raises(AssertionError, match=r"\['piece'\] == \[\]"):
        sweep(server, {"root": str(tmp_path)}, Pieces({"piece": str(target)}),
              Case(f"{target}", 2, aims=("piece",), entry="sweep_harness:fake_write"), out=str(tmp_path / "out"))
    (tmp_path / "in.txt").write_text("from stdin\n")
    r = server.run(["SWEEP_VAR"], entry="sweep_harness:fake_env", env={"SWEEP_VAR": "set"}, cwd=str(tmp_path),
                   stdin=str(tmp_path / "in.txt"))
    assert (r.code, r.out, r.err) == (2, f"set {tmp_path} from stdin\n", "beit3 fake: error: SWEEP_VAR\n")
    assert error_line(r, "beit3 fake", quiet=True) == "beit3 fake: error: SWEEP_VAR"
    assert "SWEEP_VAR" not in os.environ  # the child's change stayed in the child


def test_a_digest_sees_a_changed_byte_a_new_file_and_an_empty_folder(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "w.bin").write_bytes(bytes(1000))
    before = digest(str(tmp_path))
    with open(tmp_path / "a" / "w.bin", "r+b") as f:
        f.seek(500)
        f.write(b"\x01")
    assert digest(str(tmp_path)) != before
    (tmp_path / "a" / "w.bin").write_bytes(bytes(1000))
    assert digest(str(tmp_path)) == before
    (tmp_path / "a" / ".tmp").mkdir()
    assert set(digest(str(tmp_path))) - set(before) == {"a/.tmp"}


# -- no network read waits forever --------------------------------------------------------------------------------
CONNECTS = {"urlopen", "HTTPConnection", "HTTPSConnection", "create_connection"}
RUNS = {"run", "check_output", "check_call", "call"}
# Programs beit3 starts and then reads from, each bounded where it is read: curl and a pipe: command
# through TimedStream (select with a deadline), a GPU check part through wait(timeout=).
STARTED = {("beit3/data/remote.py", "Pipe"): 2, ("beit3/data/remote.py", "gopen"): 1,
           ("beit3/jobs/benchmark/gpu_check.py", "Popen"): 1}


def _calls(path):
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute):
                owner = getattr(func.value, "id", getattr(func.value, "attr", ""))
                yield node, owner, func.attr
            elif isinstance(func, ast.Name):
                yield node, "", func.id


def test_every_network_read_and_every_wait_on_a_program_is_bounded():
    """Read from beit3's source: each call that opens a connection (urllib, http.client, socket,
    requests) passes a timeout, so does each subprocess call that waits for a program, and the
    programs that are started and read from are the known ones, each read with a deadline. The
    modules that read from the network are the three whose silent-server cases are above."""
    unbounded, readers, started = [], set(), {}
    for parent, _, names in os.walk(os.path.join(ROOT, "beit3")):
        for path in [os.path.join(parent, n) for n in names if n.endswith(".py")]:
            rel = os.path.relpath(path, ROOT)
            for node, owner, call in _calls(path):
                keywords = {k.arg for k in node.keywords}
                connects = call in CONNECTS or (owner == "requests" and call in {"get", "post", "head", "request"})
                readers |= {rel} if connects else set()
                if (connects or (owner == "subprocess" and call in RUNS)) and "timeout" not in keywords:
                    unbounded.append(f"{rel}:{node.lineno} {owner}.{call}")
                if call in {"Popen", "Pipe", "gopen"}:
                    started[(rel, call)] = started.get((rel, call), 0) + 1
    assert unbounded == []
    assert readers == {"beit3/weights/hub.py", "beit3/data/remote.py"}  # the predictor reads through remote.download
    assert started == STARTED


# -- last: every piece, whole -----------------------------------------------------------------------------------
def test_every_piece_and_damaged_copy_is_as_it_was_after_the_sweep(pieces, places):
    aimed, _ = pieces
    assert {"run", "finetuned", "shards", "saved", "dl"} <= set(aimed.paths) and len(aimed.paths) > 10
    assert aimed.changed(aimed.paths) == []
