#!/usr/bin/env bash
# Start a Prefect server on 127.0.0.1 (foreground; Ctrl-C stops it). Its database lives in PREFECT_HOME.
#   infra/start-prefect-server.sh                 # port 4200, PREFECT_HOME=<repo>/.dpg/prefect-server
#   PORT=4300 PREFECT_HOME=/srv/prefect infra/start-prefect-server.sh
# Then, in every shell that deploys or runs workers: export PREFECT_API_URL=http://127.0.0.1:4200/api
# (workers on other machines: reach the server through an SSH tunnel or a private network; it binds 127.0.0.1.)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFECT="${PREFECT:-$REPO/.venv/bin/prefect}"
export PREFECT_HOME="${PREFECT_HOME:-$REPO/.dpg/prefect-server}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_SERVER_API_HOST=127.0.0.1
PORT="${PORT:-4200}"
mkdir -p "$PREFECT_HOME"
echo "Prefect server: http://127.0.0.1:$PORT (PREFECT_HOME=$PREFECT_HOME)"
echo "  export PREFECT_API_URL=http://127.0.0.1:$PORT/api"
exec "$PREFECT" server start --host 127.0.0.1 --port "$PORT"
