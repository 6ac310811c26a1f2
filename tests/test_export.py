"""``beit3 export``: timm ViT, consolidated safetensors (incl. from a DeepSpeed ZeRO-3 checkpoint), official."""
import functools
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from beit3 import BEiT3, BEiT3Config
from beit3.weights.backbones import vision_encoder
from beit3.weights import from_official, load_backbone
from beit3.cli.export import main
from beit3.weights.export import create_timm_model

TOL = 1e-5


def small_config(layout="released"):
    return BEiT3Config.from_preset("tiny", layout=layout, embed_dim=64, num_heads=4, ffn_dim=128, depth=2,
                                   vl_layers=1, img_size=32, patch_size=8, vocab_size=120)


def randomized(cfg, seed=7):
    model = BEiT3(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if (p.dim() == 1 and "norm" in name and name.endswith("weight")) else 0.2 * noise)
    return model


def write_config(cfg, path):
    with open(path, "w") as f:
        json.dump(cfg.to_dict(), f)
    return str(path)


def test_timm_export_builds_loads_strictly_and_matches(tmp_path):
    cfg = small_config()
    model = randomized(cfg)
    ckpt = tmp_path / "official.pth"
    torch.save({"model": {"beit3." + k: v for k, v in _official(model).items()}}, ckpt)
    out = tmp_path / "timm"
    assert main(["--to", "timm", str(ckpt), "-o", str(out), "--config", write_config(cfg, tmp_path / "c.json")]) == 0

    config = json.loads((out / "config.json").read_text())
    eps = config["beit3"]["layer_norm_eps"]
    vit = VisionTransformer(**config["model_args"], norm_layer=functools.partial(nn.LayerNorm, eps=eps)).eval()
    result = vit.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = vision_encoder(model)(image)
        tokens = vit.forward_features(image)
        pooled = vit.forward_head(tokens)  # global_pool "token", num_classes 0: the CLS features
        hub = create_timm_model(str(out)).eval()(image)
    assert (tokens - ours.tokens).abs().max() <= TOL
    assert (tokens - model(image=image)).abs().max() <= TOL
    assert (pooled - ours.pooled).abs().max() <= TOL and (hub - pooled).abs().max() <= TOL


def _official(model):
    from beit3.weights import to_official
    return {k[len("beit3."):]: v for k, v in to_official(model).items()}


