"""The pretraining step's forward and backward need no value from the device: what they read off
the batch's values (token-id checks, which patches and tokens the heads predict, whether there is
padding) is done on the CPU by ``prepare_batch`` before the batch moves. The GPU side of this (no
sync under ``torch.cuda.set_sync_debug_mode("error")``) is a part of ``scripts/gpu_check.sh``."""
import pytest
import torch

from beit3.jobs.benchmark.batches import BatchMix, synthetic_batch
from beit3.model.config import BEiT3Config
from beit3.jobs.pretrain.objective import MaskedDataModeling, prepare_batch

CFG = BEiT3Config.from_preset("tiny", depth=2, vl_layers=1, vocab_size=300)
MIX = BatchMix(2, 3, 2, 16, text_padding=0.25, mask_pair_images=True)


def _loss_and_grads(model, batch, targets):
    model.zero_grad(set_to_none=True)
    loss, metrics = model(batch, targets)
    loss.backward()
    return loss.detach(), metrics, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_prepared_batch_gives_the_same_loss_gradients_and_metrics():
    batch, targets = synthetic_batch(CFG, MIX, 64, seed=1)
    model = MaskedDataModeling(CFG, 64)
    ref_loss, ref_metrics, ref = _loss_and_grads(model, batch, targets)
    prepared = prepare_batch(batch, CFG.vocab_size)
    assert prepared["pairs"]["label_index"].numel() == int((batch["pairs"]["labels"] != -100).sum())
    assert prepared["images"]["image_mask_index"].numel() == int(batch["images"]["image_mask"].sum())
    loss, metrics, grads = _loss_and_grads(model, prepared, targets)
    assert loss == ref_loss
    assert metrics.keys() == ref_metrics.keys() and metrics["tokens/pair"] == ref_metrics["tokens/pair"]
    assert grads.keys() == ref.keys()
    for n, g in grads.items():
        torch.testing.assert_close(g, ref[n], rtol=0, atol=0, msg=n)
    assert batch["texts"]["padding_mask"] is prepared["texts"]["padding_mask"]  # shared, not copied


def test_prepare_batch_drops_a_padding_mask_without_padding_and_checks_ids():
    batch, _ = synthetic_batch(CFG, BatchMix(0, 2, 2, 16), 64)
    mask = batch["texts"]["padding_mask"]
    kept = mask.clone()
    prepared = prepare_batch(batch, CFG.vocab_size)
    assert prepared["texts"]["padding_mask"] is None and prepared["pairs"]["padding_mask"] is None
    assert batch["texts"]["padding_mask"] is mask and torch.equal(mask, kept)  # the caller's batch is left as it was
    batch["pairs"]["text"][1, 3] = CFG.vocab_size + 5
    with pytest.raises(ValueError, match=r"part 'pairs' holds token id 305; expected ids in \[0, 300\)"):
        prepare_batch(batch, CFG.vocab_size)


def test_no_padding_mask_means_no_attention_mask():
    """With no mask SDPA may take its fastest kernel; with one, padded keys are never attended."""
    from beit3.model import BEiT3
    model = BEiT3(CFG)
    xs = (torch.zeros(2, 5, CFG.embed_dim), torch.zeros(2, 4, CFG.embed_dim))
    assert model._attention_mask(xs, None, None) is None
    pad = torch.tensor([[False] * 4, [False, False, True, True]])
    mask = model._attention_mask(xs, pad, None)
    assert mask.shape == (2, 1, 1, 9) and mask[1, 0, 0].tolist() == [True] * 7 + [False] * 2


@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_pretraining_forward_and_backward_compile_as_one_graph(checkpointing):
    """torch.compile(fullgraph=True) refuses any graph break, and reading a tensor's value on the host
    (``int(x.max())``, a boolean-mask gather's size) is one: the step compiles as one graph, and
    gives the eager loss and gradients."""
    import torch._dynamo
    torch._dynamo.reset()
    batch, targets = synthetic_batch(CFG, MIX, 64, seed=2)
    batch = prepare_batch(batch, CFG.vocab_size)
    model = MaskedDataModeling(CFG, 64)
    model.model.set_grad_checkpointing(checkpointing == "full")
    ref_loss, _, ref = _loss_and_grads(model, batch, targets)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss, _, grads = _loss_and_grads(compiled, batch, targets)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for n, g in grads.items():
        torch.testing.assert_close(g, ref[n.removeprefix("_orig_mod.")], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("checkpointing", ["none", "full", "selective"])
def test_step_reads_nothing_back_from_the_device(checkpointing):
    """``HostReads`` names every op that would make the host wait for a GPU (on a GPU,
    ``torch.cuda.set_sync_debug_mode("error")`` confirms it: see scripts/gpu_check.sh). Forward and
    backward of a prepared batch run none; the unprepared one, gathering through boolean masks,
    does: the detector is not blind."""
    from beit3.jobs.benchmark.host_reads import HostReads
    batch, targets = synthetic_batch(CFG, MIX, 64, seed=3)
    prepared = prepare_batch(batch, CFG.vocab_size)
    model = MaskedDataModeling(CFG, 64)
    if checkpointing != "none":
        model.model.set_grad_checkpointing(True, 1, checkpointing)
    with HostReads() as reads:
        loss, _ = model(prepared, targets)
        loss.backward()
    assert reads.ops == []
    with HostReads() as reads:
        loss, _ = model(batch, targets)
        loss.backward()
    assert reads.ops.count("index") == 8  # hidden states and targets of 4 predicted sets
    assert "index_put" in reads.ops  # the gathers' backward
    with HostReads() as reads:
        float(loss), bool(loss > 0), torch.nonzero(batch["texts"]["padding_mask"])
    assert reads.ops == ["_local_scalar_dense", "_local_scalar_dense", "nonzero"]
