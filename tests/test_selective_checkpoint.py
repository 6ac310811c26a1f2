"""Selective activation checkpointing (``set_grad_checkpointing(mode="selective")``): the gradients of
no and of full checkpointing, the memory it keeps and the FLOPs it recomputes (both measured), the
option on the command lines, and DeepSpeed ZeRO-3."""
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from beit3 import BEiT3
from beit3.model.config import BEiT3Config

MODES = ("none", "selective", "full")
B, LT = 2, 16  # batch, text length (the last 4 tokens of each text are padding)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _torch_linear(monkeypatch):
    # torch's own F.linear, whatever a DeepSpeed ZeRO-3 engine built earlier in this process left
    # there (its replacement is process-wide); restored after each test.
    monkeypatch.setattr(F, "linear", torch._C._nn.linear)


def _model(layout="paper", **kw) -> BEiT3:
    torch.manual_seed(0)
    return BEiT3(BEiT3Config.from_preset("tiny", layout=layout, vocab_size=100, **kw)).train()


def _set(model: BEiT3, mode: str) -> None:
    model.set_grad_checkpointing(mode != "none", 1, "full" if mode == "none" else mode)


def _inputs(cfg, kind: str) -> dict:
    g = torch.Generator().manual_seed(1)
    image = torch.randn(B, 3, cfg.img_size, cfg.img_size, generator=g)
    text = torch.randint(0, cfg.vocab_size, (B, LT), generator=g)
    pad = torch.zeros(B, LT, dtype=torch.bool)
    pad[:, -4:] = True
    return {"vision": dict(image=image), "text": dict(text=text, text_padding_mask=pad),
            "fusion": dict(image=image, text=text, text_padding_mask=pad)}[kind]


def _loss_and_grads(model: BEiT3, mode: str, inputs: dict):
    _set(model, mode)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the same drop-path and attention-dropout draws in every mode
    loss = model(**inputs).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layout", ["paper", "released"])
def test_gradients_equal_without_and_with_full_checkpointing(layout):
    """Drop path and attention dropout on: the recomputation must replay the same random draws."""
    model = _model(layout, drop_path_rate=0.2, attn_dropout=0.1)
    for kind in ("vision", "text", "fusion"):
        inputs = _inputs(model.cfg, kind)
        ref_loss, ref = _loss_and_grads(model, "none", inputs)
        for mode in ("selective", "full"):
            loss, grads = _loss_and_grads(model, mode, inputs)
            assert grads.keys() == ref.keys(), (kind, mode)
            torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
            for n, g in grads.items():  # measured: bit-identical
                torch.testing.assert_close(g, ref[n], rtol=0, atol=1e-6, msg=f"{kind} {mode} {n}")


class KeptBytes(TorchDispatchMode):
    """Bytes of the storages the forward allocates that are still alive when it returns: whatever
    holds them for backward (autograd's graph, the checkpoint's inputs, the selective cache)."""

    def __init__(self, known: set):
        super().__init__()
        self.known = known  # storages that existed before (parameters, inputs)
        self.refs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.known:
                self.refs.append(weakref.ref(t.untyped_storage()))
        return out

    def alive(self) -> int:
        storages = {s.data_ptr(): s.nbytes() for s in (r() for r in self.refs) if s is not None}
        return sum(storages.values())


def test_saved_activation_memory_full_lt_selective_lt_none():
    model = _model()
    cfg = model.cfg
    inputs = _inputs(cfg, "fusion")
    known = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *inputs.values()]}
    kept = {}
    for mode in MODES:
        _set(model, mode)
        with KeptBytes(known) as probe:
            loss = model(**inputs).square().mean()
        kept[mode] = probe.alive()
        loss.backward()  # frees what was kept
    # Measured (tiny, 2 image-text pairs, 65 + 16 tokens): none 10,732,180 B, selective 5,732,374 B
    # (53%), full 747,958 B (7%); base, 1 pair of 197 + 16 tokens: 166.4, 87.8 (53%), 9.2 MB (5.5%).
    assert kept["full"] < kept["selective"] < 0.6 * kept["none"]
    # Selective keeps exactly the outputs of the ops it saves, on top of what full keeps: per layer
    # and token qkv (3D), attention output (D) and its log-sum-exp (one per head), proj (D), fc1 (F),
    # fc2 (D), in fp32.
    L, D, F_, H = cfg.num_patches + 1 + LT, cfg.embed_dim, cfg.ffn_dim, cfg.num_heads
    assert kept["selective"] - kept["full"] == cfg.depth * 4 * B * L * (6 * D + F_ + H)


