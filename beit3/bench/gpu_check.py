"""One prepared GPU check: everything a GPU must show, measured in one call (``scripts/gpu_check.sh``).

    scripts/gpu_check.sh             on a GPU machine: at most ~9 minutes, writes
                                     benchmarks/<date>-<gpu>-check.md and .json
    scripts/gpu_check.sh --dry-run   the same code on the CPU with the tiny preset (~1 minute)

The parts (``beit3.bench.check_parts``) run one after the other, each in a process of its own with
a time budget: a part that fails or runs out of time records what it had and the error, and the
next one starts. The report is rewritten after every part (and copied to ``--copy-to``, by default
``$OUT`` when set), so a check cut short still leaves its numbers behind.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from ..train.distributed import free_port
from .check_parts import MFU_TARGET, PARTS, TORCHSCALE_TARGET

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="the CPU and the tiny preset (tests the script)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all parts together (default 520 on a GPU, 600 in a dry run: a loaded CPU runs the tiny parts slowly)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--out-dir", default=os.path.join(REPO_ROOT, "benchmarks"),
                    help="where the dated .md and .json go (default benchmarks/)")
    ap.add_argument("--copy-to", default=os.environ.get("OUT") or None,
                    help="also copy the report and the profile trace here (default $OUT when set)")
    ap.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                    help="torch.profiler trace of the giant step: when MFU misses the target (auto)")
    ap.add_argument("--merge", metavar="JSON", default=None,
                    help="an earlier report of the same machine kind: its parts not rerun now are kept "
                         "(rerun only what failed)")
    ap.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part
    ap.add_argument("--context", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.part:
        return run_part(args.part, args.context)
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        print(f"gpu_check: error: unknown part(s) {unknown}; expected some of {list(PARTS)}", file=sys.stderr)
        return 2
    if not args.dry_run and not _cuda_visible():
        print("gpu_check: error: no CUDA device is visible; run with --dry-run on a CPU machine", file=sys.stderr)
        return 2
    budget = args.budget or (600.0 if args.dry_run else 520.0)
    return orchestrate(parts, args, budget)


def _cuda_visible() -> bool:
    # In a child process: the orchestrator must not hold a CUDA context (memory) while parts run.
    # A driver that hangs the query counts as no device rather than a check that never starts.
    try:
        r = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return False
    return r.stdout.strip() == "True"


# -- the orchestrator ----------------------------------------------------------------------------
def orchestrate(parts: list[str], args, budget: float) -> int:
    start = time.monotonic()
    end = start + budget
    work = tempfile.mkdtemp(prefix="beit3-gpu-check-")
    report = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "dry_run": args.dry_run,
              "command": "scripts/gpu_check.sh " + " ".join(sys.argv[1:]), "budget_s": budget,
              "environment": environment(), "parts": {}}
    if args.merge:
        with open(args.merge) as f:
            earlier = json.load(f)
        for name, p in earlier["parts"].items():
            if name not in parts and p["status"] == "ok":
                report["parts"][name] = {**p, "from": earlier["started"]}
    paths = None
    print(f"gpu_check: {len(parts)} parts, {budget:.0f} s budget{' (dry run, CPU)' if args.dry_run else ''}",
          flush=True)
    for name in parts:
        own = PARTS[name][1] * (2.0 if args.dry_run else 1.0)
        left = end - time.monotonic()
        limit = min(own, left)
        if limit < 5:
            report["parts"][name] = {"status": "skipped", "error": "no time left in the budget", "seconds": 0}
            paths = write_report(report, args, work)
            continue
        print(f"[{name}] up to {limit:.0f} s", flush=True)
        report["parts"][name] = run_child(name, limit, args, work, report)
        r = report["parts"][name]
        print(f"[{name}] {r['status']} in {r['seconds']:.0f} s" + (f": {r['error']}" if r.get("error") else ""),
              flush=True)
        report["seconds"] = time.monotonic() - start
        report["targets"] = targets(report)
        paths = write_report(report, args, work)
    for t in report.get("targets", []):
        print(f"target: {t['target']}: {t['measured']} -> {t['met']}")
    if paths:
        print("wrote " + ", ".join(paths))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def run_child(name: str, limit: float, args, work: str, report: dict) -> dict:
    """Run part ``name`` in a new process group; kill the group when ``limit`` seconds pass."""
    result_path = os.path.join(work, f"{name}.json")
    ctx = {"dry": args.dry_run, "device": "cpu" if args.dry_run else "cuda", "result_path": result_path,
           "out_dir": work, "deadline": time.monotonic() + limit, "profile": args.profile,
           "earlier": {k: v.get("results", {}) for k, v in report["parts"].items()}}
    ctx_path = os.path.join(work, f"{name}.context.json")
    with open(ctx_path, "w") as f:
        json.dump(ctx, f)
    env = dict(os.environ, PYTHONUNBUFFERED="1", MASTER_PORT=str(free_port()))
    env.pop("WORLD_SIZE", None), env.pop("RANK", None), env.pop("LOCAL_RANK", None)
    if args.dry_run:
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "beit3.bench.gpu_check", "--part", name, "--context", ctx_path],
                            env=env, start_new_session=True, cwd=REPO_ROOT)
    status, error = "ok", None
    try:
        rc = proc.wait(timeout=limit)
        if rc != 0:
            status, error = "failed", f"exit status {rc}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        status, error = "timed out", f"stopped after its {limit:.0f} s budget"
    results = {}
    if os.path.exists(result_path):
        with open(result_path) as f:
            results = json.load(f)
    if results.get("error"):  # the part's own account of what went wrong
        error = results["error"] if error is None or status != "timed out" else f"{error}; {results['error']}"
        status = "failed" if status == "ok" else status
    return {"status": status, "error": error, "seconds": time.monotonic() - t0, "results": results}


def run_part(name: str, ctx_path: str) -> int:
    """Child side: run one part, recording an exception as its error."""
    import traceback

    import torch

    from .check_parts import Context
    with open(ctx_path) as f:
        c = json.load(f)
    ctx = Context(dry=c["dry"], device=torch.device(c["device"]), result_path=c["result_path"],
                  out_dir=c["out_dir"], deadline=c["deadline"], earlier=c["earlier"], profile=c["profile"])
    if ctx.dry:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    try:
        PARTS[name][0](ctx)
        if ctx.dist is not None:  # the group ends at exit, not in an abort after the part's success
            from ..train.distributed import finish_distributed
            finish_distributed(ctx.dist)
        return 0
    except Exception as e:  # noqa: BLE001 - recorded, and the next part runs
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        ctx.record(error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:400] if str(e).strip() else ''}",
                   traceback=tb.splitlines()[-12:])
        return 1


def environment() -> dict:
    from ..train.trainer import git_commit
    from .report import _version
    return {"python": sys.version.split()[0], **{p: _version(p) for p in ("torch", "deepspeed", "timm", "torchscale")},
            # A copy of the tree without .git (a lent GPU machine) names its commit in the environment.
            "git_commit": os.environ.get("BEIT3_GIT_COMMIT") or git_commit(), "host_cpus": os.cpu_count()}


# -- targets and the report ----------------------------------------------------------------------
def _get(report: dict, part: str, *keys):
    d = report["parts"].get(part, {}).get("results", {})
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def targets(report: dict) -> list[dict]:
    """The three targets of the GPU check, each measured, missed, or not measured."""
    out = []
    best = max((_get(report, "giant", "max_batch", k) or {} for k in ("selective", "full")),
               key=lambda r: r.get("mfu") or 0.0, default={})
    mfu = best.get("mfu")
    batch = _get(report, "giant", "max_batch", "batch")
    out.append({"target": f"giant mixed batch, model FLOPs >= {MFU_TARGET:.0%} of the measured bf16 peak",
                "measured": "not measured" if mfu is None else f"{100 * mfu:.1f}% ({batch})",
                "met": None if mfu is None else mfu >= MFU_TARGET})
    ours, timm = _get(report, "giant", "image_only", "samples_per_s"), _get(report, "peers", "timm_compiled",
                                                                             "samples_per_s")
    out.append({"target": "image-only images/s >= timm ViT-g/14 compiled",
                "measured": "not measured" if None in (ours, timm) else f"{ours:.1f} vs {timm:.1f} ({ours / timm:.2f}x)",
                "met": None if None in (ours, timm) else ours >= timm})
    ours, ts = _get(report, "giant", "torchscale_batch", "samples_per_s"), _get(report, "peers", "torchscale",
                                                                               "samples_per_s")
    out.append({"target": f"samples/s >= {TORCHSCALE_TARGET}x torchscale at equal batch",
                "measured": "not measured" if None in (ours, ts) else f"{ours / ts:.2f}x ({ours:.1f} vs {ts:.1f})",
                "met": None if None in (ours, ts) else ours / ts >= TORCHSCALE_TARGET})
    return out


def slug(report: dict) -> str:
    if report["dry_run"]:
        return "cpu-dry-run"
    name = _get(report, "peak", "device_name") or "gpu"
    m = re.search(r"\b([A-Za-z]+\d+[A-Za-z]*)\b", name.replace("NVIDIA", ""))
    return (m.group(1) if m else "gpu").lower()


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


def _row(label: str, r: dict | None, extra: str = "") -> str:
    r = r or {}
    if r.get("error"):
        return f"| {label} | {extra} | {r['error']} | | | | |"
    return (f"| {label} | {extra} | {_n(r.get('samples_per_s'))} | {_n(r.get('model_tflops'))} | "
            f"{_n(r.get('mfu'), '.1f', 100)}% | {_n(r.get('peak_mem_gb'))} | {_n(r.get('step_ms_median'), '.0f')} |")


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
             "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in report.get("targets", []):
        lines.append(f"| {t['target']} | {t['measured']} | {'n/a' if t['met'] is None else 'yes' if t['met'] else 'no'} |")
    lines += ["", "## Parts", "", "| part | status | seconds | error |", "|---|---|---|---|"]
    for name, p in parts.items():
        note = f" (run {p['from']})" if p.get("from") else ""
        lines.append(f"| {name} | {p['status']}{note} | {p['seconds']:.0f} | {p.get('error') or ''} |")
    head = ["| configuration | batch | samples/s | TFLOP/s | MFU | peak GiB | step ms |", "|---|---|---|---|---|---|---|"]
    g = _get(report, "giant") or {}
    if g:
        search = g.get("max_batch_search") or {}
        lines += ["", f"## Throughput: {g.get('preset')} ({g.get('layout')} layout, {_n(g.get('params'), '.3f', 1e-9)}B "
                  "parameters), DeepSpeed ZeRO-3 + bf16", "",
                  (f"Largest micro-batch with selective checkpointing: {g.get('max_batch_per_part')} per part (found "
                   f"in {_n(search.get('seconds'), '.0f')} s; " if g.get("max_batch") else
                   "Largest micro-batch: not established (the part stopped before measuring it; ")
                  + _search_text(search) + ").", ""] + head
        mb = g.get("max_batch") or {}
        for mode in ("selective", "full"):
            if mode in mb:
                lines.append(_row(f"beit3, {mode} checkpointing", mb[mode], mb.get("batch", "")))
        for key, label in (("torchscale_batch", "beit3, torchscale's batch"), ("image_only", "beit3, image-only")):
            if key in g:
                lines.append(_row(f"{label} ({g[key].get('checkpointing')})", g[key], g[key].get("batch", "")))
        pe = _get(report, "peers") or {}
        for key, label in (("torchscale", "torchscale BEiT3 (its checkpointing)"), ("timm_eager", "timm ViT-g/14 eager"),
                           ("timm_compiled", "timm ViT-g/14 torch.compile")):
            if key in pe:
                lines.append(_row(label, pe[key], pe[key].get("batch", "")))
    n = _get(report, "numerics") or {}
    if n.get("max_abs_diff") is not None:
        lines += ["", f"## bf16 against fp32 ({n['preset']}, {n['steps']} steps of {n['batch']}, ZeRO-3, same weights "
                  "and batches)", "",
                  f"Loss fp32 {n['first_last_fp32'][0]:.4f} -> {n['first_last_fp32'][1]:.4f}, bf16 "
                  f"{n['first_last_bf16'][0]:.4f} -> {n['first_last_bf16'][1]:.4f}; per-step |difference| max "
                  f"{n['max_abs_diff']:.4f} ({100 * n['max_rel_diff']:.2f}% of the loss), mean {n['mean_abs_diff']:.4f}."]
    sd = _get(report, "sdpa") or {}
    if sd:
        lines += ["", f"## Attention kernels (head dim {sd.get('head_dim')}, {sd.get('dtype')})", "",
                  "| batch | SDPA ops (forward, backward) | kernels |", "|---|---|---|"]
        for k, v in sd.items():
            if isinstance(v, dict):
                lines.append(f"| {k} | {', '.join(o.removeprefix('aten::') for o in v['ops'])} | "
                             f"{'; '.join(v['kernels']) or 'n/a'} |")
    sy = _get(report, "sync") or {}
    if sy:
        lines += ["", f"## Host syncs in the step ({sy.get('preset')}, {sy.get('batch')}, "
                  "`torch.cuda.set_sync_debug_mode(\"error\")`)", ""]
        lines += [f"- {k}: {v}" for k, v in sy.items() if k not in ("preset", "batch", "error", "traceback")]
    prof = _get(report, "giant", "profile")
    if prof:
        lines += ["", f"## Profile of one giant step ({prof['batch']}, {prof['checkpointing']} checkpointing)", "",
                  "Time by kind: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in prof["time_by_kind"].items()), "",
                  "```", prof["op_table"].rstrip(), "```"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
