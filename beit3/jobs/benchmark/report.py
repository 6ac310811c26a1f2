"""Benchmark results as JSON records, text lines, and a dated Markdown file (torchtitan style)."""
from __future__ import annotations

import datetime
import math
import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Optional

import torch

from beit3.core.files import atomic_write_bytes
from beit3.trainer.trainer import git_commit
from beit3.jobs.benchmark.measure import Measurement
from beit3.jobs.benchmark.runner import Config, Settings

FIGURES = ("samples_per_s", "tokens_per_s", "model_tflops", "mfu_measured_peak", "mfu_datasheet",
           "peak_mem_gb", "step_ms_median")


def environment(device: torch.device, matmul_peak: float, datasheet: Optional[float], world_size: int) -> dict:
    """Hardware, versions and commit: the fields every record shares."""
    return {"device": device.type, "device_name": device_name(device), "world_size": world_size,
            "matmul_peak_tflops": matmul_peak / 1e12,
            "datasheet_tflops": None if datasheet is None else datasheet / 1e12,
            "torch": torch.__version__, **{p: package_version(p) for p in ("deepspeed", "timm", "torchscale")},
            "git_commit": git_commit()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} thread(s)"


def package_version(pkg: str) -> Optional[str]:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def figures(m: Measurement, env: dict) -> dict:
    """Throughput, TFLOP/s, MFU and memory of one measurement; None where it failed. Throughput
    counts every rank; TFLOP/s, MFU and memory are per device."""
    if not m.ok:
        return dict.fromkeys(FIGURES)
    peak, sheet, world = env["matmul_peak_tflops"] * 1e12, env["datasheet_tflops"], env["world_size"]
    return {"samples_per_s": m.samples_per_s * world, "tokens_per_s": m.tokens_per_s * world,
            "model_tflops": m.flops_per_s / 1e12, "mfu_measured_peak": m.flops_per_s / peak,
            "mfu_datasheet": None if sheet is None else m.flops_per_s / (sheet * 1e12),
            "peak_mem_gb": m.peak_mem_gb, "step_ms_median": m.step_ms_median}


def record(c: Config, ms: dict, s: Settings, env: dict, ds_name: str) -> dict:
    """One JSON object for configuration ``c``: its fields, our figures, each peer's figures
    (prefixed with its name) and ``ratio_vs_<peer>`` = our samples/s over the peer's."""
    ours: Measurement = ms["beit3"]
    mix = c.mix
    out = {"config": c.label, "preset": s.cfg.preset, "layout": s.cfg.layout, **env,
           "engine": ds_name, "zero_stage": None if s.ds_config is None else
           s.ds_config.get("zero_optimization", {}).get("stage", 0),
           "batch_images": mix.images, "batch_texts": mix.texts, "batch_pairs": mix.pairs,
           "micro_batch": mix.samples, "text_len": None if mix.image_only else mix.text_len,
           "text_padding": mix.text_padding, "mask_pair_images": mix.mask_pair_images,
           "checkpoint_every": c.checkpoint_every, "checkpoint_mode": c.checkpoint_mode if c.checkpoint_every else None,
           "compile": s.compile and s.compile_skipped is None, "compile_skipped": s.compile_skipped, "sdpa": s.sdpa,
           "warmup": s.warmup, "steps": s.steps,
           "samples_per_step": ours.samples, "tokens_per_step": ours.tokens, "flops_per_step": ours.flops,
           "params": ours.info.get("params"), "error": ours.error, **figures(ours, env)}
    for peer, m in ms.items():
        if peer == "beit3":
            continue
        out.update({f"{peer}_{k}": v for k, v in figures(m, env).items()})
        out.update({f"{peer}_{k}": v for k, v in m.info.items()})
        out[f"{peer}_error"] = m.error
        out[f"ratio_vs_{peer}"] = ours.samples_per_s / m.samples_per_s if ours.ok and m.ok else None
    return clean(out)


def checkpoint_costs(records: list[dict]) -> list[dict]:
    """Throughput cost and memory saving of each activation-checkpointing setting measured on the
    main batch (``--checkpoint-cost``: off, full, selective), against the record without; [] if
    the run did not measure them."""
    same = [records[0]] + [r for r in records[1:] if r["config"].startswith("checkpoint_every=")]
    off = next((r for r in same if not r["checkpoint_every"]), None)
    if len(same) < 2 or off is None:
        return []
    return [_cost(on, off) for on in same if on["checkpoint_every"]]


def _cost(on: dict, off: dict) -> dict:
    head = {"config": on["config"], "every": on["checkpoint_every"], "checkpoint_mode": on["checkpoint_mode"]}
    if on["samples_per_s"] is None or off["samples_per_s"] is None:
        return {**head, "slowdown": None, "memory_saved_gb": None}
    return {**head, "slowdown": 1 - on["samples_per_s"] / off["samples_per_s"],
            "memory_saved_gb": off["peak_mem_gb"] - on["peak_mem_gb"],
            "samples_per_s": (on["samples_per_s"], off["samples_per_s"]),
            "peak_mem_gb": (on["peak_mem_gb"], off["peak_mem_gb"])}


