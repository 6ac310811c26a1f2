"""Commands run as a user runs them, at the cost of a fork: the sweep's process harness.

A ``beit3`` command in a fresh interpreter spends ~4-8 s importing torch, DeepSpeed and timm, too
much for a sweep of a hundred cases. ``ForkServer`` starts one interpreter (``serve``) that imports
every command's module once, then forks a child per case. The child is a process of its own, as the
console script's would be: its own environment changes, working folder, stdin, and stdout/stderr
written to files; it runs ``beit3.cli.main(argv)`` (or a script under ``scripts/``) and exits with
its return code, and an exception that escapes is printed as the interpreter would print it (a
traceback, exit 1). A child still running after the case's ``timeout`` is killed with its process
group, so a hang fails its case instead of stalling the suite.

    with ForkServer() as server:
        r = server.run(["pretrain", "--steps", "0"], timeout=20)
        r.code, r.err, r.seconds, r.timed_out

Variables that a library reads when it is imported (``TQDM_DISABLE``) were read by the server before
the fork: such a case runs with ``fresh=True``, in a new interpreter (the same request, seconds
slower). The fork server never runs a tensor operation itself, so each child starts torch's thread
pools afresh. Requests and answers are JSON lines on two pipes kept apart from the children's
streams. ``digest`` gives a folder's content (file list and bytes) to compare before and after.
"""
from __future__ import annotations

import atexit
import hashlib
import importlib
import json
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Imported once by the server: every command's module and what their main() imports on first use.
PRELOAD = ("deepspeed", "timm", "beit3.jobs.pretrain.loop", "beit3.jobs.finetune.run", "beit3.inference.predictor",
           "beit3.data.pretrain_loader", "beit3.vqkd.teachers", "beit3.jobs.benchmark.runner")


@dataclass(repr=False)
class Result:
    argv: list
    code: Optional[int]  # exit status; -N when killed by signal N; None when it timed out
    out: str
    err: str
    seconds: float
    timed_out: bool

    def __repr__(self) -> str:
        state = "timed out" if self.timed_out else f"exit {self.code}"
        return f"beit3 {' '.join(map(str, self.argv))}: {state} after {self.seconds:.1f}s\n--- stderr:\n" \
               f"{self.err[-4000:]}\n--- stdout:\n{self.out[-1000:]}"


LAUNCHER_VARIABLES = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"}


class ForkServer:
    """The client: starts the server, sends it one case at a time, reads back what the child wrote."""

    def __init__(self, workdir: Optional[str] = None, env: Optional[dict] = None):
        self.workdir = workdir or tempfile.mkdtemp(prefix="beit3-sweep-")
        self.count = 0
        # A user's command starts without a launcher's variables; one left by an in-process test
        # (MASTER_PORT of a group still bound in pytest) would make every pretraining case fail to bind.
        server_env = {**{k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES},
                      "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                      "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                      **(env or {})}
        self.env = server_env
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=server_env, cwd=ROOT)
        ready = self.proc.stdout.readline()
        if json.loads(ready or "null") != "ready":
            raise RuntimeError(f"the fork server did not start (exit {self.proc.wait()})")

    def run(self, argv, *, env: Optional[dict] = None, cwd: Optional[str] = None, stdin: Optional[str] = None,
            timeout: float = 60.0, entry: Optional[str] = None, fresh: bool = False) -> Result:
        """Run ``beit3 <argv>`` in a forked child. ``env``: variables to set (None: to unset);
        ``stdin``: a file to read as stdin (default: empty); ``entry``: ``module:function`` or
        ``script:<path under the repository>`` instead of the ``beit3`` console script; ``fresh``: in
        a new interpreter instead, for variables that libraries read when imported (TQDM_DISABLE)."""
        self.count += 1
        out, err = (os.path.join(self.workdir, f"{self.count:04d}.{s}") for s in ("out", "err"))
        request = {"argv": [str(a) for a in argv], "env": env or {}, "cwd": cwd or self.workdir, "stdin": stdin,
                   "timeout": timeout, "entry": entry, "out": out, "err": err}
        answer = _run_fresh(request, self.env) if fresh else self._ask(request)
        with open(out, encoding="utf-8", errors="replace") as f_out, \
                open(err, encoding="utf-8", errors="replace") as f_err:
            return Result(list(argv), answer["code"], f_out.read(), f_err.read(), answer["seconds"],
                          answer["timed_out"])

    def _ask(self, request: dict) -> dict:
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline() or "null")
        if answer is None:
            raise RuntimeError(f"the fork server died (exit {self.proc.wait()})")
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)

    def __enter__(self) -> "ForkServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _run_fresh(req: dict, env: dict) -> dict:
    """The request in a new interpreter (the harness's ``child`` entry), under the same time limit."""
    env = {**env, **{k: v for k, v in req["env"].items() if v is not None}}
    for name in [k for k, v in req["env"].items() if v is None]:
        env.pop(name, None)
    start = time.monotonic()
    with open(req["stdin"] or os.devnull, "rb") as stdin, open(req["out"], "wb") as out, \
            open(req["err"], "wb") as err:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "child", json.dumps(req)], stdin=stdin,
                                stdout=out, stderr=err, env=env, cwd=req["cwd"], start_new_session=True)
        try:
            code, timed_out = proc.wait(timeout=req["timeout"]), False
        except subprocess.TimeoutExpired:
            code, timed_out = None, True
        _kill_group(proc.pid)
        proc.wait()
    return {"code": code, "timed_out": timed_out, "seconds": round(time.monotonic() - start, 3)}


