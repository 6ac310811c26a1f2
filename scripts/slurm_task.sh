#!/usr/bin/env bash
# One Slurm task = one rank: torch's rendezvous variables from Slurm's, then beit3 pretrain.
# srun starts it once per task (scripts/slurm_pretrain.sbatch); it runs without Slurm too, given
# the SLURM_* variables (the tests set them by hand).
#
#   SLURM_PROCID    -> RANK        (0 .. SLURM_NTASKS - 1, over all nodes)
#   SLURM_NTASKS    -> WORLD_SIZE
#   SLURM_LOCALID   -> LOCAL_RANK  (the task's GPU on its node)
#   first host of SLURM_JOB_NODELIST -> MASTER_ADDR (unless set); MASTER_PORT default 29500
#
# PYTHON (default .venv/bin/python) runs beit3.
set -euo pipefail
: "${SLURM_PROCID:?not a Slurm task (SLURM_PROCID unset)}" "${SLURM_NTASKS:?SLURM_NTASKS unset}"
export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=${SLURM_LOCALID:-0}
if [ -z "${MASTER_ADDR:-}" ]; then
  MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST unset}" | head -n 1)
fi
export MASTER_ADDR MASTER_PORT=${MASTER_PORT:-29500}
exec "${PYTHON:-.venv/bin/python}" -m beit3.cli.pretrain "$@"
