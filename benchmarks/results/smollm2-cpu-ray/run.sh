#!/usr/bin/env bash
# configs/ablation-paper.yaml (23 points) with --launcher local, then --launcher ray on this machine's
# local cluster (default resources: 1 CPU per worker -> 2 workers on 2 cores), then the same command
# again (nothing left to run). Usage: bash run.sh RUNS_DIR
# The script meant to interrupt the first Ray run with SIGINT at 12 stored points, but a background job
# of a non-interactive shell ignores SIGINT, so that run went to the end; interrupt.sh measures the
# resume (SIGTERM, i.e. a crash).
set -uo pipefail
runs=${1:?runs folder}
export HF_HUB_OFFLINE=1
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../../.."
rm -rf "$runs/abl-local" "$runs/abl-ray"
t0=$(date +%s.%N)
ppf ablate configs/ablation-paper.yaml --out "$runs/abl-local" --no-progress > "$runs/abl-local.log" 2>&1
rc=$?
t1=$(date +%s.%N)
echo "local: rc=$rc wall $(echo "$t1 - $t0" | bc) s"
ppf ablate configs/ablation-paper.yaml --launcher ray --out "$runs/abl-ray" --no-progress > "$runs/abl-ray-1.log" 2>&1 &
pid=$!
while [ "$(ls "$runs/abl-ray/points" 2>/dev/null | wc -l)" -lt 12 ]; do sleep 2; done
kill -INT $pid; wait $pid; rc=$?
t2=$(date +%s.%N)
echo "ray, interrupted: rc=$rc wall $(echo "$t2 - $t1" | bc) s, points stored $(ls "$runs/abl-ray/points" | wc -l)"
ppf ablate configs/ablation-paper.yaml --launcher ray --out "$runs/abl-ray" --no-progress > "$runs/abl-ray-2.log" 2>&1
rc=$?
t3=$(date +%s.%N)
echo "ray, resumed: rc=$rc wall $(echo "$t3 - $t2" | bc) s; ray total $(echo "$t3 - $t1" | bc) s"
