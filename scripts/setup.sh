#!/usr/bin/env bash
# Create .venv and install beit3 with every dependency from the repo's own requirements files.
# Idempotent: an existing .venv is reused and only topped up.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_quiet() {  # pip, minus one warning line per package that some local pip configs print
  .venv/bin/python -m pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }
}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip_quiet -r requirements.txt -r requirements-test.txt
# torchscale pins stale timm/fairscale: test-only, installed without its dependencies.
pip_quiet --no-deps -r requirements-nodeps.txt
pip_quiet --no-deps --no-build-isolation -e .
.venv/bin/python -c "import torch, torchvision, timm, deepspeed, webdataset, sentencepiece, beit3; print('beit3', beit3.__version__, '| torch', torch.__version__, '| ready')"
