"""A pretraining run's ``final/``: the backbone's fp32 master weights as a saved model, written
whenever the run stops, equal to what ``beit3 export`` takes out of the run's last checkpoint."""
import errno
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from pretrain_fixtures import IndexedBatches, exported_backbone, run_args

from beit3 import BEiT3, from_pretrained
from beit3.core.errors import OutputError
from beit3.jobs.finetune.init_weights import load_init
from beit3.cli.pretrain import check_args
from beit3.trainer.checkpoint import complete_checkpoints
from beit3.jobs.pretrain.loop import FINAL, PretrainRun

HERE = os.path.dirname(__file__)
pytestmark = pytest.mark.usefixtures("one_thread")


def _meta(run) -> dict:
    with open(os.path.join(run, FINAL, "meta.json")) as f:
        return json.load(f)


def _assert_equal(final: dict, reference: dict) -> None:
    assert final.keys() == reference.keys()
    for k, v in final.items():
        assert v.dtype == torch.float32, k
        assert torch.equal(v, reference[k]), (k, (v - reference[k]).abs().max().item())


def test_final_is_the_backbone_of_the_last_checkpoint(pretrained_tiny, small_world, tmp_path):
    final = pretrained_tiny / FINAL
    model = from_pretrained(str(final))
    assert type(model) is BEiT3
    step, checkpoint = complete_checkpoints(os.path.join(pretrained_tiny, "checkpoints"))[-1]
    meta = _meta(pretrained_tiny)
    assert step == meta["step"] == 60
    assert meta["checkpoint"] == os.path.join("checkpoints", "step_00000060") and meta["task"] is None
    assert model.pretrained.task is None and model.pretrained.config["model"] == meta["model"]
    with open(final / "tokenizer.model", "rb") as a, open(small_world.spm, "rb") as b:
        assert a.read() == b.read()
    # ZeRO-3: the run's gathered fp32 masters, as zero_to_fp32 reads them from the optimizer files.
    _assert_equal(model.state_dict(), exported_backbone(checkpoint, tmp_path))
    init = load_init(str(final))  # what `beit3 finetune --init <run>/final` starts from
    assert init.meta["step"] == 60 and init.heads == {} and init.config == model.cfg.replace(drop_path_rate=0.1)
    _assert_equal(init.backbone, model.state_dict())


def test_finetune_starts_from_final(data, pretrained_tiny, tmp_path):
    from finetune_helpers import finetune
    run = finetune("classification", data, pretrained_tiny / FINAL, tmp_path / "run", "--linear-probe",
                   "--max-steps", "2", "--img-size", "64")
    best = load_file(os.path.join(run, "best", "model.safetensors"))
    backbone = {k[len("beit3."):]: v for k, v in best.items() if k.startswith("beit3.")}
    _assert_equal(backbone, load_file(os.path.join(pretrained_tiny, FINAL, "model.safetensors")))  # frozen


def _run(out, assets, ga=1, **kw):
    """In this process, on tests/pretrain_worker.py's batches."""
    spm, tok = assets
    args = run_args(str(out), spm, tok, batch_images=2, batch_texts=2, batch_pairs=2, log_every=1, grad_accum=ga, **kw)
    return PretrainRun(args, check_args(args, 1), "cpu", data=IndexedBatches(spm, 0, 1, ga, sizes=(2, 2, 2)))


def test_a_bf16_run_stopped_early_writes_its_fp32_masters_and_keeps_them_on_a_full_disk(
        assets, tmp_path, monkeypatch):
    with open(os.path.join(HERE, "..", "beit3", "ds_configs", "zero2_bf16.json")) as f:
        ds = json.load(f)
    ds["zero_optimization"]["overlap_comm"] = False  # no side stream on the CPU
    (tmp_path / "bf16.json").write_text(json.dumps(ds))
    out = tmp_path / "run"
    common = dict(steps=3, save_every=3, ds_config=str(tmp_path / "bf16.json"))
    run = _run(out, assets, stop_after_steps=2, **common)
    assert run.train() == 0
    [(step, checkpoint)] = complete_checkpoints(str(out / "checkpoints"))
    assert step == _meta(out)["step"] == 2
    final = from_pretrained(str(out / FINAL)).state_dict()
    _assert_equal(final, exported_backbone(checkpoint, tmp_path))

    # The module trains in bf16; its weights are the masters rounded, which final/ is not.
    params = dict(run.engine.module.model.named_parameters())
    differ = 0
    for name, p in params.items():
        assert p.dtype == torch.bfloat16
        assert torch.equal(final[name].to(torch.bfloat16), p.detach()), name
        differ += not torch.equal(final[name], p.detach().float())
    assert differ == len(params)  # measured: every one of the 115 tensors

    # The disk fills while final/ is written: the run fails naming the checkpoint, which is
    # complete, and the previous final/ is left as it was.
    before = {n: os.path.getsize(out / FINAL / n) for n in os.listdir(out / FINAL)}

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("beit3.model.saved.write_files", full_disk)
    with pytest.raises(OutputError, match=r"final/ not written: could not write .*No space left.*step_00000003"):
        _run(out, assets, resume="auto", **common).train()
    assert [s for s, _ in complete_checkpoints(str(out / "checkpoints"))] == [2, 3]
    assert _meta(out)["step"] == 2 and not os.path.exists(f"{out / FINAL}.tmp")
    assert {n: os.path.getsize(out / FINAL / n) for n in os.listdir(out / FINAL)} == before
    _assert_equal(from_pretrained(str(out / FINAL)).state_dict(), final)
