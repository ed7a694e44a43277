#!/usr/bin/env bash
# Set up tinylm in a virtual environment at .venv (idempotent).
#   bash scripts/setup.sh          runtime only
#   bash scripts/setup.sh --dev    + test/lint tools and the optional data extras
#   bash scripts/setup.sh --xla    PyTorch/XLA in its own .venv-xla (see scripts/setup_xla.sh)
# On a machine without an NVIDIA GPU it installs the CPU build of PyTorch 2.13.0 first, so that
# pip never pulls the multi-GB CUDA build. Set TINYLM_TORCH to override the torch requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ "${1:-}" == "--xla" ]] && exec bash scripts/setup_xla.sh
extras=""
[[ "${1:-}" == "--dev" ]] && extras="[dev]"
python3 -m venv .venv
py=.venv/bin/python
if ! $py -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then torch_req="${TINYLM_TORCH:-torch>=2.4,<2.14}"
  else torch_req="${TINYLM_TORCH:-torch==2.13.0}"; fi
  echo "setup: installing $torch_req"
  $py -m pip install -q --disable-pip-version-check "$torch_req" 2>&1 | grep -v "^WARNING: Location" || true
fi
echo "setup: installing tinylm$extras"
$py -m pip install -q --disable-pip-version-check -e ".$extras" 2>&1 | grep -v "^WARNING: Location" || true
# The serve browser tests drive Debian's chromium through selenium (no browser download needed).
if [[ -n "$extras" ]] && ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
  sudo=""; [[ $(id -u) == 0 ]] || sudo="sudo -n"
  if command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing chromium and chromium-driver (browser tests)"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "setup: chromium and chromedriver are missing (needed by tests/serve/test_serve_browser.py)"
  fi
fi
$py -c "import tinylm, torch; print(f'setup: tinylm {tinylm.__version__} with torch {torch.__version__} ready in .venv')"
