"""VQ-KD tokenizer: codebook math, checkpoint layout, teachers, and short CPU training runs."""
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from beit3.model.config import BEiT3Config
from beit3.vqkd.quantizer import NormEMAVectorQuantizer
from beit3.vqkd.teachers import build_teacher
from beit3.cli.train_tokenizer import main
from beit3.jobs.tokenizer.train import read_metrics, train_tokenizer
from beit3.vqkd.vqkd import VQKD, VQKDConfig, load_trained_tokenizer, load_vqkd

# Names in beit2's vqkd_encoder_base_decoder_3x768x12_clip checkpoint (modeling_vqkd.py, BEiT's
# modeling_finetune.VisionTransformer with use_mean_pooling, norm_ema_quantizer.py).
OFFICIAL_KEYS = {
    "encoder.cls_token": (1, 1, 768), "encoder.pos_embed": (1, 197, 768),
    "encoder.patch_embed.proj.weight": (768, 3, 16, 16), "encoder.patch_embed.proj.bias": (768,),
    "encoder.blocks.0.norm1.weight": (768,), "encoder.blocks.0.attn.qkv.weight": (2304, 768),
    "encoder.blocks.0.attn.q_bias": (768,), "encoder.blocks.0.attn.v_bias": (768,),
    "encoder.blocks.0.attn.proj.weight": (768, 768), "encoder.blocks.11.mlp.fc1.weight": (3072, 768),
    "encoder.blocks.11.mlp.fc2.bias": (768,), "encoder.blocks.11.norm2.bias": (768,),
    "encoder.fc_norm.weight": (768,), "encoder.fc_norm.bias": (768,),
    "decoder.cls_token": (1, 1, 768), "decoder.pos_embed": (1, 197, 768),
    "decoder.patch_embed.proj.weight": (768, 32, 1, 1), "decoder.blocks.2.attn.qkv.weight": (2304, 768),
    "decoder.blocks.0.mlp.fc2.bias": (768,), "decoder.fc_norm.weight": (768,),
    "quantize.embedding.weight": (8192, 32), "quantize.embedding.cluster_size": (8192,),
    "quantize.embedding.embed_avg": (8192, 32), "quantize.embedding.initted": (1,),
    "quantize.cluster_size": (8192,),
    "encode_task_layer.0.weight": (768, 768), "encode_task_layer.2.weight": (32, 768),
    "encode_task_layer.2.bias": (32,), "decode_task_layer.0.bias": (768,),
    "decode_task_layer.2.weight": (512, 768),
}


