"""The GPU check's report: its three targets (each with the gap left to it) and the dated Markdown
and JSON files (``benchmarks/<date>-<gpu>-check.md`` and ``.json``, copied to ``--copy-to``)."""
from __future__ import annotations

import json
import os
import re
import shutil

from beit3.jobs.benchmark.check_parts import MFU_TARGET, TORCHSCALE_TARGET


def _get(report: dict, part: str, *keys):
    d = report["parts"].get(part, {}).get("results", {})
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def card(report: dict, part: str) -> str:
    """Where a part's figures come from: '' for this run, else '(<card>, run <date>)'."""
    p = report["parts"].get(part, {})
    if not p.get("from"):
        return ""
    return f" ({_short(p.get('device') or 'another card')}, run {p['from'][:10]})"


def _short(device: str) -> str:
    m = re.search(r"\b([A-Za-z]+\d+[A-Za-z]*)\b", device.replace("NVIDIA", ""))
    return m.group(1) if m else device


def best_at_max_batch(report: dict) -> tuple[str | None, dict]:
    """(configuration, figures) of the largest micro-batch's highest MFU, compiled or not."""
    mb = _get(report, "giant", "max_batch") or {}
    runs = {k: v for k, v in mb.items() if isinstance(v, dict) and v.get("samples_per_s")}
    if not runs:
        return None, {}
    key = max(runs, key=lambda k: runs[k].get("mfu") or runs[k]["samples_per_s"])
    return key, runs[key]


def config_label(key: str) -> str:
    """"selective" -> "selective checkpointing"; "full, compiled" -> "full checkpointing, compiled"."""
    mode, _, rest = key.partition(",")
    return f"{mode} checkpointing" + (f",{rest}" if rest else "")


def targets(report: dict) -> list[dict]:
    """The three targets of the GPU check: each measured (met or missed, and by how much) or not."""
    key, best = best_at_max_batch(report)
    mfu = best.get("mfu")
    batch = _get(report, "giant", "max_batch", "batch")
    out = [{"target": f"giant mixed batch, model FLOPs >= {MFU_TARGET:.0%} of the measured bf16 peak",
            "measured": "not measured" if mfu is None else f"{100 * mfu:.1f}% ({batch}, {config_label(key)})",
            "met": None if mfu is None else mfu >= MFU_TARGET,
            "gap": _gap(mfu, MFU_TARGET, lambda v: f"{100 * v:.1f}%")}]
    ours = _get(report, "giant", "image_only", "samples_per_s")
    timm = _get(report, "peers", "timm_compiled", "samples_per_s")
    ratio = None if None in (ours, timm) else ours / timm
    out.append({"target": "image-only images/s >= timm ViT-g/14 compiled" + card(report, "peers"),
                "measured": "not measured" if ratio is None else f"{ours:.1f} vs {timm:.1f} ({ratio:.2f}x)",
                "met": None if ratio is None else ratio >= 1.0,
                "gap": _gap(ratio, 1.0, lambda v: f"{v:.2f}x")})
    ours = _get(report, "giant", "torchscale_batch", "samples_per_s")
    ts = _get(report, "peers", "torchscale", "samples_per_s")
    ratio = None if None in (ours, ts) else ours / ts
    stage = _get(report, "giant", "torchscale_batch", "zero_stage")
    out.append({"target": f"samples/s >= {TORCHSCALE_TARGET}x torchscale at equal batch" + card(report, "peers"),
                "measured": "not measured" if ratio is None else
                f"{ratio:.2f}x ({ours:.1f} vs {ts:.1f}, ZeRO-{stage})",
                "met": None if ratio is None else ratio >= TORCHSCALE_TARGET,
                "gap": _gap(ratio, TORCHSCALE_TARGET, lambda v: f"{v:.2f}x")})
    return out


def _gap(value, target: float, show) -> str:
    if value is None:
        return "n/a"
    if value >= target:
        return f"met with {value / target:.2f}x the target"
    return f"{show(value)} of {show(target)}: needs {target / value:.2f}x" if value > 0 else "needs any speed"


def slug(report: dict) -> str:
    if report["dry_run"]:
        return "cpu-dry-run"
    return _short(_get(report, "peak", "device_name") or "gpu").lower()


