#!/usr/bin/env bash
# Multi-node pretraining with the deepspeed launcher, in one of two ways (see docs/multinode.md).
#
# With ssh: run once, on the first node; the launcher starts every node over passwordless ssh (pdsh).
#   HOSTFILE=hostfile scripts/launch_multinode.sh --preset giant --data /data/shards \
#       --spm beit3.spm --tokenizer vqkd_base.pth --tokenizer-preset base \
#       --deepspeed ds_configs/zero3_bf16.json --output runs/giant --resume auto
#
# Without ssh: run on every node, each with its NODE_RANK (0 on the node of MASTER_ADDR); for
# clusters without ssh between nodes, containers, or a scheduler that starts one task per node.
#   NODE_RANK=1 HOSTFILE=hostfile scripts/launch_multinode.sh --preset giant ...   (same flags)
#
# hostfile: one line per node, "node-name slots=8" (slots: GPUs of the node); MASTER_ADDR defaults to
# its first name. Every node needs the same checkout and .venv at the same path, and the data and
# --output on a shared filesystem. NCCL: set NCCL_SOCKET_IFNAME / NCCL_IB_HCA for your fabric.
# DEEPSPEED (default .venv/bin/deepspeed) picks another launcher executable.
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTFILE=${HOSTFILE:-hostfile}
MASTER_PORT=${MASTER_PORT:-29500}
DEEPSPEED=${DEEPSPEED:-.venv/bin/deepspeed}
[ -f "$HOSTFILE" ] || { echo "no hostfile at $HOSTFILE (lines: 'host slots=N')" >&2; exit 2; }
MASTER_ADDR=${MASTER_ADDR:-$(head -n1 "$HOSTFILE" | awk '{print $1}')}
# The launcher sets no thread count; one OpenMP thread per rank unless asked (dataloader workers and
# GPU ranks share the node's cores).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ -n "${NODE_RANK:-}" ]; then
  NUM_NODES=$(grep -cv '^\s*\(#\|$\)' "$HOSTFILE")
  SLOTS=$(awk -v n=$((NODE_RANK + 1)) '!/^[[:space:]]*(#|$)/ && ++i == n {sub("slots=", "", $2); print $2}' "$HOSTFILE")
  exec $DEEPSPEED --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" --num_nodes "$NUM_NODES" \
    --num_gpus "$SLOTS" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --module beit3.cli.pretrain "$@"
fi
# Variables the launcher forwards to the other nodes over ssh (it reads .deepspeed_env).
: > .deepspeed_env
for v in NCCL_SOCKET_IFNAME NCCL_IB_HCA NCCL_DEBUG BEIT3_CACHE PYTHONPATH OMP_NUM_THREADS; do
  [ -n "${!v:-}" ] && echo "$v=${!v}" >> .deepspeed_env
done
exec $DEEPSPEED --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  --module beit3.cli.pretrain "$@"
