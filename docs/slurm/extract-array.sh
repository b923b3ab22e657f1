#!/usr/bin/env bash
# extract@<t> as a Slurm job array: one task per GPU (node), on a filesystem every node sees,
# then one `dvc commit`. From the project root, its venv active:
#
#     bash docs/slurm/extract-array.sh 91 16      # extract@91 over 16 array tasks
#
# Three jobs, each after the last (docs/scale.md, "Beyond one machine"):
#   1. one task creates (or readies to resume) every store of the timestep at full size, with
#      the PCA fitted once (`--create-only`);
#   2. N tasks fill the missing shards: task i owns shard s when s % N == i, so no two write one
#      file and a task needs nothing from the others;
#   3. one task runs the stage alone, which computes what a failed task left (nothing when all
#      succeeded) and writes its metrics, checks every store, and records them: `dvc commit`.
# A task that dies leaves its shards missing (`python -m pipeline.cache.verify` says so); run
# the script again with any N, or `dvc repro`, and only those are computed.
# Site options (partition, account, time limit) go in SBATCH_* variables, which sbatch reads.
set -euo pipefail
t=${1:?usage: extract-array.sh <timestep> <tasks>}
n=${2:?usage: extract-array.sh <timestep> <tasks>}
stage="python stages/extract.py --timestep $t data/encoded data/trajectories data/model data/features metrics/extract --replace-stale"
gpu=(--gres=gpu:1 --cpus-per-task="${CPUS_PER_TASK:-8}")

create=$(sbatch --parsable "${gpu[@]}" --job-name "extract$t-create" --wrap "$stage --create-only")
array=$(sbatch --parsable "${gpu[@]}" --job-name "extract$t" --array "0-$((n - 1))" \
    --dependency "afterok:$create" --wrap "$stage")
finish=$(sbatch --parsable "${gpu[@]}" --job-name "extract$t-finish" --dependency "afterany:$array" \
    --wrap "$stage && python -m pipeline.cache.verify data/features/t$t && dvc commit -f extract@$t")
echo "extract@$t: create $create, array $array ($n tasks), finish $finish"
