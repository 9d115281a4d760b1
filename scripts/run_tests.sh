#!/usr/bin/env bash
# Set up a virtual environment and run the test suite (the command README.md and .ci/run use).
#
# The numerical parity tests against the official implementation (inference and one training step)
# need reference dumps. When SCNET_REF_DIR does not already hold them and the reference tool is found
# next to the repository (../shared/tools/mmdet_reference, or SCNET_REF_TOOL), this script builds them
# first (about 8 minutes, PyPI only, outside the repository); the training one and the one on real photos
# also need the real COCO sample (../shared/data/coco_train2017_sample, or SCNET_COCO_SAMPLE). Otherwise
# the parity tests report themselves as skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=${SCNET_VENV:-$REPO/.venv}

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q -r requirements.txt -r requirements-test.txt -r requirements-export.txt -c constraints.txt
"$VENV/bin/pip" install -q --no-deps -e .

export SCNET_REF_DIR=${SCNET_REF_DIR:-$HOME/.cache/scnet-mmdet-ref/data}
export SCNET_REF_ENV=${SCNET_REF_ENV:-$HOME/.cache/scnet-mmdet-ref/venv}
TOOL=${SCNET_REF_TOOL:-$REPO/../shared/tools/mmdet_reference}
SAMPLE=${SCNET_COCO_SAMPLE:-$REPO/../shared/data/coco_train2017_sample}
build_reference() {
  [ -x "$SCNET_REF_ENV/bin/python" ] || bash "$TOOL/setup_refenv.sh" "$SCNET_REF_ENV"
  for config in scnet_r50_fpn_20e_coco scnet_x101-64x4d_fpn_20e_coco mask-rcnn_r50_fpn_1x_coco \
      cascade-mask-rcnn_r50_fpn_1x_coco htc_r50_fpn_1x_coco ms-rcnn_r50_fpn_1x_coco; do
    [ -f "$SCNET_REF_DIR/${config}_seed0_bncalib_synth0.npz" ] ||
      (cd "$TOOL" && "$SCNET_REF_ENV/bin/python" run_ref.py --config "$config" --seed 0 --out-dir "$SCNET_REF_DIR" > /dev/null)
  done
  # training parity: the official training step on a batch of real COCO images (tests/parity_batch.py)
  local train_dir=$SCNET_REF_DIR/train_scnet_r50_fpn_20e_coco
  if [ -d "$SAMPLE" ] && [ ! -f "$train_dir/official_out.pth" ]; then
    mkdir -p "$train_dir"
    "$VENV/bin/python" tests/parity_batch.py "$train_dir/batch.npz" --sample "$SAMPLE" > /dev/null
    (cd "$TOOL" && "$SCNET_REF_ENV/bin/python" train_ref.py --batch "$train_dir/batch.npz" --out "$train_dir" > /dev/null)
  fi
  # parity through model([rgb]) on real photos that need the test-time resize (tests/test_parity_photos.py)
  [ -d "$SAMPLE" ] || return 0
  local photos
  photos=$(cd tests && "$VENV/bin/python" -c "from test_parity_photos import PHOTOS; print(*PHOTOS)")
  for photo in $photos; do
    [ -f "$SCNET_REF_DIR/scnet_r50_fpn_20e_coco_seed0_bncalib_${photo}.npz" ] ||
      (cd "$TOOL" && "$SCNET_REF_ENV/bin/python" run_ref.py --config scnet_r50_fpn_20e_coco --seed 0 \
        --image "$SAMPLE/train2017/$photo.jpg" --out-dir "$SCNET_REF_DIR" > /dev/null)
  done
}
if [ "${SCNET_SKIP_REFERENCE:-0}" != 1 ] && [ -f "$TOOL/run_ref.py" ]; then
  echo "building the MMDetection reference dumps in $SCNET_REF_DIR (parity test)"
  build_reference || echo "WARNING: could not build the reference dumps; the parity test will be skipped"
fi

exec "$VENV/bin/python" -m pytest tests -q -rs "$@"
