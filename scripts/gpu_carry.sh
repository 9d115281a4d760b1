#!/usr/bin/env bash
# Prepare what scripts/gpu_check.py needs on a GPU machine that cannot download anything (gpu_carry/,
# ignored by git; ~30 MB): the pycocotools wheel for that machine's Python (default 3.12; its image has
# torch, torchvision, numpy, pyyaml, tqdm, tensorboard, pillow and OpenCV, not pycocotools), and the
# first N images of the COCO sample with their annotations. docs/gpu.md shows the command that uses it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${1:-3.12}
N=${2:-150}
SAMPLE=${SCNET_COCO_SAMPLE:-../shared/data/coco_train2017_sample}
PY=${PYTHON:-.venv/bin/python}
rm -rf gpu_carry && mkdir -p gpu_carry/wheels gpu_carry/coco_sample/annotations gpu_carry/coco_sample/train2017
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d gpu_carry/wheels "pycocotools==$(sed -n 's/^pycocotools==//p' constraints.txt)"
"$PY" - "$SAMPLE" "$N" <<'PY'
import json, os, shutil, sys
sample, n = sys.argv[1], int(sys.argv[2])
with open(os.path.join(sample, "annotations", "instances_train2017.json")) as f:
    coco = json.load(f)
coco["images"] = sorted(coco["images"], key=lambda im: im["id"])[:n]
ids = {im["id"] for im in coco["images"]}
coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in ids]
for im in coco["images"]:
    shutil.copy(os.path.join(sample, "train2017", im["file_name"]), os.path.join("gpu_carry/coco_sample/train2017"))
with open("gpu_carry/coco_sample/annotations/instances_train2017.json", "w") as f:
    json.dump(coco, f)
print(f"gpu_carry/: {len(coco['images'])} images, {len(coco['annotations'])} annotations")
PY
du -sh gpu_carry
