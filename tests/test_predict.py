"""Saved models and ``beit3 predict``: self-contained folders (copied elsewhere, the original
deleted: identical outputs), every task's predictions through the command and the ``Predictor``,
one clear line for each bad input.

Each task is fine-tuned for 2 steps through ``beit3 finetune`` (the trainer writes ``best/`` in
the saved-model format): the plumbing and the output format are the point, and the numbers are
compared with the model's own forward, not with the truth.
"""
import glob
import json
import os
import shutil
import stat

import pytest
import torch

from beit3 import BEiT3, BEiT3Config
from beit3.data.text_tokenizer import TextTokenizer
from beit3.data.transforms import build_cls_transform, build_vl_transform, eval_transform
from beit3.model.generation import DecodeConfig, generate
from beit3.cli.predict import main as predict_main
from beit3.inference.predictor import load_predictor
from beit3.model.pretrained import from_pretrained

from finetune_helpers import evaluate, finetune

pytestmark = pytest.mark.usefixtures("one_thread")
UMASK = 0o027  # not the usual 022: a file created 0600 (mkstemp) or 0644 regardless would show


TASKS = {"vqa": (), "classification": ("--img-size", "40"), "captioning": ("--num-beams", "2"), "nlvr2": ()}


@pytest.fixture(scope="module")
def runs(data, retrieval_run, tmp_path_factory):
    """Every task fine-tuned for 2 steps from random weights, written under a umask of 027 (retrieval:
    the session's shared run)."""
    root = tmp_path_factory.mktemp("predict")
    old = os.umask(UMASK)
    try:
        out = {task: finetune(task, data, None, root / task, "--max-steps", "2", *extra)
               for task, extra in TASKS.items()}
        evaluate("vqa", data, out["vqa"], root / "vqa_eval")
    finally:
        os.umask(old)
    return {**out, "retrieval": retrieval_run}


def val_images(data, n=3):
    return sorted(glob.glob(os.path.join(data.world, "images", "val", "*.*")))[:n]


def predict_lines(capsys, *argv):
    assert predict_main([str(a) for a in argv]) == 0, capsys.readouterr().err
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_best_folder_is_self_contained_and_moves(runs, data, tmp_path, capsys):
    best = runs["vqa"] / "best"
    config = json.loads((best / "config.json").read_text())
    assert config["task"] == "vqa" and config["tokenizer"] == "tokenizer.model"
    assert "/" not in json.dumps({k: config[k] for k in ("weights", "tokenizer")})  # names, not paths
    assert len(config["labels"]) == config["head_args"]["num_answers"] > 10
    assert config["preprocess"] == {"size": 32, "resize": "square", "crop_pct": 1.0, "interpolation": "bicubic",
                                    "mean": [0.5] * 3, "std": [0.5] * 3}
    assert (best / "tokenizer.model").read_bytes() == open(data.spm, "rb").read()
    meta = json.loads((best / "meta.json").read_text())
    assert meta["spm"] == "tokenizer.model"
    image = val_images(data, 1)[0]
    before = predict_lines(capsys, best, "--image", image, "--question", "what color is the circle?", "--top-k", "3")

    moved = tmp_path / "elsewhere" / "vqa"
    shutil.copytree(best, moved)
    shutil.rmtree(runs["vqa"] / "best.bak", ignore_errors=True)
    shutil.move(str(best), str(runs["vqa"] / "best.bak"))  # the original gone (restored below)
    try:
        after = predict_lines(capsys, moved, "--image", image, "--question", "what color is the circle?",
                              "--top-k", "3")
    finally:
        shutil.move(str(runs["vqa"] / "best.bak"), str(best))
    assert after == before  # identical answers and scores, bit for bit
    [line] = after
    assert [a["score"] for a in line["answers"]] == sorted((a["score"] for a in line["answers"]), reverse=True)
    assert len(line["answers"]) == 3 and all(a["answer"] in config["labels"] for a in line["answers"])

    # The top answer is the argmax of the model's own forward on the dataset's inputs.
    p = load_predictor(str(moved))
    tok = TextTokenizer(data.spm)
    ids, pad = tok.batch_encode(["what color is the circle?"], config["inference"]["max_text_len"])
    from PIL import Image
    x = build_vl_transform(32, train=False)(Image.open(image).convert("RGB"))[None]
    with torch.no_grad():
        logits = p.model(image=x, text=ids, padding_mask=pad)[0]
    assert config["labels"][int(logits.argmax())] == line["answers"][0]["answer"]
    assert line["answers"][0]["score"] == pytest.approx(float(logits.max().sigmoid()), abs=1e-6)


