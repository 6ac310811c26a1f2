"""Network reads that end: a server that refuses, stalls or trickles fails the read in bounded time.

- ``Timeouts``: how long to wait for a connection, how long a read may go without making progress
  (fewer than ``min_rate`` bytes/s over a ``read``-second window: silence and a trickle alike), and
  an optional deadline for a whole download.
- ``open_stream``: a remote shard's bytes from a subprocess, as webdataset opens them (curl for
  http(s), the command of a ``pipe:`` URL, gsutil/ais for their schemes), read through
  :class:`TimedStream`. curl runs without its own retries (webdataset's ``--retry 30`` turns a 503
  into a minute of silence per attempt): the caller's retry loop decides, with its backoff.
- ``download``: one file over http(s) within a deadline (the image URLs of a captions table).

A failed read raises :class:`ReadTimeout` (an ``OSError``) whose message says what was too slow.
"""
from __future__ import annotations

import contextlib
import io
import os
import select
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlparse

from webdataset.gopen import Pipe, gopen, rewrite_url

EXIT_GRACE = 5.0  # seconds a command may take to exit after its stream ended or was closed
CURL_EXITS = {6: "host not found", 7: "connection refused", 18: "transfer cut short", 22: "HTTP error status",
              28: "timed out", 35: "TLS handshake failed", 56: "connection reset"}


class ReadTimeout(OSError):
    """A remote read made too little progress in time."""


@dataclass(frozen=True)
class Timeouts:
    connect: float = 30.0  # seconds to establish a connection (curl, urllib)
    read: float = 60.0  # window: a read delivering under min_rate * read bytes in it fails
    min_rate: float = 1024.0  # bytes/s; below it for a whole window the server is stalled or trickling
    total: float | None = None  # seconds for a whole download; None: no deadline

    def check(self) -> None:
        for name in ("connect", "read", "total"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and value < float("inf")):
                raise ValueError(f"{name} timeout must be a positive number of seconds, got {value}")
        if not 0 <= self.min_rate < float("inf"):
            raise ValueError(f"min_rate must be >= 0 bytes/s, got {self.min_rate}")


def curl_args(url: str, t: Timeouts) -> list[str]:
    # -N: pass each received block on at once (stdio buffering would hide a trickle's progress)
    args = ["curl", "--connect-timeout", f"{t.connect:g}", "-f", "-s", "-L", "-N"]
    if t.total is not None:
        args += ["--max-time", f"{t.total:g}"]
    return args + [url]


def open_stream(url: str, timeouts: Timeouts) -> TimedStream:
    """The bytes of remote ``url`` from the command that fetches it."""
    url = rewrite_url(url)
    scheme = urlparse(url).scheme
    # bufsize 0: a raw pipe whose reads return what has arrived, so that select() can time them.
    # Our own commands get a process group, so that a stalled one is killed with its children
    # (a pipe: command runs in a shell).
    if scheme in ("http", "https"):
        pipe = Pipe(curl_args(url, timeouts), mode="rb", bufsize=0, timeout=EXIT_GRACE, ignore_status=[141, 23],
                    start_new_session=True)
    elif scheme == "pipe":
        pipe = Pipe(url[len("pipe:"):], mode="rb", shell=True, bufsize=0, timeout=EXIT_GRACE, ignore_status=[141],
                    start_new_session=True)
    else:  # gs://, ais://, ...: webdataset's command for the scheme
        pipe = gopen(url, "rb", bufsize=0)
        if not isinstance(pipe, Pipe):
            raise ValueError(f"{url}: not a remote URL that a command reads")
        pipe.timeout = EXIT_GRACE
    return TimedStream(pipe, url, timeouts, group=scheme in ("http", "https", "pipe"))


