#!/usr/bin/env bash
# The README's MLflow screenshot: both models' analyze runs on one chart against relative depth, as the
# MLflow UI shows them (a real `mlflow server`, a real headless Chromium).
#
#   bash analysis/cross-model/mlflow_screenshot.sh [sqlite:////tmp/mcr-cross/mlflow.db] [OUT.png]
set -euo pipefail
cd "$(dirname "$0")/../.."
URI=${1:-sqlite:////tmp/mcr-cross/mlflow.db}
PNG=${2:-analysis/cross-model/mlflow_compare_depth.png}
PY=${PYTHON:-python3}
MLFLOW=${MLFLOW:-mlflow}
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
PORT=${PORT:-5077}
KEY=${KEY:-depth/hidden/entropy_norm}
ART=$(mktemp -d)
$MLFLOW server --backend-store-uri "$URI" --artifacts-destination "$ART" --host 127.0.0.1 --port "$PORT" \
  > "$ART/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$ART"' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done
# the latest FINISHED analyze run of each model in experiment cross-model
read -r EXP RUNS < <($PY - "$URI" <<'PY'
import json, sys
import mlflow
c = mlflow.MlflowClient(tracking_uri=sys.argv[1])
exp = c.get_experiment_by_name("cross-model")
runs = c.search_runs([exp.experiment_id], "tags.`mcr_exit.command` = 'analyze' and attributes.status = 'FINISHED'",
                     order_by=["attributes.start_time DESC"])
latest = {}
for r in runs:
    latest.setdefault(r.data.tags["mcr_exit.model"], r.info.run_id)
print(exp.experiment_id, json.dumps(sorted(latest.values())).replace(" ", ""))
PY
)
enc() { $PY -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$1"; }
URL="http://127.0.0.1:$PORT/#/metric/$(enc "$KEY")?runs=$(enc "$RUNS")&experiments=$(enc "[\"$EXP\"]")"
URL+="&plot_metric_keys=$(enc "[\"$KEY\"]")&plot_layout=$(enc '{}')&x_axis=step&y_axis_scale=linear&line_smoothness=1&show_point=true"
echo "$URL" >&2
"$CHROMIUM" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,760 \
  --virtual-time-budget=30000 --screenshot="$PNG" "$URL" 2>/dev/null
echo "wrote $PNG" >&2