def test_classification_top1_is_the_forward_argmax(runs, data, capsys):
    best = runs["classification"] / "best"
    images = val_images(data, 4)
    folder = best.parent / "some_images"
    folder.mkdir(exist_ok=True)
    for path in images:
        shutil.copy(path, folder)
    lines = predict_lines(capsys, best, "--image", folder, "--top-k", "3")
    assert [os.path.basename(r["image"]) for r in lines] == sorted(os.path.basename(p) for p in images)
    model = from_pretrained(str(best))
    config = model.pretrained.config
    # The saved preprocessing is the evaluation transform (40 px: resize the short side, centre crop).
    tf = build_cls_transform(40, train=False)
    from PIL import Image
    for r in lines:
        x = tf(Image.open(r["image"]).convert("RGB"))[None]
        assert torch.equal(eval_transform(config["preprocess"])(Image.open(r["image"]).convert("RGB"))[None], x)
        with torch.no_grad():
            probs = model(image=x)[0].softmax(-1)
        top = r["top_k"][0]
        assert top["label"] == int(probs.argmax()) and top["score"] == pytest.approx(float(probs.max()), abs=1e-6)
        assert top["class_name"] == config["labels"][top["label"]] and len(r["top_k"]) == 3
    assert len(config["labels"]) == 18 and not any(label.isdigit() for label in config["labels"])


def test_results_and_saved_files_honour_the_umask(runs, tmp_path):
    want = 0o666 & ~UMASK
    files = [runs["vqa"] / "best" / n for n in ("model.safetensors", "config.json", "tokenizer.model", "meta.json")]
    files += [runs["vqa"].parent / "vqa_eval" / n for n in ("results.json", "vqa_submission_val.json")]
    for f in files:
        assert stat.S_IMODE(os.stat(f).st_mode) == want, (f, oct(os.stat(f).st_mode))


def best(runs, task):
    return str(runs[task] / "best")


def test_caption_rank_and_nlvr2(runs, data, capsys):
    images = val_images(data, 3)
    [cap] = predict_lines(capsys, best(runs, "captioning"), "--image", images[0])
    p = load_predictor(best(runs, "captioning"))
    tok = p.tokenizer
    assert p.inference == {"max_text_len": 24, "num_beams": 2, "length_penalty": 0.6, "ban_special": True}  # the recipe
    dc = DecodeConfig(num_beams=2, max_len=24, length_penalty=0.6, bos_id=tok.bos_id, eos_id=tok.eos_id,
                      pad_id=tok.pad_id, mask_id=tok.mask_id)
    tokens, scores = generate(p.model, p.images([images[0]]), p.model.cfg.depth, dc)
    assert cap == {"image": images[0], "caption": tok.decode(tokens[0]), "score": float(scores[0])}

    folder = os.path.dirname(images[0])
    [ranked] = predict_lines(capsys, best(runs, "retrieval"), "--image", folder, "--text", "a red circle",
                             "--top-k", "100")
    r = load_predictor(best(runs, "retrieval"))
    every = sorted(glob.glob(os.path.join(folder, "*.*")))
    assert len(ranked["ranking"]) == len(every)
    sims = (r.embed_images(every) @ r.embed_texts(["a red circle"])[0]).tolist()
    assert ranked["ranking"][0]["score"] == pytest.approx(max(sims), abs=1e-6)
    texts = predict_lines(capsys, best(runs, "retrieval"), "--image", images[0], "--text", "a red circle",
                          "--text", "two blue squares")[0]["ranking"]
    assert sorted(t["text"] for t in texts) == ["a red circle", "two blue squares"]
    assert texts[0]["score"] >= texts[1]["score"]

    [judged] = predict_lines(capsys, best(runs, "nlvr2"), "--image", images[0], "--image2", images[1],
                             "--text", "there is a circle")
    # The probability of "true" (class 1) of the model's own forward on the two images.
    n = from_pretrained(best(runs, "nlvr2"))
    max_len = n.pretrained.config["inference"]["max_text_len"]
    ids, pad = TextTokenizer(data.spm).batch_encode(["there is a circle"], max_len)
    from PIL import Image
    tf = build_vl_transform(32, train=False)
    x, x2 = (tf(Image.open(path).convert("RGB"))[None] for path in images[:2])
    with torch.no_grad():
        p_true = float(n(image=x, image2=x2, text=ids, padding_mask=pad)[0].softmax(-1)[1])
    assert judged["score"] == pytest.approx(p_true, abs=1e-6)
    assert judged["answer"] is (p_true > 0.5)