def make_images(root, n=200, size=64, seed=0):
    """Flat noisy backgrounds with 1-3 rectangles/ellipses in a contrasting colour."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        bg = rng.integers(0, 256, 3)
        pixels = np.clip(bg + rng.normal(0, 3, (size, size, 3)), 0, 255).astype(np.uint8)
        im = Image.fromarray(pixels)
        draw = ImageDraw.Draw(im)
        for _ in range(rng.integers(1, 4)):
            x0, y0 = (int(v) for v in rng.integers(0, size - 16, 2))
            x1, y1 = x0 + int(rng.integers(12, size - x0 + 1)), y0 + int(rng.integers(12, size - y0 + 1))
            fill = tuple(int(c) for c in np.clip(255 - bg + rng.integers(-40, 41, 3), 0, 255))
            (draw.rectangle if rng.random() < 0.5 else draw.ellipse)([x0, y0, x1, y1], fill=fill)
        sub = root / f"part{i // 100}"  # nested folders: the loader searches recursively
        sub.mkdir(exist_ok=True)
        im.save(sub / f"{i:03d}.png")
    return root


def load_pixels(root, count):
    files = sorted(root.rglob("*.png"))[:count]
    return torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1)
                        for f in files]).float() / 255


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = make_images(tmp_path_factory.mktemp("shapes"))
    (root / "part0" / "broken.png").write_bytes(b"this is not a png")
    return root


@pytest.fixture(scope="module")
def hog_run(image_dir, tmp_path_factory):
    torch.manual_seed(0)
    config = VQKDConfig.from_preset("tiny")
    teacher = build_teacher("hog", grid=config.grid_size, img_size=config.img_size)
    out = tmp_path_factory.mktemp("hog_run")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        path = train_tokenizer(image_dir, config, teacher, steps=120, batch_size=8, lr=1e-3, output_dir=out,
                               seed=0, log_every=20, min_crop_scale=0.5, usage_window=50)
    return path, out, [str(w.message) for w in record]


# -- quantizer -----------------------------------------------------------------------------------
def _quantizer(weight, decay=0.9, restart_after=0):
    q = NormEMAVectorQuantizer(weight.shape[0], weight.shape[1], beta=1.0, decay=decay, kmeans_init=False,
                               restart_after=restart_after)
    q.embedding.weight.copy_(weight)
    return q


def test_ema_update_moves_codes_towards_their_vectors():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    q = _quantizer(w).train()
    avg_before = q.embedding.embed_avg.clone()
    z = torch.tensor([[[2.0, 0.4], [0.2, 1.0], [0.6, 0.8]]])  # (B=1, N=3, D=2), not unit
    z_q, idx, loss = q(z)
    zn = F.normalize(z[0], dim=-1)
    assert idx.tolist() == [[0, 1, 1]]
    assert torch.allclose(z_q[0], w[[0, 1, 1]])  # forward value: the codes before the update
    assert torch.allclose(loss, F.mse_loss(w[[0, 1, 1]], zn))
    # w_k <- l2norm(0.9 w_k + 0.1 l2norm(mean of assigned)), unassigned codes stay
    exp0 = F.normalize(0.9 * w[0] + 0.1 * zn[0], dim=0)
    exp1 = F.normalize(0.9 * w[1] + 0.1 * F.normalize((zn[1] + zn[2]) / 2, dim=0), dim=0)
    new = q.embedding.weight
    assert torch.allclose(new[0], exp0, atol=1e-6) and torch.allclose(new[1], exp1, atol=1e-6)
    assert torch.equal(new[2], w[2])
    assert F.cosine_similarity(new[0], zn[0], dim=0) > F.cosine_similarity(w[0], zn[0], dim=0)
    assert torch.allclose(q.cluster_size, torch.tensor([0.1, 0.2, 0.0]))
    assert torch.allclose(q.embedding.embed_avg[1], 0.9 * avg_before[1] + 0.1 * (zn[1] + zn[2]))


def test_eval_mode_and_assign_leave_the_codebook_alone():
    w = F.normalize(torch.randn(5, 4), dim=-1)
    q = _quantizer(w).eval()
    z = torch.randn(2, 6, 4)
    _, idx, _ = q(z)
    assert torch.equal(q.embedding.weight, w) and q.cluster_size.sum() == 0
    assert torch.equal(q.train().assign(z), idx)
    assert torch.equal(q.embedding.weight, w)


def test_kmeans_init_runs_once_on_the_first_training_batch():
    q = NormEMAVectorQuantizer(2, 3, kmeans_init=True)
    assert q.embedding.initted.item() == 0 and q.embedding.weight.abs().sum() == 0
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    z = torch.stack([a + 0.05 * torch.randn(3) for _ in range(20)] + [b + 0.05 * torch.randn(3) for _ in range(20)])
    q.train()(z[None])
    assert q.embedding.initted.item() == 1
    codes = q.embedding.weight
    assert torch.allclose(codes.norm(dim=-1), torch.ones(2))
    assert sorted((codes @ a).gt(0.95).tolist()) == [False, True]  # one code per cluster
    assert sorted((codes @ b).gt(0.95).tolist()) == [False, True]


def test_unused_codes_restart_on_batch_vectors():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    q = _quantizer(w, restart_after=2).train()
    z = F.normalize(torch.tensor([[[1.0, 0.1], [0.1, 1.0]]]), dim=-1)
    q(z)
    assert torch.equal(q.embedding.weight[2], w[2])  # unused once: kept
    q(z)
    restarted = q.embedding.weight[2]
    assert any(torch.allclose(restarted, v) for v in z[0])
    assert q.unused_steps.tolist() == [0, 0, 0]


def test_straight_through_gradient_reaches_the_encoder():
    model = VQKD(VQKDConfig.from_preset("tiny")).train()
    images, target = torch.rand(2, 3, 64, 64), torch.randn(2, 64, 108)
    out = model(images, target)
    out.rec_loss.backward()  # the reconstruction term alone reaches the encoder only through z_q
    for name in ("encoder.patch_embed.proj.weight", "encoder.blocks.0.attn.qkv.weight", "encode_task_layer.2.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert not any(name.startswith("quantize") for name, _ in model.named_parameters())


# -- checkpoint layout ---------------------------------------------------------------------------
def test_base_state_dict_has_official_beit2_keys():
    with torch.device("meta"):
        model = VQKD(VQKDConfig.from_preset("base"))
    state = model.state_dict()
    for key, shape in OFFICIAL_KEYS.items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, (key, tuple(state[key].shape))
    assert not any("k_bias" in k or "gamma" in k or k.startswith(("encoder.head", "encoder.norm.")) for k in state)
    assert model.grid_size == 14


def test_tiny_grid_matches_beit3_tiny():
    assert VQKDConfig.from_preset("tiny").grid_size == BEiT3Config.from_preset("tiny").grid_size == 8
    with pytest.raises(TypeError, match="colour"):
        VQKDConfig.from_preset("tiny", colour=3)


def test_load_vqkd_round_trips_strictly(tmp_path):
    config = VQKDConfig.from_preset("tiny")
    model = VQKD(config)
    state = model.state_dict()
    # beit2 release layout: the weights under "model", plus teacher keys its own loader drops
    torch.save({"model": {**state, "teacher_model.visual.proj": torch.zeros(3),
                          "scaling_layer.shift": torch.zeros(3)}}, tmp_path / "vqkd.pth")
    loaded = load_vqkd(tmp_path / "vqkd.pth", config)
    assert set(loaded.state_dict()) == set(state)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(load_vqkd(state, config).quantize.embedding.weight, state["quantize.embedding.weight"])


def test_load_vqkd_names_missing_unexpected_and_misshaped_keys(tmp_path):
    config = VQKDConfig.from_preset("tiny")
    state = VQKD(config).state_dict()
    broken = {k: v for k, v in state.items() if k != "quantize.embedding.weight"}
    broken["encoder.blocks.0.attn.k_bias"] = torch.zeros(96)
    with pytest.raises(ValueError, match=r"missing keys: quantize\.embedding\.weight.*unexpected keys: "
                                         r"encoder\.blocks\.0\.attn\.k_bias"):
        load_vqkd(broken, config)
    with pytest.raises(ValueError, match=r"decode_task_layer\.2\.weight: checkpoint \(512, 96\)"):
        load_vqkd({**state, "decode_task_layer.2.weight": torch.zeros(512, 96)}, config)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_vqkd(tmp_path / "nope.pth", config)


# -- teachers ------------------------------------------------------------------------------------
def test_hog_teacher_bins_edge_orientations():
    teacher = build_teacher("hog", grid=8, img_size=64)
    assert teacher.dim == 3 * 9 * 2 * 2
    vertical = torch.zeros(1, 3, 64, 64)
    vertical[..., :, 36:] = 1.0  # intensity changes along x: gradient angle 0 -> bin 0
    horizontal = vertical.transpose(-1, -2)  # changes along y: angle pi/2 -> bin 4 (of 9, 20 deg each)
    for image, bin_ in ((vertical, 0), (horizontal, 4)):
        feats = teacher(image)[0].reshape(8, 8, 3, 9, 2, 2)  # (gy, gx, channel, bin, cell_y, cell_x)
        edge_patches = feats[:, 4] if bin_ == 0 else feats[4, :]  # the column/row of patches at px 32..39
        energy = edge_patches.pow(2).sum(dim=(0, 1, 3, 4))  # per bin
        assert energy[bin_] > 0 and energy.sum() == energy[bin_]
        flat = feats[:, :3] if bin_ == 0 else feats[:3, :]
        assert flat.abs().sum() == 0
    assert torch.allclose(teacher(vertical).norm(dim=-1).max(), torch.tensor(1.0))


def test_pixel_teacher_normalises_each_patch():
    teacher = build_teacher("pixel", grid=8, img_size=64)
    feats = teacher(torch.rand(2, 3, 64, 64))
    assert feats.shape == (2, 64, 192) and teacher.dim == 192
    assert feats.mean(-1).abs().max() < 1e-5
    assert torch.allclose(feats.std(-1), torch.ones(2, 64), atol=1e-3)


def test_timm_teacher_reads_local_weights_and_resamples_to_the_grid(tmp_path):
    import timm

    # timm's test_vit: 160 px in 16 px patches (a 10x10 grid), 64 wide, one CLS token
    source = timm.create_model("test_vit", pretrained=False, num_classes=5)
    torch.save({"model": source.state_dict()}, tmp_path / "vit.pth")
    teacher = build_teacher("test_vit", tmp_path / "vit.pth", grid=8, img_size=64)
    images = torch.rand(2, 3, 64, 64)
    feats = teacher(images)
    assert feats.shape == (2, 64, 64) and teacher.dim == 64
    data = timm.data.resolve_model_data_config(source)
    x = F.interpolate(images, size=(160, 160), mode="bicubic", align_corners=False).clamp(0, 1)
    x = (x - torch.tensor(data["mean"]).view(1, 3, 1, 1)) / torch.tensor(data["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = source.forward_features(x)[:, 1:].transpose(1, 2).reshape(2, 64, 10, 10)
    expected = F.interpolate(tokens, size=(8, 8), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    assert torch.allclose(feats, expected, atol=1e-4)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_teacher_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_teacher("test_vit", tmp_path / "missing.pth", grid=8, img_size=64)
    with pytest.raises(ValueError, match="needs a local weights file"):
        build_teacher("test_vit", None, grid=8, img_size=64)
    with pytest.raises(ValueError, match="unknown teacher 'no_such_net'"):
        build_teacher("no_such_net", grid=8, img_size=64)
    try:
        import open_clip  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install open_clip_torch"):
            build_teacher("open_clip:ViT-B-16", tmp_path / "clip.bin", grid=14, img_size=224)


# -- training ------------------------------------------------------------------------------------
def test_training_lowers_the_loss_and_uses_the_codebook(hog_run):
    _, out, warnings = hog_run
    metrics = read_metrics(out)
    first, last = metrics[0], metrics[-1]
    # 120 steps fit the average HOG target (rec ~0.50 here); getting below that level takes
    # ~500 steps, so that tokens carry information is checked with the pixel teacher below.
    assert [m["step"] for m in metrics] == [1, *range(20, 121, 20)]
    assert last["rec_loss"] < 0.6 * first["rec_loss"], (first, last)
    assert last["usage"] >= 0.5, last  # share of the 256 codes used in the last 50 batches
    assert last["perplexity"] > 64, last  # and not concentrated on a few of them
    assert any("skipping undecodable image" in w and "broken.png" in w for w in warnings)
    assert any("skipped 1 undecodable image" in w for w in warnings)
    assert (out / "tensorboard").is_dir() and (out / "run_config.json").is_file() and (out / "run.log").is_file()
    # Every job's throughput figures: each 64 px image is CLS + 8 x 8 patch tokens.
    for m in metrics:
        assert m["mfu"] > 0 and m["model_tflops"] > 0 and m["memory_gb"] > 0.1
        assert m["tokens_per_s"] == pytest.approx(65 * m["samples_per_s"])


def test_trained_tokens_are_stable_long_and_on_the_grid(hog_run, image_dir):
    path, out, _ = hog_run
    model = load_trained_tokenizer(out)
    images = load_pixels(image_dir, 6)
    ids = model.get_codebook_indices(images)
    assert ids.dtype == torch.long and ids.shape == (6, 64)
    assert 0 <= ids.min() and ids.max() < 256
    assert torch.equal(ids, model.get_codebook_indices(images))
    assert torch.equal(ids, load_trained_tokenizer(path).get_tokens(images))
    assert len(ids.unique()) > 4
    with pytest.raises(ValueError, match=r"expected images \(B, 3, 64, 64\)"):
        model.get_codebook_indices(torch.rand(1, 3, 32, 32))


def test_tokens_carry_the_teacher_signal(image_dir, tmp_path):
    """With the pixel teacher the decoder, reading only the codes, must beat the best constant."""
    config = VQKDConfig.from_preset("tiny", teacher_dim=192)
    teacher = build_teacher("pixel", grid=8, img_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the broken file, checked above
        train_tokenizer(image_dir, config, teacher, steps=60, batch_size=8, lr=1e-3, output_dir=tmp_path,
                        seed=1, log_every=30, min_crop_scale=0.5)
    model = load_trained_tokenizer(tmp_path)
    images = load_pixels(image_dir, 32)
    target = teacher(images)
    with torch.no_grad():
        rec = model(images, target).rec_loss.item()
    mean = F.normalize(target.mean(dim=(0, 1)), dim=0).expand_as(target)
    constant = (1 - F.cosine_similarity(mean, target, dim=-1)).mean().item()
    assert rec < 0.5 * constant, (rec, constant)


@pytest.mark.filterwarnings("ignore:skip")
def test_command_line(image_dir, tmp_path, capsys):
    argv = ["--images", str(image_dir), "--preset", "tiny", "--teacher", "hog", "--steps", "3",
            "--batch-size", "4", "--output", str(tmp_path), "--seed", "0", "--log-every", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "final rec loss" in printed and "codebook usage" in printed
    assert len(read_metrics(tmp_path)) == 3
    assert load_trained_tokenizer(tmp_path).config == VQKDConfig.from_preset("tiny")
    assert main(["--images", str(tmp_path / "none"), "--steps", "1", "--output", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def _tree(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.mark.filterwarnings("ignore:skip")
def test_a_finished_run_is_refused_resumed_or_moved_aside(image_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--images", str(image_dir), "--teacher", "pixel", "--steps", "3", "--batch-size", "4",
            "--output", str(out), "--log-every", "1", "--no-tensorboard"]
    assert main(argv) == 0
    before = _tree(out)
    broken = tmp_path / "broken"  # none of its images decodes: the run would fail after starting
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    for images in (image_dir, broken):
        assert main([*argv, "--images", str(images)]) == 2
        err = capsys.readouterr().err
        assert f"beit3 train-tokenizer: error: {out} holds a run (checkpoint checkpoints/step_00000003, " \
               f"model.safetensors, run_config.json, metrics.jsonl); continue it with --resume auto, give another " \
               f"--output, or replace it with --overwrite" in err
        assert _tree(out) == before
    assert main([*argv, "--resume", "auto"]) == 0  # at its last step: nothing left to train
    resumed = _tree(out)
    assert resumed["model.safetensors"] == before["model.safetensors"]
    assert main([*argv, "--overwrite", "--seed", "1"]) == 0
    [aside] = [p for p in out.iterdir() if p.name.startswith("replaced-")]
    assert _tree(aside) == resumed
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]  # another seed's weights


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_tokens_agree_with_cpu_float32():
    model = VQKD(VQKDConfig.from_preset("tiny")).freeze()
    images = torch.rand(4, 3, 64, 64)
    cpu = model.get_codebook_indices(images)
    gpu = model.cuda().get_codebook_indices(images.cuda()).cpu()
    assert (cpu == gpu).float().mean() > 0.9


def test_load_at_another_image_size_resamples_positions():
    """A 224/16 tokenizer serves a patch-14 model's 16x16 grid on 256 px views."""
    model = VQKD(VQKDConfig.from_preset("tiny"))
    bigger = load_vqkd(model.state_dict(), VQKDConfig.from_preset("tiny", img_size=80))
    assert bigger.grid_size == 10 and bigger.encoder.pos_embed.shape[1] == 1 + 100
    torch.testing.assert_close(bigger.encoder.pos_embed[:, 0], model.encoder.pos_embed[:, 0])  # CLS row kept
    tokens = bigger.get_codebook_indices(torch.rand(2, 3, 80, 80))
    assert tokens.shape == (2, 100) and tokens.dtype == torch.long


