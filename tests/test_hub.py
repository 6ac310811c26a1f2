"""Official checkpoints by name: the registry, and downloads against a local HTTP server (checksum
good and bad, a resumed partial download, a mirror) that never load a file that is not the one named."""
import functools
import hashlib
import http.server
import os
import threading

import pytest
import torch

from beit3 import hub
from beit3.cli import main as cli_main
from beit3.config import BEiT3Config
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
