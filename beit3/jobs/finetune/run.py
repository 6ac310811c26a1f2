"""The fine-tuning run shared by every task: build, train under DeepSpeed, validate, keep the best.

    run = FinetuneRun(cfg, options); run.train()

What differs between tasks (model head, data, loss, metric) comes from ``tasks.py``. Around it:
layer-wise lr decay and the head lr multiplier (``param_groups``), warmup + cosine per optimizer
step, parameters the task never reaches frozen (the language experts for classification, the
whole backbone for linear probing), an optional EMA (timm ``ModelEmaV3``), validation on the eval
transforms after every ``eval_every`` epochs, ``best/`` weights by the task's main metric,
resumable checkpoints (``checkpoints/step_*``, as pretraining), metrics.jsonl with pretraining's
throughput figures (samples/s, tokens/s, model TFLOP/s, MFU, peak memory: ``work.py``), the
``--report-to`` trackers, run.log and a progress bar.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import warnings
from typing import Optional

import torch
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

from beit3.model.config import BEiT3Config, check_text_vocab, text_table_rows
from beit3.data.bad_images import SKIPPED_KEY, SkipUnreadable, UnreadableImages
from beit3.data.index_check import check_dataset
from beit3.data.text_tokenizer import TextTokenizer
from beit3.core.files import recover_dir
from beit3.model.saved import TOKENIZER_FILE, save_folder, saved_config
from beit3.trainer.checkpoint import latest_checkpoint
from beit3.trainer.distributed import DistInfo, all_reduce_flag
from beit3.trainer.engine import OptimConfig, build_engine
from beit3.trainer.full_weights import full_state_dict
from beit3.trainer.optim import param_groups
from beit3.trainer.run_dir import check_resume, check_same_run, find_checkpoint, on_every_rank
from beit3.trainer.throughput import Throughput
from beit3.trainer.trainer import Trainer, compute_dtype, seed_everything, to_device
from beit3.jobs.demo_assets import finetune_world
from beit3.jobs.finetune.batches import collate, epoch_batches
from beit3.model.heads import TaskModel, unreached_parameters
from beit3.jobs.finetune.init_weights import InitWeights, apply_init, load_init, tokenizer_for
from beit3.jobs.finetune.options import SYNTHETIC, RunOptions
from beit3.jobs.finetune.recipes import FinetuneConfig
from beit3.jobs.finetune.tasks import build_task
from beit3.jobs.finetune.validation import evaluate, scalars
from beit3.jobs.finetune.work import batch_work

warnings.filterwarnings("ignore", message=".*(reduce_scatter_tensor|all_gather_into_tensor).*")


# -- the default data -------------------------------------------------------------------------------
def synthetic_data(dist: DistInfo, log=print) -> tuple[str, str]:
    """(data root, spm) of the synthetic world with its fine-tuning index files (rank 0 builds them;
    a stopped build stops every rank)."""
    world = on_every_rank(dist, lambda: finetune_world(build=dist.is_main, log=log))
    return world.world, world.spm


def cpu_flush_denormal(device: torch.device) -> None:
    """On the CPU, treat denormal floats as zero: the 0.001-scaled classifier heads make gradients
    and Adam moments denormal, and x86 CPUs compute with those 10-100x slower."""
    if device.type == "cpu":
        torch.set_flush_denormal(True)


# -- model -----------------------------------------------------------------------------------------
def model_config(cfg: FinetuneConfig, init: Optional[InitWeights], vocab_size: Optional[int]) -> BEiT3Config:
    """The checkpoint's architecture (else the preset's) at the recipe's image size and drop path;
    ``vocab_size`` None (a task without texts, no tokenizer): the text table as it is."""
    drop_path = 0.0 if cfg.linear_probe else cfg.drop_path
    if init is not None:
        mc = init.config.replace(img_size=cfg.img_size, drop_path_rate=drop_path)
    else:
        rows = {} if vocab_size is None else {"vocab_size": text_table_rows(vocab_size)}
        mc = BEiT3Config.from_preset(cfg.preset, layout=cfg.layout, img_size=cfg.img_size, drop_path_rate=drop_path,
                                     **rows)
    if vocab_size is not None:
        check_text_vocab(vocab_size, mc.vocab_size, init.source if init is not None else "the model")
    if cfg.max_text_len > mc.max_text_len:
        raise ValueError(f"--max-text-len {cfg.max_text_len}: the model's text position table holds {mc.max_text_len} "
                         f"tokens")
    return mc


def freeze_unreached(model: TaskModel, linear_probe: bool) -> list[str]:
    """requires_grad=False for what the task never reaches (and the backbone when probing); these
    parameters are given to no optimizer group. Returns their names."""
    frozen = set(unreached_parameters(model))
    if linear_probe:
        frozen |= {n for n, _ in model.named_parameters() if n.startswith("beit3.")}
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    return sorted(frozen)


def schedule_steps(cfg: FinetuneConfig, steps_per_epoch: int) -> tuple[int, int, Optional[str]]:
    """(optimizer steps, warm-up steps, a note or None): ``epochs`` and ``warmup_epochs`` of
    ``steps_per_epoch`` steps. A ``max_steps`` below the epochs' steps scales the warm-up and the
    cosine decay to the steps that run (as HF's Trainer does with max_steps): the warm-up keeps its
    share of the schedule, and the lr reaches ``min_lr`` at the last step; the note says so."""
    total = math.ceil(cfg.epochs * steps_per_epoch)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if cfg.max_steps is None or cfg.max_steps >= total:
        return total, warmup, None
    scaled = int(cfg.max_steps * cfg.warmup_epochs / cfg.epochs)
    return cfg.max_steps, scaled, (f"--max-steps {cfg.max_steps} < the {total} steps of {cfg.epochs:g} epochs: "
                                   f"warm-up ({warmup} -> {scaled} steps) and cosine decay scaled to "
                                   f"{cfg.max_steps} steps")


def optimizer_setup(model: TaskModel, cfg: FinetuneConfig, total_steps: int, warmup_steps: int):
    """AdamW's settings and parameter groups. The lr scales are unilm/beit3's (run_beit3_finetuning.py):
    layer decay when ``layer_decay`` < 1, else ``head_lr_scale`` on ``head.*`` (its
    get_is_head_flag_for_vit); never both, so the head takes the top layer's scale under decay."""
    depth = model.cfg.depth
    opt = OptimConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, eps=cfg.eps,
                      warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=cfg.min_lr / cfg.lr,
                      grad_clip=cfg.grad_clip, layer_decay=cfg.layer_decay, depth=depth, schedule=cfg.lr_schedule)
    head = None
    if cfg.layer_decay == 1.0 and cfg.head_lr_scale != 1.0:
        head = lambda name: cfg.head_lr_scale if name.startswith("head.") else 1.0  # noqa: E731
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay, depth, lr_scale=head)
    return opt, groups


