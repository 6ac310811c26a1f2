"""One prepared GPU check: everything a GPU must show, measured in one call (``scripts/gpu_check.sh``).

    scripts/gpu_check.sh             on a GPU machine: at most ~9 minutes, writes
                                     benchmarks/<date>-<gpu>-check.md and .json
    scripts/gpu_check.sh --dry-run   the same code on the CPU with the tiny preset (~1 minute)

The parts (``beit3.jobs.benchmark.check_parts``) run one after the other, each in a process of its own with
a time budget: a part that fails or runs out of time records what it had and the error, and the
next one starts. The report is rewritten after every part (and copied to ``--copy-to``, by default
``$OUT`` when set), so a check cut short still leaves its numbers behind.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import torch

from beit3.trainer.distributed import finish_distributed, free_port
from beit3.trainer.trainer import git_commit
from beit3.jobs.benchmark.check_giant import part_giant
from beit3.jobs.benchmark.check_parts import Context, part_numerics, part_peak, part_peers, part_sdpa, part_sync
from beit3.jobs.benchmark.check_report import targets, write_report
from beit3.jobs.benchmark.report import package_version

# In the order they run, with their time budgets in seconds (a dry run doubles them). giant gets
# most of a 520 s check: it is what the check is for until its targets are measured.
PARTS = {"peak": (part_peak, 40), "sync": (part_sync, 60), "sdpa": (part_sdpa, 50),
         "giant": (part_giant, 470), "peers": (part_peers, 160), "numerics": (part_numerics, 70)}

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


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
    return orchestrate(parts, args, budget, sys.argv[1:] if argv is None else argv)


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
def orchestrate(parts: list[str], args, budget: float, argv: list[str]) -> int:
    start = time.monotonic()
    end = start + budget
    work = tempfile.mkdtemp(prefix="beit3-gpu-check-")
    report = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "dry_run": args.dry_run,
              "command": "scripts/gpu_check.sh " + " ".join(argv), "budget_s": budget,
              "environment": environment(), "parts": {}}
    if args.merge:
        with open(args.merge) as f:
            earlier = json.load(f)
        for name, p in earlier["parts"].items():
            if name not in parts and p["status"] == "ok":
                # The card that measured it: its figures (MFU, a peer's speed) are that card's.
                device = earlier["parts"].get("peak", {}).get("results", {}).get("device_name")
                report["parts"][name] = {**p, "from": p.get("from") or earlier["started"],
                                         "device": p.get("device") or device}
    paths = None
    print(f"gpu_check: {len(parts)} parts, {budget:.0f} s budget{' (dry run, CPU)' if args.dry_run else ''}",
          flush=True)
    for name in parts:
        own = PARTS[name][1] * (2.0 if args.dry_run else 1.0)
        left = end - time.monotonic()
        limit = min(own, left)
        if limit < 5:
            report["parts"][name] = {"status": "skipped", "error": "no time left in the budget", "seconds": 0}
            report["targets"] = targets(report)
            paths = write_report(report, args, work)
            continue
        print(f"[{name}] up to {limit:.0f} s", flush=True)

        def progress(entry, name=name):
            report["parts"][name] = entry
            report["seconds"] = time.monotonic() - start
            report["targets"] = targets(report)
            write_report(report, args, work)
        report["parts"][name] = run_child(name, limit, args, work, report, progress)
        r = report["parts"][name]
        print(f"[{name}] {r['status']} in {r['seconds']:.0f} s" + (f": {r['error']}" if r.get("error") else ""),
              flush=True)
        report["seconds"] = time.monotonic() - start
        report["targets"] = targets(report)
        paths = write_report(report, args, work)
    for t in report.get("targets", []):
        print(f"target: {t['target']}: {t['measured']} -> "
              f"{'not measured' if t['met'] is None else 'met' if t['met'] else 'missed'}; {t['gap']}")
    if paths:
        print("wrote " + ", ".join(paths))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def run_child(name: str, limit: float, args, work: str, report: dict, progress=None) -> dict:
    """Run part ``name`` in a new process group; kill the group when ``limit`` seconds pass. While it
    runs, ``progress(entry)`` gets its results each time the part records more (the report is
    rewritten then, so a check cut short from outside keeps every figure measured)."""
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
    proc = subprocess.Popen([sys.executable, "-m", "beit3.jobs.benchmark.gpu_check", "--part", name, "--context", ctx_path],
                            env=env, start_new_session=True, cwd=REPO_ROOT)
    status, error = "ok", None
    try:
        rc = _wait(proc, t0 + limit, result_path, lambda r: progress and progress(
            {"status": "running", "error": None, "seconds": time.monotonic() - t0, "results": r}))
        if rc != 0:
            status, error = "failed", f"exit status {rc}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        status, error = "timed out", f"stopped after its {limit:.0f} s budget"
    results = _read(result_path) or {}
    if results.get("error"):  # the part's own account of what went wrong
        error = results["error"] if error is None or status != "timed out" else f"{error}; {results['error']}"
        status = "failed" if status == "ok" else status
    return {"status": status, "error": error, "seconds": time.monotonic() - t0, "results": results}


def _wait(proc, deadline: float, result_path: str, on_new) -> int:
    """Wait for ``proc`` until ``deadline`` (TimeoutExpired then), calling ``on_new(results)`` each
    time the part's result file changes."""
    seen = None
    while True:
        try:
            return proc.wait(timeout=max(0.0, min(2.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
                raise
        stamp = os.stat(result_path).st_mtime_ns if os.path.exists(result_path) else None
        if stamp != seen:
            seen, results = stamp, _read(result_path)
            if results is not None:
                on_new(results)


def _read(path: str) -> dict | None:
    """A part's results (written whole by an atomic rename), or None."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run_part(name: str, ctx_path: str) -> int:
    """Child side: run one part, recording an exception as its error."""
    with open(ctx_path) as f:
        c = json.load(f)
    ctx = Context(dry=c["dry"], device=torch.device(c["device"]), result_path=c["result_path"],
                  out_dir=c["out_dir"], deadline=c["deadline"], earlier=c["earlier"], profile=c["profile"])
    if ctx.dry:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    try:
        PARTS[name][0](ctx)
        if ctx.dist is not None:  # the group ends at exit, not in an abort after the part's success
            finish_distributed(ctx.dist)
        return 0
    except Exception as e:  # noqa: BLE001 - recorded, and the next part runs
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        ctx.record(error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:400] if str(e).strip() else ''}",
                   traceback=tb.splitlines()[-12:])
        return 1


def environment() -> dict:
    return {"python": sys.version.split()[0],
            **{p: package_version(p) for p in ("torch", "deepspeed", "timm", "torchscale")},
            # A copy of the tree without .git (a lent GPU machine) names its commit in the environment.
            "git_commit": os.environ.get("BEIT3_GIT_COMMIT") or git_commit(), "host_cpus": os.cpu_count()}


if __name__ == "__main__":
    sys.exit(main())
