"""``scripts/gpu_check.sh --dry-run``: the GPU check's code on the CPU with the tiny preset, so the
script a GPU session runs cannot rot. Every part must run and record real figures."""
import gzip
import json
import math
import os
import subprocess
import sys

import pytest

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


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    r = _run(tmp, "--profile", "always")
    assert r.returncode == 0, r.stderr[-3000:]
    report, md = _report(tmp)
    [trace] = [p for p in os.listdir(tmp / "out") if p.endswith("-trace.json.gz")]
    with gzip.open(tmp / "out" / trace) as f:
        assert json.load(f)["traceEvents"]
    return report, md, r.stdout


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
    for mode in ("selective", "full"):
        r = giant["max_batch"][mode]
        assert _pos(r["samples_per_s"]) and _pos(r["model_tflops"]) and 0 < r["mfu"] < 1.5, r
    for key in ("torchscale_batch", "image_only"):
        assert _pos(giant[key]["samples_per_s"]), giant[key]
    assert giant["profile"]["time_by_kind"]["matmul"] > 0
    for key in ("torchscale", "timm_eager", "timm_compiled"):
        assert _pos(res["peers"][key]["samples_per_s"]), res["peers"][key]
    # Every target is measured (met or not: the CPU's figures mean nothing).
    assert [t["met"] in (True, False) for t in report["targets"]] == [True] * 3
    assert "## Targets" in md and "| giant | ok |" in md and "## Profile of one giant step" in md


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
    """giant cannot finish in the 9 s left after peak: it is stopped, recorded as timed out with
    what it had, the report is still written, and the exit status is 0."""
    r = _run(tmp_path, "--parts", "peak,giant,peers", "--budget", "20", timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    report, md = _report(tmp_path)
    status = {p: v["status"] for p, v in report["parts"].items()}
    assert status["peak"] == "ok" and status["giant"] == "timed out", report["parts"]
    assert status["peers"] == "skipped"
    assert "stopped after its" in report["parts"]["giant"]["error"] and "| giant | timed out |" in md


def test_bad_arguments_fail_before_any_work(tmp_path):
    r = _run(tmp_path, "--parts", "peak,warp", timeout=60)
    assert r.returncode == 2 and "unknown part(s) ['warp']" in r.stderr
