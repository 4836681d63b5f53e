#!/usr/bin/env bash
# The resume measurement: --launcher ray on configs/ablation-paper.yaml, killed (SIGTERM, no cleanup:
# a crash) once half its points are stored, then the same command again. Usage: bash interrupt.sh RUNS_DIR
# (A background job of a non-interactive shell ignores SIGINT, so Ctrl-C is not what is simulated.)
set -uo pipefail
runs=${1:?runs folder}
export HF_HUB_OFFLINE=1
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../../.."
out="$runs/abl-ray-crash"
rm -rf "$out"
t0=$(date +%s.%N)
ppf ablate configs/ablation-paper.yaml --launcher ray --out "$out" --no-progress > "$runs/abl-ray-crash-1.log" 2>&1 &
pid=$!
while [ "$(ls "$out/points" 2>/dev/null | wc -l)" -lt 12 ]; do sleep 1; done
kill -TERM $pid; wait $pid; rc=$?
t1=$(date +%s.%N)
echo "ray, killed: rc=$rc wall $(echo "$t1 - $t0" | bc) s, points stored $(ls "$out/points" | wc -l)"
sleep 5
ppf ablate configs/ablation-paper.yaml --launcher ray --out "$out" --no-progress > "$runs/abl-ray-crash-2.log" 2>&1
rc=$?
t2=$(date +%s.%N)
echo "ray, resumed: rc=$rc wall $(echo "$t2 - $t1" | bc) s; total $(echo "$t2 - $t0" | bc) s"
