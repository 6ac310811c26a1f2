"""``beit3 embed``'s job: embed every input in chunks, resumably, over any number of processes.

The input is cut into chunks (``beit3.data.embed_inputs``: items in input order, or one shard each).
Each finished chunk is written atomically to ``<output stem>.chunks/chunk-NNNNNN.npz`` (its vectors,
ids, and the ids it skipped with the reason). A run that finds chunks there (``resume``, the default)
keeps them and embeds only the others, once ``plan.json`` shows that they were made by the same
model, from the same input, with the same settings; a kill costs at most the chunks in flight.
Under torchrun, rank r embeds chunks r, r + W, r + 2W, ... (the chunks do not depend on W, so a run
may resume on another number of processes); rank 0 then assembles the matrix in input order, writes
the ids file and ``<output stem>.json``, and removes the chunks. The chunks folder must be shared by
every rank (one node, or a shared file system).

Images that cannot be read, and empty texts, are skipped and counted: their ids are not in the ids
file; the summary holds the count and the first few with the reason.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from beit3.data.embed_inputs import MODALITIES, Chunk, Inputs, Skip, chunk_items, open_inputs
from beit3.data.sources import RetryPolicy, SkipLog
from beit3.inference.embed import decode_images, image_vectors, load_retrieval, text_vectors, usable_texts
from beit3.core.errors import BadFileError, UserError
from beit3.core.files import atomic_file, atomic_write_bytes, check_output_dir, check_output_file, read_json
from beit3.core.settings import check_settings, setting as _f
from beit3.inference.predictor import Predictor
from beit3.trainer.distributed import DistInfo, all_reduce_flag, barrier, finish_distributed, init_distributed
from beit3.inference.vectors import DTYPES, VectorFiles, files_of, write_ids, write_matrix

PLAN_FILE = "plan.json"
SHOWN_SKIPS = 20  # skipped ids (with the reason) kept in the summary
Log = Callable[[str], None]


@dataclass
class EmbedConfig:
    model: str = _f("", "saved retrieval model folder, fine-tuning run, checkpoint file with retrieval heads (with "
                    "--spm), or registry name")
    input: str = _f("", "folder of images, text file (one text a line), JSON-lines list, or webdataset shards "
                    "(pattern, http(s)://, pipe:)")
    output: str = _f("", "the matrix: NAME.npy or NAME.safetensors (NAME.ids.txt, NAME.json beside it)")
    modality: Optional[str] = _f(None, "what to embed (default: what the input holds; shards: image)",
                                 choices=MODALITIES)
    batch_size: int = _f(32, "inputs per forward pass", ge=1)
    chunk_size: int = _f(4096, "inputs per chunk of a listed input (the unit kept after a kill); shards: one chunk "
                         "each", ge=1)
    dtype: str = _f("float32", "the matrix's dtype", choices=tuple(DTYPES))
    resume: bool = _f(True, "keep the finished chunks of an earlier run of the same model and input (--no-resume: "
                      "start over)")
    spm: Optional[str] = _f(None, "SentencePiece model of a checkpoint file (a saved folder holds its own)")
    allow_pickle: bool = _f(False, "trust checkpoint files that need unpickling")
    device: Optional[str] = _f(None, "default: cuda if available, else cpu", choices=["cuda", "cpu"])
    workers: int = _f(4, "threads decoding images (0: none)", ge=0)
    shard_retries: int = _f(3, "further attempts at a remote shard whose open or read failed", ge=0)
    retry_backoff: float = _f(1.0, "seconds before the first retry, doubled for each further one", ge=0)
    dist_timeout: float = _f(1800.0, "seconds a rank waits for the others", gt=0)

    def __post_init__(self):
        check_settings(self)


class IncompleteError(UserError):
    """Some chunks could not be read to their end (a shard that failed after its retries)."""


def stderr_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(cfg: EmbedConfig, log: Log = stderr_log) -> dict:
    """Embed ``cfg.input`` into ``cfg.output``; returns the summary on rank 0 ({} on the others).
    Bad inputs raise ``UserError`` before any work; shards that failed raise ``IncompleteError``
    once every other chunk is saved."""
    start = time.time()
    files, inputs = check(cfg)
    dist = _dist(cfg)
    p = load_retrieval(cfg.model, dist.device, cfg.spm, cfg.allow_pickle)
    plan = make_plan(cfg, inputs, p)
    kept = prepare_chunks(files, plan, cfg.resume, dist, log)
    todo = [c for c in inputs.chunks if c.index % dist.world_size == dist.rank and c.index not in kept]
    began = time.time()
    failed = embed_chunks(p, inputs, todo, files, cfg, dist)
    barrier(dist)
    embedding = time.time() - began
    if all_reduce_flag(bool(failed), dist):
        raise IncompleteError(_incomplete(failed, files, dist))
    summary = {}
    if dist.is_main:
        summary = assemble(files, inputs, cfg, plan, kept, (time.time() - start, embedding), dist.world_size)
        log(_done_line(summary, files))
    finish_distributed(dist)
    return summary


def check(cfg: EmbedConfig) -> tuple[VectorFiles, Inputs]:
    """Every check that needs no model: the output can be written, the input is there and not empty."""
    for name, flag in (("model", "MODEL"), ("input", "--input"), ("output", "--output")):
        if not getattr(cfg, name):
            raise UserError(f"no {name} given ({flag})")
    files = files_of(cfg.output)
    check_output_file(files.matrix)
    check_output_dir(files.chunks)
    return files, open_inputs(cfg.input, cfg.modality, cfg.chunk_size)


def _dist(cfg: EmbedConfig) -> DistInfo:
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return init_distributed(cfg.dist_timeout, device)
    if device == "cuda":
        return DistInfo.single(torch.device("cuda", torch.cuda.current_device()))
    return DistInfo.single(device)


# -- the chunks folder -------------------------------------------------------------------------------
def make_plan(cfg: EmbedConfig, inputs: Inputs, p: Predictor) -> dict:
    """What the chunks depend on: a resumed run must match it field for field."""
    weights = p.saved.path("weights")
    stat = os.stat(weights) if weights and os.path.isfile(weights) else None
    config = json.dumps(p.saved.config, sort_keys=True, default=str).encode()
    return {"model": os.path.abspath(cfg.model) if os.path.exists(cfg.model) else cfg.model,
            "weights": [weights, stat.st_size, stat.st_mtime_ns] if stat else None,
            "model_config": hashlib.sha256(config).hexdigest(),
            "input": inputs.spec, "input_fingerprint": inputs.fingerprint, "modality": inputs.modality,
            "chunks": len(inputs.chunks), "chunk_size": cfg.chunk_size, "dtype": cfg.dtype,
            "dims": p.model.cfg.embed_dim}


def chunk_path(files: VectorFiles, index: int) -> str:
    return os.path.join(files.chunks, f"chunk-{index:06d}.npz")


def prepare_chunks(files: VectorFiles, plan: dict, resume: bool, dist: DistInfo, log: Log) -> set[int]:
    """The indices of the chunks an earlier run finished (kept). Rank 0 checks that they belong to
    this plan (else ``UserError``), or removes them without ``resume``; then every rank starts."""
    problem = None
    if dist.is_main:
        problem = _start_chunks(files, plan, resume, log)
    if all_reduce_flag(problem is not None, dist):
        raise UserError(problem or f"{files.chunks} holds the chunks of another run (rank 0 says why)")
    barrier(dist)
    kept = {i for i in range(plan["chunks"]) if os.path.isfile(chunk_path(files, i))}
    if kept and dist.is_main:
        log(f"resuming: {len(kept)} of {plan['chunks']} chunks in {files.chunks}/ were finished by an earlier "
            f"run and are kept, not recomputed (--no-resume starts over)")
    return kept


def _start_chunks(files: VectorFiles, plan: dict, resume: bool, log: Log) -> Optional[str]:
    """Keep the chunks of this plan, refuse those of another (the reason), or start anew."""
    path = os.path.join(files.chunks, PLAN_FILE)
    found = [n for n in os.listdir(files.chunks) if n.startswith("chunk-")] if os.path.isdir(files.chunks) else []
    earlier = _read_plan(path) if found else None
    if resume and earlier == plan:
        return None
    if resume and earlier is not None:
        differ = ", ".join(k for k in plan if earlier.get(k) != plan[k])
        return (f"{files.chunks} holds the chunks of another run ({differ} differ): give --no-resume to "
                f"replace them, or another --output")
    if os.path.isdir(files.chunks):
        shutil.rmtree(files.chunks)
    if found:  # --no-resume, or chunks whose plan was lost: nothing says what made them
        why = "--no-resume" if not resume else f"no readable {PLAN_FILE} says what made them"
        log(f"removed {len(found)} chunks of an earlier run from {files.chunks}/ ({why})")
    os.makedirs(files.chunks)
    atomic_write_bytes(path, json.dumps(plan, indent=1).encode())
    return None


def _read_plan(path: str) -> Optional[dict]:
    try:
        return read_json(path) if os.path.isfile(path) else None
    except BadFileError:
        return None


# -- embedding ---------------------------------------------------------------------------------------
def embed_chunks(p: Predictor, inputs: Inputs, todo: list[Chunk], files: VectorFiles, cfg: EmbedConfig,
                 dist: DistInfo) -> dict[str, str]:
    """Embed and save each chunk of ``todo``; returns {shard: why} of those that could not be read."""
    sizes = [c.size for c in todo]
    ranks = f" (rank 0 of {dist.world_size})" if dist.world_size > 1 else ""
    bar = tqdm(total=sum(sizes) if None not in sizes else None, unit="sample", dynamic_ncols=True,
               desc=f"embedding {inputs.modality}s{ranks}", disable=not dist.is_main or not todo, file=sys.stderr)
    failed: dict[str, str] = {}
    pool = ThreadPoolExecutor(cfg.workers) if cfg.workers and inputs.modality == "image" else None
    retry = RetryPolicy(cfg.shard_retries, cfg.retry_backoff)
    try:
        for chunk in todo:
            skips = SkipLog()
            vectors, ids, skipped = embed_chunk(p, chunk, inputs.modality, cfg.batch_size, (skips, retry), pool, bar)
            if skips.failed:
                failed.update(skips.failed)
                continue  # not saved: the next run reads the shard again
            save_chunk(files, chunk.index, vectors.astype(DTYPES[cfg.dtype]), ids, skipped)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
    return failed


def embed_chunk(p: Predictor, chunk: Chunk, modality: str, batch_size: int, reading: tuple[SkipLog, RetryPolicy],
                pool, bar) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """(vectors (n, D) float32, their ids, [(id, why)] skipped) of one chunk, in input order;
    ``reading``: where a shard's read errors go, and how often it is tried."""
    vectors, ids, skipped, batch = [], [], [], []

    def flush():
        got, kept, bad = _embed_batch(p, modality, [v for _, v in batch], pool)
        vectors.append(got)
        ids.extend(batch[i][0] for i in kept)
        skipped.extend((batch[i][0], why) for i, why in sorted(bad.items()))
        bar.update(len(batch))
        batch.clear()

    for key, value in chunk_items(chunk, modality, *reading):
        if isinstance(value, Skip):
            skipped.append((key, value.why))
            bar.update(1)
            continue
        batch.append((key, value))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    dims = p.model.cfg.embed_dim
    return (np.concatenate(vectors) if vectors else np.zeros((0, dims), np.float32)), ids, skipped


