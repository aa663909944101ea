#!/usr/bin/env bash
# Create the process work pools dpg-cpu and dpg-gpu if missing, then start one worker per pool (foreground;
# Ctrl-C stops both). Needs PREFECT_API_URL (infra/start-prefect-server.sh prints it).
#   infra/start-workers.sh                 # both pools on this machine
#   POOLS=dpg-gpu GPU_WORKERS=4 infra/start-workers.sh
#                                          # a GPU machine: 4 GPU workers, one per GPU (CUDA_VISIBLE_DEVICES=0..3)
#   POOLS=dpg-gpu GPU_IDS="2 3" infra/start-workers.sh   # one worker on GPU 2, one on GPU 3
# Each GPU worker sees exactly one device (CUDA_VISIBLE_DEVICES) and runs one flow run at a time, so its stages'
# execution.device=auto (or cuda) is that device. On a machine without CUDA the stages run on its CPU.
# Every worker runs flows from this checkout (DPG_REPO) and must see the run's storage.url: s3://... or a shared
# folder mounted at the same absolute path on every machine.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFECT="${PREFECT:-$REPO/.venv/bin/prefect}"
CPU_POOL="${CPU_POOL:-dpg-cpu}"
GPU_POOL="${GPU_POOL:-dpg-gpu}"
POOLS="${POOLS:-$CPU_POOL $GPU_POOL}"
GPU_WORKERS="${GPU_WORKERS:-1}"
GPU_IDS="${GPU_IDS:-$(seq -s ' ' 0 $((GPU_WORKERS - 1)))}"
: "${PREFECT_API_URL:?export PREFECT_API_URL=http://127.0.0.1:4200/api (the server of infra/start-prefect-server.sh)}"
export DPG_REPO="$REPO"  # read by the pull step of infra/prefect.yaml
export PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cd "$REPO"

# Stop: SIGTERM to every worker, SIGKILL after GRACE seconds (a Prefect 3.9.1 worker can hang in its graceful
# shutdown). Flow runs already started live in sessions of their own and finish (or fail) on their own.
pids=()
cleanup() {
  trap - EXIT INT TERM
  kill -TERM "${pids[@]}" 2>/dev/null || true
  for ((waited = 0; waited < ${GRACE:-30}; waited++)); do
    kill -0 "${pids[@]}" 2>/dev/null || return 0
    sleep 1
  done
  kill -KILL "${pids[@]}" 2>/dev/null || true
}
trap cleanup EXIT INT TERM

for pool in $POOLS; do
  if ! "$PREFECT" work-pool inspect "$pool" >/dev/null 2>&1; then
    "$PREFECT" work-pool create "$pool" --type process
  fi
  if [ "$pool" = "$GPU_POOL" ]; then
    for gpu in $GPU_IDS; do  # one device and one flow run at a time per worker
      CUDA_VISIBLE_DEVICES=$gpu "$PREFECT" worker start --pool "$pool" --name "$(hostname)-$pool-$gpu" --limit 1 &
      pids+=($!)
    done
  else
    "$PREFECT" worker start --pool "$pool" --name "$(hostname)-$pool" &
    pids+=($!)
  fi
done
wait