def test_safetensors_export_of_our_checkpoint_keeps_every_weight_and_the_config(tmp_path):
    cfg = small_config("paper")
    model = randomized(cfg)
    ckpt = tmp_path / "ours.pt"
    torch.save({"model": model.state_dict(), "step": 3}, ckpt)
    out = tmp_path / "ours.safetensors"
    config = write_config(cfg, tmp_path / "c.json")
    assert main(["--to", "safetensors", str(ckpt), "-o", str(out), "--config", config]) == 0
    sd = load_file(str(out))
    ref = model.state_dict()
    assert sorted(sd) == sorted(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    loaded = load_backbone(str(out))  # the config comes back from the file's metadata, not guessed
    assert loaded.config == cfg and not loaded.inferred


def test_official_export_round_trips(tmp_path):
    cfg = small_config()
    model = randomized(cfg)
    ours = tmp_path / "ours.pt"
    torch.save(model.state_dict(), ours)
    out = tmp_path / "official.pth"
    config = write_config(cfg, tmp_path / "c.json")
    assert main(["--to", "official", str(ours), "-o", str(out), "--config", config]) == 0
    again = from_official(str(out), cfg).eval()
    image, text = torch.randn(1, 3, 32, 32), torch.randint(3, 120, (1, 5))
    with torch.no_grad():
        assert torch.equal(again(image=image, text=text), model(image=image, text=text))


def test_cli_errors_are_clear(tmp_path, capsys):
    import argparse
    cfg = small_config()
    ckpt = tmp_path / "finetuned.pth"
    torch.save({"model": randomized(cfg).state_dict(), "args": argparse.Namespace(lr=1.0)}, ckpt)
    assert main(["--to", "safetensors", str(ckpt), "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="full unpickling"):
        assert main(["--to", "timm", str(ckpt), "-o", str(tmp_path / "t"), "--preset", "base", "--allow-pickle"]) == 2
    assert "checkpoint embed_dim 64 but config embed_dim 768 (base)" in capsys.readouterr().err


ZERO_SCRIPT = textwrap.dedent("""
    import json, os, socket, sys
    import torch, torch.distributed as dist
    out = sys.argv[1]
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    import deepspeed, deepspeed.comm.torch
    # One CPU process needs no shared-memory collectives; building that C++ op takes minutes.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    from beit3 import BEiT3, BEiT3Config
    torch.manual_seed(0)
    cfg = BEiT3Config.from_dict(json.load(open(os.path.join(out, "config.json"))))

    class Pretrain(torch.nn.Module):  # the backbone at .model, as the pretraining engine holds it
        def __init__(self):
            super().__init__()
            self.model = BEiT3(cfg)
            self.mlm_head = torch.nn.Linear(cfg.embed_dim, cfg.vocab_size)

    module = Pretrain()
    torch.save(module.model.state_dict(), os.path.join(out, "reference.pt"))
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}, "bf16": {"enabled": False}}
    engine, *_ = deepspeed.initialize(model=module, config=ds, model_parameters=module.parameters(),
                                      dist_init_required=False)
    engine.save_checkpoint(os.path.join(out, "checkpoints"), tag="step_00000001", save_latest=False)
    dist.destroy_process_group()
""")


def test_safetensors_export_from_a_zero3_checkpoint(tmp_path):
    cfg = small_config()
    write_config(cfg, tmp_path / "config.json")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", ZERO_SCRIPT, str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    tag_dir = tmp_path / "checkpoints" / "step_00000001"
    assert any(f.endswith("model_states.pt") for f in os.listdir(tag_dir))

    out = tmp_path / "consolidated.safetensors"
    assert main(["--to", "safetensors", str(tag_dir), "-o", str(out), "--config", str(tmp_path / "config.json")]) == 0
    sd, ref = load_file(str(out)), torch.load(tmp_path / "reference.pt", weights_only=True)
    assert sorted(sd) == sorted(ref)  # "model." stripped, mlm_head dropped
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["beit3_config"]) == cfg.to_dict()

    heads = tmp_path / "with_heads.safetensors"
    args = ["--to", "safetensors", str(tmp_path / "checkpoints"), "--tag", "step_00000001", "-o", str(heads),
            "--config", str(tmp_path / "config.json"), "--keep-heads"]
    assert main(args) == 0
    assert {"mlm_head.weight", "mlm_head.bias"} <= set(load_file(str(heads)))


def test_plain_timm_local_dir_reproduces_the_vision_encoder(tmp_path):
    """No extra arguments: config.json alone gives timm BEiT-3's LayerNorm eps (1e-5, not timm's 1e-6)."""
    import timm
    cfg = small_config()
    model = randomized(cfg)
    torch.save(model.state_dict(), tmp_path / "ours.pt")
    out = tmp_path / "timm"
    assert main(["--to", "timm", str(tmp_path / "ours.pt"), "-o", str(out), "--config",
                 write_config(cfg, tmp_path / "c.json")]) == 0
    vit = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert {m.eps for m in vit.modules() if isinstance(m, nn.LayerNorm)} == {cfg.layer_norm_eps}
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        diff = (vit.forward_features(image) - vision_encoder(model)(image).tokens).abs().max().item()
    assert diff < 1e-5, diff  # measured 0.0 (the same kernels); with timm's default eps 1e-6: 1e-4 to 1e-2


def test_timm_export_refuses_an_eps_timm_cannot_build(tmp_path, capsys):
    cfg = small_config().replace(layer_norm_eps=1e-3)
    torch.save(randomized(cfg).state_dict(), tmp_path / "ours.pt")
    assert main(["--to", "timm", str(tmp_path / "ours.pt"), "-o", str(tmp_path / "t"), "--config",
                 write_config(cfg, tmp_path / "c.json")]) == 1
    assert "layer_norm_eps 0.001" in capsys.readouterr().err
    assert not (tmp_path / "t" / "model.safetensors").exists()


def test_exported_files_honour_the_umask(tmp_path):
    """safetensors' save_file creates 0600 files whatever the umask; outputs get what open() would."""
    import stat
    cfg = small_config()
    torch.save(randomized(cfg).state_dict(), tmp_path / "ours.pt")
    old = os.umask(0o027)
    try:
        assert main(["--to", "timm", str(tmp_path / "ours.pt"), "-o", str(tmp_path / "t"), "--config",
                     write_config(cfg, tmp_path / "c.json")]) == 0
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE(os.stat(tmp_path / "t" / name).st_mode) == 0o640, name


def test_an_export_never_overwrites_what_it_reads(tmp_path, capsys):
    """An output that is, lies inside or contains an input (symlinks resolved) is refused before
    anything is loaded; every input stays byte-identical."""
    cfg = small_config()
    saved = tmp_path / "saved"
    randomized(cfg).save_pretrained(str(saved))
    weights = tmp_path / "w.safetensors"
    assert main(["--to", "safetensors", str(saved), "-o", str(weights)]) == 0
    config = write_config(cfg, tmp_path / "c.json")
    (tmp_path / "link").symlink_to(saved)
    files = [*saved.iterdir(), weights, tmp_path / "c.json"]
    before = {f: f.read_bytes() for f in files}
    cases = [
        (["--to", "timm", saved, "-o", saved], f"-o/--output {saved} is the input {saved}"),
        (["--to", "timm", tmp_path / "link", "-o", saved], "is the input"),  # through a symlink
        (["--to", "timm", saved / "model.safetensors", "-o", saved], "contains the input"),
        (["--to", "onnx", saved, "-o", saved / "onnx"], "lies inside the input"),
        (["--to", "safetensors", weights, "-o", weights], f"{weights} is the input {weights}"),
        (["--to", "safetensors", saved / "model.safetensors", "-o", saved / "config.json"], "is the input"),
        (["--to", "official", weights, "-o", config, "--config", config], "is the input"),
    ]
    for argv, message in cases:
        assert main([str(a) for a in argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("beit3 export: error: ") and err.count("\n") == 1 and message in err, err
        assert "choose another output" in err
    assert {f: f.read_bytes() for f in files} == before
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors"]  # no onnx/ in it


# -- exports carry their preprocessing ------------------------------------------------------------------
def a_picture(width=48, height=32, seed=3):
    """A non-square picture: a square resize and a centre crop give different inputs."""
    from PIL import Image
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def saved_task_model(task, folder, spm=None, img_size=32, **preprocess):
    """A task model with random weights (and heads) saved with its preprocessing and tokenizer."""
    from beit3.data.transforms import cls_preprocess
    from beit3.model.heads import ImageClassifier, RetrievalModel
    cfg = small_config().replace(img_size=img_size)
    model = RetrievalModel(cfg) if task == "retrieval" else ImageClassifier(cfg, num_classes=5)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    extra = {"preprocess": cls_preprocess(img_size, **preprocess)} if task == "classification" else {}
    model.save_pretrained(str(folder), tokenizer=spm, **extra)
    return str(folder)


@pytest.mark.parametrize("task", ["retrieval", "classification"])
def test_timm_own_preprocessing_reproduces_the_predictor(task, tmp_path):
    """timm's resolve_data_config + create_transform on the export give the predictor's input and
    tokens: a square resize for vision-language models, short side + centre crop for classifiers."""
    import timm
    from timm.data import create_transform, resolve_data_config

    from beit3.inference.predictor import load_predictor
    saved = saved_task_model(task, tmp_path / "saved", img_size=32 if task == "retrieval" else 40, crop_pct=0.875)
    assert main(["--to", "timm", saved, "-o", str(tmp_path / "timm")]) == 0
    vit = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    transform = create_transform(**resolve_data_config({}, model=vit))
    p = load_predictor(saved)
    picture = a_picture()
    ours = p.images([picture])
    assert torch.equal(transform(picture)[None], ours)  # the same pixels, bit for bit
    with torch.no_grad():
        diff = (vit.forward_features(transform(picture)[None]) - p.model.beit3(image=ours)).abs().max().item()
    assert diff < 1e-4, diff  # measured 0.0; timm's default centre crop: 4.05 for the retrieval model


def onnx_image_input(path, p):
    """docs/models.md's recipe: preprocess.json's "image" with PIL and numpy only."""
    from PIL import Image
    img = (path if isinstance(path, Image.Image) else Image.open(path)).convert("RGB")
    size, resample = p["size"], getattr(Image.Resampling, p["interpolation"].upper())
    if p["resize"] == "square":
        img = img.resize((size, size), resample)
    elif p["resize"] == "short_side":  # the short side to size / crop_pct, then the centre
        short, (w, h) = int(size / p["crop_pct"]), img.size
        w, h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        img = img.resize((w, h), resample)
        left, top = int(round((w - size) / 2)), int(round((h - size) / 2))
        img = img.crop((left, top, left + size, top + size))
    mean, std = np.array(p["mean"], dtype=np.float32), np.array(p["std"], dtype=np.float32)
    x = (np.asarray(img, dtype=np.float32) / 255 - mean) / std
    return x.transpose(2, 0, 1)[None]  # (1, 3, S, S)


def onnx_text_input(texts, t, sp):
    """docs/models.md's recipe: preprocess.json's "text" with the shipped SentencePiece model."""
    rows = [[t["bos_id"]] + [i + t["piece_offset"] if i else t["unk_id"] for i in sp.encode(s)][:t["max_len"] - 2]
            + [t["eos_id"]] for s in texts]
    width = max(map(len, rows))
    ids = np.full((len(rows), width), t["pad_id"], dtype=np.int64)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = row
    return ids, np.arange(width)[None, :] >= np.array([len(r) for r in rows])[:, None]


def test_onnx_export_matches_pytorch_and_embeds_as_the_predictor(assets, tmp_path):
    """Both graphs match PyTorch in onnxruntime (another batch size and length than traced, a padded
    row); a retrieval model's end in its projection heads and normalisation, and preprocess.json
    with the shipped SentencePiece model, applied with PIL/numpy, give embed_images / embed_texts."""
    ort = pytest.importorskip("onnxruntime")
    import sentencepiece

    from beit3.weights.backbones import text_encoder
    from beit3.inference.predictor import load_predictor
    spm, _ = assets
    saved = saved_task_model("retrieval", tmp_path / "saved", spm=spm)
    out = tmp_path / "onnx"
    assert main(["--to", "onnx", saved, "-o", str(out)]) == 0
    check = json.loads((out / "onnx_check.json").read_text())["max_abs_diff"]
    assert max(v for d in check.values() for v in d.values()) < 2e-5, check  # measured 2e-6 to 5e-6
    model = load_predictor(saved).model.beit3
    image, text = torch.randn(4, 3, 32, 32), torch.randint(4, 120, (3, 9))
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[1, 5:] = True
    vis = ort.InferenceSession(str(out / "vision_encoder.onnx"), providers=["CPUExecutionProvider"])
    txt = ort.InferenceSession(str(out / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref_v, ref_t = vision_encoder(model)(image), text_encoder(model)(text, pad)
        full = model(text=text, text_padding_mask=pad)
    got_v = vis.run(None, {"image": image.numpy()})
    got_t = txt.run(None, {"text": text.numpy(), "padding_mask": pad.numpy()})
    assert (torch.from_numpy(got_v[0]) - ref_v.tokens).abs().max() < 2e-5
    assert (torch.from_numpy(got_t[1]) - ref_t.pooled).abs().max() < 2e-5
    assert (torch.from_numpy(got_t[0])[~pad] - full[~pad]).abs().max() < 2e-5  # and the full model's

    recipe = json.loads((out / "preprocess.json").read_text())
    assert (out / recipe["text"]["tokenizer"]).read_bytes() == open(spm, "rb").read()
    assert recipe["outputs"] == {"vision": ["tokens", "pooled", "retrieval_embedding"], "text": ["tokens", "pooled", "retrieval_embedding"]}
    p = load_predictor(saved)
    pictures = [a_picture(seed=s) for s in (3, 4)]
    image = np.concatenate([onnx_image_input(x, recipe["image"]) for x in pictures])
    [embedding] = vis.run(["retrieval_embedding"], {"image": image})
    assert np.abs(embedding - p.embed_images(pictures).numpy()).max() < 1e-4  # measured 4e-7

    texts = ["a red circle left of a square", "two"]  # of different lengths: the second is padded
    sp = sentencepiece.SentencePieceProcessor(model_file=str(out / recipe["text"]["tokenizer"]))
    ids, pad = onnx_text_input(texts, recipe["text"], sp)
    assert pad[1].any()
    [embedding] = txt.run(["retrieval_embedding"], {"text": ids, "padding_mask": pad})
    assert np.abs(embedding - p.embed_texts(texts).numpy()).max() < 1e-4