# -- the tokenizer trainer on the shared Trainer ---------------------------------------------------
def _pixel_run(image_dir, out, **kw):
    config = VQKDConfig.from_preset("tiny", teacher_dim=192)
    teacher = build_teacher("pixel", grid=8, img_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the broken file, checked above
        return train_tokenizer(image_dir, config, teacher, steps=12, batch_size=8, lr=1e-3, output_dir=out,
                               seed=3, log_every=3, min_crop_scale=0.5, usage_window=4, **kw)


def _steady(metrics: list[dict]) -> list[dict]:
    """The lines without their timings (throughput, memory), which differ from run to run."""
    timings = ("samples_per_s", "tokens_per_s", "model_tflops", "mfu", "memory_gb")
    return [{k: v for k, v in m.items() if k not in timings} for m in metrics]


def _weights(path):
    from safetensors.torch import load_file
    return load_file(path)


def test_stopped_and_resumed_run_equals_the_uninterrupted_one(image_dir, tmp_path):
    """Stopped at step 5 (mid-epoch, mid-log-window) and resumed: the same weights, bit for bit, and
    the same metrics lines, because the sampler's position, the crops' RNG, the optimizer, the
    schedule and the usage window are all in the checkpoint."""
    ref = _pixel_run(image_dir, tmp_path / "ref")
    _pixel_run(image_dir, tmp_path / "run", stop_after_steps=5)
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 3]
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["latest", "step_00000005"]
    resumed = _pixel_run(image_dir, tmp_path / "run", resume="auto")
    a, b = _weights(ref), _weights(resumed)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert _steady(read_metrics(tmp_path / "run")) == _steady(read_metrics(tmp_path / "ref"))  # steps 1, 3, 6, 9, 12
    # The same folder layout as every job: run files, checkpoints, safetensors weights.
    names = set(os.listdir(tmp_path / "run"))
    assert {"run_config.json", "metrics.jsonl", "tensorboard", "checkpoints", "model.safetensors",
            "tokenizer_config.json"} <= names
    run_config = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert run_config["steps"] == 12 and run_config["resume"] == "auto" and "git_commit" in run_config