def clean(d: dict) -> dict:
    """NaN and inf to None: JSON has no NaN."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in d.items()}


# -- text --------------------------------------------------------------------------------------------
def _fmt(v, spec: str, unit: str = "") -> str:
    return "n/a" if v is None else f"{v:{spec}}{unit}"


def model_line(name: str, r: dict, prefix: str = "") -> str:
    g = lambda k: r.get(prefix + k)  # noqa: E731
    if g("error"):
        return f"  {name:<11} {g('error')}"
    return (f"  {name:<11} {_fmt(g('samples_per_s'), '10.2f')} samples/s {_fmt(g('tokens_per_s'), '12,.0f')} tokens/s "
            f"{_fmt(g('model_tflops'), '9.4f')} TFLOP/s  MFU {_fmt(_pct(g('mfu_measured_peak')), '5.1f', '%')} "
            f"(datasheet {_fmt(_pct(g('mfu_datasheet')), '.1f', '%')})  peak mem {_fmt(g('peak_mem_gb'), '.2f')} GiB")


def _pct(v):
    return None if v is None else 100 * v


def text_lines(r: dict, peers: tuple) -> list[str]:
    ckpt = f"{_selective(r)}checkpoint every {r['checkpoint_every']}" if r["checkpoint_every"] else "no checkpointing"
    batch = ", ".join(f"{r['batch_' + k]} {k}" for k in ("images", "texts", "pairs") if r["batch_" + k])
    text = f", text {r['text_len']}" if r["text_len"] else ""
    lines = [f"[{r['config']}] {r['preset']} ({r['layout']}), {batch}{text}; {r['engine']}; {ckpt}; "
             f"{r['flops_per_step'] / 1e9:,.1f} GFLOP/step", model_line("beit3", r)]
    for p in peers:
        lines.append(model_line(p, r, p + "_"))
        ratio = r.get(f"ratio_vs_{p}")
        lines.append(f"  beit3 / {p}: {_fmt(ratio, '.2f', 'x')} samples/s")
    return lines


def _selective(r: dict) -> str:
    return "selective " if r.get("checkpoint_mode") == "selective" else ""


def checkpoint_line(cost: dict) -> str:
    what = f"{_selective(cost)}activation checkpointing"
    if cost["slowdown"] is None:
        return f"{what} (every {cost['every']}): not comparable (a run failed)"
    on, off = cost["samples_per_s"]
    mon, moff = cost["peak_mem_gb"]
    return (f"{what} every {cost['every']} layer(s): samples/s {-100 * cost['slowdown']:+.1f}% "
            f"({on:.2f} with, {off:.2f} without), peak memory {-cost['memory_saved_gb']:+.2f} GiB "
            f"({mon:.2f} with, {moff:.2f} without)")


# -- Markdown ----------------------------------------------------------------------------------------
TABLE = (("config", "config"), ("model", None), ("batch", None), ("samples/s", "samples_per_s"),
         ("tokens/s", "tokens_per_s"), ("TFLOP/s", "model_tflops"), ("MFU (measured peak)", "mfu_measured_peak"),
         ("MFU (datasheet)", "mfu_datasheet"), ("peak mem GiB", "peak_mem_gb"))


def markdown(records: list[dict], command: str, peers_of: list[tuple]) -> str:
    """A dated result file: hardware, versions, commit, the exact command, one row per model."""
    r0 = records[0]
    today = datetime.date.today().isoformat()
    head = [f"# beit3 benchmark, {today}", "",
            f"- hardware: {r0['device_name']}; {r0['world_size']} process(es)",
            f"- matmul peak measured: {r0['matmul_peak_tflops']:.3f} TFLOP/s"
            + ("" if r0["datasheet_tflops"] is None else f"; datasheet {r0['datasheet_tflops']:.0f} TFLOP/s"),
            f"- versions: torch {r0['torch']}, deepspeed {r0['deepspeed']}, timm {r0['timm']}, "
            f"torchscale {r0['torchscale']}",
            f"- commit: {r0['git_commit']}", f"- command: `{command}`", "",
            "| " + " | ".join(h for h, _ in TABLE) + " |", "|" + "---|" * len(TABLE)]
    rows = []
    for r, peers in zip(records, peers_of):
        for name, prefix in (("beit3", ""), *((p, p + "_") for p in peers)):
            rows.append(_row(r, name, prefix))
    return "\n".join(head + rows) + "\n"


def _row(r: dict, name: str, prefix: str) -> str:
    batch = "/".join(str(r["batch_" + k]) for k in ("images", "texts", "pairs"))
    cells = []
    for h, key in TABLE:
        if key is None:
            text = f", text {r['text_len']}" if r["text_len"] else ""
            ckpt = f"{r['checkpoint_every']}{' selective' if _selective(r) else ''}"
            cells.append(name if h == "model" else f"{batch} (i/t/p){text}, ckpt {ckpt}")
            continue
        v = r.get(key if key == "config" else prefix + key)
        if key.startswith("mfu"):
            v = _fmt(_pct(v), ".1f", "%")
        elif isinstance(v, float):
            v = f"{v:,.2f}" if key != "model_tflops" else f"{v:.4f}"
        cells.append(str(v))
    return "| " + " | ".join(cells) + " |"


def write_markdown(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode())