# -- the server ------------------------------------------------------------------------------------
def serve() -> None:
    # The protocol gets its own descriptors; 0, 1 and 2 are what each child redirects.
    requests = os.fdopen(os.dup(0), "rb")
    answers = os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(2, 1)
    # Imported here, in the server: the test process that drives a ForkServer never imports beit3.
    import beit3.cli
    for module in [m.partition(":")[0] for m, _ in beit3.cli.COMMANDS.values() if m] + \
            [m.partition(":")[0] for m in beit3.cli.DATA_COMMANDS.values()] + list(PRELOAD):
        importlib.import_module(module)
    answers.write(b'"ready"\n')
    answers.flush()
    for line in requests:
        answer = _run_case(json.loads(line), keep=(requests.fileno(), answers.fileno()))
        answers.write((json.dumps(answer) + "\n").encode())
        answers.flush()


def _run_case(req: dict, keep: tuple) -> dict:
    start = time.monotonic()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child(req, keep)  # never returns
    deadline, timed_out = start + req["timeout"], False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            _kill_group(pid)
            _, status = os.waitpid(pid, 0)
            timed_out = True
            break
        time.sleep(0.005)
    _kill_group(pid)  # what the child started and left running (a download's curl, a worker)
    code = None if timed_out else os.waitstatus_to_exitcode(status)
    return {"code": code, "timed_out": timed_out, "seconds": round(time.monotonic() - start, 3)}


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _child(req: dict, keep: tuple) -> None:
    code = 1
    try:
        os.setpgid(0, 0)
        # The handlers the imports registered are the server's (0.1 s of library teardown a case);
        # the child runs those its command registers, as the interpreter would at exit.
        atexit._clear()
        for fd in keep:
            os.close(fd)
        for name, value in req["env"].items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        os.chdir(req["cwd"])
        os.dup2(os.open(req["stdin"] or os.devnull, os.O_RDONLY), 0)
        for fd, path in ((1, req["out"]), (2, req["err"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        code = _main(req)
    except SystemExit as e:  # what sys.exit gives the interpreter: None 0, an int, else 1 and the text
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: what escapes a command reaches the user as a traceback
        traceback.print_exc()
        code = 1
    finally:
        try:
            threading._shutdown()  # as the interpreter at exit: wait for the command's non-daemon threads
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code & 0xFF if isinstance(code, int) else 1)


def _main(req: dict) -> int:
    entry, argv = req["entry"], req["argv"]
    if entry and entry.startswith("script:"):
        path = os.path.join(ROOT, entry[len("script:"):])
        sys.argv = [path, *argv]
        runpy.run_path(path, run_name="__main__")
        return 0
    module, _, func = (entry or "beit3.cli:main").partition(":")
    sys.argv = ["beit3", *argv]
    return int(getattr(importlib.import_module(module), func)(argv) or 0)


# -- fake commands: the harness's own test ---------------------------------------------------------
def fake_raise(argv) -> int:
    raise RuntimeError("a fault no command caught")


def fake_hang(argv) -> int:
    time.sleep(3600)
    return 0


def fake_thread(argv) -> int:
    """Returns at once, leaving a thread that the interpreter waits for at exit."""
    threading.Thread(target=time.sleep, args=(3600,)).start()
    return 0


def fake_write(argv) -> int:
    """Appends a byte to the file ``argv[0]`` and fails as a command would: a case that changed data."""
    with open(argv[0], "ab") as f:
        f.write(b"x")
    print(f"beit3 fake: error: {argv[0]}", file=sys.stderr)
    return 2


def fake_env(argv) -> int:
    print(os.environ.get(argv[0], "<unset>"), os.getcwd(), sys.stdin.read().strip())
    print("beit3 fake: error: " + argv[0], file=sys.stderr)
    return 2


# -- content digests -------------------------------------------------------------------------------
def digest(path: str) -> dict[str, str]:
    """{path under ``path``: what is there}: each file's size and sha256, each folder and link (a
    file alone: {its name: the same}). Two equal digests mean the same file list and the same bytes
    in every file."""
    if not os.path.isdir(path):
        return {os.path.basename(path): _file_digest(path)}
    out = {}
    for parent, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(parent, name)
            rel = os.path.relpath(full, path)
            out[rel] = "link " + os.readlink(full) if os.path.islink(full) else \
                "folder" if os.path.isdir(full) else _file_digest(full)
    return out


def _file_digest(path: str) -> str:
    if not os.path.lexists(path):
        return "absent"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"{os.path.getsize(path)} bytes sha256 {h.hexdigest()}"


if __name__ == "__main__" and sys.argv[1:] == ["serve"]:
    serve()
elif __name__ == "__main__" and sys.argv[1:2] == ["child"]:  # a fresh interpreter's case: run as the server's child
    sys.exit(_main(json.loads(sys.argv[2])))