def _embed_batch(p: Predictor, modality: str, values: list, pool) -> tuple[np.ndarray, list[int], dict[int, str]]:
    if modality == "image":
        pixels, kept, bad = decode_images(p, values, pool)
        got = image_vectors(p, pixels) if pixels is not None else None
    else:
        kept, bad = usable_texts(values)
        got = text_vectors(p, [values[i] for i in kept]) if kept else None
    return (got.numpy() if got is not None else np.zeros((0, p.model.cfg.embed_dim), np.float32)), kept, bad


def save_chunk(files: VectorFiles, index: int, vectors: np.ndarray, ids: list[str],
               skipped: list[tuple[str, str]]) -> None:
    with atomic_file(chunk_path(files, index)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, vectors=vectors, ids=np.array(ids, dtype=str),
                     skipped_ids=np.array([s[0] for s in skipped], dtype=str),
                     skipped_why=np.array([s[1] for s in skipped], dtype=str))


def load_chunk(files: VectorFiles, index: int) -> dict[str, np.ndarray]:
    path = chunk_path(files, index)
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in ("vectors", "ids", "skipped_ids", "skipped_why")}
    except (OSError, ValueError, KeyError) as e:
        raise BadFileError(path, f"not a chunk written by beit3 embed ({e}); remove it to embed it again") from None


