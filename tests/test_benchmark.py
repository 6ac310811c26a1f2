"""``beit3 benchmark`` on the CPU: the JSON records, the FLOP count, the batch search, the pieces."""
import json
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from beit3.jobs.benchmark.batches import BatchMix, synthetic_batch
from beit3.trainer.flops import batch_counts
from beit3.jobs.benchmark.measure import PeakMemory
from beit3.jobs.benchmark.peers import TimmMIM, TorchscaleMDM, timm_mlp_ratio
from beit3.jobs.benchmark.search import largest_fitting
from beit3.jobs.benchmark.trainers import compile_layers, sdpa_context
from beit3.cli.benchmark import main
from beit3.model.config import BEiT3Config
from beit3.trainer.flops import pretrain_flops_breakdown
from beit3.jobs.pretrain.objective import MaskedDataModeling

TINY = BEiT3Config.from_preset("tiny")
FIGURES = ("samples_per_s", "tokens_per_s", "model_tflops", "mfu_measured_peak", "peak_mem_gb",
           "matmul_peak_tflops")


def _records(capsys) -> tuple[list[dict], str]:
    out = capsys.readouterr()
    return [json.loads(line) for line in out.out.splitlines() if line.startswith("{")], out.err


def _positive(r: dict, prefix: str = "") -> None:
    for k in FIGURES:
        key = k if k == "matmul_peak_tflops" else prefix + k
        assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (key, r[key])


def hand_flops(D, F, depth, N, patch_params, vocab, codes, parts) -> int:
    """Forward + backward = 3 x forward; forward = 2 FLOPs per multiply-add of each matmul.
    parts: (sequences, image tokens incl. CLS, text tokens, MLM tokens, MIM tokens)."""
    total = 0
    for B, Li, Lt, mlm, mim in parts:
        L = Li + Lt
        qkv, proj, fc1, fc2 = L * D * 3 * D, L * D * D, L * D * F, L * F * D  # multiply-adds per layer
        scores, mix = L * L * D, L * L * D  # q k^T and attention x v over all heads
        patches = (Li - 1) * patch_params if Li else 0
        total += 3 * 2 * B * (depth * (qkv + proj + fc1 + fc2 + scores + mix) + patches)
        total += 3 * 2 * (mlm * D * vocab + mim * D * codes)
    return total


def test_cli_json_with_both_comparisons(capsys):
    argv = ["--preset", "tiny", "--steps", "2", "--warmup", "1", "--json", "--compare", "torchscale",
            "--compare", "timm"]
    assert main(argv) == 0
    records, _ = _records(capsys)
    assert [r["config"] for r in records] == ["pretrain", "image-only"]
    mix, img = records
    assert (mix["batch_images"], mix["batch_texts"], mix["batch_pairs"], mix["text_len"]) == (4, 4, 4, 32)
    assert (img["batch_images"], img["batch_texts"], img["batch_pairs"]) == (12, 0, 0)
    for r in records:
        _positive(r)
        assert r["mfu_datasheet"] is None and r["device"] == "cpu" and r["engine"].endswith("cpu_zero3.json")
        assert r["zero_stage"] == 3 and r["steps"] == 2 and r["error"] is None
    _positive(mix, "torchscale_")
    _positive(img, "timm_")
    assert img["timm_fused_attn"] is True
    for r, peer in ((mix, "torchscale"), (img, "timm")):
        assert r[f"ratio_vs_{peer}"] == pytest.approx(r["samples_per_s"] / r[f"{peer}_samples_per_s"])
        # Same batch, same work: the TFLOP/s ratio is the samples/s ratio.
        assert r["model_tflops"] / r[f"{peer}_model_tflops"] == pytest.approx(r[f"ratio_vs_{peer}"])
    assert mix["tokens_per_step"] == 4 * 65 + 4 * 32 + 4 * (65 + 32)  # no padding by default

    # The FLOP count against a hand computation on the same synthetic batch (seed 0).
    batch, _ = synthetic_batch(TINY, BatchMix(4, 4, 4, 32), 8192, seed=0)
    mlm_t, mlm_p = (int((batch[p]["labels"] != -100).sum()) for p in ("texts", "pairs"))
    mim = int(batch["images"]["image_mask"].sum())
    assert mim == 4 * 26  # 40% of an 8x8 grid, block-wise (BEiT)
    expected = hand_flops(192, 768, 4, 64, 3 * 8 * 8 * 192, 64010, 8192,
                          [(4, 65, 0, 0, mim), (4, 0, 32, mlm_t, 0), (4, 65, 32, mlm_p, 0)])
    assert mix["flops_per_step"] == expected
    assert img["flops_per_step"] == hand_flops(192, 768, 4, 64, 3 * 8 * 8 * 192, 64010, 8192,
                                               [(12, 65, 0, 0, 12 * 26)])