def test_requests_file(runs, data, tmp_path, capsys):
    images = val_images(data, 2)
    for path in images:
        shutil.copy(path, tmp_path)
    names = [os.path.basename(p) for p in images]
    lines = [{"image": names[0], "text": "a circle"}, {"image": names[1], "texts": ["a", "b", "c"], "top_k": 2}]
    (tmp_path / "requests.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = predict_lines(capsys, best(runs, "retrieval"), "--requests", tmp_path / "requests.jsonl")
    assert len(out) == 2 and len(out[0]["ranking"]) == 1 and len(out[1]["ranking"]) == 2


def test_bad_inputs_are_one_clear_line(runs, data, tmp_path, capsys):
    vqa, cls = runs["vqa"] / "best", runs["classification"] / "best"
    image = val_images(data, 1)[0]
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": image, "question": ""}) + "\n")
    cases = [
        ((vqa, "--image", tmp_path / "missing.jpg", "--question", "what?"), "missing.jpg does not exist"),
        ((vqa, "--image", broken, "--question", "what?"), f"cannot decode image {broken}"),
        ((vqa, "--image", image, "--question", "  "), "empty question"),
        ((vqa, "--requests", tmp_path / "bad.jsonl"), "bad.jsonl line 1: empty question"),
        ((cls, "--image", image, "--question", "what?"), "holds a classification model; a vqa model answers"),
        ((best(runs, "retrieval"), "--image", image), "ranks images for one --text"),
        ((tmp_path, "--image", image), "no config.json"),
    ]
    for argv, message in cases:
        assert predict_main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("beit3 predict: error: ") and message in err and err.count("\n") == 1, (argv, err)
    with pytest.raises(Exception, match="a classification model; a vqa model"):
        load_predictor(str(cls)).vqa(image, "what?")


def test_a_loaded_model_saved_again_keeps_everything(runs, data, tmp_path):
    model = from_pretrained(best(runs, "retrieval"))
    again = model.save_pretrained(str(tmp_path / "again"))
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == model.pretrained.config
    assert (tmp_path / "again" / "tokenizer.model").read_bytes() == open(data.spm, "rb").read()
    image = val_images(data, 1)[0]
    a, b = load_predictor(best(runs, "retrieval")), load_predictor(again)
    assert a.rank_texts(image, ["a red circle", "a cat"]) == b.rank_texts(image, ["a red circle", "a cat"])


def test_backbone_round_trip_and_an_older_best_folder(runs, data, tmp_path):
    model = BEiT3(BEiT3Config.from_preset("tiny", img_size=32)).eval()
    model.save_pretrained(str(tmp_path / "backbone"))
    again = from_pretrained(str(tmp_path / "backbone"))
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert type(again) is BEiT3 and torch.equal(again(image=image), model(image=image))

    old = tmp_path / "old_best"  # a best/ from before config.json: meta.json with an absolute tokenizer path
    shutil.copytree(runs["classification"] / "best", old)
    meta = json.loads((old / "meta.json").read_text())
    (old / "meta.json").write_text(json.dumps({**meta, "spm": data.spm}))
    for name in ("config.json", "tokenizer.model"):
        os.remove(old / name)
    new = load_predictor(str(runs["classification"] / "best"))
    legacy = load_predictor(str(old))
    image = val_images(data, 1)[0]
    a, b = new.classify(image, 3), legacy.classify(image, 3)
    assert [(x["label"], x["score"]) for x in a] == [(x["label"], x["score"]) for x in b]
    assert all(x["class_name"] is None for x in b)  # older folders carry no class names


def test_a_saved_folder_exports_with_its_own_config(runs, tmp_path, capsys):
    """The head count comes from config.json, not guessed from the weights; plain timm reproduces
    the saved model's vision path."""
    import timm

    from beit3.weights.backbones import vision_encoder
    from beit3.cli.export import main as export_main
    assert export_main(["--to", "timm", best(runs, "retrieval"), "-o", str(tmp_path / "timm")]) == 0
    assert "guessed" not in capsys.readouterr().out
    model = from_pretrained(best(runs, "retrieval"))
    vit = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (vit.forward_features(image) - vision_encoder(model.beit3)(image).tokens).abs().max() < 1e-5
