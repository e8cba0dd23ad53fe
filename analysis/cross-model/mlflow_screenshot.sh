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
KEYS=${KEYS:-[\"depth/hidden/entropy_norm\",\"depth/attention/sink_rate\"]}
URL="http://127.0.0.1:$PORT/#/metric?runs=$RUNS&metric=$(enc "\"${KEYS_FIRST:-depth/hidden/entropy_norm}\"")"
URL+="&experiments=[\"$EXP\"]&plot_metric_keys=$(enc "$KEYS")&plot_layout={}&x_axis=step&y_axis_scale=linear"
URL+="&line_smoothness=1&show_point=true&deselected_curves=[]&last_linear_y_axis_range=[]"
echo "$URL" >&2
"$CHROMIUM" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1900,980 \
  --virtual-time-budget=30000 --screenshot="$ART/full.png" "$URL" 2>/dev/null
# keep the page and its chart; the UI's assistant side panel (right) is cut off, the image made small
$PY - "$ART/full.png" "$PNG" <<'PY'
import sys
from PIL import Image
im = Image.open(sys.argv[1]).convert("RGB")
w, h = im.size
im = im.crop((0, 0, w - 490, h))
im.quantize(colors=64).save(sys.argv[2], optimize=True)
PY
echo "wrote $PNG" >&2