def test_cli_plain_checkpoint_cost_markdown_and_cpu_batch_search(capsys, tmp_path):
    md = tmp_path / "bench.md"
    argv = ["--preset", "tiny", "--image-only", "--batch-images", "2", "--steps", "1", "--warmup", "0",
            "--deepspeed", "none", "--checkpoint-cost", "--find-max-batch", "--json", "--markdown", str(md)]
    assert main(argv) == 0
    records, err = _records(capsys)
    assert "--find-max-batch: not applicable on the CPU" in err
    assert [(r["config"], r["checkpoint_every"], r["checkpoint_mode"]) for r in records] == [
        ("image-only", 0, None), ("checkpoint_every=1", 1, "full"), ("checkpoint_every=1,selective", 1, "selective")]
    for r in records:
        _positive(r)
        assert r["engine"] == "plain PyTorch" and r["zero_stage"] is None
        assert r["flops_per_step"] == records[0]["flops_per_step"]  # recomputation not counted
    off = records[0]
    for on in records[1:]:
        assert on["checkpoint_slowdown"] == pytest.approx(1 - on["samples_per_s"] / off["samples_per_s"])
        assert on["checkpoint_memory_saved_gb"] == pytest.approx(off["peak_mem_gb"] - on["peak_mem_gb"])
    lines = [line for line in err.splitlines() if "activation checkpointing every 1 layer(s): samples/s" in line]
    assert [line.startswith("selective") for line in lines] == [False, True]
    text = md.read_text()
    assert "beit3 benchmark --preset tiny --image-only" in text and "| image-only | beit3 |" in text


def test_cli_rejects_bad_input(capsys):
    assert main(["--preset", "tiny", "--batch-images", "0", "--batch-texts", "0", "--batch-pairs", "0"]) == 2
    assert "empty batch mix" in capsys.readouterr().err
    assert main(["--preset", "tiny", "--text-len", "5000"]) == 2
    assert "--text-len 5000" in capsys.readouterr().err
    assert main(["--preset", "tiny", "--deepspeed", "/nonexistent.json"]) == 2
    assert "/nonexistent.json" in capsys.readouterr().err


def test_data_loader_option(capsys, tmp_path):
    """Both decoders side by side on the same shards: one record each, with real rates."""
    from beit3.data.synthetic.world import make_synthetic_world
    make_synthetic_world(tmp_path, num_images=60, seed=0)
    argv = ["--preset", "tiny", "--data-loader", "--steps", "2", "--warmup", "1", "--json",
            "--batch-images", "2", "--batch-texts", "2", "--batch-pairs", "2", "--text-len", "16",
            "--data", str(tmp_path / "shards"), "--spm", str(tmp_path / "spm" / "synthetic.model")]
    assert main(argv) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["decoder"] for r in records] == ["pil", "torchvision"]
    for r in records:
        assert r["config"] == "data-loader" and r["steps"] == 2
        assert r["batches_per_s"] > 0 and r["samples_per_s"] == pytest.approx(6 * r["batches_per_s"])
    assert main(argv[:-1] + ["/nonexistent.model"]) == 2 and "nonexistent" in capsys.readouterr().err


@pytest.mark.parametrize("mix", [BatchMix(2, 2, 2, 16, text_padding=0.25, mask_pair_images=True),
                                 BatchMix(3, 0, 0, 8), BatchMix(0, 3, 0, 8)])
def test_flop_count_equals_torch_flop_counter(mix):
    """Every matmul the real model runs, counted by torch (attention through the math kernel, whose
    matmuls the counter sees). The patch conv gets no input gradient (the image needs none)."""
    model = MaskedDataModeling(TINY.replace(vocab_size=100), num_visual_tokens=64)
    cfg = model.cfg
    batch, targets = synthetic_batch(cfg, mix, 64, seed=1)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        loss, _ = model(batch, targets)
        loss.backward()
    images = mix.images + mix.pairs
    conv_input_grad = 2 * images * cfg.num_patches * cfg.in_chans * cfg.patch_size**2 * cfg.embed_dim
    assert counter.get_total_flops() == pretrain_flops_breakdown(cfg, batch, 64)["total"] - conv_input_grad


def test_synthetic_batch_masks_and_counts():
    mix = BatchMix(2, 3, 2, 20, text_padding=0.25, mask_pair_images=True)
    batch, targets = synthetic_batch(TINY, mix, 64, seed=0)
    assert batch["images"]["image"].shape == (2, 3, 64, 64) and targets["images"].shape == (2, 64)
    assert batch["images"]["image_mask"].sum(1).tolist() == [26, 26]
    assert targets["pairs"].shape == (2, 64) and int(targets["images"].max()) < 64
    pad = batch["texts"]["padding_mask"]
    assert pad.sum(1).tolist() == [5, 5, 5]  # 25% of 20
    labels = batch["texts"]["labels"]
    assert ((labels != -100) & pad).sum() == 0 and ((labels != -100).sum(1) >= 1).all()
    assert batch_counts(TINY, batch) == (7, 2 * 65 + 3 * 15 + 2 * (65 + 15))
    assert synthetic_batch(TINY, mix, 64, seed=0)[0]["texts"]["text"].equal(batch["texts"]["text"])
    with pytest.raises(ValueError, match="--text-padding 1.0"):
        BatchMix(1, 1, 0, 8, text_padding=1.0)
    assert mix.scaled(5) == BatchMix(5, 5, 5, 20, 0.25, True)
    assert mix.as_image_only() == BatchMix(7, 0, 0, 20, 0.25, True)


