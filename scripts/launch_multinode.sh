#!/usr/bin/env bash
# Multi-node pretraining with the deepspeed launcher and a hostfile.
#
#   HOSTFILE=hostfile scripts/launch_multinode.sh --preset giant --data /data/shards \
#       --spm beit3.spm --tokenizer vqkd_base.pth --tokenizer-preset base \
#       --deepspeed ds_configs/zero3_bf16.json --output runs/giant
#
# hostfile: one line per node, "node-name slots=8". Every node needs passwordless ssh from the
# first one, the same checkout and .venv at the same path, and the data on a shared filesystem.
# NCCL: set NCCL_SOCKET_IFNAME / NCCL_IB_HCA for your fabric (exported below if set).
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTFILE=${HOSTFILE:-hostfile}
MASTER_PORT=${MASTER_PORT:-29500}
[ -f "$HOSTFILE" ] || { echo "no hostfile at $HOSTFILE (lines: 'host slots=N')" >&2; exit 2; }
MASTER_ADDR=${MASTER_ADDR:-$(head -n1 "$HOSTFILE" | awk '{print $1}')}
# Variables the deepspeed launcher forwards to every node (it reads .deepspeed_env).
: > .deepspeed_env
for v in NCCL_SOCKET_IFNAME NCCL_IB_HCA NCCL_DEBUG BEIT3_CACHE PYTHONPATH; do
  [ -n "${!v:-}" ] && echo "$v=${!v}" >> .deepspeed_env
done
exec .venv/bin/deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  --module beit3.pretrain "$@"
