#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the default test suite (SmolLM2; no slow marks).
# Extra pytest arguments pass through, e.g. `bash scripts/test.sh -m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
