#!/usr/bin/env bash
# Idempotent set-up: system audio packages, then the project's virtual environment (.venv).
# Called by scripts/demo.sh and scripts/test.sh; safe to run again (it skips what is done).
#   TORCH_SPEC  pip requirement for PyTorch (default torch==2.13.0; on a CUDA workstation
#               PyPI's build of that version brings CUDA)
#   PYTHON      interpreter to build the venv from (default python3, needs >= 3.10)
#   ORT_EXTRA   which ONNX Runtime: cpu (default, onnxruntime) or gpu (onnxruntime-gpu, on
#               a CUDA workstation); never both, they overwrite each other (setup.cfg)
set -euo pipefail
cd "$(dirname "$0")/.."

ORT_EXTRA=${ORT_EXTRA:-cpu}
case "$ORT_EXTRA" in
  cpu) other=onnxruntime-gpu ;;
  gpu) other=onnxruntime ;;
  *) echo "setup: ORT_EXTRA must be cpu or gpu, not '$ORT_EXTRA'" >&2; exit 1 ;;
esac

bash scripts/install-system-deps.sh

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "setup: Python >= 3.10 is needed ($PYTHON is older)" >&2; exit 1; }
  "$PYTHON" -m venv .venv
fi

stamp=.venv/.msn-edge-installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ] \
  || [ "$(cat "$stamp")" != "$ORT_EXTRA" ]; then
  echo "setup: installing msn-edge [$ORT_EXTRA] and its dependencies into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  if .venv/bin/python -m pip show -q "$other" >/dev/null 2>&1; then
    # Both share the onnxruntime module: remove both, then install the one chosen.
    .venv/bin/python -m pip uninstall -q -y onnxruntime onnxruntime-gpu
  fi
  .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  .venv/bin/python -m pip install -q -e ".[$ORT_EXTRA,train,export,plot,fleet,dev]"
  echo "$ORT_EXTRA" >"$stamp"
fi
