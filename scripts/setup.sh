#!/usr/bin/env bash
# Idempotent set-up: system audio packages, then the project's virtual environment (.venv).
# Called by scripts/demo.sh and scripts/test.sh; safe to run again (it skips what is done).
#   TORCH_SPEC  pip requirement for PyTorch (default torch==2.13.0; on a CUDA workstation
#               PyPI's build of that version brings CUDA)
#   PYTHON      interpreter to build the venv from (default python3, needs >= 3.10)
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-system-deps.sh

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "setup: Python >= 3.10 is needed ($PYTHON is older)" >&2; exit 1; }
  "$PYTHON" -m venv .venv
fi

stamp=.venv/.msn-edge-installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing msn-edge and its dependencies into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  .venv/bin/python -m pip install -q -e ".[train,export,plot,fleet,dev]"
  touch "$stamp"
fi