class _RunsCodeWhenUnpickled:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "a")


def test_resume_refuses_another_run_and_a_planted_pickle(image_dir, tmp_path):
    from beit3.trainer.checkpoint import CheckpointError, file_crc32
    from beit3.core.weight_files import UnsafeCheckpointError
    _pixel_run(image_dir, tmp_path, stop_after_steps=2)
    config = VQKDConfig.from_preset("tiny", teacher_dim=192)
    teacher = build_teacher("pixel", grid=8, img_size=64)
    with pytest.raises(CheckpointError, match="lr 0.001 in the checkpoint, 0.002 now"):
        train_tokenizer(image_dir, config, teacher, steps=12, batch_size=8, lr=2e-3, output_dir=tmp_path,
                        seed=3, resume="auto")
    state = tmp_path / "checkpoints" / "step_00000002" / "engine_state.pt"
    good = torch.load(state, weights_only=True)
    torch.save({**good, "payload": _RunsCodeWhenUnpickled(tmp_path / "pwned")}, state)
    size = state.stat().st_size
    marker = tmp_path / "checkpoints" / "step_00000002" / "COMPLETE"
    meta = json.loads(marker.read_text())
    meta["files"]["engine_state.pt"] = size  # a planted file of the recorded size and digest
    meta["digests"]["engine_state.pt"] = file_crc32(str(state))
    marker.write_text(json.dumps(meta))
    with pytest.raises(UnsafeCheckpointError, match="engine_state.pt"):
        _pixel_run(image_dir, tmp_path, resume="auto")
    assert not (tmp_path / "pwned").exists()


