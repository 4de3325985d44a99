#!/usr/bin/env bash
# Set up (idempotent), then run the whole test suite (what CI runs). Extra arguments go to
# pytest: `scripts/test.sh -m "not slow"` is the quick suite for the inner loop (README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
