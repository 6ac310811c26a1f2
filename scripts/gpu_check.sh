#!/usr/bin/env bash
# The GPU check: every GPU figure of beit3 measured in one call of at most ~9 minutes.
#
#   scripts/gpu_check.sh             on a bare GPU machine, from the repo root (see docs/gpu_check.md)
#   scripts/gpu_check.sh --dry-run   the same code on the CPU, tiny preset, about a minute
#
# On a machine whose Python lacks deepspeed (or fairscale, torchscale, webdataset), wheels in .whl/
# (../shared/gpu/prepare.sh stages them) are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ls .whl/*.whl >/dev/null 2>&1 && ! "$PY" -c "import deepspeed, torchscale" >/dev/null 2>&1; then
  echo "gpu_check: installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: error: installing .whl/*.whl failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# Fewer out-of-memory errors from fragmentation at the largest batch.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec "$PY" -m beit3.jobs.benchmark.gpu_check "$@"
