#!/usr/bin/env bash
# One autosplit study searched by N machines of a SLURM cluster: a job array of N tasks, one
# task per node, each running ONE `autosplit search` with every GPU SLURM gave it (--devices),
# hence one worker process per GPU. All tasks run the same command on one PostgreSQL study and
# one MLflow store; the first to claim the teacher trains and publishes it, the others wait for
# it and fetch it (see README, "Scale out").
#
# Why one search per node and not one per GPU: the node's search process plans once, loads the
# data and the teacher once, and hands its workers the plan; a process per GPU would repeat that
# work per GPU and (on a node without a shared runs folder) keep one teacher copy per process.
#
#   export AUTOSPLIT_STORAGE=postgresql://user:pass@dbhost/autosplit
#   export AUTOSPLIT_TRACKING_URI=http://mlflow-host:5000
#   sbatch --array=0-3 --gres=gpu:4 scripts/slurm_search.sh \
#       --space search_spaces/cifar100_resnet.yaml --budget 0.25x --time-limit 6h
#
# Extra arguments go to `autosplit search` as they are. Every node needs: the same space file
# and data files (same data fingerprint, or the node is refused), the storage URL and the
# tracking URI (exported above; sbatch passes the environment on), and `autosplit` installed
# with the postgres extra. AUTOSPLIT_TEACHER_DIR, if set, publishes the teacher in a folder
# every node mounts instead of the MLflow store.
#
#SBATCH --job-name=autosplit-search
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --gres=gpu:1
#SBATCH --output=autosplit-%A_%a.out
set -euo pipefail

: "${AUTOSPLIT_STORAGE:?set AUTOSPLIT_STORAGE to the postgresql:// URL of the study}"
: "${AUTOSPLIT_TRACKING_URI:?set AUTOSPLIT_TRACKING_URI to the MLflow tracking server}"
STUDY_NAME="${AUTOSPLIT_STUDY_NAME:-slurm-${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-local}}}"

# SLURM exposes the GPUs it allocated through CUDA_VISIBLE_DEVICES, renumbered from 0 inside the
# job: with 4 of them the process sees cuda:0..cuda:3 whatever their physical numbers.
devices=cpu
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    IFS=',' read -r -a visible <<< "${CUDA_VISIBLE_DEVICES}"
    devices=""
    for i in "${!visible[@]}"; do
        devices+="${devices:+,}cuda:${i}"
    done
fi

# Each node keeps its own runs folder (teacher cache, trial weights) on local disk when there
# is one; the study, the MLflow store and the published teacher are what the nodes share.
runs_dir="${AUTOSPLIT_RUNS_DIR:-${TMPDIR:-/tmp}/autosplit-runs-${SLURM_JOB_ID:-$$}}"
mkdir -p "${runs_dir}"

extra=()
if [[ -n "${AUTOSPLIT_TEACHER_DIR:-}" ]]; then
    extra+=(--teacher-dir "${AUTOSPLIT_TEACHER_DIR}")
fi

echo "task ${SLURM_ARRAY_TASK_ID:-0} on $(hostname): devices ${devices}, runs ${runs_dir}"
exec autosplit search \
    --study-name "${STUDY_NAME}" \
    --storage "${AUTOSPLIT_STORAGE}" \
    --tracking-uri "${AUTOSPLIT_TRACKING_URI}" \
    --devices "${devices}" \
    --runs-dir "${runs_dir}" \
    ${extra[@]+"${extra[@]}"} \
    "$@"