def test_non_finite_steps_are_skipped_then_stop_the_run(image_dir, tmp_path, monkeypatch):
    """The one non-finite policy of every job: skipped and counted, --max-bad-steps in a row stop."""
    from beit3.trainer.trainer import NonFiniteLossError
    from beit3.jobs.tokenizer import train as train_mod
    calls = {"n": 0}
    real = train_mod.VQKD.forward

    def sometimes_nan(self, images, target):
        calls["n"] += 1
        out = real(self, images, target)
        if calls["n"] in (2, 4):  # two single bad steps: each skipped, the run goes on
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(train_mod.VQKD, "forward", sometimes_nan)
    _pixel_run(image_dir, tmp_path / "ok")
    last = read_metrics(tmp_path / "ok")[-1]
    assert last["step"] == 12 and last["skipped_steps"] == 2 and calls["n"] == 14

    def always_nan(self, images, target):
        out = real(self, images, target)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(train_mod.VQKD, "forward", always_nan)
    with pytest.raises(NonFiniteLossError, match="3 non-finite steps in a row"):
        _pixel_run(image_dir, tmp_path / "bad", max_bad_steps=3)


_RANK0_TRAINS = """
import sys, torch
from beit3.trainer.distributed import DistInfo, barrier, init_distributed
from beit3.vqkd.teachers import build_teacher
from beit3.jobs.tokenizer.train import train_tokenizer
from beit3.vqkd.vqkd import VQKDConfig
info = init_distributed(60.0, "cpu")
if info.is_main:  # as the demo: rank 0 trains the tokenizer alone, the others wait
    config = VQKDConfig.from_preset("tiny", teacher_dim=192)
    teacher = build_teacher("pixel", grid=8, img_size=64)
    train_tokenizer(sys.argv[1], config, teacher, steps=4, batch_size=8, output_dir=sys.argv[2], save_every=2)
barrier(info)
torch.distributed.all_reduce(torch.ones(1))  # the group is still usable by both ranks
sys.stdout.write(f"rank {info.rank} done\\n")  # one write: the two ranks share the pipe
sys.stdout.flush()
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_rank0_trains_alone_inside_a_two_rank_job(image_dir, tmp_path):
    """The Trainer's single-process mode joins no collective: rank 0 of a 2-rank job trains (lock,
    checkpoints, resume check, run files) while rank 1 waits, as when the demo builds its assets."""
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "--no-python", sys.executable, "-c",
                          _RANK0_TRAINS, str(image_dir), str(tmp_path / "tok")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "rank 0 done" in out.stdout and "rank 1 done" in out.stdout
    assert sorted(os.listdir(tmp_path / "tok" / "checkpoints")) == ["latest", "step_00000004"]
    assert load_trained_tokenizer(tmp_path / "tok").config.num_codes == 256
