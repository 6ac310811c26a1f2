"""Official checkpoints by name: the registry, and downloads against a local HTTP server (checksum
good and bad, a resumed partial download, a mirror) that never load a file that is not the one named."""
import functools
import hashlib
import http.server
import os
import socket
import threading
import time

import pytest
import torch

from beit3.weights import hub
from beit3.cli import main as cli_main
from beit3.model.config import BEiT3Config
from beit3.weights.official import save_official
from beit3.model import BEiT3


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with HTTP range requests (206 Partial Content), counting the bytes sent."""
    sent = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            return self.send_error(404)
        data = open(path, "rb").read()
        start = 0
        if "Range" in self.headers:
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])
        RangeHandler.sent.append(len(data) - start)


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A mirror serving a small released-layout checkpoint under an official name, and a fresh cache."""
    files = tmp_path / "mirror"
    files.mkdir()
    cfg = BEiT3Config.from_preset("tiny", layout="released")
    model = BEiT3(cfg)
    name = "beit3_base_patch16_224"
    save_official(model, str(files / f"{name}.pth"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RangeHandler, directory=str(files)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("BEIT3_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("BEIT3_MIRROR", f"http://127.0.0.1:{server.server_address[1]}")
    RangeHandler.sent.clear()
    yield name, files / f"{name}.pth", model
    server.shutdown()


def test_registry_names_the_official_files():
    m = hub.info("beit3_large_patch16_480_vqa")
    assert (m.preset, m.img_size, m.task) == ("large", 480, "vqa")
    assert m.url.endswith("/beit3/vqa/beit3_large_patch16_480_vqa.pth")
    assert len(hub.list_models(task="backbone")) == 6 and len(hub.list_models("*retrieval")) == 4
    with pytest.raises(hub.UserError, match="unknown model 'beit3_huge'"):
        hub.info("beit3_huge")


def test_download_checks_the_sha256_and_never_keeps_a_wrong_file(mirror, capsys):
    name, source, _ = mirror
    good = hashlib.sha256(source.read_bytes()).hexdigest()
    path = hub.download(name, sha256=good, progress=False)
    assert open(path, "rb").read() == source.read_bytes()
    os.remove(path)
    with pytest.raises(hub.DownloadError, match="does not match the expected 00+; the file was deleted"):
        hub.download(name, sha256="0" * 64, progress=False)
    assert not os.path.exists(path)
    assert cli_main(["download", name]) == 0  # no checksum pinned: the computed one is printed
    out = capsys.readouterr()
    assert out.out.strip() == path and f"sha256 {good} (not pinned" in out.err


def test_download_resumes_a_partial_file(mirror):
    name, source, _ = mirror
    data = source.read_bytes()
    part = os.path.join(hub.cache_dir(), os.path.basename(source)) + ".part"
    os.makedirs(hub.cache_dir(), exist_ok=True)
    with open(part, "wb") as f:
        f.write(data[:1000])
    path = hub.download(name, sha256=hashlib.sha256(data).hexdigest(), progress=False)
    assert RangeHandler.sent == [len(data) - 1000]  # only the missing bytes travelled
    assert open(path, "rb").read() == data and not os.path.exists(part)


def test_create_model_pretrained_loads_the_downloaded_weights(mirror, monkeypatch):
    name, _, model = mirror
    # the mirror holds a tiny model under the base name: build it with tiny's sizes
    tiny = BEiT3Config.from_preset("tiny", layout="released")
    monkeypatch.setitem(hub.MODELS, name, hub.MODELS[name].__class__(name, hub.MODELS[name].path, "tiny",
                                                                      tiny.img_size, None))
    loaded = hub.create_model(name, pretrained=True)
    image = torch.randn(1, 3, tiny.img_size, tiny.img_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(image=image), model.eval()(image=image))
    with pytest.raises(hub.UserError, match="not a network"):
        hub.create_model("beit3.spm")


def error_line(err: str) -> str:
    """The one error line of ``err`` (the progress bar shares stderr); no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("beit3 download: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- downloads that must not be taken for complete ------------------------------------------------------
class Misbehaving(http.server.BaseHTTPRequestHandler):
    """A mirror of one file that announces no length and closes after ``cut`` bytes of a plain GET;
    with ``ranges`` it answers a range request properly (206, Content-Range with the total);
    ``stall`` seconds of silence after ``cut`` bytes (or before the headers when ``cut`` is None)."""
    data, cut, ranges, stall, requests = b"", 0, False, 0.0, []
    release = threading.Event()
    protocol_version = "HTTP/1.0"  # no length: the body ends when the connection closes

    def log_message(self, *args):
        pass

    def do_GET(self):
        Misbehaving.requests.append(self.headers.get("Range"))
        if self.cut is None:
            self.release.wait(self.stall)
            return
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if "Range" in self.headers else 0
        if start and self.ranges:
            if start >= len(self.data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(self.data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(self.data) - 1}/{len(self.data)}")
            self.end_headers()
            self.wfile.write(self.data[start:])
            return
        self.send_response(200)
        self.end_headers()
        self.wfile.write(self.data[:self.cut])
        self.wfile.flush()
        self.release.wait(self.stall)


@pytest.fixture
def misbehaving(tmp_path, monkeypatch):
    """(name, the file's bytes, configure(**attrs)): a 300,000-byte zip (a torch file) served by
    ``Misbehaving`` under an official name, and a fresh cache."""
    torch.save({"w": torch.arange(74_900, dtype=torch.float32)}, tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Misbehaving)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("BEIT3_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("BEIT3_MIRROR", f"http://127.0.0.1:{server.server_address[1]}")
    Misbehaving.release.clear()
    Misbehaving.requests = []

    def configure(**attrs):
        for k, v in {"data": data, "cut": len(data) // 2, "ranges": False, "stall": 0.0, **attrs}.items():
            setattr(Misbehaving, k, v)
    configure()
    yield "beit3_base_patch16_224", data, configure
    Misbehaving.release.set()
    server.shutdown()


def test_a_download_cut_short_without_a_length_is_never_taken_for_the_file(misbehaving, capsys):
    name, data, _ = misbehaving
    path = os.path.join(hub.cache_dir(), f"{name}.pth")
    assert len(data) > 299_000
    assert cli_main(["download", name]) == 1
    err = error_line(capsys.readouterr().err)
    assert f"{path}.part ({len(data) // 2:,} bytes): incomplete or corrupted download of {name}.pth: not a " \
           f"complete zip archive" in err and "the server announced no length" in err
    assert not os.path.exists(path) and os.path.getsize(path + ".part") == len(data) // 2


def test_a_download_without_a_length_is_completed_by_range_requests(misbehaving):
    name, data, configure = misbehaving
    configure(ranges=True)
    path = hub.download(name, progress=False)
    assert open(path, "rb").read() == data and not os.path.exists(path + ".part")
    # the cut GET; a range request past what came, which shows there is more; the rest, with the total
    assert Misbehaving.requests == [None, f"bytes={len(data) // 2}-", f"bytes={len(data) // 2}-"]


def test_a_stalled_server_times_out(misbehaving):
    name, data, configure = misbehaving
    configure(stall=30.0)  # half the file, then silence
    t0 = time.monotonic()
    with pytest.raises(hub.DownloadError, match=f"broke off after {len(data) // 2:,} bytes \\(timed out\\)"):
        hub.download(name, progress=False, timeout=0.5)
    configure(cut=None, stall=30.0)  # not even the headers
    with pytest.raises(hub.DownloadError, match="failed: timed out; without network, copy"):
        hub.download(name, progress=False, timeout=0.5)
    assert time.monotonic() - t0 < 10


def test_a_folder_or_file_url_is_a_mirror(misbehaving, tmp_path, monkeypatch, capsys):
    name, data, _ = misbehaving
    folder = tmp_path / "mirror folder"
    folder.mkdir()
    (folder / f"{name}.pth").write_bytes(data)
    for value in (str(folder), folder.as_uri()):
        monkeypatch.setenv("BEIT3_MIRROR", value)
        path = hub.download(name, progress=False)
        assert open(path, "rb").read() == data and not os.path.exists(path + ".part")
        os.remove(path)
    monkeypatch.setenv("BEIT3_MIRROR", str(tmp_path / "elsewhere"))
    assert cli_main(["download", name]) == 1
    assert f"BEIT3_MIRROR {tmp_path / 'elsewhere'} (does not exist): not a folder" in error_line(capsys.readouterr().err)
    assert Misbehaving.requests == []  # nothing went over HTTP


def test_no_network_names_the_mirror_and_the_cache_and_offline_never_tries(misbehaving, monkeypatch, capsys):
    name, data, _ = misbehaving
    cache = os.path.join(hub.cache_dir(), f"{name}.pth")
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with monkeypatch.context() as m:
        m.setenv("BEIT3_MIRROR", f"http://127.0.0.1:{port}")
        assert cli_main(["download", name]) == 1
    err = error_line(capsys.readouterr().err)
    assert "Connection refused" in err and "BEIT3_MIRROR" in err and cache in err, err

    monkeypatch.setenv("BEIT3_OFFLINE", "1")
    with pytest.raises(hub.DownloadError, match=f"offline .*{name}.pth is not in the cache {hub.cache_dir()}"):
        hub.create_model(name, pretrained=True)
    monkeypatch.delenv("BEIT3_OFFLINE")
    assert cli_main(["download", name, "--offline"]) == 1
    assert f"copy it there as {cache}" in error_line(capsys.readouterr().err)
    os.makedirs(hub.cache_dir(), exist_ok=True)
    with open(cache, "wb") as f:
        f.write(data)
    assert cli_main(["download", name, "--offline"]) == 0  # the cached file
    assert capsys.readouterr().out.strip() == cache and Misbehaving.requests == []  # no request, ever


def test_list_models_refuses_an_unknown_task(capsys):
    assert cli_main(["list-models", "--task", "ocr"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == (
        "beit3 list-models: error: unknown task 'ocr'; the registry's tasks: backbone, captioning, classification, "
        "nlvr2, retrieval, tokenizer, vqa\n")
    assert cli_main(["list-models", "--task", "nlvr2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4
