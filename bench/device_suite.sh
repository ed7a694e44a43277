#!/usr/bin/env bash
# One command for a lent GPU (issue 18): about 6-8 minutes on one H100.
#
#   bash bench/device_suite.sh            # from the repository root
#
# Python: $PYTHON, else .venv/bin/python, else python3 (a lent GPU machine has no .venv and no
# internet: its image's python3 holds a CUDA PyTorch, and tinylm runs from this checkout through
# PYTHONPATH, uninstalled). Parts needing a package the image lacks (torchao for FP8) record
# "not available" and the suite goes on.
#
# Runs, each with its own time limit (a part that fails or times out is recorded as such and
# the suite goes on):
#   1. the CUDA-only tests (tests/test_cuda.py; they skip on a machine without CUDA),
#   2. GPT-2 124M training throughput in bf16 + torch.compile: tokens/s, MFU (peak table per GPU
#      model: tinylm/train/runtime.py), peak memory (bench/device_bench.py throughput),
#   3. FP8 vs bf16 tokens/s on the same model through `tinylm train --dry-run`
#      (train.precision=fp8 comes from another issue; when it fails the result says
#      "not available" with the error's last line),
#   4. Muon's optimizer step with bfloat16 Newton-Schulz vs AdamW (bench/device_bench.py muon),
#   5. DDP on NCCL when there are >= 2 GPUs (torchrun, 20 steps), else "skipped: 1 GPU".
# Results: bench/results/device-<host>-<UTC time>.json and .md (commit them).
# Not run by the test suite; `bash -n bench/device_suite.sh` checks that it parses.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=python3
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # tinylm from this checkout, installed or not
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=bench/results
BASE="$OUT/device-$(hostname -s)-$STAMP"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
JSON_PARTS=()

record() {  # record NAME JSON
  printf '%s' "$2" > "$WORK/$1.json"
  JSON_PARTS+=("$1")
}

# One JSON object from a command's last stdout line, or {"error": ...} naming why not.
run_json() {  # run_json NAME TIMEOUT CMD...
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*" >&2
  if timeout "$limit" "$@" > "$WORK/$name.out" 2> "$WORK/$name.err"; then
    record "$name" "$(tail -n 1 "$WORK/$name.out")"
  else
    local rc=$?
    local why
    why=$(tail -n 1 "$WORK/$name.err" | tr -d '"\\' | cut -c1-300)
    [ "$rc" = 124 ] && why="timed out after ${limit}s"
    record "$name" "{\"error\": \"exit $rc: $why\"}"
  fi
}

# Tokens/s of `tinylm train --dry-run` (the real training step) for one precision.
dry_run_tokens() {  # dry_run_tokens NAME PRECISION
  local name=$1 prec=$2
  echo "== $name: tinylm train --dry-run train.precision=$prec" >&2
  if timeout 240 "$PY" -m tinylm.cli train gpt2-124m data.train=shakespeare \
      data.tokenizer=char model.vocab_size=0 train.batch_size=16 train.compile=true \
      "train.precision=$prec" --dry-run > "$WORK/$name.out" 2> "$WORK/$name.err"; then
    local line tps
    line=$(grep -m1 '^time per step:' "$WORK/$name.out")
    tps=$(echo "$line" | sed -E 's/.*\(([0-9,]+) tokens\/s.*/\1/' | tr -d ,)
    record "$name" "{\"precision\": \"$prec\", \"tokens_per_s\": ${tps:-null}, \"line\": \"$line\"}"
  else
    local why
    why=$(tail -n 1 "$WORK/$name.err" | tr -d '"\\' | cut -c1-300)
    record "$name" "{\"precision\": \"$prec\", \"error\": \"not available: $why\"}"
  fi
}

GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
GPU_NAME=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null || echo none)
record env "{\"host\": \"$(hostname -s)\", \"utc\": \"$STAMP\", \"gpus\": $GPUS, \"gpu\": \"$GPU_NAME\", \"torch\": \"$("$PY" -c 'import torch; print(torch.__version__)')\"}"
if [ "$GPUS" = 0 ]; then
  echo "device_suite.sh: no CUDA device visible; nothing to measure" >&2
  exit 1
fi
mkdir -p "$OUT"

# 1. CUDA-only tests
echo "== cuda tests" >&2
if timeout 180 "$PY" -m pytest -q tests/test_cuda.py > "$WORK/tests.out" 2>&1; then
  record cuda_tests "{\"result\": \"$(tail -n 1 "$WORK/tests.out" | tr -d '"')\"}"
else
  record cuda_tests "{\"error\": \"$(tail -n 1 "$WORK/tests.out" | tr -d '"')\"}"
fi
# 2. GPT-2 124M bf16 + compile (tokens/s, MFU, peak memory)
run_json gpt2_bf16_compile 240 "$PY" bench/device_bench.py throughput --preset gpt2-124m \
  --batch 16 --steps 30 --precision bf16 --compile
# 3. FP8 vs bf16, same model and settings
dry_run_tokens dry_bf16 bf16
dry_run_tokens dry_fp8 fp8
# 4. Muon step with bfloat16 Newton-Schulz vs AdamW
run_json muon_step 120 "$PY" bench/device_bench.py muon --preset gpt2-124m --steps 10
# 5. DDP on NCCL
if [ "$GPUS" -ge 2 ]; then
  echo "== ddp on $GPUS GPUs" >&2
  if timeout 240 "$PY" -m torch.distributed.run --nproc_per_node="$GPUS" -m tinylm.cli train gpt2-124m \
      data.train=shakespeare data.tokenizer=char model.vocab_size=0 \
      train.batch_size=16 train.max_steps=20 log.interval=10 eval.interval=0 eval.samples=0 \
      "out_dir=$WORK/runs" run_name=ddp > "$WORK/ddp.out" 2>&1; then
    tps=$(grep -o '[0-9,]* tok/s' "$WORK/ddp.out" | tail -n 1 | tr -d ', tok/s')
    record ddp "{\"gpus\": $GPUS, \"tokens_per_s\": ${tps:-null}}"
  else
    record ddp "{\"gpus\": $GPUS, \"error\": \"$(tail -n 1 "$WORK/ddp.out" | tr -d '"\\' | cut -c1-300)\"}"
  fi
else
  record ddp "{\"skipped\": \"1 GPU\"}"
fi

# JSON (one object, a key per part) and a Markdown summary beside it
{
  echo "{"
  sep=""
  for part in "${JSON_PARTS[@]}"; do
    printf '%s"%s": %s' "$sep" "$part" "$(cat "$WORK/$part.json")"
    sep=$',\n'
  done
  printf '\n}\n'
} > "$BASE.json"
"$PY" - "$BASE.json" > "$BASE.md" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
env = r["env"]
print(f"# Device suite: {env['gpu']} x{env['gpus']}, torch {env['torch']}, {env['utc']}\n")
print("| part | result |\n|---|---|")
for key, value in r.items():
    if key != "env":
        print(f"| {key} | {', '.join(f'{k}: {v:.4g}' if isinstance(v, float) else f'{k}: {v}' for k, v in value.items())} |")
PYEOF
echo "wrote $BASE.json and $BASE.md" >&2
cat "$BASE.md"