# -- the run -----------------------------------------------------------------------------------------
class FinetuneRun(Trainer):
    """One task's fine-tuning (``FinetuneConfig``, the task's head, data and metric) in the Trainer's
    run folder; ``best/`` holds the best validated model as a saved model."""

    def __init__(self, cfg: FinetuneConfig, options: RunOptions, ds_config: dict):
        """``options`` resolved (``RunOptions.resolved``); ``ds_config`` with its batch sizes filled in."""
        self.cfg, self.opt, self.ds_config = cfg, options, ds_config
        self.best: Optional[float] = None
        self.history: list[dict] = []

    # building
    def build(self) -> None:
        o, c = self.opt, self.cfg
        self.open_run(o.output, o.device, o.dist_timeout, 1, resume=o.resume, overwrite=o.overwrite,
                      tensorboard=o.tensorboard, report_to=o.report_to, desc=c.task, max_bad_steps=o.max_bad_steps,
                      keep_last=o.keep_last)
        cpu_flush_denormal(self.dist.device)
        if self.dist.is_main:  # holding the folder's lock: nobody else is replacing best/
            recovered = recover_dir(os.path.join(o.output, "best"))
            if recovered:
                self.logger.write(recovered)
        o.spm = tokenizer_for(o.init, o.spm)  # --init's own tokenizer, and no other
        if o.data == SYNTHETIC:
            o.data, spm = synthetic_data(self.dist, self.logger.write)
            o.spm = o.spm or spm
            if o.vqa_annotations is None and c.task == "vqa":
                o.vqa_annotations = os.path.join(o.data, "raw", "vqa", "v2_mscoco_val_annotations.json")
        self.tokenizer = TextTokenizer(o.spm) if o.spm else None  # None: a task without texts (main checks)
        self.task = build_task(c, self.tokenizer, **({"annotations": o.vqa_annotations} if c.task == "vqa" else {}))
        self.train_set = self.task.dataset(o.data, "train", train=True)
        self.val_set = self.task.dataset(o.data, self.task.eval_split, train=False)
        self.labels = self.task.labels(self.train_set)  # answers / class names, saved with best/
        self.check_data()
        self.build_schedule()
        seed_everything(c.seed)  # the same initial weights on every rank
        self.model = self.build_model()
        self.ema = self.build_ema()
        opt, groups = optimizer_setup(self.model, c, self.total_steps, self.warmup_steps)
        self.engine = build_engine(self.model, self.ds_config, opt, groups)
        self.dtype = compute_dtype(self.ds_config)
        seed_everything(c.seed + self.dist.rank)  # augmentations differ per rank

    def check_resume(self) -> tuple[Optional[str], Optional[dict]]:
        """The checkpoint to resume from, verified and compared with this run before anything is
        built (the model config and the head once they are known, still before the engine)."""
        c = self.cfg
        path = find_checkpoint(self.ckpt_dir, self.opt.resume)
        if path is None:
            return None, None
        shape = {k: getattr(c, k) for k in ("preset", "layout", "img_size", "max_text_len", "linear_probe")}
        identity = {"task": c.task, "dataset": c.dataset, "finetune": shape}
        return path, check_resume(path, self.dist, identity, self.opt.allow_pickle)

    def same_as_checkpoint(self, **identity) -> None:
        if self.resume_meta is not None:
            on_every_rank(self.dist, lambda: check_same_run(self.resume_path, self.resume_meta, identity))

    def check_data(self) -> None:
        """Every index entry usable and every image there before the first step; up to
        ``max_bad_fraction`` of the training images may be missing (skipped), none of the val images."""
        o, is_main = self.opt, self.dist.is_main
        log = self.logger.write
        images, missing = on_every_rank(self.dist, lambda: check_dataset(
            self.train_set, "train", o.max_bad_fraction, log=log, progress=is_main))
        num_classes = getattr(self.train_set, "num_classes", None) if self.cfg.task == "classification" else None
        on_every_rank(self.dist, lambda: check_dataset(self.val_set, self.task.eval_split, 0.0, num_classes,
                                                       log=log, progress=is_main))
        rank_log = log if is_main else (lambda m: print(f"[rank {self.dist.rank}] {m}", flush=True))
        self.unreadable = UnreadableImages(images, o.max_bad_fraction, rank_log, known=missing)

    def build_schedule(self) -> None:
        c, ga = self.cfg, self.ds_config["gradient_accumulation_steps"]
        self.micro_per_epoch = (len(self.train_set) // self.dist.world_size) // c.batch_size
        self.steps_per_epoch = self.micro_per_epoch // ga
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.train_set)} training samples do not fill one step of --batch-size "
                             f"{c.batch_size} x {ga} accumulation steps x {self.dist.world_size} ranks")
        self.total_steps, self.warmup_steps, note = schedule_steps(c, self.steps_per_epoch)
        if note:
            self.logger.write(note)
        self.logger.set_total(self.total_steps)

    def build_model(self) -> TaskModel:
        o, c = self.opt, self.cfg
        init = load_init(o.init, o.allow_pickle) if o.init else None
        mc = model_config(c, init, self.tokenizer.vocab_size if self.tokenizer is not None else None)
        self.same_as_checkpoint(model=mc.to_dict())
        model = self.task.build_model(mc, self.train_set)
        self.same_as_checkpoint(head_args=model.head_args)
        if init is not None:
            report = apply_init(model, init)
            self.logger.write(f"initialised from {init.source} ({init.source_format}); {report.summary()}")
        else:
            self.logger.write(f"no --init: {c.preset} ({c.layout}) from random initialisation")
        model.beit3.set_grad_checkpointing(bool(c.checkpoint_every), c.checkpoint_every or 1)
        frozen = freeze_unreached(model, c.linear_probe)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.logger.write(f"{type(model).__name__}: {trainable:,} trainable parameters, "
                          f"{len(frozen)} tensors frozen (unused by {c.task}{', linear probe' if c.linear_probe else ''})")
        self.init = init
        return model

    def build_ema(self):
        if not self.cfg.model_ema:
            return None
        return ModelEmaV3(self.model, decay=self.cfg.ema_decay, device=self.dist.device, dtype=torch.float32)

    @property
    def zero3(self) -> bool:
        return self.engine.zero_optimization_stage() == 3

    def all_parameters(self):
        """Context in which the module holds its whole parameters (ZeRO-3 gathers them: memory!)."""
        if not self.zero3:
            return contextlib.nullcontext()
        import deepspeed  # heavy: deepspeed, ~2 s to import
        return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()))

    def write_run_info(self) -> None:
        self.write_run_config({
            "finetune": self.cfg.to_dict(), "options": dataclasses.asdict(self.opt),
            "deepspeed": self.ds_config, "model": self.model.cfg.to_dict(), "head_args": self.model.head_args,
            "steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
            "train_samples": len(self.train_set), "val_samples": len(self.val_set)})

    def meta(self) -> dict:
        return {"task": self.cfg.task, "dataset": self.cfg.dataset, "model": self.model.cfg.to_dict(),
                "head_args": self.model.head_args, "finetune": self.cfg.to_dict(), "spm": self.opt.spm,
                "world_size": self.dist.world_size}

    # training
    def train(self) -> dict:
        """Train; returns the best validation metrics."""
        self.run(self.train_body)
        return self.best_metrics

    def train_body(self) -> None:
        """Build, resume, then epochs of steps with validation and a checkpoint after each."""
        self.build()
        step, epoch, skip = self.maybe_resume()
        self.write_run_info()  # only now: every check on the folder, the checkpoint and the data passed
        self.logger.write(f"fine-tuning {self.cfg.task} for {self.total_steps} steps "
                          f"({self.steps_per_epoch}/epoch) on {self.dist.world_size} x "
                          f"{self.dist.device.type}; output {self.opt.output}")
        self.logger.start_at(step)
        self.throughput = Throughput(self.dist.device, self.dist.world_size)
        stop = self.opt.stop_after_steps
        self.end_step = self.total_steps if stop is None else min(self.total_steps, step + stop)
        while step < self.end_step:
            step, micro = self.train_epoch(epoch, step, skip)
            complete = micro >= self.micro_per_epoch
            epoch, skip = (epoch + 1, 0) if complete else (epoch, micro)
            if step >= self.total_steps or (complete and epoch % self.opt.eval_every == 0):
                self.validate(step, epoch)
            self.save(step, epoch, skip)
        if step < self.total_steps:
            self.logger.write(f"stopped at step {step} of {self.total_steps} (--stop-after-steps {stop}); "
                              f"continue with --resume auto")

    def train_epoch(self, epoch: int, step: int, skip: int) -> tuple[int, int]:
        """Micro-batches ``skip``.. of ``epoch`` until the epoch or the schedule ends; returns the
        step reached and the micro-batches of the epoch done."""
        c, eng = self.cfg, self.engine
        batches = epoch_batches(len(self.train_set), c.batch_size, self.dist.rank, self.dist.world_size, c.seed, epoch)
        # Its own generator: building the loader draws no number from the global RNG, so a resumed
        # run (RNG restored from the checkpoint) augments the same way as an uninterrupted one.
        g = torch.Generator().manual_seed(c.seed * 10_007 + epoch * 101 + self.dist.rank)
        loader = DataLoader(SkipUnreadable(self.train_set), batch_sampler=batches[skip:],
                            num_workers=self.opt.num_workers, collate_fn=collate,
                            pin_memory=self.dist.device.type == "cuda", generator=g)
        ga = eng.gradient_accumulation_steps()
        window = {"logs": []}
        self.throughput.reset()  # from this epoch's first batch: the validation before it is not counted
        self.engine.train()
        done = skip
        if skip == 0:
            self.accumulated = 0  # finite micro-batches of the step being formed
        for micro, batch in enumerate(loader, start=skip):
            self.unreadable.record(batch.pop(SKIPPED_KEY))
            if all_reduce_flag(self.unreadable.too_many, self.dist):
                raise self.unreadable.error(f"stopped at step {step} (epoch {epoch}); last checkpoint: "
                                            f"{latest_checkpoint(self.ckpt_dir)}")
            work = batch_work(c.task, self.model.cfg, batch)
            loss, logs = self.task.train_step(eng, to_device(batch, self.dist.device, self.dtype), step)
            done = micro + 1
            if all_reduce_flag(not bool(torch.isfinite(loss)), self.dist):
                # No backward and no engine step: the step forms from the next finite micro-batches.
                self.non_finite.skipped(step + 1)
                continue
            self.non_finite.finite()
            eng.backward(loss)
            eng.step()
            self.throughput.add(*work)
            window["logs"].append({"loss": loss.detach(), **logs})
            self.accumulated += 1
            if self.accumulated % ga:
                continue
            step += 1
            self.after_step(step, window)
            if self.opt.save_every and step % self.opt.save_every == 0 and micro + 1 < len(batches):
                self.save(step, epoch, micro + 1)
            if step >= self.end_step:
                break
        return step, done

    def after_step(self, step: int, window: dict) -> None:
        self.logger.advance()
        if self.ema is not None:
            with self.all_parameters():
                self.ema.update(self.engine.module, step)
        if step % self.opt.log_every and step != self.total_steps:
            return
        mean = self.mean_over_ranks(window["logs"])
        out = {"loss": mean["loss"], **{f"train/{k}": v for k, v in mean.items() if k != "loss"}}
        out.update({"lr": max(self.engine.get_lr()), **self.throughput.figures(),
                    "skipped_samples": self.unreadable.count, "skipped_steps": self.non_finite.total})
        gn = self.engine.get_global_grad_norm()
        if gn is not None:
            out["grad_norm"] = float(gn)
        self.logger.log(step, out)
        window["logs"] = []

    # validation and checkpoints
    def validate(self, step: int, epoch: int) -> dict:
        o, c = self.opt, self.cfg
        t = time.perf_counter()
        metrics = evaluate(self.task, self.engine, self.val_set, c.eval_batch, self.dist.device, self.dtype, o.num_workers)
        logged = {**scalars(metrics, "val"), "epoch": epoch, "val_seconds": time.perf_counter() - t}
        if self.ema is not None:
            ema = evaluate(self.task, self.ema.module, self.val_set, c.eval_batch, self.dist.device, torch.float32,
                           o.num_workers)
            logged.update(scalars(ema, "ema_val"))
        self.logger.log(step, logged)
        value = metrics[self.task.main_metric]
        self.logger.write(f"step {step} epoch {epoch}: val {self.task.main_metric} {value:.4f}"
                          + (f" (best so far {self.best:.4f})" if self.best is not None else ""))
        self.history.append({"step": step, **scalars(metrics, "val")})
        if self.best is None or value > self.best:
            self.best, self.best_metrics = value, {k: v for k, v in metrics.items() if k != "predictions"}
            self.save_best(step, epoch)
        return metrics

    def save_best(self, step: int, epoch: int) -> None:
        # The module's weights, as best/ always held: a bf16 run's are bf16 (the masters are the
        # optimizer's; pretraining's final/ takes those).
        sd = full_state_dict(self.engine.module, masters=False, keep=self.dist.is_main)
        meta = {**self.meta(), "spm": TOKENIZER_FILE, "step": step, "epoch": epoch,
                "metric": self.task.main_metric, "value": self.best, "val": scalars(self.best_metrics, "val")}
        config = saved_config(self.model, self.task.preprocess(), self.labels, self.task.inference(),
                              tokenizer=self.opt.spm is not None)

        def write():
            if self.dist.is_main:
                save_folder(os.path.join(self.opt.output, "best"), sd, config, self.opt.spm, meta=meta)
        on_every_rank(self.dist, write)  # a failed write (a full disk) on rank 0 stops every rank

    def save(self, step: int, epoch: int, micro: int) -> None:
        """Resumable checkpoint at micro-batch ``micro`` of ``epoch`` (every rank keeps its EMA copy)."""
        state = {"epoch": epoch, "micro": micro, "best": self.best, "best_metrics": self.best_metrics,
                 "ema": self.ema.state_dict() if self.ema is not None else None}
        self.save_state(step, state, self.meta())

    def maybe_resume(self) -> tuple[int, int, int]:
        """(step, epoch, micro-batches of that epoch already done)."""
        self.best_metrics, self.accumulated = {}, 0
        meta, state = self.load_state(self.opt.allow_pickle, self.opt.resume)
        if meta is None:
            return 0, 0, 0
        if meta.get("world_size") != self.dist.world_size:
            raise ValueError(f"{self.resume_path} was written by {meta.get('world_size')} ranks; resume on as many "
                             f"(the data order is per rank)")
        self.best, self.best_metrics = state.get("best"), state.get("best_metrics") or {}
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        return int(meta["step"]), int(state["epoch"]), int(state["micro"])
