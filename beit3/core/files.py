"""Outputs that are checked before the work and never left half-written.

- ``check_output_dir`` / ``check_output_file``: before a command spends minutes (a benchmark, a
  training run), its output path can be created and written: not a file where a folder is wanted
  nor the reverse, not under a file, not read-only.
- ``atomic_file``: write beside the target and rename over it once complete, with the mode the
  umask gives (``honour_umask``: some writers create 0600 files). On an error (a full
  disk) or an interrupt the temporary file is removed and the previous file stays as it was. A
  ``kill -9`` cannot clean up; the next writer of the same path removes the temporaries of dead
  processes, recognised by the host and pid in their names.
- ``staging_dir`` / ``commit_dir`` / ``recover_dir`` / ``current_dir``: replace a whole folder
  (``best/``) by two renames, ``final -> final.old`` then ``final.tmp -> final``. ``final.old``
  exists only while ``final.tmp`` is complete, so after a kill at any moment the newest complete
  copy is known, and ``recover_dir`` puts it back in place.
- ``file_sizes`` / ``size_problems``: every file of a folder and its size, recorded in a marker
  when the folder is complete and compared before it is used (a lost or truncated file).
- ``read_json``: JSON whose errors name the file.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any, Optional

from beit3.core.errors import BadFileError, OutputError, describe, first_line


# -- checks before the work ---------------------------------------------------------------------
def _existing_ancestor(path: str) -> str:
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _probe_writable(directory: str, flag: str, target: str) -> None:
    """Create and remove a file: the only test that also holds for root, read-only mounts and ACLs."""
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".beit3-write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise OutputError(f"{flag} {target}: cannot write in {directory} ({e.strerror})") from None


def check_output_dir(path: str | os.PathLike, flag: str = "--output") -> None:
    """Raise :class:`OutputError` unless ``path`` is, or can be created as, a writable folder."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f"{flag} {describe(path)}: exists and is not a folder")
    base = _existing_ancestor(path)
    if not os.path.isdir(base):
        raise OutputError(f"{flag} {path}: cannot be created, {describe(base)} is not a folder")
    _probe_writable(base, flag, path)