def write_report(report: dict, args, work: str) -> list[str]:
    os.makedirs(args.out_dir, exist_ok=True)
    stem = f"{report['started'][:10]}-{slug(report)}-check"
    md_path, json_path = os.path.join(args.out_dir, stem + ".md"), os.path.join(args.out_dir, stem + ".json")
    for path, text in ((json_path, json.dumps(report, indent=1, default=str)), (md_path, markdown(report))):
        with open(path + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(path + ".tmp", path)
    paths = [md_path, json_path]
    if args.copy_to:
        os.makedirs(args.copy_to, exist_ok=True)
        for p in paths:
            shutil.copy(p, args.copy_to)
        trace = _get(report, "giant", "profile", "trace")
        if trace and os.path.exists(trace):
            shutil.copy(trace, os.path.join(args.copy_to, stem.replace("-check", "-trace") + ".json.gz"))
    return paths


def _n(v, spec=".1f", scale=1.0) -> str:
    return "n/a" if v is None else f"{v * scale:{spec}}"


HEAD = ["| configuration | batch | samples/s | TFLOP/s | MFU | peak GiB | step ms |", "|---|---|---|---|---|---|---|"]


def _figs(r: dict | None) -> str:
    """The figure cells of a row: samples/s, TFLOP/s, MFU, peak GiB, step ms (or the error)."""
    r = r or {}
    if r.get("error"):
        return f"{r['error']} | | | | |"
    return (f"{_n(r.get('samples_per_s'))} | {_n(r.get('model_tflops'))} | {_n(r.get('mfu'), '.1f', 100)}% | "
            f"{_n(r.get('peak_mem_gb'))} | {_n(r.get('step_ms_median'), '.0f')} |")


def _row(label: str, r: dict | None, extra: str = "") -> str:
    return f"| {label} | {extra} | {_figs(r)}"


def _search_text(search: dict) -> str:
    out = []
    for t in search.get("tries", []):
        if "forward_backward_peak_gb" in t:
            out.append(f"probe {t['per_part']}: forward + backward peak {_n(t['forward_backward_peak_gb'])} GiB")
        else:
            out.append(f"step at {t['per_part']}: {t.get('error') or _n(t.get('step_peak_gb', t.get('peak_mem_gb'))) + ' GiB'}")
    if search.get("candidate") is not None:
        out.append(f"predicted {search['candidate']} for 90% of {_n(search.get('capacity_gb'))} GiB")
    return "; ".join(out) or "no search"


def markdown(report: dict) -> str:
    env, parts = report["environment"], report["parts"]
    peak = _get(report, "peak") or {}
    lines = [f"# GPU check: {peak.get('device_name', 'n/a')}, {report['started'][:10]}", "",
             f"`{report['command']}`{' (dry run: tiny preset on the CPU, figures mean nothing)' if report['dry_run'] else ''}; "
             f"commit {env.get('git_commit') or 'n/a'}; torch {env.get('torch')}, deepspeed {env.get('deepspeed')}, "
             f"timm {env.get('timm')}, torchscale {env.get('torchscale')}; {report.get('seconds', 0):.0f} s in all.",
             "", f"Matmul peak measured in this run: {_n(peak.get('matmul_peak_tflops'))} TFLOP/s "
             f"({peak.get('dtype', 'n/a')}; datasheet {_n(peak.get('datasheet_tflops'), '.0f')}); "
             f"device memory {_n(peak.get('memory_gb'))} GiB. MFU below is against the measured peak.", "",
             "## Targets", "", "| target | measured | met | gap |", "|---|---|---|---|"]
    for t in report.get("targets", []):
        met = "n/a" if t["met"] is None else "yes" if t["met"] else "no"
        lines.append(f"| {t['target']} | {t['measured']} | {met} | {t.get('gap', '')} |")
    lines += ["", "## Parts", "", "| part | status | seconds | error |", "|---|---|---|---|"]
    for name, p in parts.items():
        note = f" (run {p['from']}{', ' + p['device'] if p.get('device') else ''})" if p.get("from") else ""
        lines.append(f"| {name} | {p['status']}{note} | {p['seconds']:.0f} | {p.get('error') or ''} |")
    lines += _giant_lines(report)
    lines += _other_parts_lines(report)
    return "\n".join(lines)


def _giant_lines(report: dict) -> list[str]:
    g = _get(report, "giant") or {}
    if not g:
        return []
    lines = ["", f"## Throughput: {g.get('preset')} ({g.get('layout')} layout, {_n(g.get('params'), '.3f', 1e-9)}B "
             f"parameters), DeepSpeed ZeRO-{g.get('zero_stage', 3)} + bf16", ""]
    lines += _stage_lines(g)
    search = g.get("max_batch_search") or {}
    lines += [(f"Largest micro-batch with selective checkpointing: {g.get('max_batch_per_part')} per part (found "
               f"in {_n(search.get('seconds'), '.0f')} s; " if g.get("max_batch") else
               "Largest micro-batch: not established (the part stopped before measuring it; ")
              + _search_text(search) + ").", ""] + HEAD
    mb = g.get("max_batch") or {}
    for key, r in mb.items():
        if isinstance(r, dict) and key not in ("compile",):
            lines.append(_row(f"beit3 ZeRO-{mb.get('zero_stage', '?')}, {config_label(key)}", r, mb.get("batch", "")))
    for key, r in (g.get("image_only_variants") or {}).items():
        lines.append(_row(f"beit3, image-only, {key}", r, g.get("image_only", {}).get("batch", "")))
    pe = _get(report, "peers") or {}
    for key, label in (("torchscale", "torchscale BEiT3 (its checkpointing)"), ("timm_eager", "timm ViT-g/14 eager"),
                       ("timm_compiled", "timm ViT-g/14 torch.compile")):
        if key in pe:
            lines.append(_row(label + card(report, "peers"), pe[key], pe[key].get("batch", "")))
    lines += _compile_lines(mb)
    lines += _profile_lines(g.get("profile"))
    return lines


def _stage_lines(g: dict) -> list[str]:
    st = g.get("stages") or {}
    if not st:
        return []
    lines = [f"### ZeRO-3 against ZeRO-2 ({st.get('batch')}, {st.get('checkpointing')} checkpointing, same weights)",
             "", "| stage | engine build s | first step s | first loss | samples/s | TFLOP/s | MFU | peak GiB | step ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for stage in ("zero3", "zero2"):
        r = st.get(stage)
        if r is None:
            continue
        lines.append(f"| ZeRO-{stage[-1]} | {_n(r.get('engine_build_s'))} | {_n(r.get('first_step_s'))} | "
                     f"{_n(r.get('first_loss'), '.4f')} | {_figs(r)}")
    if st.get("chosen"):
        ratio = st.get("zero2_over_zero3")
        kept = st.get("kept", st["chosen"])
        rest = ("the rest of this part ran under it" if kept == st["chosen"] else
                f"a dry run goes on with ZeRO-{kept} whatever its timings")
        lines += ["", f"ZeRO-2 / ZeRO-3 samples/s: {_n(ratio, '.2f')}; first losses differ by "
                  f"{_n(st.get('first_loss_difference'), '.2g')}. **The giant recipe on one GPU should use "
                  f"ZeRO-{st['chosen']}** (measured here; {rest})."]
    return lines + [""]


def _compile_lines(mb: dict) -> list[str]:
    c = mb.get("compile")
    if c is None:
        return []
    if isinstance(c, str):
        return ["", f"torch.compile of the blocks: {c}."]
    out = ["", f"torch.compile of every block ({c.get('backend')}):"]
    for key, r in mb.items():
        if key.endswith("compiled") and isinstance(r, dict):
            d = r.get("dynamo") or {}
            out.append(f"- {key}: " + (r["error"] if r.get("error") else
                       f"{_n(r.get('with_warmup_s'), '.0f')} s to compile and warm up; {d.get('unique_graphs')} "
                       f"graphs, {d.get('graph_breaks')} graph breaks" +
                       (f" ({'; '.join(d['break_reasons'])})" if d.get("break_reasons") else "")))
    return out


def _profile_lines(prof: dict | None) -> list[str]:
    if not prof:
        return []
    lines = ["", f"## Profile of one giant step ({prof['batch']}, "
             f"{config_label(prof.get('configuration', prof['checkpointing']))})", "",
             f"Step {_n(prof.get('step_ms'), '.0f')} ms, device busy {_n(prof.get('device_busy'), '.0f', 100)}% of it. "
             "Time by kind: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in prof["time_by_kind"].items()), "",
             "| largest costs (kernel, or op on the CPU) | ms per step | share of the step |", "|---|---|---|"]
    for r in prof.get("top_costs", []):
        lines.append(f"| `{r['name']}` | {r['ms_per_step']:.1f} | {100 * r['share']:.1f}% |")
    return lines + ["", "```", prof["op_table"].rstrip(), "```"]


def _other_parts_lines(report: dict) -> list[str]:
    lines = []
    n = _get(report, "numerics") or {}
    if n.get("max_abs_diff") is not None:
        lines += ["", f"## bf16 against fp32 ({n['preset']}, {n['steps']} steps of {n['batch']}, ZeRO-3, same weights "
                  f"and batches){card(report, 'numerics')}", "",
                  f"Loss fp32 {n['first_last_fp32'][0]:.4f} -> {n['first_last_fp32'][1]:.4f}, bf16 "
                  f"{n['first_last_bf16'][0]:.4f} -> {n['first_last_bf16'][1]:.4f}; per-step |difference| max "
                  f"{n['max_abs_diff']:.4f} ({100 * n['max_rel_diff']:.2f}% of the loss), mean {n['mean_abs_diff']:.4f}."]
    sd = _get(report, "sdpa") or {}
    if sd:
        lines += ["", f"## Attention kernels (head dim {sd.get('head_dim')}, {sd.get('dtype')}){card(report, 'sdpa')}", "",
                  "| batch | SDPA ops (forward, backward) | kernels |", "|---|---|---|"]
        for k, v in sd.items():
            if isinstance(v, dict):
                lines.append(f"| {k} | {', '.join(o.removeprefix('aten::') for o in v['ops'])} | "
                             f"{'; '.join(v['kernels']) or 'n/a'} |")
    sy = _get(report, "sync") or {}
    if sy:
        lines += ["", f"## Host syncs in the step ({sy.get('preset')}, {sy.get('batch')}, "
                  f"`torch.cuda.set_sync_debug_mode(\"error\")`){card(report, 'sync')}", ""]
        lines += [f"- {k}: {v}" for k, v in sy.items() if k not in ("preset", "batch", "error", "traceback")]
    return lines