def test_backward_flops_selective_recomputes_no_matmul():
    """FLOPs of the backward pass (matmuls and attention, the math SDPA kernel so that the counter
    sees it): selective repeats none, full repeats about one forward of the layers."""
    model = _model()
    inputs = _inputs(model.cfg, "fusion")
    bwd = {}
    with sdpa_kernel(SDPBackend.MATH):
        for mode in MODES:
            _set(model, mode)
            with FlopCounterMode(display=False) as fwd:
                loss = model(**inputs).square().mean()
            with FlopCounterMode(display=False) as counter:
                loss.backward()
            bwd[mode] = counter.get_total_flops()
    layers = sum(sum(fwd.get_flop_counts()[f"BEiT3.layers.{i}"].values()) for i in range(model.cfg.depth))
    # Measured: backward none = selective = 1,236,676,608; full 1,812,547,584, i.e. + 575,870,976 =
    # 94% of the layers' forward (613,619,712): the recomputation stops after the last tensor
    # backward needs, before the text stream's fc2. (base, 1 pair: + 36.9 GFLOP, 97% of a forward.)
    assert bwd["selective"] == bwd["none"]
    assert 0.9 * layers < bwd["full"] - bwd["none"] <= layers


def test_in_place_write_to_a_kept_output(monkeypatch):
    """A linear that writes to its own output after reading it cannot be replayed from the kept
    matmul output: the policy refuses it rather than giving wrong gradients."""
    def read_then_write(x, w, b=None):
        out = torch._C._nn.linear(x, w, b)
        out.mul(2.0).sum()  # a recomputed op reads the kept output ...
        return out.add_(1.0)  # ... before it is written

    model = _model()
    _set(model, "selective")
    monkeypatch.setattr(F, "linear", read_then_write)
    with pytest.raises(RuntimeError, match="writes in place to a kept matmul output"):
        model(**_inputs(model.cfg, "text"))


def test_bad_modes_fail_early():
    model = _model()
    with pytest.raises(ValueError, match="'partial'"):
        model.set_grad_checkpointing(True, 1, mode="partial")
    with pytest.raises(ValueError, match="every 0 layers"):
        model.set_grad_checkpointing(True, 0, mode="selective")


def test_command_line_options():
    from beit3.cli import benchmark, pretrain
    from beit3.trainer.ds_config import ConfigError

    def pretrain_args(*flags):
        args = pretrain.build_parser().parse_args(["--preset", "tiny", *flags])
        return pretrain.defaults_for(args, "cpu")

    a = pretrain_args("--checkpoint-mode", "selective")
    assert (a.model.checkpoint_every, a.model.checkpoint_mode) == (1, "selective")  # also on the CPU
    a = pretrain_args()
    assert (a.model.checkpoint_every, a.model.checkpoint_mode) == (0, "full")  # the defaults as before
    with pytest.raises(ConfigError, match="--checkpoint-every 0"):
        pretrain.check_args(pretrain_args("--checkpoint-mode", "selective", "--checkpoint-every", "0"), 1)
    with pytest.raises(ValueError, match="--checkpoint-every must be >= 0, got -1"):  # when the settings are made
        pretrain_args("--checkpoint-every", "-1")
    with pytest.raises(SystemExit):
        pretrain_args("--checkpoint-mode", "partial")
    assert benchmark.main(["--checkpoint-mode", "selective", "--checkpoint-every", "0"]) == 2


