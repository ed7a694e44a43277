#!/usr/bin/env bash
# Set up .venv-xla: tinylm on PyTorch/XLA (idempotent). Run as `bash scripts/setup.sh --xla`.
#
# torch_xla 2.9 runs only on its own torch 2.9, while the main .venv keeps torch 2.13, so XLA
# gets a separate environment. PyPI has no CPU-only torch 2.9 for x86_64 Linux: its torch 2.9.0
# pulls the CUDA libraries (nvidia-*, triton), about 4 GB unpacked, which `import torch` loads
# even on a machine without a GPU (installing torch with --no-deps fails at import: measured in
# notes/issue-22-xla-fp8.md). On a TPU VM add the TPU runtime: TINYLM_XLA_EXTRA=tpu.
# Overrides: TINYLM_XLA_TORCH (default torch==2.9.0), TINYLM_XLA (default torch_xla==2.9.0).
set -euo pipefail
cd "$(dirname "$0")/.."
torch_req="${TINYLM_XLA_TORCH:-torch==2.9.0}"
xla_req="${TINYLM_XLA:-torch_xla==2.9.0}"
[[ -n "${TINYLM_XLA_EXTRA:-}" ]] && xla_req="${xla_req/torch_xla/torch_xla[${TINYLM_XLA_EXTRA}]}"
python3 -m venv .venv-xla
py=.venv-xla/bin/python
if ! $py -c "import torch_xla" 2>/dev/null; then
  echo "setup-xla: installing $torch_req $xla_req (several GB on x86_64: torch's CUDA libraries)"
  $py -m pip install -q --disable-pip-version-check "$torch_req" "$xla_req" 2>&1 \
    | grep -v "^WARNING: Location" || true
fi
echo "setup-xla: installing tinylm and pytest"
$py -m pip install -q --disable-pip-version-check -e . "pytest>=8" 2>&1 | grep -v "^WARNING: Location" || true
PJRT_DEVICE=CPU $py -c "import tinylm, torch, torch_xla; print(f'setup-xla: tinylm {tinylm.__version__} with torch {torch.__version__} and torch_xla {torch_xla.__version__} ready in .venv-xla')"
