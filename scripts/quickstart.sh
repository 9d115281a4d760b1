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
"$VENV/bin/pip" install -q -r requirements.txt -c constraints.txt
"$VENV/bin/pip" install -q --no-deps -e .
PY="$VENV/bin/python"

# The same numbers on every x86-64 machine with AVX2, given constraints.txt's versions: the thread count
# and the CPU code paths of ATen, oneDNN (convolutions) and MKL (matrix products) each change the float
# rounding of training, hence its final AP, so all four are fixed: two threads, AVX2 kernels even where
# the CPU has AVX-512 or AMX. (Measured on the quick start: no slower on a 2-core AVX-512 machine.)
export OMP_NUM_THREADS=2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2

# this machine's speed, to compare the time below with README.md's (scripts/machine_speed.py says how)
"$PY" scripts/machine_speed.py

echo "== 1/4 dataset: $DATA"
[ -f "$DATA/annotations/instances_val.json" ] || "$PY" datasets/make_synthetic.py "$DATA"
# the digest README.md gives: a different one means the data, not the training, differs
echo "dataset digest: $(cd "$DATA" && find . -type f | LC_ALL=C sort | xargs cat | sha1sum | cut -c1-16)"

echo "== 2/4 training (configs/quickstart.yaml) -> $OUT"
# --resume auto: a second run of this script continues (here: reuses) the first one's training
"$PY" scripts/train.py --cfg configs/quickstart.yaml --output-dir "$OUT" --resume auto

echo "== 3/4 evaluation on $DATA/val"
mkdir -p "$OUT/eval"
"$PY" scripts/eval.py --cfg configs/quickstart.yaml --weights "$OUT/model_final.pth" --output-dir "$OUT/eval" \
  | tee "$OUT/eval/summary.txt"

echo "== 4/4 predictions drawn on 8 validation images -> $OUT/predictions"
mkdir -p "$OUT/demo_inputs"
ls "$DATA/val" | sort | head -n 8 | while read -r name; do cp "$DATA/val/$name" "$OUT/demo_inputs/"; done
"$PY" scripts/demo.py "$OUT/demo_inputs" --cfg configs/quickstart.yaml --weights "$OUT/model_final.pth" \
  --out "$OUT/predictions" --categories "$DATA/annotations/instances_val.json"

"$PY" scripts/machine_speed.py  # again: a machine that got busier meanwhile shows here
echo "done in $(( $(date +%s) - start )) s: metrics in $OUT/eval/metrics.json, pictures in $OUT/predictions/"
