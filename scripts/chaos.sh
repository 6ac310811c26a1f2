#!/usr/bin/env bash
# Loop the kill -9 test: kill a tiny pretraining run at random moments (one of them while a
# checkpoint is being written), resume with --resume auto each time, and check that the final
# weights equal those of an uninterrupted run.   scripts/chaos.sh [ROUNDS] [KILLS_PER_ROUND]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-5}
KILLS=${2:-8}
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
.venv/bin/python - "$ROUNDS" "$KILLS" <<'PY'
import os, sys, tempfile
sys.path.insert(0, "tests")
import torch
from pretrain_fixtures import make_assets
from test_faults import _start, _weights, chaos

rounds, kills = int(sys.argv[1]), int(sys.argv[2])
total = {"kills": 0, "kills_during_save": 0, "checkpoints_verified": 0, "rounds_equal": 0}
with tempfile.TemporaryDirectory() as tmp:
    assets = make_assets(tmp)
    ref = os.path.join(tmp, "ref")
    assert _start(ref, assets, 10, "--save-every", "1").wait() == 0
    _, w_ref = _weights(ref)
    for r in range(rounds):
        out = os.path.join(tmp, f"chaos{r}")
        counts = chaos(out, assets, 10, kills, seed=r)
        _, w = _weights(out)
        equal = all(torch.allclose(w[k], w_ref[k], atol=1e-6, rtol=1e-5) for k in w_ref)
        for k in ("kills", "kills_during_save", "checkpoints_verified"):
            total[k] += counts[k]
        total["rounds_equal"] += int(equal)
        print(f"round {r + 1}/{rounds}: {counts}, final weights equal: {equal}", flush=True)
print(f"chaos total: {total} over {rounds} rounds")
sys.exit(0 if total["rounds_equal"] == rounds else 1)
PY