# -- the result ----------------------------------------------------------------------------------------
def assemble(files: VectorFiles, inputs: Inputs, cfg: EmbedConfig, plan: dict, kept: set[int],
             seconds: tuple[float, float], world: int) -> dict:
    """The matrix, ids and summary from every chunk, in input order; then the chunks are removed.
    ``kept``: the chunks an earlier run finished; ``seconds``: (the whole run, its embedding part),
    whose throughput counts only the inputs this run embedded."""
    chunks = [load_chunk(files, c.index) for c in inputs.chunks]
    done_now = sum(len(c["ids"]) + len(c["skipped_ids"]) for n, c in enumerate(chunks) if n not in kept)
    ids = [str(i) for c in chunks for i in c["ids"]]
    skipped = [(str(i), str(w)) for c in chunks for i, w in zip(c["skipped_ids"], c["skipped_why"])]
    if not ids:
        raise UserError(f"--input {cfg.input}: none of its {len(skipped):,} inputs could be embedded "
                        f"(first: {skipped[0][0]}: {skipped[0][1]})" if skipped else f"--input {cfg.input}: empty")
    write_matrix(files, (c["vectors"] for c in chunks), len(ids), plan["dims"], cfg.dtype)
    write_ids(files, ids)
    summary = {"model": plan["model"], "task": "retrieval", "input": inputs.spec, "modality": inputs.modality,
               "dims": plan["dims"], "count": len(ids), "skipped": len(skipped),
               "skipped_examples": [{"id": i, "why": w} for i, w in skipped[:SHOWN_SKIPS]],
               "dtype": cfg.dtype, "format": files.format, "chunks": len(chunks),
               "chunks_computed": len(chunks) - len(kept), "ranks": world, "seconds": round(seconds[0], 3),
               "embedding_seconds": round(seconds[1], 3),
               "samples_per_second": round(done_now / seconds[1], 2) if seconds[1] > 0 else None,
               "settings": {k: v for k, v in asdict(cfg).items() if k not in ("model", "input", "output")}}
    atomic_write_bytes(files.summary, json.dumps(summary, indent=1).encode())
    shutil.rmtree(files.chunks, ignore_errors=True)
    return summary


def _done_line(s: dict, files: VectorFiles) -> str:
    resumed = s["chunks"] - s["chunks_computed"]
    return (f"embedded {s['count']:,} {s['modality']}s into {files.matrix} ({s['count']:,} x {s['dims']} {s['dtype']}; "
            f"ids in {files.ids}, summary in {files.summary}) in {s['seconds']:.1f} s "
            f"({s['samples_per_second']} samples/s); "
            f"{s['skipped']:,} skipped" + (f" (first: {s['skipped_examples'][0]['id']}: "
                                          f"{s['skipped_examples'][0]['why']})" if s["skipped"] else "")
            + (f"; {resumed} of {s['chunks']} chunks kept from an earlier run" if resumed else ""))


def _incomplete(failed: dict[str, str], files: VectorFiles, dist: DistInfo) -> str:
    if not failed:
        return f"another rank could not read some of its shards (its log says which); finished chunks are kept " \
               f"in {files.chunks}/: run again to retry the others"
    name, why = next(iter(failed.items()))
    return (f"{len(failed)} shard(s) could not be read to their end (first: {name}: {why}); every other chunk is "
            f"kept in {files.chunks}/: run the same command again to retry them")
