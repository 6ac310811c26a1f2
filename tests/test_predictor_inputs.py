"""What a Predictor and ``beit3 predict`` take: paths, URLs, PIL images, numpy arrays, lists of
them, several ``--image``; and one line for every saved folder or request that does not hold
together. Models are tiny, saved with random weights: the plumbing is the point, and every
number is compared with the model's own forward."""
import functools
import http.server
import json
import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from beit3 import BEiT3Config
from beit3.model.heads import CaptioningModel, ImageClassifier, NLVR2Model
from beit3.cli.predict import main as predict_main
from beit3.inference.predictor import load_predictor

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = ["circle", "square", "triangle", "star", "cross"]


def tiny():
    return BEiT3Config.from_preset("tiny", embed_dim=64, num_heads=4, ffn_dim=128, depth=2, vl_layers=1, img_size=32,
                                   patch_size=8, vocab_size=120)


def randomize(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def saved(assets, tmp_path_factory):
    """{task: folder} of a 5-class classifier (40 px: short side + centre crop; with class names), a
    captioning model and an NLVR2 model."""
    from beit3.data.text_tokenizer import TextTokenizer
    spm, _ = assets
    root = tmp_path_factory.mktemp("saved")
    words = tiny().replace(vocab_size=TextTokenizer(spm).vocab_size)  # every id the head predicts decodes
    models = {"classification": (ImageClassifier(tiny().replace(img_size=40), num_classes=5), {"labels": CLASSES}),
              "captioning": (CaptioningModel(words), {"inference": {"max_text_len": 8, "num_beams": 2}}),
              "nlvr2": (NLVR2Model(tiny()), {})}
    for task, (model, extra) in models.items():
        randomize(model).save_pretrained(str(root / task), tokenizer=spm, **extra)
    return {task: str(root / task) for task in models}


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Three PNG files of different sizes (random pixels)."""
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(40, 56), (32, 32), (48, 36)]):
        paths.append(str(folder / f"p{i}.png"))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    return paths


class Slow(http.server.SimpleHTTPRequestHandler):
    stall = 0.0
    release = threading.Event()

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.stall:
            self.release.wait(self.stall)
            return
        super().do_GET()


@pytest.fixture
def web(pictures):
    """A local http server of the pictures' folder: base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Slow, directory=os.path.dirname(pictures[0])))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Slow.stall = 0.0
    Slow.release.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    Slow.release.set()
    server.shutdown()


def test_arrays_urls_and_lists_of_images_give_the_paths_results(saved, pictures, web, monkeypatch):
    p = load_predictor(saved["classification"])
    by_path = [p.classify(x, k=5) for x in pictures]
    arrays = [np.asarray(Image.open(x).convert("RGB")) for x in pictures]
    assert [p.classify(a, k=5) for a in arrays] == by_path  # (H, W, 3) uint8
    assert p.classify(arrays[1][:, :, 0], k=2)[0]["label"] == \
        p.classify(Image.fromarray(arrays[1][:, :, 0]), k=2)[0]["label"]  # (H, W): grey
    assert p.classify(pictures, k=5) == by_path  # a list: one result each, in order
    urls = [f"{web}/{os.path.basename(x)}" for x in pictures]
    assert p.classify(urls, k=5) == by_path
    x = p.images([pictures[0]])
    with torch.no_grad():
        probs = p.model(image=x)[0].softmax(-1)
    top = by_path[0][0]
    assert top["label"] == int(probs.argmax()) and top["score"] == pytest.approx(float(probs.max()), abs=1e-6)
    assert top["class_name"] == CLASSES[top["label"]]

    for bad, message in [(np.zeros((32, 32, 3), np.float32), "dtype float32: expected uint8 pixels"),
                         (np.zeros((3, 32, 32), np.uint8), "shape (3, 32, 32)"),
                         (7, "expected a file path, an http(s) URL, a PIL image or a uint8 numpy array"),
                         (f"{web}/missing.png", "HTTP 404")]:
        with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
            p.classify(bad)
        assert e.type.__name__ == "UserError"
    monkeypatch.setattr("beit3.inference.predictor.URL_TIMEOUT", 0.5)
    Slow.stall = 30.0
    with pytest.raises(Exception, match="cannot be read \\(timed out\\)"):
        p.classify(urls[0])


def lines(capsys, *argv, code=0):
    assert predict_main([str(a) for a in argv]) == code
    captured = capsys.readouterr()
    if code:
        assert captured.err.startswith("beit3 predict: error: ") and captured.err.count("\n") == 1, captured.err
        assert "Traceback" not in captured.err
        return captured.err
    return [json.loads(line) for line in captured.out.splitlines()]


def test_several_images_on_the_command_line(saved, pictures, web, capsys):
    folder = os.path.dirname(pictures[0])
    out = lines(capsys, saved["classification"], "--image", pictures[2], "--image", f"{web}/p0.png", "--image",
                folder, "--top-k", "2")
    assert [r["image"] for r in out] == [pictures[2], f"{web}/p0.png", *pictures]  # one line each, in order
    p = load_predictor(saved["classification"])
    assert [r["top_k"] for r in out] == [p.classify(x, k=2) for x in (pictures[2], pictures[0], *pictures)]
    err = lines(capsys, saved["nlvr2"], "--image", pictures[0], "--image", pictures[1], "--image2", pictures[2],
                "--text", "two circles", code=2)
    assert "an nlvr2 model judges one pair: one --image, one --image2 and one --text (got 2 images)" in err


def test_ban_special_changes_what_captioning_can_generate(saved, pictures, capsys):
    """With [MASK] the likeliest token everywhere, the default never generates it; --no-ban-special
    lets the beams take it (and score higher)."""
    from beit3.model.generation import DecodeConfig, generate
    from beit3.model.pretrained import from_pretrained
    model = from_pretrained(saved["captioning"])
    p = load_predictor(saved["captioning"])
    tok = p.tokenizer
    with torch.no_grad():
        model.mlm_head.bias[tok.mask_id] += 30.0
    special = {tok.bos_id, tok.pad_id, tok.mask_id}
    x = p.images([pictures[0]])
    for ban in (True, False):
        dc = DecodeConfig(num_beams=2, max_len=8, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id,
                          mask_id=tok.mask_id, ban_special=ban)
        tokens, _ = generate(model, x, model.cfg.depth, dc)
        body = tokens[0, 1:][tokens[0, 1:] != tok.pad_id].tolist()
        assert (tok.mask_id in body) is not ban and (ban is False or not special & set(body)), (ban, body)

    folder = os.path.dirname(saved["captioning"])
    model.save_pretrained(os.path.join(folder, "masky"))
    default = lines(capsys, os.path.join(folder, "masky"), "--image", pictures[0])[0]
    allowed = lines(capsys, os.path.join(folder, "masky"), "--image", pictures[0], "--no-ban-special")[0]
    assert allowed["score"] > default["score"] + 1.0, (default, allowed)


def test_evaluate_takes_the_ban_special_switch_for_an_older_run():
    """A run saved before the setting existed still takes --no-ban-special; its decoder follows."""
    import dataclasses

    from beit3.cli.evaluate import build_parser
    from beit3.core.settings import given
    from beit3.jobs.finetune.evaluate import config_for
    from beit3.jobs.finetune.recipes import FinetuneConfig, get_recipe
    from beit3.jobs.finetune.tasks import build_task

    def flags(*argv):  # the FinetuneConfig fields of a command line
        return given(build_parser().parse_args(["--checkpoint", "x", *argv]), FinetuneConfig)
    saved = dataclasses.asdict(get_recipe("captioning-tiny"))
    saved.pop("ban_special")
    assert config_for({"finetune": saved}, None, None, flags()).ban_special is True
    cfg = config_for({"finetune": saved}, None, None, flags("--no-ban-special"))
    assert cfg.ban_special is False

    class Tok:
        bos_id, eos_id, pad_id, mask_id = 0, 2, 1, 99
    task = build_task(cfg, Tok())
    assert task.decode_config().ban_special is False and task.inference()["ban_special"] is False


def edit_config(folder, tmp_path, name, change):
    import shutil
    copy = tmp_path / name
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    change(config)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_saved_folders_and_requests_that_do_not_hold_together_are_one_line(saved, pictures, assets, tmp_path, capsys):
    cls = saved["classification"]
    image = pictures[0]
    no_model = edit_config(cls, tmp_path, "no_model", lambda c: c.pop("model"))
    no_pre = edit_config(cls, tmp_path, "no_pre", lambda c: c.pop("preprocess"))
    labels = edit_config(cls, tmp_path, "labels", lambda c: c.update(labels=["a", "b", "c"]))
    spm = edit_config(cls, tmp_path, "spm", lambda c: None)
    (spm / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    requests = {"utf16": "{\"image\": \"p0.png\"}\n".encode("utf-16"),
                "many": b'{"image": "p0.png", "top_k": "many"}\n', "negative": b'{"image": "p0.png", "top_k": -1}\n',
                "numbers": b'{"images": [1, 2]}\n'}
    for name, content in requests.items():
        (tmp_path / f"{name}.jsonl").write_bytes(content)
    cases = [
        ((no_model,), f"{no_model / 'config.json'} ("),
        ((no_model,), "has no 'model' entry"),
        ((no_pre,), "has no 'preprocess' entry"),
        ((labels,), "3 labels for a classification head of 5 outputs"),
        ((spm,), f"{spm / 'tokenizer.model'} (25 bytes): not a usable SentencePiece model"),
        ((cls, "--requests", tmp_path / "utf16.jsonl"), "utf16.jsonl (42 bytes): line 1 is not UTF-8 text"),
        ((cls, "--requests", tmp_path / "many.jsonl"), "many.jsonl line 1: top_k must be a positive integer, got 'many'"),
        ((cls, "--requests", tmp_path / "negative.jsonl"), "top_k must be a positive integer, got -1"),
        ((cls, "--requests", tmp_path / "numbers.jsonl"), "images must be a list of image paths or URLs, got [1, 2]"),
        ((cls, "--num-beams", "0"), "--num-beams must be >= 1, got 0"),
    ]
    for argv, message in cases:
        if "--requests" not in argv and "--num-beams" not in argv:
            argv = (*argv, "--image", image)
        err = lines(capsys, *argv, code=2)
        assert message in err, (argv, err)

    from beit3.cli.evaluate import main as evaluate_main
    assert evaluate_main(["--checkpoint", cls, "--task", "classification", "--data", str(tmp_path), "--spm",
                          str(spm / "tokenizer.model"), "--output", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("beit3 evaluate: error: ") and "is not a sentencepiece model" in err and \
        "Traceback" not in err, err