@pytest.mark.parametrize("largest,limit", [(1, 64), (37, 1024), (64, 1024), (1000, 1000), (5000, 1000)])
def test_largest_fitting_doubles_then_bisects(largest, limit):
    calls = []

    def fits(b):
        calls.append(b)
        return b <= largest

    assert largest_fitting(fits, limit) == min(largest, limit)
    assert len(calls) <= 2 * math.log2(limit) + 2
    assert calls[:3] == [1, 2, 4][:len(calls[:3])]


def test_largest_fitting_nothing_fits():
    assert largest_fitting(lambda b: False, 64) == 0
    with pytest.raises(ValueError):
        largest_fitting(lambda b: True, 0)


def test_peak_memory_follows_allocations_on_cpu():
    mem = PeakMemory(torch.device("cpu"))
    mem.reset()
    base = mem.read_gb()
    x = torch.ones(64 * 2**20, dtype=torch.float32)  # 0.25 GiB, touched
    grown = mem.read_gb()
    del x
    mem.reset()
    assert grown - base > 0.2
    assert mem.read_gb() < grown - 0.2  # reset forgets the freed peak (Linux /proc/self/clear_refs)


def test_peers_match_our_sizes_and_train():
    cfg = TINY.replace(layout="released", vocab_size=100)
    ts = TorchscaleMDM(cfg, 64, checkpoint_activations=False)
    ours = MaskedDataModeling(cfg, 64)
    # The released layout is torchscale's: the same number of parameters (ours fuses q, k, v).
    assert sum(p.numel() for p in ts.parameters()) == sum(p.numel() for p in ours.parameters())
    vit = TimmMIM(cfg, 64, grad_checkpointing=False)
    assert vit.vit.blocks[0].mlp.fc1.out_features == cfg.ffn_dim
    assert int(1408 * timm_mlp_ratio(BEiT3Config.from_preset("giant"))) == 6144
    batch, targets = synthetic_batch(cfg, BatchMix(2, 2, 2, 8, mask_pair_images=True), 64, seed=0)
    loss, _ = ts(batch, targets)
    loss.backward()
    assert math.isfinite(loss.item())
    assert [n for n, p in ts.named_parameters() if p.grad is None] == []
    img, img_t = synthetic_batch(cfg, BatchMix(2, 0, 0, 8), 64, seed=0)
    loss, _ = vit(img, img_t)
    assert loss.item() == pytest.approx(math.log(64), rel=0.2)  # random init: about uniform
    with pytest.raises(ValueError, match="image-only"):
        vit(batch, targets)


def test_fast_paths_agree_with_eager():
    """Compiled layers (the dynamo trace; aot_eager keeps the test fast) and a forced SDPA kernel give
    the loss and gradients of the eager model."""
    torch.manual_seed(0)
    cfg = TINY.replace(vocab_size=100, depth=2, vl_layers=1)
    batch, targets = synthetic_batch(cfg, BatchMix(2, 2, 2, 8, text_padding=0.25), 64, seed=0)
    eager = MaskedDataModeling(cfg, 64)
    fast = MaskedDataModeling(cfg, 64)
    fast.load_state_dict(eager.state_dict())
    assert compile_layers(fast.model.layers, backend="aot_eager") == 2
    assert list(dict(fast.named_parameters())) == list(dict(eager.named_parameters()))
    ref, _ = eager(batch, targets)
    ref.backward()
    with sdpa_context("math"):
        out, _ = fast(batch, targets)
        out.backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g_ref = dict(eager.named_parameters())
    for name, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, g_ref[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_profile_summary_attributes_time_by_kind():
    from beit3.jobs.benchmark.profile import category, profile_steps
    from beit3.jobs.benchmark.trainers import plain_trainer

    cfg = TINY.replace(vocab_size=100, depth=1, vl_layers=0)
    trainer = plain_trainer(MaskedDataModeling(cfg, 64), torch.device("cpu"))
    batch, targets = synthetic_batch(cfg, BatchMix(2, 2, 0, 8), 64, seed=0)
    prof = profile_steps(lambda: trainer.step(batch, targets), 2, torch.device("cpu"), top=5)
    assert "aten::mm" in prof.table
    shares = prof.shares
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["matmul"] > 0 and shares["optimizer"] > 0 and shares["attention"] > 0
    # The five largest costs: per step, largest first, each a share of the step's wall time.
    assert len(prof.top) == 5 and prof.wall_ms > 0
    ms = [r["ms_per_step"] for r in prof.top]
    assert ms == sorted(ms, reverse=True) and ms[-1] > 0
    assert all(r["share"] == pytest.approx(r["ms_per_step"] / prof.wall_ms) for r in prof.top)
    assert 0 < sum(r["share"] for r in prof.top) <= prof.busy
    assert [category(op) for op in ("aten::addmm", "aten::native_layer_norm_backward", "aten::add_")] == \
        ["matmul", "layernorm", "elementwise"]
