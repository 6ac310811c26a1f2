"""``scripts/zero3_comm.py``: the bytes ZeRO-3 moves in a micro-step of 2 ranks, counted where the
collectives are called, against the parameters that exist (docs/multinode.md)."""
import json
import os
import subprocess
import sys

import pytest

from beit3.jobs.benchmark.comm_bytes import main, parse_variant
from beit3.trainer.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def counts(tmp_path_factory):
    out = tmp_path_factory.mktemp("comm") / "counts.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", str(free_port()), os.path.join(ROOT, "scripts", "zero3_comm.py"),
                        "--preset", "tiny", "--mixes", "mixed,pairs", "--variants", "config;live=1e9,reuse=0",
                        "--json", str(out)], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout


@pytest.mark.slow
def test_the_shipped_config_gathers_each_parameter_once_per_micro_step(counts):
    """zero3_bf16.json (its numel settings scaled to tiny): from the third step on, the forward
    gathers every partitioned parameter once in bf16 (2 bytes each), the backward gathers nothing,
    and the gradients of every parameter are reduce-scattered once; the three parts of the mixed
    batch share the gather, so it costs what the parameters used cost, as one part alone does."""
    result, stdout = counts
    for name in ("mixed", "pairs"):
        run = result["runs"][f"config, {name}"]
        step = run["steps"][-1]
        used = step["distinct_gathered_numel"]
        fwd, bwd = step["forward"], step.get("backward", {})
        assert fwd["all_gather_bytes"] == pytest.approx(2 * used, rel=1e-3), name
        assert fwd["gathered_numel"] == pytest.approx(used, rel=0.02) and bwd.get("all_gather_bytes", 0) == 0, name
        assert bwd["reduce_scatter_bytes"] > 0
    mixed, pairs = result["runs"]["config, mixed"], result["runs"]["config, pairs"]
    whole = mixed["partitioned_numel"]
    assert mixed["steps"][-1]["distinct_gathered_numel"] == whole  # the mixed batch uses every parameter
    assert 0.8 * whole < pairs["steps"][-1]["distinct_gathered_numel"] < whole
    assert mixed["copies"]["gathered_copies_forward"] == pytest.approx(1.0, abs=0.01)
    assert mixed["copies"]["reduce_scattered_copies"] == 1.0
    assert mixed["steps"][-1]["backward"]["reduce_scatter_bytes"] == \
        2 * (mixed["partitioned_numel"] + mixed["persistent_numel"])
    # The first step has no module trace yet: each part gathers again, and the backward too.
    assert mixed["steps"][0]["forward"]["all_gather_bytes"] > 1.5 * 2 * whole
    # Applied to giant: 2 bytes x its 1.946 B partitioned parameters.
    assert result["giant"]["partitioned_numel"] == pytest.approx(1.946e9, rel=1e-3)
    assert mixed["giant"]["all_gather_gb"] == pytest.approx(3.89, rel=0.01)
    assert mixed["giant"]["reduce_scatter_gb"] == pytest.approx(3.90, rel=0.01)
    assert "config, mixed: gathered 1.00 + 0.00 copies" in stdout


@pytest.mark.slow
def test_with_fewer_live_parameters_than_the_model_the_parts_gather_again(counts):
    """The control: stage3_max_live_parameters below the model (1e9 of giant's 1.95e9, scaled) and
    no reuse distance make the counter see each part gather its parameters again, and the backward
    too. So one gather per micro-step comes from max_live_parameters exceeding the model."""
    result, _ = counts
    mixed = result["runs"]["live=1e9,reuse=0, mixed"]["copies"]
    assert mixed["gathered_copies_forward"] > 1.5 and mixed["gathered_copies_backward"] > 0.3, mixed
    assert mixed["reduce_scattered_copies"] == result["runs"]["config, mixed"]["copies"]["reduce_scattered_copies"]


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(["--mixes", "mixed,warp"]) == 2
    assert main(["--variants", "config;reuse=lots"]) == 2
    assert main(["--json", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["zero3_comm: error: --mixes ['warp']: expected some of ['mixed', 'images', 'texts', 'pairs']",
                   "zero3_comm: error: --variants 'reuse=lots': reuse='lots' is not a number",
                   f"zero3_comm: error: --json {tmp_path} (a directory): expected a file name, not a folder"]
    assert parse_variant("live=1e9,reuse=0") == {"stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 0.0}
