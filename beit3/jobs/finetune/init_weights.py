"""``--init``: the weights a fine-tuning run (or an evaluation) starts from.

Accepted, told apart by their contents:

* a run directory of ours: a fine-tuning run's ``best/`` weights when present (after a kill while
  ``best/`` was being replaced, its newest complete copy), else the newest complete DeepSpeed
  checkpoint in ``checkpoints/`` (a pretraining run's backbone is ``model.*``);
* one checkpoint directory ``.../checkpoints/step_XXXXXXXX`` (consolidated with zero_to_fp32);
* a weights directory or file of ours (``model.safetensors`` + ``meta.json``, or any state dict);
* an official unilm/beit3 checkpoint (``beit3.encoder.*`` keys), pretrained or fine-tuned.

The backbone goes through ``beit3.weights.load_backbone``; every other weight whose name and
shape match the task model is loaded too: official heads share our names, and a pretraining run's
``mlm_head`` starts the captioning head.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from beit3.weights.official import load_backbone
from beit3.model.config import BEiT3Config
from beit3.data.text_tokenizer import check_same_tokenizer, spm_digest
from beit3.core.errors import BadFileError, UserError
from beit3.core.files import current_dir, read_json, size_problems
from beit3.model.saved import LEGACY_META as META_FILE  # the run's record beside the saved model
from beit3.model.saved import WEIGHTS_FILE
from beit3.trainer.checkpoint import MARKER, latest_checkpoint


@dataclass
class InitWeights:
    backbone: dict  # our names, without prefix
    config: BEiT3Config  # the checkpoint's
    heads: dict  # everything else, names as in the file
    source: str
    source_format: str  # "ours" | "official"
    meta: dict = field(default_factory=dict)  # our run's metadata (task, head args, ...) when found


def resolve_init(path: str) -> tuple[str, dict]:
    """(what to load, metadata of ours found beside it)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--init {path!r} does not exist")
    if os.path.isdir(path):
        best = current_dir(os.path.join(path, "best"))
        if best is not None and os.path.isfile(os.path.join(best, WEIGHTS_FILE)):
            path = best
        elif os.path.isdir(os.path.join(path, "checkpoints")):
            latest = latest_checkpoint(os.path.join(path, "checkpoints"))
            if latest is None:
                raise FileNotFoundError(f"--init {path}: no complete checkpoint in {path}/checkpoints")
            path = latest
        if os.path.isfile(os.path.join(path, WEIGHTS_FILE)):
            return os.path.join(path, WEIGHTS_FILE), _read_meta(os.path.join(path, META_FILE))
        return path, _read_meta(os.path.join(path, MARKER))
    return path, _read_meta(os.path.join(os.path.dirname(path), META_FILE)) if path.endswith(WEIGHTS_FILE) else {}


def _read_meta(path: str) -> dict:
    """Our metadata beside weights ({} when there is none); the files it lists must be as written."""
    if not os.path.isfile(path):
        return {}
    meta = read_json(path)
    problems = size_problems(os.path.dirname(path), meta.get("files") or {})
    if problems:
        raise BadFileError(path, f"lists files that changed since they were written: {'; '.join(problems)}")
    spm = meta.get("spm")
    if isinstance(spm, str) and not os.path.isabs(spm) and os.path.isfile(os.path.join(os.path.dirname(path), spm)):
        meta["spm"] = os.path.join(os.path.dirname(path), spm)  # the tokenizer copied into the folder
    return meta


def init_tokenizer(path: Optional[str]) -> Optional[str]:
    """The SentencePiece model saved with ``--init``'s weights (a saved model of ours: a
    pretraining run's ``final/``, a fine-tuning run's ``best/``), or None when it has none."""
    if path is None:
        return None
    try:
        _, meta = resolve_init(path)
    except (OSError, UserError, ValueError):  # load_init reports these when it loads the weights
        return None
    spm = meta.get("spm")
    return spm if isinstance(spm, str) and os.path.isfile(spm) else None


def tokenizer_for(init: Optional[str], spm: Optional[str]) -> Optional[str]:
    """The run's SentencePiece model: ``spm``, else ``init``'s own. Both given, they must be the
    same model: the weights' text embeddings were trained on ``init``'s ids."""
    own = init_tokenizer(init)
    if spm is None or own is None:
        return spm or own
    check_same_tokenizer(spm_digest(own), own, f"--init {init} was trained", spm,
                         fix="leave out --spm to use the model's own")
    return spm


def load_init(path: str, allow_pickle: bool = False) -> InitWeights:
    src, meta = resolve_init(path)
    cfg = BEiT3Config.from_dict(meta["model"]) if isinstance(meta.get("model"), dict) else None
    loaded = load_backbone(src, cfg, allow_pickle=allow_pickle)
    return InitWeights(loaded.state_dict, loaded.config, loaded.extras, src, loaded.source_format, meta)


@dataclass
class LoadReport:
    missing: list
    heads_loaded: list
    heads_skipped: list

    def summary(self) -> str:
        parts = [f"heads loaded: {', '.join(self.heads_loaded) or 'none'}"]
        if self.heads_skipped:
            parts.append(f"not loaded (no such head or other shape): {', '.join(self.heads_skipped[:8])}")
        if self.missing:
            parts.append(f"backbone weights not in the checkpoint: {', '.join(self.missing[:8])}")
        return "; ".join(parts)


def apply_init(model, init: InitWeights) -> LoadReport:
    """Load ``init`` into a task model (``model.beit3`` + heads). A backbone weight may be missing
    only for the final LayerNorm (unilm's normalize_output=False checkpoints)."""
    result = model.beit3.load_state_dict(init.backbone, strict=False)
    missing = list(result.missing_keys)
    bad = [k for k in missing if not k.startswith("norm.")]
    if bad or result.unexpected_keys:
        raise ValueError(f"{init.source}: backbone does not fit: missing {bad[:8]}, "
                         f"unexpected {list(result.unexpected_keys)[:8]}")
    own = model.state_dict()
    fits = {k: v for k, v in init.heads.items() if k in own and not k.startswith("beit3.")
            and tuple(own[k].shape) == tuple(v.shape)}
    model.load_state_dict(fits, strict=False)
    return LoadReport(missing, sorted(fits), sorted(set(init.heads) - set(fits)))