def check_output_file(path: str | os.PathLike, flag: str = "--output") -> None:
    """Raise :class:`OutputError` unless a file can be written at ``path`` (replacing one there)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise OutputError(f"{flag} {describe(path)}: expected a file name, not a folder")
    base = _existing_ancestor(os.path.dirname(path))
    if not os.path.isdir(base):
        raise OutputError(f"{flag} {path}: cannot be created, {describe(base)} is not a folder")
    _probe_writable(base, flag, path)


# -- atomic files -------------------------------------------------------------------------------
def _temp_prefix(path: str) -> str:
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.tmp-{socket.gethostname()}-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        with contextlib.suppress(OSError):
            os.remove(path)


def remove_stale_temps(path: str | os.PathLike) -> list[str]:
    """Remove the temporaries of ``path`` left by killed processes of this host; returns them."""
    prefix = _temp_prefix(os.fspath(path))
    removed = []
    for tmp in glob.glob(glob.escape(prefix) + "*"):
        pid = tmp[len(prefix):]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            _remove(tmp)
            removed.append(tmp)
    return removed


def is_write_error(e: BaseException) -> bool:
    # A full disk reaches us as OSError from Python, RuntimeError("unexpected pos ...") from
    # torch.save's zip writer and SafetensorError("I/O error: ...") from safetensors.
    return isinstance(e, (OSError, RuntimeError)) or type(e).__name__ == "SafetensorError"


def write_error(path: str, e: BaseException, kept: bool) -> OutputError:
    """One line for a failed write: the path, the reason, the free space, what is left."""
    reason = getattr(e, "strerror", None) or first_line(e)
    try:
        free = f"{shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free:,} bytes free there"
    except OSError:
        free = "free space unknown"
    left = "the previous version is kept" if kept else "nothing was written"
    return OutputError(f"could not write {path}: {reason} ({free}); {left}")


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (no race with threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or every file under a folder) the mode a plain ``open`` would: some
    writers create 0600 files whatever the umask (safetensors' ``save_file``, ``mkstemp``), and
    outputs are meant to be read by the group that shares a run folder."""
    mode = 0o666 & ~current_umask()
    paths = [os.fspath(path)] if not os.path.isdir(path) else \
        [os.path.join(d, n) for d, _, names in os.walk(path) for n in names]
    for p in paths:
        if os.path.isfile(p) and not os.path.islink(p):
            os.chmod(p, mode)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; once the block has written it, rename it to ``path``.

    A write error becomes an :class:`OutputError` naming ``path``; on any error or interrupt the
    temporary is removed and a previous ``path`` is untouched."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    remove_stale_temps(path)
    tmp = _temp_prefix(path) + str(os.getpid())
    try:
        yield tmp
        honour_umask(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        _remove(tmp)
        if is_write_error(e):
            raise write_error(path, e, kept=os.path.exists(path)) from e
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM raises ``SystemExit(143)`` inside the block, so ``finally`` clauses (removing a
    half-written temporary) run; by default SIGTERM ends Python without running them."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)
    try:
        old = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave the handler alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# -- a folder replaced as a whole ---------------------------------------------------------------
def _versions(final: str) -> tuple[str, str, str]:
    final = os.fspath(final).rstrip("/")
    return final, final + ".tmp", final + ".old"


def current_dir(final: str | os.PathLike) -> Optional[str]:
    """The newest complete copy of ``final`` without changing anything (a reader's view while a
    writer may be at work): ``final``; after a kill between the two renames ``final.tmp``, which
    was complete, else ``final.old``; None if there is none."""
    final, tmp, old = _versions(final)
    if os.path.isdir(final):
        return final
    if os.path.isdir(old):
        return tmp if os.path.isdir(tmp) else old
    return None


def recover_dir(final: str | os.PathLike) -> Optional[str]:
    """Put the newest complete copy back at ``final`` and remove the leftovers of a kill; returns
    what was done (None: nothing to do). Only the folder's owner (the run holding its lock) calls it."""
    final, tmp, old = _versions(final)
    done = None
    if not os.path.isdir(final) and os.path.isdir(old):
        source = tmp if os.path.isdir(tmp) else old
        os.replace(source, final)
        done = f"{final} was being replaced when a process died; restored it from {os.path.basename(source)}"
    for leftover in (tmp, old):
        if os.path.isdir(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
            done = done or f"removed {leftover}, left by a process that died while writing it"
    return done


def staging_dir(final: str | os.PathLike) -> str:
    """An empty ``final.tmp`` to write the next version of ``final`` into; then ``commit_dir``."""
    recover_dir(final)
    _, tmp, _ = _versions(final)
    os.makedirs(tmp)
    return tmp


def commit_dir(final: str | os.PathLike) -> None:
    """Replace ``final`` by the complete ``final.tmp``."""
    final, tmp, old = _versions(final)
    honour_umask(tmp)
    if os.path.isdir(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


# -- file lists with sizes ----------------------------------------------------------------------
def file_sizes(directory: str | os.PathLike) -> dict[str, int]:
    """{name: bytes} of the regular files of ``directory`` (not hidden temporaries)."""
    with os.scandir(directory) as entries:
        return {e.name: e.stat().st_size for e in entries if e.is_file() and not e.name.startswith(".")}


def size_problems(directory: str | os.PathLike, expected: Mapping[str, int]) -> list[str]:
    """What differs from ``expected`` ({name: bytes}): a missing file, or one of another size."""
    problems = []
    for name, size in sorted(expected.items()):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            problems.append(f"{name} is missing")
        elif os.path.getsize(path) != size:
            problems.append(f"{name} has {os.path.getsize(path):,} bytes, {size:,} when written")
    return problems


def read_json(path: str | os.PathLike, kind: type = dict) -> Any:
    """The JSON value in ``path``, which must be a ``kind``; errors name the file and its size."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise BadFileError(path, f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError:
        raise BadFileError(path, "not UTF-8 text") from None
    if not isinstance(value, kind):
        raise BadFileError(path, f"expected a JSON {'object' if kind is dict else kind.__name__}, "
                                 f"got {type(value).__name__}")
    return value


def cache_root() -> str:
    """Where downloads and the demo's built assets are cached: ``$BEIT3_CACHE``, else ~/.cache/beit3."""
    return os.environ.get("BEIT3_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "beit3"))


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
