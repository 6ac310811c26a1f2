"""DeepSpeed configs: read, check against the command line, fill "auto" values.

Everything here runs before a model is built, so a bad config costs no GPU time.
"""
from __future__ import annotations

import json
import os
from importlib.resources import files
from typing import Any


# The configs a run uses when --deepspeed is not given. They ship inside the package (found through
# importlib.resources, so an installed wheel has them); ds_configs/ at the top of the repository
# holds the same files for users to copy and edit (a test keeps the two identical).
DEFAULT_DS = {"cpu": "cpu_zero3.json", "cuda": "zero3_bf16.json"}


def packaged_ds_config(name: str) -> str:
    return str(files("beit3") / "ds_configs" / name)


def default_ds_config(device: str) -> str:
    return packaged_ds_config(DEFAULT_DS[device])


def ds_config_path(name_or_path: str) -> str:
    """A file that exists, else the packaged config of that bare name (``zero3_bf16.json``), so
    recipes name configs that an installed wheel has wherever it runs."""
    if os.path.exists(name_or_path) or os.sep in name_or_path:
        return name_or_path
    packaged = packaged_ds_config(name_or_path)
    return packaged if os.path.exists(packaged) else name_or_path


class ConfigError(ValueError):
    pass


def load_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"DeepSpeed config {path!r} does not exist")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"DeepSpeed config {path!r} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"DeepSpeed config {path!r} holds a JSON {type(cfg).__name__}, not an object of settings")
    return cfg


def _int_or_auto(cfg: dict, key: str, path: str) -> Any:
    v = cfg.get(key, "auto")
    if v != "auto" and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
        raise ConfigError(f"{path}: {key}={v!r}; expected a positive integer or \"auto\"")
    return v


def resolve_ds_config(path: str, micro_batch: int, grad_accum: int | None, world_size: int) -> dict:
    """Return the config with batch sizes filled in, or raise ConfigError naming the mismatch.

    micro_batch: samples per rank per micro-step (images + texts + pairs).
    grad_accum: from the command line, or None to take the config's (default 1).
    """
    cfg = load_json(path)
    mb = _int_or_auto(cfg, "train_micro_batch_size_per_gpu", path)
    ga = _int_or_auto(cfg, "gradient_accumulation_steps", path)
    tb = _int_or_auto(cfg, "train_batch_size", path)
    if mb != "auto" and mb != micro_batch:
        raise ConfigError(f"{path}: train_micro_batch_size_per_gpu={mb} but the command line asks for "
                          f"{micro_batch} samples per micro-batch (images + texts + pairs); "
                          f"make them agree or set it to \"auto\"")
    if grad_accum is not None and ga != "auto" and ga != grad_accum:
        raise ConfigError(f"{path}: gradient_accumulation_steps={ga} but --grad-accum {grad_accum}")
    ga = grad_accum if grad_accum is not None else (1 if ga == "auto" else ga)
    expected = micro_batch * ga * world_size
    if tb != "auto" and tb != expected:
        raise ConfigError(f"{path}: train_batch_size={tb} but micro-batch {micro_batch} x grad-accum {ga} "
                          f"x {world_size} ranks = {expected}")
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = ga
    cfg["train_batch_size"] = expected
    zero = cfg.get("zero_optimization", {}).get("stage", 0)
    if zero not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage={zero}; expected 0-3")
    if cfg.get("fp16", {}).get("enabled") and cfg.get("bf16", {}).get("enabled"):
        raise ConfigError(f"{path}: fp16 and bf16 are both enabled")
    return cfg


def precision(cfg: dict) -> str:
    if cfg.get("bf16", {}).get("enabled"):
        return "bf16"
    if cfg.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"
