"""``scripts/gpu_check.sh --dry-run``: the GPU check's code on the CPU with the tiny preset, so the
script a GPU session runs cannot rot. Every part must run and record real figures."""
import gzip
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
from worker_cache import built_once, mark_built

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, *args, timeout=420):
    env = dict(os.environ, PYTHON=sys.executable, DS_ACCELERATOR="cpu")
    env.pop("OUT", None)
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry-run",
                           "--out-dir", str(tmp_path / "bench"), "--copy-to", str(tmp_path / "out"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _report(tmp_path) -> tuple[dict, str]:
    [md] = [p for p in os.listdir(tmp_path / "bench") if p.endswith("-cpu-dry-run-check.md")]
    with open(tmp_path / "bench" / md.replace(".md", ".json")) as f:
        report = json.load(f)
    copied = set(os.listdir(tmp_path / "out"))  # $OUT: the report, and the profile's trace if any
    assert set(os.listdir(tmp_path / "bench")) <= copied
    assert copied - set(os.listdir(tmp_path / "bench")) <= {md.replace("-check.md", "-trace.json.gz")}
    return report, (tmp_path / "bench" / md).read_text()


def _pos(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="session")
def dry_run(tmp_path_factory):
    """The whole dry run (~2 minutes), once for every test and worker that reads it."""
    with built_once(tmp_path_factory, "gpu_check") as (tmp, built):
        if not built:
            r = _run(tmp, "--profile", "always")
            assert r.returncode == 0, r.stderr[-3000:]
            (tmp / "stdout.txt").write_text(r.stdout)
            mark_built(tmp)
    report, md = _report(tmp)
    [trace] = [p for p in os.listdir(tmp / "out") if p.endswith("-trace.json.gz")]
    with gzip.open(tmp / "out" / trace) as f:
        assert json.load(f)["traceEvents"]
    return report, md, (tmp / "stdout.txt").read_text()


@pytest.mark.slow
def test_every_part_runs_and_records_figures(dry_run):
    report, md, stdout = dry_run
    parts = report["parts"]
    assert list(parts) == ["peak", "sync", "sdpa", "giant", "peers", "numerics"]
    assert {p: v["status"] for p, v in parts.items()} == dict.fromkeys(parts, "ok"), \
        {p: v.get("error") for p, v in parts.items()}
    res = {p: v["results"] for p, v in parts.items()}
    assert _pos(res["peak"]["matmul_peak_tflops"])
    giant = res["giant"]
    assert giant["preset"] == "tiny" and giant["params"] > 10**6
    assert giant["max_batch_per_part"] >= 2 and giant["max_batch_search"]["tries"]
    for mode in ("selective", "full", "selective, compiled", "full, compiled"):
        r = giant["max_batch"][mode]
        assert _pos(r["samples_per_s"]) and _pos(r["model_tflops"]) and 0 < r["mfu"] < 1.5, (mode, r)
    for key in ("torchscale_batch", "image_only"):
        assert _pos(giant[key]["samples_per_s"]), giant[key]
    assert giant["profile"]["time_by_kind"]["matmul"] > 0
    for key in ("torchscale", "timm_eager", "timm_compiled"):
        assert _pos(res["peers"][key]["samples_per_s"]), res["peers"][key]
    # Every target is measured (met or not: the CPU's figures mean nothing), with the gap left to it.
    assert [t["met"] in (True, False) for t in report["targets"]] == [True] * 3
    assert all(t["gap"].startswith("met with") or ": needs " in t["gap"] for t in report["targets"])
    assert "target: giant mixed batch" in stdout and "| gap |" in md
    assert "## Targets" in md and "| giant | ok |" in md and "## Profile of one giant step" in md


@pytest.mark.slow
def test_giant_compares_zero_stages_times_the_first_step_and_compiles(dry_run):
    """ZeRO-3 and ZeRO-2 on the same weights and batch (the same first loss), each with its build
    and first-step times; the faster stage runs the rest; the blocks really compile (dynamo graphs)."""
    report, md, _ = dry_run
    giant = report["parts"]["giant"]["results"]
    assert _pos(giant["engine_build_s"]) and _pos(giant["first_step_s"])
    stages = giant["stages"]
    for key in ("zero3", "zero2"):
        r = stages[key]
        assert _pos(r["engine_build_s"]) and _pos(r["first_step_s"]) and _pos(r["samples_per_s"]), (key, r)
        assert _pos(r["step_ms_median"]) and math.isfinite(r["first_loss"])
    assert stages["first_loss_difference"] < 1e-3 * stages["zero3"]["first_loss"]
    fastest = 2 if stages["zero2"]["samples_per_s"] > stages["zero3"]["samples_per_s"] else 3
    assert stages["chosen"] == fastest == giant["torchscale_batch"]["zero_stage"]
    # A dry run goes on with ZeRO-2 whatever its (noise) timings, so it always compiles.
    assert stages["kept"] == giant["zero_stage"] == giant["max_batch"]["zero_stage"] == 2
    assert _pos(stages["zero2_over_zero3"])
    for mode in ("selective", "full"):
        dynamo = giant["max_batch"][f"{mode}, compiled"]["dynamo"]
        assert dynamo["unique_graphs"] > 0, dynamo
    assert giant["max_batch"]["compile"]["backend"] == "eager (dry run)"
    variants = giant["image_only_variants"]
    assert _pos(variants["no checkpointing"]["samples_per_s"])
    assert _pos(variants["no checkpointing, compiled"]["samples_per_s"])
    assert "### ZeRO-3 against ZeRO-2" in md and f"should use ZeRO-{fastest}**" in md
    assert "| beit3 ZeRO-2, full checkpointing, compiled |" in md


@pytest.mark.slow
def test_profile_lists_the_five_largest_costs(dry_run):
    report, md, _ = dry_run
    prof = report["parts"]["giant"]["results"]["profile"]
    top = prof["top_costs"]
    assert len(top) == 5 and all(_pos(r["ms_per_step"]) and 0 < r["share"] < 1 for r in top), top
    assert [r["ms_per_step"] for r in top] == sorted((r["ms_per_step"] for r in top), reverse=True)
    assert _pos(prof["step_ms"])
    assert "| largest costs (kernel, or op on the CPU) | ms per step | share of the step |" in md
    assert f"| `{top[0]['name']}` |" in md


@pytest.mark.slow
def test_sync_part_finds_no_host_read_in_the_step_and_its_control_does(dry_run):
    sync = dry_run[0]["parts"]["sync"]["results"]
    steps = {k: v for k, v in sync.items() if k.startswith(("forward", "backward"))}
    assert len(steps) == 6 and set(steps.values()) == {"no host read"}
    assert sync["control: forward of an unprepared batch (boolean-mask gathers)"].startswith("HOST READS: ")


@pytest.mark.slow
def test_numerics_and_attention_parts(dry_run):
    res = dry_run[0]["parts"]
    n = res["numerics"]["results"]
    assert len(n["loss_fp32"]) == len(n["loss_bf16"]) == n["steps"] == 6
    assert n["loss_fp32"][-1] < n["loss_fp32"][0]  # four batches in turn: remembered
    assert 0 < n["max_rel_diff"] < 0.02  # bf16 differs, but little (measured 0.01% on the CPU)
    sdpa = res["sdpa"]["results"]
    cases = [k for k, v in sdpa.items() if isinstance(v, dict)]
    assert len(cases) == 5 and all(any("scaled_dot_product" in op for op in sdpa[c]["ops"]) for c in cases)


@pytest.mark.slow
def test_a_part_out_of_time_is_recorded_and_the_check_goes_on(tmp_path):
    """giant cannot get past its first step in 6 s (its process spends ~4 s importing torch and
    DeepSpeed, the first step ~5 s more on 2 cores): it is stopped, recorded as timed out with what
    it had, the report is still written, the part after it is skipped, and the exit status is 0.
    (With more time giant cuts its own measurements short and ends "ok": only the kill is tested.
    That the figures measured before a kill are kept: the test below.)"""
    r = _run(tmp_path, "--parts", "giant,peers", "--budget", "6", timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    report, md = _report(tmp_path)
    status = {p: v["status"] for p, v in report["parts"].items()}
    assert status == {"giant": "timed out", "peers": "skipped"}, report["parts"]
    assert "stopped after its 6 s budget" in report["parts"]["giant"]["error"] and "| giant | timed out |" in md


def test_bad_arguments_fail_before_any_work(tmp_path):
    r = _run(tmp_path, "--parts", "peak,warp", timeout=60)
    assert r.returncode == 2 and "unknown part(s) ['warp']" in r.stderr


@pytest.mark.slow
def test_the_report_holds_each_figure_while_the_part_still_runs(tmp_path):
    """A check killed from outside (the GPU session's own limit) leaves in the .md and .json every
    figure measured so far: the orchestrator rewrites them whenever a running part records one."""
    env = dict(os.environ, PYTHON=sys.executable, DS_ACCELERATOR="cpu")
    env.pop("OUT", None)
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry-run", "--parts", "giant",
                             "--out-dir", str(tmp_path / "bench")], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        giant = {}
        while "first_step_s" not in giant and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            jsons = list((tmp_path / "bench").glob("*-check.json")) if (tmp_path / "bench").exists() else []
            if jsons:
                with open(jsons[0]) as f:
                    giant = json.load(f)["parts"].get("giant", {}).get("results", {})
        assert "first_step_s" in giant, "no first-step time reached the report while the part ran"
    finally:
        _kill_tree(proc.pid)
        proc.wait()
    report, md = json.loads(jsons[0].read_text()), jsons[0].with_suffix(".md").read_text()
    assert report["parts"]["giant"]["status"] == "running"
    assert _pos(report["parts"]["giant"]["results"]["engine_build_s"])
    assert "| giant | running |" in md and "| ZeRO-3 | " in md


def _kill_tree(pid: int) -> None:
    """The orchestrator and the part it started (in a session of its own)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        children = []
    for child in children:
        try:
            os.killpg(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_merged_parts_are_labelled_with_the_card_that_measured_them(tmp_path, capsys):
    """The next GPU session's command: peak and giant rerun, the H200 report's other parts merged;
    the targets that use the H200's peers say so."""
    from beit3.jobs.benchmark.gpu_check import main
    h200 = os.path.join(ROOT, "benchmarks", "2026-11-28-h200-check.json")
    # A budget under 5 s runs no part: only the merge and the report are exercised.
    assert main(["--dry-run", "--parts", "peak,giant", "--budget", "1", "--merge", h200,
                 "--out-dir", str(tmp_path), "--copy-to", ""]) == 0
    [path] = tmp_path.glob("*-check.json")
    report = json.loads(path.read_text())
    assert {p for p, v in report["parts"].items() if v.get("from")} == {"sync", "sdpa", "peers", "numerics"}
    assert report["parts"]["peers"]["device"] == "NVIDIA H200"
    assert report["parts"]["giant"]["status"] == "skipped"
    t = report["targets"]
    assert t[1]["target"].endswith("(H200, run 2026-11-28)") and t[1]["met"] is None and t[1]["gap"] == "n/a"
    md = path.with_suffix(".md").read_text()
    assert "| peers | ok (run 2026-11-28T01:46:12, NVIDIA H200) |" in md
    assert "image-only images/s >= timm ViT-g/14 compiled (H200, run 2026-11-28)" in capsys.readouterr().out


def test_targets_give_the_gap_to_each():
    from beit3.jobs.benchmark.check_report import targets
    giant = {"max_batch": {"batch": "64 images + 64 texts + 64 pairs, text 64", "zero_stage": 2,
                           "selective": {"samples_per_s": 150.0, "mfu": 0.30},
                           "full, compiled": {"samples_per_s": 160.0, "mfu": 0.32}},
             "image_only": {"samples_per_s": 300.0}, "torchscale_batch": {"samples_per_s": 121.0, "zero_stage": 2}}
    peers = {"timm_compiled": {"samples_per_s": 261.9}, "torchscale": {"samples_per_s": 48.4}}
    report = {"parts": {"giant": {"status": "ok", "results": giant},
                        "peers": {"status": "ok", "results": peers, "from": "2026-11-28T01:46:12",
                                  "device": "NVIDIA H200"}}}
    mfu, images, ts = targets(report)
    assert mfu["met"] is False and mfu["gap"] == "32.0% of 50.0%: needs 1.56x"
    assert "full checkpointing, compiled" in mfu["measured"]
    assert images["met"] is True and images["gap"] == "met with 1.15x the target"
    assert ts["met"] is False and ts["gap"] == "2.50x of 3.50x: needs 1.40x" and "ZeRO-2" in ts["measured"]


def test_a_compiled_run_is_stopped_at_its_allowance():
    """The giant part's compiled runs get the time the steps after them leave: past it the running
    code is interrupted (Overrun, which ``measure`` does not swallow as a step error), and the
    process's alarm is left as it was."""
    from beit3.jobs.benchmark.check_giant import Overrun, allowance
    before = signal.getsignal(signal.SIGALRM)
    t0 = time.monotonic()
    with pytest.raises(Overrun, match="stopped at its 0 s allowance"):
        with allowance(0.3):
            while time.monotonic() - t0 < 10:
                time.sleep(0.01)
    assert 0.25 < time.monotonic() - t0 < 2
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0) and signal.getsignal(signal.SIGALRM) is before
    assert not issubclass(Overrun, RuntimeError)
