#!/bin/bash
# Two nodes with plain torchrun: run this same command on both machines (any order).
#
#   RDZV_HOST=node1.example.org bash examples/multinode/two_nodes.sh     # on node1 and on node2
#
# RDZV_HOST is a host both can reach (it hosts the rendezvous; usually the first node). The run
# directory (out_dir) and the data cache (TINYLM_CACHE) must be on a file system both nodes
# share, at the same path: only global rank 0 writes them, the other node reads them.
# Extra arguments are `tinylm train` overrides, e.g. train.distributed=fsdp.
set -euo pipefail

: "${RDZV_HOST:?set RDZV_HOST to the host that runs the rendezvous (e.g. the first node)}"
RDZV_PORT=${RDZV_PORT:-29500}
NPROC=${NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1  # a fresh rendezvous store per restart round

exec torchrun \
    --nnodes=2 \
    --nproc_per_node="$NPROC" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$RDZV_HOST:$RDZV_PORT" \
    --rdzv-id="${RDZV_ID:-tinylm-two-nodes}" \
    --max-restarts="${MAX_RESTARTS:-3}" \
    -m tinylm.cli train "${CONFIG:-tinystories-15m}" run_name="${RUN_NAME:-two-nodes}" "$@"
