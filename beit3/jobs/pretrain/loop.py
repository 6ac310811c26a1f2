"""The pretraining run: build everything, then step, log, checkpoint, and stop cleanly.

Kept apart from the command line (beit3/cli/pretrain.py) so tests can drive a run with their own data.

Whenever the loop leaves (the last step, a signal, ``--stop-after-steps``) it writes, after the
checkpoint, ``<output>/final/``: the backbone as a saved model (``beit3.model.pretrained``), from the
optimizer's fp32 masters, for ``beit3.from_pretrained`` and ``beit3 finetune --init`` without a
consolidation step. One folder, not one per step: it is replaced as a whole each time the run stops
and its ``meta.json`` names the step; the checkpoints keep the history (``beit3 export`` any of them).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import resource
import time
import warnings
from typing import Iterator, Optional

import numpy as np
import torch

from beit3.core.errors import OutputError, UserError
from beit3.core.files import recover_dir, sha256_of
from beit3.data.pretrain_loader import PretrainLoader
from beit3.data.text_tokenizer import TextTokenizer, spm_digest
from beit3.jobs import demo_assets
from beit3.jobs.pretrain.config import PretrainConfig
from beit3.jobs.pretrain.objective import MaskedDataModeling, prepare_batch
from beit3.model.config import BEiT3Config, text_table_rows
from beit3.model.saved import TOKENIZER_FILE, save_folder, saved_config
from beit3.trainer.checkpoint import data_states
from beit3.trainer.distributed import all_reduce_flag
from beit3.trainer.engine import build_engine
from beit3.trainer.flops import batch_counts, measure_matmul_peak, pretrain_flops_breakdown
from beit3.trainer.full_weights import full_state_dict
from beit3.trainer.run_dir import check_resume, check_same_run, find_checkpoint, on_every_rank
from beit3.trainer.trainer import StopRequested, Trainer, compute_dtype, seed_everything, to_device
from beit3.trainer.universal import ensure_universal, repair_universal_optimizer, universal_dir, use_universal
from beit3.vqkd.vqkd import VQKDConfig, load_trained_tokenizer, load_vqkd, trained_weights
from beit3.weights.official import load_backbone

log = logging.getLogger("beit3.cli.pretrain")
FINAL = "final"  # <output>/final/: the backbone's weights when the run last stopped
# DeepSpeed's ZeRO-3 calls these torch.distributed functions every step.
warnings.filterwarnings("ignore", message=".*(reduce_scatter_tensor|all_gather_into_tensor).*")


def tokenizer_digests(spm: str, vqkd: str) -> dict:
    """What identifies the two tokenizers a run was trained with: their files' contents (not their
    paths: a moved copy is the same tokenizer; a retrained one of the same size is not)."""
    weights = str(trained_weights(vqkd) or vqkd) if os.path.isdir(vqkd) else vqkd
    return {"text_tokenizer_sha256": spm_digest(spm), "visual_tokenizer_sha256": sha256_of(weights)[:16]}


def resume_identity(cfg: PretrainConfig) -> dict:
    """What a checkpoint must have recorded to be resumed with the settings ``cfg`` (its marker's
    keys: the same whatever form, flat or nested, the settings were given in)."""
    model = cfg.model.config().to_dict()
    del model["vocab_size"]  # compared once the text tokenizer is loaded
    return {"preset": cfg.model.preset, "layout": cfg.model.layout, "patch_aggregation": cfg.model.patch_aggregation,
            "model": model}


class PretrainRun(Trainer):
    """Masked data modeling: the model, the tokenizers and the mixed data of ``PretrainConfig``, in
    the Trainer's run folder."""

    def __init__(self, args: PretrainConfig, ds_config: dict, device: str, data: Optional[Iterator] = None):
        """``data``: an iterator of batches to use instead of the shard loader (tests)."""
        self.args, self.ds_config, self.device_kind = args, ds_config, device
        self.external_data = data

    # -- building ------------------------------------------------------------------------------
    def build(self) -> None:
        a, run = self.args, self.args.run
        self.open_run(run.output, self.device_kind, a.engine.dist_timeout, a.optim.steps, resume=run.resume,
                      overwrite=run.overwrite, tensorboard=run.tensorboard, report_to=run.report_to, desc="pretrain",
                      max_bad_steps=run.max_bad_steps, keep_last=run.keep_last)
        if self.dist.is_main:  # holding the folder's lock: nobody else is replacing final/
            recovered = recover_dir(os.path.join(run.output, FINAL))
            if recovered:
                self.logger.write(recovered)
        self.elastic = self.prepare_elastic_resume()
        seed_everything(a.data.seed)
        self.text_tokenizer, self.visual_tokenizer, data_source = self.build_tokenizers_and_data()
        cfg = a.model.config(vocab_size=text_table_rows(self.text_tokenizer.vocab_size))
        if self.visual_tokenizer.grid_size != cfg.grid_size:
            raise ValueError(f"visual tokenizer grid {self.visual_tokenizer.grid_size}x"
                             f"{self.visual_tokenizer.grid_size} != model patch grid {cfg.grid_size}x{cfg.grid_size}")
        self.cfg = cfg
        if self.resume_meta is not None:  # what the tokenizers decide: the vocabulary, the MIM classes
            identity = {"model": cfg.to_dict(), "num_visual_tokens": self.visual_tokenizer.num_tokens,
                        **self.tokenizer_digests}
            on_every_rank(self.dist, lambda: check_same_run(self.resume_path, self.resume_meta, identity))
        model = MaskedDataModeling(cfg, num_visual_tokens=self.visual_tokenizer.num_tokens,
                                   patch_aggregation=a.model.patch_aggregation)
        model.model.set_grad_checkpointing(a.model.checkpoint_every > 0, a.model.checkpoint_every,
                                           a.model.checkpoint_mode)
        self.engine = self.build_engine(model)
        self.dtype = compute_dtype(self.ds_config)
        self.data = data_source if self.external_data is None else self.external_data

    def check_resume(self) -> tuple[Optional[str], Optional[dict]]:
        """The checkpoint to resume from, verified and compared with this run's settings before
        anything is built (the vocabulary is compared once the tokenizer is loaded)."""
        run = self.args.run
        path = find_checkpoint(self.ckpt_dir, run.resume)
        if path is None:
            return None, None
        return path, check_resume(path, self.dist, resume_identity(self.args), run.allow_pickle)

    def prepare_elastic_resume(self) -> bool:
        """A checkpoint written by another number of ranks is resumed from DeepSpeed's universal
        form of it: converted (once, by rank 0) before the engine is built to load it."""
        if self.resume_meta is None or self.resume_meta.get("world_size", 1) == self.dist.world_size:
            return False
        self.logger.write(f"checkpoint {self.resume_path} was written by {self.resume_meta.get('world_size', 1)} "
                          f"ranks, resuming on {self.dist.world_size}: loading its universal form")
        # The other ranks wait in the next collective, so the conversion gets the same time limit.
        on_every_rank(self.dist, lambda: ensure_universal(self.resume_path, self.logger.write,
                                                          self.args.engine.dist_timeout)
                      if self.dist.is_main else None)
        use_universal(self.ds_config)
        then = self.resume_meta.get("micro_batches_per_step")
        now = self.dist.world_size * self.ds_config["gradient_accumulation_steps"]
        if then is not None and then != now:
            self.logger.write(f"warning: {then} micro-batches per step in the checkpoint, {now} now: the data "
                              f"stream goes on in order but steps group it differently; --micro-batches-per-step "
                              f"{then} keeps the global batch")
        return True

    def build_tokenizers_and_data(self):
        a, tokenizers = self.args, self.args.tokenizers
        spm, tok, shards = tokenizers.spm, tokenizers.tokenizer, a.data.shards_dir
        if shards == "synthetic" and (spm is None or tok is None or self.external_data is None):
            # Rank 0 builds; a stopped build (BuildStopped) stops every rank.
            assets = on_every_rank(self.dist, lambda: demo_assets.demo_assets(
                seed=0, build=self.dist.is_main, log=self.logger.write))
            spm, tok, shards = spm or assets.spm, tok or assets.tokenizer, assets.shards
        text_tok = TextTokenizer(spm)
        self.spm = spm  # copied into final/
        self.tokenizer_digests = tokenizer_digests(spm, tok)
        if tokenizers.tokenizer_preset:
            vcfg = VQKDConfig.from_preset(tokenizers.tokenizer_preset)
            grid = BEiT3Config.from_preset(a.model.preset).grid_size
            if vcfg.grid_size != grid:
                # e.g. giant (224/14: 16x16) with the 224/16 tokenizer: tokenize a 256 px view.
                vcfg = VQKDConfig.from_preset(tokenizers.tokenizer_preset, img_size=grid * vcfg.patch_size)
                self.logger.write(f"visual tokenizer sees {vcfg.img_size} px views for the model's "
                                  f"{grid}x{grid} patch grid")
            vqkd = load_vqkd(tok, vcfg)
        else:
            vqkd = load_trained_tokenizer(tok)
        vqkd = vqkd.to(self.dist.device).freeze()
        a.data.tokenizer_img_size = vqkd.config.img_size  # the views it tokenizes (run_config.json keeps it)
        data = None
        if self.external_data is None:
            data = self.build_loader(shards, text_tok, vqkd)
        return text_tok, vqkd, data

    def build_loader(self, shards: str | None, text_tok, vqkd):
        """The loader of the data part as it is, reading the synthetic world's folder for 'synthetic'."""
        data = self.args.data
        if shards != data.shards_dir:
            data = dataclasses.replace(data, shards_dir=shards)
        # The command line opened every source's first shard before anything was built (check_args).
        loader = PretrainLoader(data, text_tok, rank=self.dist.rank, world_size=self.dist.world_size, check=False)
        self.logger.write(loader.summary())
        return loader

    def build_engine(self, model):
        return build_engine(model, self.ds_config, self.args.optim.optim_config())

    def write_run_info(self) -> None:
        self.write_run_config({"args": self.args.to_dict(), "model": self.cfg.to_dict(), "deepspeed": self.ds_config})

    # -- one step --------------------------------------------------------------------------------
    @torch.no_grad()
    def visual_targets(self, batch: dict) -> dict:
        """VQ-KD tokens of every image part that is masked: frozen, no_grad, bf16 on CUDA."""
        out = {}
        for part in ("images", "pairs"):
            if part in batch and "tokenizer_image" in batch[part]:
                out[part] = self.visual_tokenizer.get_codebook_indices(batch[part]["tokenizer_image"].float())
        return out

    def micro_step(self, batch: dict) -> tuple[bool, dict]:
        """Forward, backward and (at the accumulation boundary) optimizer step. Returns whether the
        loss was finite on every rank, and the metrics."""
        batch = to_device(prepare_batch(batch, self.cfg.vocab_size), self.dist.device, self.dtype)
        targets = self.visual_targets(batch)
        loss, metrics = self.engine(batch, targets)
        if all_reduce_flag(not bool(torch.isfinite(loss)), self.dist):
            return False, metrics  # skipped on every rank: no backward, no step
        self.engine.backward(loss)
        self.engine.step()
        return True, metrics

    # -- the loop --------------------------------------------------------------------------------
    def train(self) -> int:
        def body() -> int:
            self.build()
            step = self.maybe_resume()
            self.write_run_info()  # only now: every check on the folder and the checkpoint passed
            return self.loop(step)
        return self.run(body)

    def loop(self, step: int) -> int:
        a, eng, steps = self.args.run, self.engine, self.args.optim.steps
        first = step
        ga = eng.gradient_accumulation_steps()
        peak = measure_matmul_peak(self.dist.device)
        stop = StopRequested().install()
        data_iter = iter(self.data)
        checkpoint = None
        window = {"t": time.perf_counter(), "samples": 0, "tokens": 0, "flops": 0.0, "metrics": []}
        self.logger.start_at(step)
        self.logger.write(f"pretraining {self.args.model.preset} ({self.cfg.layout} layout) for {steps} steps from "
                          f"step {step} on {self.dist.world_size} x {self.dist.device.type}; output {a.output}")
        try:
            while step < steps:
                ok_all = True
                for _ in range(ga):
                    batch = next(data_iter)
                    ok, metrics = self.micro_step(batch)
                    ok_all &= ok
                    s, t = batch_counts(self.cfg, batch)
                    window["samples"] += s
                    window["tokens"] += t
                    window["flops"] += pretrain_flops_breakdown(self.cfg, batch, self.visual_tokenizer.num_tokens)["total"]
                    if ok:
                        window["metrics"].append(metrics)
                    window["skipped_data"] = batch.get("stats", {}).get("skipped", 0)
                grad_norm = eng.get_global_grad_norm()
                finite_grad = grad_norm is None or np.isfinite(float(grad_norm))
                if not ok_all or not finite_grad:
                    self.non_finite.skipped(step + 1, "loss" if not ok_all else "gradient")
                    continue  # the optimizer did not step: the step is not counted
                self.non_finite.finite()
                step += 1
                self.logger.advance()
                if step % a.log_every == 0 or step == steps:
                    self.log_window(step, window, peak, grad_norm, self.non_finite.total)
                leave = a.stop_after_steps is not None and step - first >= a.stop_after_steps
                stop_now = all_reduce_flag(stop.signal is not None or leave, self.dist)
                if step % a.save_every == 0 or step == steps or stop_now:
                    checkpoint = self.save(step)
                if stop_now:
                    self.save_final(step, checkpoint)
                    why = "by signal" if stop.signal is not None else "after --stop-after-steps"
                    self.logger.write(f"stopped {why} at step {step}; checkpoint written")
                    return 0
            if step > first:  # the last step saved a checkpoint (a finished run resumed trains none)
                self.save_final(step, checkpoint)
            return 0
        finally:
            stop.restore()

    def meta(self) -> dict:
        """What identifies the run: in its checkpoints' markers and in final/meta.json."""
        return {"preset": self.args.model.preset, "layout": self.cfg.layout, "model": self.cfg.to_dict(),
                "patch_aggregation": self.args.model.patch_aggregation,
                "num_visual_tokens": self.visual_tokenizer.num_tokens,
                "micro_batches_per_step": self.dist.world_size * self.engine.gradient_accumulation_steps(),
                **self.tokenizer_digests}

    def save(self, step: int) -> str:
        state = {"data": self.data.state_dict() if hasattr(self.data, "state_dict") else None}
        return self.save_state(step, state, self.meta())

    def save_final(self, step: int, checkpoint: str) -> None:
        """``final/``: the backbone at ``step`` as a saved model (config.json with task None, its
        fp32 master weights, the run's SentencePiece model) and ``meta.json`` (the step, the run's
        settings). Collective. A failed write (a full disk) fails the run on every rank; the previous
        final/ and the checkpoint just written, ``checkpoint``, are kept."""
        if not self.args.run.final_weights:
            return
        path = os.path.join(self.output, FINAL)
        sd = full_state_dict(self.engine.module, masters=True, keep=self.dist.is_main)
        error = None
        if self.dist.is_main:
            try:
                # The engine's module is the backbone under "model." beside the objective's heads;
                # the export's key mapping takes the backbone out.
                backbone = load_backbone(sd, self.cfg).state_dict
                del sd
                meta = {**self.meta(), "task": None, "step": step, "spm": TOKENIZER_FILE,
                        "checkpoint": os.path.relpath(checkpoint, self.output), "world_size": self.dist.world_size,
                        "pretrain": self.args.to_dict()}
                config = saved_config(self.engine.module.model, tokenizer=True)
                save_folder(path, backbone, config, self.spm, meta=meta)
            except Exception as e:  # the other ranks wait in the flag's collective below, whatever failed
                error = e
        if all_reduce_flag(error is not None, self.dist):
            if error is not None and not isinstance(error, UserError):
                raise error
            reason = error if error is not None else "rank 0 could not write it (see its message)"
            raise OutputError(f"{FINAL}/ not written: {reason}; the checkpoint {checkpoint} is complete: resume "
                              f"from it (--resume auto) or `beit3 export` it")
        self.logger.write(f"wrote {path}: the backbone at step {step} as a saved model")

    def maybe_resume(self) -> int:
        a = self.args.run
        tag_dir = universal_dir(self.resume_path) if self.elastic else None
        meta, state = self.load_state(a.allow_pickle, a.resume, tag_dir)
        if meta is None:
            return 0
        if self.elastic:
            repair_universal_optimizer(self.engine, tag_dir)
        if hasattr(self.data, "load_state_dict"):
            if self.elastic:  # the stream's readers are spread over every rank's state
                states = on_every_rank(self.dist, lambda: data_states(self.resume_path, a.allow_pickle))
                if all(s is not None for s in states):
                    self.data.load_state_dict(states)
            elif state.get("data") is not None:
                self.data.load_state_dict(state["data"])
        return int(meta["step"])

    def log_window(self, step: int, w: dict, peak: float, grad_norm, skipped_steps: int) -> None:
        dt = max(time.perf_counter() - w["t"], 1e-9)
        vals = {k: v for k, v in self.mean_over_ranks(w["metrics"]).items() if not k.startswith("tokens/")}
        world = self.dist.world_size
        flops_per_s = w["flops"] * world / dt
        out = {**vals, "lr": self.engine.get_lr()[0], "samples_per_s": w["samples"] * world / dt,
               "tokens_per_s": w["tokens"] * world / dt, "model_tflops": flops_per_s / 1e12 / world,
               "mfu": flops_per_s / world / peak, "skipped_steps": skipped_steps,
               "skipped_samples": w.get("skipped_data", 0), "memory_gb": self.peak_memory_gb()}
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        self.logger.log(step, out)
        w.update(t=time.perf_counter(), samples=0, tokens=0, flops=0.0, metrics=[])

    def peak_memory_gb(self) -> float:
        if self.dist.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.dist.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