@pytest.mark.parametrize("outputs_seen", [True, False], ids=["torch>=2.14", "no-op_output"])
def test_zero3_engine_selective_equals_no_checkpointing(outputs_seen, monkeypatch):
    """Two steps of a 1-rank DeepSpeed ZeRO-3 engine (CPU, the pretraining config): the same losses
    and weights as without checkpointing. ZeRO-3 replaces F.linear by one that adds the bias in place
    to the matmul's output, which selective checkpointing keeps; biases are not zero after step 1.
    Also with the policy blind to op outputs, as on torch < 2.14 (the GPU image's torch 2.11)."""
    from beit3.model import activation_checkpointing as checkpointing
    monkeypatch.setattr(checkpointing, "SEES_OUTPUTS", outputs_seen)
    from deepspeed.utils import safe_get_full_fp32_param

    from beit3.jobs.benchmark.batches import BatchMix, synthetic_batch
    from beit3.trainer.ds_config import default_ds_config
    from beit3.trainer.distributed import init_distributed
    from beit3.trainer.ds_config import resolve_ds_config
    from beit3.trainer.engine import OptimConfig, build_engine
    from beit3.jobs.pretrain.objective import MaskedDataModeling

    init_distributed(device="cpu")
    cfg = BEiT3Config.from_preset("tiny", vocab_size=100, depth=2, vl_layers=1, drop_path_rate=0.1)
    mix = BatchMix(0, 0, 3, 8, text_padding=0.25, mask_pair_images=True)  # pairs: the VL-FFN too
    batch, targets = synthetic_batch(cfg, mix, 64, seed=0)
    ds = resolve_ds_config(default_ds_config("cpu"), mix.samples, 1, 1)
    runs = {}
    for mode in ("none", "selective"):
        torch.manual_seed(0)
        model = MaskedDataModeling(cfg, 64)
        _set(model.model, mode)
        engine = build_engine(model, dict(ds), OptimConfig(lr=1e-3, total_steps=10))
        assert F.linear is not torch._C._nn.linear  # DeepSpeed's memory-efficient linear
        losses = []
        for step in range(2):
            torch.manual_seed(step)
            loss, _ = engine(batch, targets)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        weights = {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}
        runs[mode] = losses, weights
        engine.destroy()
    (l0, w0), (l1, w1) = runs["none"], runs["selective"]
    assert l1 == pytest.approx(l0, rel=1e-6) and l0[1] < l0[0]
    for n, w in w0.items():  # measured: identical; keeping the matmuls alone (no write kept): not
        torch.testing.assert_close(w1[n], w, rtol=0, atol=1e-6, msg=n)


def test_zero3_selective_survives_a_change_of_batch_parts():
    """ZeRO-3 gathers parameters from inside the checkpointed blocks, ahead of time once it knows the
    module order. A batch with other parts (images only, then no images) changes that order: the
    recomputation used to meet parameter-gathering ops the forward had not run ("aten.view.default
    invocation index 34 ... not found in storage"). Losses equal those without checkpointing."""
    from beit3.jobs.benchmark.batches import BatchMix, synthetic_batch
    from beit3.trainer.distributed import init_distributed
    from beit3.trainer.ds_config import default_ds_config, resolve_ds_config
    from beit3.trainer.engine import OptimConfig, build_engine
    from beit3.jobs.pretrain.objective import MaskedDataModeling, prepare_batch

    init_distributed(device="cpu")
    cfg = BEiT3Config.from_preset("tiny", vocab_size=100, depth=2, vl_layers=1)
    mixes = [BatchMix(2, 2, 2, 8), BatchMix(6, 0, 0, 8), BatchMix(2, 2, 2, 8), BatchMix(0, 3, 3, 8),
             BatchMix(2, 2, 2, 8)]
    data = [prepare_batch(*synthetic_batch(cfg, m, 64, seed=i)[:1], cfg.vocab_size) for i, m in enumerate(mixes)]
    targets = [synthetic_batch(cfg, m, 64, seed=i)[1] for i, m in enumerate(mixes)]
    runs = {}
    for mode in ("none", "selective"):
        torch.manual_seed(0)
        model = MaskedDataModeling(cfg, 64)
        _set(model.model, mode)
        engine = build_engine(model, resolve_ds_config(default_ds_config("cpu"), 6, 1, 1),
                              OptimConfig(lr=1e-3, total_steps=10))
        losses = []
        for batch, tgt in zip(data, targets):
            loss, _ = engine(batch, tgt)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        runs[mode] = losses
        engine.destroy()
    assert runs["selective"] == pytest.approx(runs["none"], rel=1e-6)
