#!/usr/bin/env bash
# The quick start, from a fresh clone with only python3: set up a virtual environment, generate the
# built-in synthetic dataset, train a small SCNet on it (CPU is enough), evaluate it (COCO box and
# mask AP) and draw its predictions on validation images.
#
#   bash scripts/quickstart.sh            # results in output/quickstart/
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SCNET_VENV:-.venv}
OUT=${SCNET_QUICKSTART_OUT:-output/quickstart}
DATA=datasets/shapes
start=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q -r requirements.txt
"$VENV/bin/pip" install -q --no-deps -e .
PY="$VENV/bin/python"

echo "== 1/4 dataset: $DATA"
[ -f "$DATA/annotations/instances_val.json" ] || "$PY" datasets/make_synthetic.py "$DATA"

echo "== 2/4 training (configs/quickstart.yaml) -> $OUT"
"$PY" scripts/train.py --cfg configs/quickstart.yaml --output-dir "$OUT"

echo "== 3/4 evaluation on $DATA/val"
mkdir -p "$OUT/eval"
"$PY" scripts/eval.py --cfg configs/quickstart.yaml --weights "$OUT/model_final.pth" --output-dir "$OUT/eval" \
  | tee "$OUT/eval/summary.txt"

echo "== 4/4 predictions drawn on 8 validation images -> $OUT/predictions"
mkdir -p "$OUT/demo_inputs"
ls "$DATA/val" | sort | head -n 8 | while read -r name; do cp "$DATA/val/$name" "$OUT/demo_inputs/"; done
"$PY" scripts/demo.py "$OUT/demo_inputs" --cfg configs/quickstart.yaml --weights "$OUT/model_final.pth" \
  --out "$OUT/predictions" --categories "$DATA/annotations/instances_val.json"

echo "done in $(( $(date +%s) - start )) s: metrics in $OUT/eval/metrics.json, pictures in $OUT/predictions/"
