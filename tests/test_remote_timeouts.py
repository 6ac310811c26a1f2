"""Remote reads end: a local HTTP server that answers 503, sends 1 KiB and goes silent, or trickles
a byte at a time; a ``pipe:`` command that stalls. Pretraining goes on without such shards (counted)
or stops with one line, ``beit3 data shards --captions`` skips such image URLs, and every case
finishes within a few seconds (asserted), with the timeouts set small."""
import csv
import http.server
import io
import os
import tarfile
import threading
import time
from itertools import islice

import numpy as np
import pytest
from PIL import Image

from beit3.data.pretrain_loader import PretrainDataConfig, PretrainLoader
from beit3.data.remote import Timeouts
from beit3.cli.data import shards_main
from beit3.data.shards import read_manifest
from beit3.data.sources import RetryPolicy, Shard, SkipLog, read_samples
from beit3.cli.pretrain import main as pretrain_main

pytestmark = pytest.mark.usefixtures("one_thread")
QUICK = Timeouts(connect=2, read=1, min_rate=100)  # a stall or a trickle fails after ~1 s


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _tar(n: int, seed: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(n):
            for ext, data in (("jpg", _jpeg(seed + i)), ("txt", f"a red circle number {i}".encode())):
                info = tarfile.TarInfo(f"{seed:03d}{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Handler(http.server.BaseHTTPRequestHandler):
    """/ok/N.tar: a shard; /503/...: Service Unavailable; /stall/...: 1 KiB of a shard, then
    silence until the test ends; /trickle/...: a byte every 0.1 s; /img/N.jpg, /trickle-img/N.jpg."""

    release: threading.Event

    def log_message(self, *args):
        pass

    def do_GET(self):
        try:
            self.answer()
        except (BrokenPipeError, ConnectionResetError):  # the reader gave up: what the tests want
            pass

    def answer(self):
        kind, name = self.path.strip("/").split("/", 1)
        if kind == "503":
            self.send_error(503)
            return
        body = _jpeg(int(name.split(".")[0])) if kind.endswith("img") else _tar(4, int(name.split(".")[0]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if kind == "ok" or kind == "img":
            self.wfile.write(body)
        elif kind == "stall":
            self.wfile.write(body[:1024])
            self.wfile.flush()
            self.release.wait(60)
        else:  # trickle
            for b in body:
                if self.release.wait(0.1):
                    return
                self.wfile.write(bytes([b]))
                self.wfile.flush()


@pytest.fixture(scope="module")
def server():
    release = threading.Event()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("H", (Handler,), {"release": release}))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    release.set()
    httpd.shutdown()


def _read(url, retries=1):
    skips, waits = SkipLog(), []
    start = time.monotonic()
    samples = list(read_samples(Shard(url), skips, RetryPolicy(retries, 0.05, QUICK, sleep=waits.append)))
    return samples, skips, waits, time.monotonic() - start


def test_a_good_shard_reads_whole(server):
    samples, skips, waits, _ = _read(f"{server}/ok/0.tar")
    assert len(samples) == 4 and not skips.failed and waits == []


@pytest.mark.parametrize("kind,why", [
    ("503", "curl exit 22 (HTTP error status)"),
    ("stall", "read timed out: no data for 1 s"),
    ("trickle", "read timed out: "),
])
def test_a_failing_server_gives_the_shard_up_in_seconds(server, kind, why):
    url = f"{server}/{kind}/0.tar"
    samples, skips, waits, seconds = _read(url, retries=1)
    assert samples == [] and skips.failed[url].startswith(why), skips.failed
    assert waits == [0.05]  # the retry happened, and the loop ended
    assert seconds < (2 if kind == "503" else 8), seconds  # 2 attempts of 1-2 s (webdataset's curl: minutes)
    if kind == "trickle":
        assert "slower than 100 bytes/s" in skips.failed[url]


def test_a_stalled_pipe_command_is_killed(tmp_path):
    marker, shard = tmp_path / "still-running", tmp_path / "0.tar"
    shard.write_bytes(_tar(4, 0))
    url = f"pipe:head -c 1024 {shard}; sleep 30; touch {marker}"  # a tar's first KiB, then nothing
    samples, skips, _, seconds = _read(url, retries=0)
    assert samples == [] and skips.failed[url] == "read timed out: no data for 1 s" and seconds < 5
    time.sleep(0.5)
    assert not marker.exists()  # the shell and its sleep were killed, not left behind


def _cfg(server, *shards, **kw):
    return PretrainDataConfig(pair_shards=[f"{server}/{s}" for s in shards], batch_images=0, batch_texts=0,
                              batch_pairs=4, img_size=32, patch_size=8, tokenizer_img_size=16, max_text_len=16,
                              shuffle_buffer=4, retry_backoff=0.05, shard_read_timeout=1, shard_connect_timeout=2,
                              shard_min_rate=100, **kw)


def test_pretraining_goes_on_without_hanging_shards(server, assets):
    """One good shard among a 503 one and a stalled one: batches keep coming, the two are counted."""
    cfg = _cfg(server, "{ok/1.tar,503/2.tar,stall/3.tar}", max_bad_shard_fraction=1.0, shard_retries=0)
    start = time.monotonic()
    batches = list(islice(PretrainLoader(cfg, assets[0]), 2))  # 8 pairs: two epochs over the 3 shards
    seconds = time.monotonic() - start
    assert {k.split(":")[0] for b in batches for k in b["stats"]["keys"]["pairs"]} == {"1.tar"}
    skipped = batches[-1]["stats"]["skipped_per_shard"]
    assert set(skipped) == {f"{server}/503/2.tar", f"{server}/stall/3.tar"} and min(skipped.values()) >= 1
    assert seconds < 15, seconds


def test_pretrain_stops_with_one_line_when_a_source_hangs(server, assets, tmp_path, capsys):
    out = tmp_path / "never"
    start = time.monotonic()
    rc = pretrain_main(["--preset", "tiny", "--output", str(out), "--spm", assets[0], "--tokenizer", assets[1],
                        "--pair-shards", f"{server}/stall/{{0..2}}.tar", "--batch-images", "0", "--batch-texts", "0",
                        "--shard-retries", "0", "--shard-read-timeout", "1"])
    seconds = time.monotonic() - start
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists() and seconds < 15, seconds  # 3 shards, 2 s each
    assert len(err.strip().splitlines()) == 1
    assert "no usable sample in its first 3 shard(s)" in err and "read timed out: no data for 1 s" in err


def test_shards_from_urls_skip_trickling_images_within_the_deadline(server, tmp_path):
    table = tmp_path / "pairs.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption"])
        w.writerows([[f"{server}/img/1.jpg", "a red circle"], [f"{server}/trickle-img/2.jpg", "a blue square"],
                     [f"{server}/503/3.jpg", "gone"], [f"{server}/img/4.jpg", "a green star"]])
    start = time.monotonic()
    rc = shards_main(["--captions", str(table), "--output", str(tmp_path / "out"), "--download-timeout", "1"])
    seconds = time.monotonic() - start
    entry = read_manifest(tmp_path / "out")["kinds"]["pairs"]
    assert rc == 0 and (entry["num_samples"], entry["skipped"]) == (2, 2)
    assert seconds < 8, seconds  # the trickle: one 1 s deadline, not retried; the 503: two short retries
    assert not os.path.exists(tmp_path / "out" / ".pairs-shards.tmp")