class TimedStream(io.RawIOBase):
    """The stdout of the command behind a remote URL, each read bounded by ``timeouts``."""

    def __init__(self, pipe: Pipe, url: str, timeouts: Timeouts, group: bool = False):
        """``group``: the command leads its own process group, killed as a whole."""
        super().__init__()
        self.pipe, self.url, self.t, self.group = pipe, url, timeouts, group
        self.command = pipe.args[0][0]
        self.started = self.window_start = time.monotonic()
        self.window_bytes = 0
        self.failure: str | None = None  # why a read was cut off, once one was
        self.eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        fd = self.pipe.stream.fileno()
        while not select.select([fd], [], [], self._wait())[0]:
            pass
        n = self.pipe.stream.readinto(buf)
        self.window_bytes += n or 0
        self.eof = self.eof or not n
        return n

    def _wait(self) -> float:
        """Seconds until the current window closes; checks the windows and the deadline that passed."""
        now, t = time.monotonic(), self.t
        if t.total is not None and now - self.started >= t.total:
            self._fail(f"not complete after {t.total:g} s")
        if now - self.window_start >= t.read:
            if self.window_bytes < max(1.0, t.min_rate * t.read):
                self._fail(f"no data for {t.read:g} s" if not self.window_bytes else
                           f"{self.window_bytes} bytes in {t.read:g} s, slower than {t.min_rate:g} bytes/s")
            self.window_start, self.window_bytes = now, 0
        end = self.window_start + t.read
        if t.total is not None:
            end = min(end, self.started + t.total)
        return max(0.0, end - now)

    def _fail(self, why: str) -> None:
        self.failure = f"read timed out: {why}"
        self._stop()
        raise ReadTimeout(self.failure)

    def _stop(self) -> None:
        proc = self.pipe.proc
        if proc.poll() is None:  # not yet reaped: its pid (and group id) is still its own
            if self.group:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the shell of a pipe: command and what it started
            else:
                proc.kill()
        proc.wait()

    def exit_problem(self) -> str | None:
        """Why the command failed (a timeout, its exit status), or None; a command whose output
        has not ended yet has not failed (the reader stopped on what it read)."""
        if self.failure:
            return self.failure
        if not self.eof and self.pipe.proc.poll() is None:
            return None
        try:
            code = self.pipe.proc.wait(timeout=EXIT_GRACE)
        except subprocess.TimeoutExpired:
            self._stop()
            return f"{os.path.basename(str(self.command))} did not exit after its output ended"
        # webdataset's list per command: 0, SIGPIPE (141) and curl's write error (23) when the reader stops early
        return None if code in self.pipe.ignore_status else exit_text(self.command, code)

    def close(self) -> None:
        """Close the stream; a command still running (the reader stopped early) is killed."""
        if not self.closed:
            self.pipe.stream.close()
            if self.pipe.proc.poll() is None:
                self._stop()
            self.pipe.status = self.pipe.proc.returncode  # webdataset's Pipe.close then has nothing to wait for
        super().close()


def exit_text(command, code: int) -> str:
    """``curl exit 22 (HTTP error status)``, or ``command exit N`` for a ``pipe:`` command."""
    if isinstance(command, (list, tuple)) and command and command[0] == "curl":
        return f"curl exit {code}" + (f" ({CURL_EXITS[code]})" if code in CURL_EXITS else "")
    return f"command exit {code}"


def download(url: str, timeouts: Timeouts) -> bytes:
    """The body of ``url``; :class:`ReadTimeout` once ``timeouts.total`` passes or a read waits
    ``timeouts.read`` seconds, ``OSError`` (``HTTPError``, ``URLError``) for other failures."""
    start = time.monotonic()
    total = timeouts.total if timeouts.total is not None else float("inf")
    # One socket timeout bounds the connect and every receive; the loop checks the deadline between
    # receives, so a trickle ends within ``total`` plus one receive.
    socket_timeout = min(timeouts.connect, timeouts.read, total)
    chunks = []
    with urllib.request.urlopen(url, timeout=socket_timeout) as response:
        while True:
            if time.monotonic() - start >= total:
                raise ReadTimeout(f"download not complete after {total:g} s "
                                  f"({sum(map(len, chunks))} bytes arrived)")
            try:
                chunk = response.read1(1 << 16)
            except TimeoutError:
                raise ReadTimeout(f"no data for {socket_timeout:g} s") from None
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
