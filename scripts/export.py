"""Export a model of the zoo to ONNX or to a torch.export program (.pt2), and check it against eager.

    python scripts/export.py --cfg configs/r50_20e.yaml --weights scnet_r50.pth --format onnx --out scnet_r50.onnx
    python scripts/export.py --cfg configs/r50_20e.yaml --weights scnet_r50.pth --format export --out scnet_r50.pt2
    python scripts/export.py ... --check photo1.jpg photo2.jpg    # exported vs eager on these images
    python scripts/export.py --cfg C --weights W --format onnx --out F.onnx model.test.score_thresh=0.05

The file holds the whole inference graph of one image, NMS and mask head included, from the normalised,
padded network input and its image size to boxes, scores, labels and 28x28 mask probabilities
(scnet/export.py says exactly what). Height and width are dynamic (multiples of 32 from 96, up to
--max-side) unless --static: then the graph is fixed to the padded test scale, landscape (--size to
choose), and the runtime pads every image to it. The file also carries the class names and COCO
category ids, from --categories or as scripts/demo.py finds them (scnet/data/categories.py).
deploy/scnet_runtime.py runs either file with the resize before and the mask paste after in numpy:
``OnnxDetector`` needs only numpy and onnxruntime, ``ExportedDetector`` torch and torchvision, neither
needs this package.

--check runs the exported file through that runtime and the eager model (``model([rgb])``) on each
image and prints the differences: detections, labels, boxes (px), scores, mask IoU.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

import scnet
from scnet.config import get_cfg
from scnet.data.categories import load_categories
from scnet.export import export_program, example_inputs, metadata, save_onnx, save_program
from scnet.utils.files import report_file_errors

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy"))
from scnet_runtime import ExportedDetector, OnnxDetector  # noqa: E402  deploy/, torch-free for ONNX


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cfg", required=True, help="config YAML of the model")
    p.add_argument("--weights", required=True, help="weights: a checkpoint of train.py or a converted official file")
    p.add_argument("--format", choices=("onnx", "export"), required=True, help="ONNX file or torch.export .pt2")
    p.add_argument("--out", required=True, help="file to write (.onnx or .pt2)")
    p.add_argument("--static", action="store_true", help="one input size (--size) instead of any size")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                   help="--static input size (default: the padded test scale, landscape)")
    p.add_argument("--max-side", type=int, default=4096, help="largest height/width of a dynamic graph")
    p.add_argument("--check", nargs="+", default=[], metavar="IMAGE", help="compare with eager on these images")
    p.add_argument("--categories", help="COCO annotation file whose categories name the classes (default: "
                   "the training annotation file of the checkpoint's or --cfg's config, scnet/data/categories.py)")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    return p.parse_intermixed_args(argv)  # the overrides may follow the options


def export(args):
    cfg = get_cfg(args.cfg, args.overrides)
    model = scnet.build_model(cfg, weights=args.weights).eval()
    size = args.size or (min(model.test_scale), max(model.test_scale))
    inputs = example_inputs(model, *size)
    start = time.perf_counter()
    program = export_program(model, inputs, dynamic=not args.static, max_side=args.max_side)
    names, category_ids, source = load_categories(args.weights, cfg, cfg.model.num_classes, args.categories)
    print(f"class names: {source}")
    meta = metadata(model, names, category_ids, input_size=tuple(inputs[0].shape[-2:]) if args.static else None)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.format == "export":
        save_program(program, args.out, meta)
    else:
        save_onnx(program, args.out, meta)
    print(f"{args.out}: {args.format}, {'input ' + 'x'.join(map(str, inputs[0].shape[-2:])) if args.static else 'any size'}"
          f", {os.path.getsize(args.out) / 1e6:.1f} MB, exported in {time.perf_counter() - start:.0f} s")
    return model


def matched_rows(eager, exported):
    """For each eager detection, the exported one of the same label with the nearest box (greedy, by
    eager's order): detections whose scores differ by less than the float rounding may be swapped."""
    rows, free = [], np.ones(len(exported["scores"]), dtype=bool)
    for box, label in zip(eager["boxes"], eager["labels"]):
        distance = np.where(free & (exported["labels"] == label), np.abs(exported["boxes"] - box).max(1), np.inf)
        j = int(np.argmin(distance))
        if not np.isfinite(distance[j]):
            return None
        rows.append(j)
        free[j] = False
    return np.array(rows)


def compare(eager, exported):
    """Differences between two result dicts of one image, detections paired by label and box."""
    n, m = len(eager["scores"]), len(exported["scores"])
    report = {"detections": (n, m)}
    if n != m or n == 0:
        return report
    rows = matched_rows(eager, exported)
    report["labels_equal"] = rows is not None
    if rows is None:
        return report
    report["reordered"] = int((rows != np.arange(n)).sum())
    exported = {k: v[rows] for k, v in exported.items()}
    report["box_diff"] = float(np.abs(eager["boxes"] - exported["boxes"]).max())
    report["score_diff"] = float(np.abs(eager["scores"] - exported["scores"]).max())
    a, b = eager["masks"].reshape(n, -1), exported["masks"].reshape(n, -1)
    union = (a | b).sum(1)
    iou = np.where(union > 0, (a & b).sum(1) / np.maximum(union, 1), 1.0)
    report["mask_iou_min"] = float(iou.min())
    return report


def check(model, args):
    detector = OnnxDetector(args.out) if args.format == "onnx" else ExportedDetector(args.out)
    for path in args.check:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        with torch.no_grad():
            eager = {k: v.numpy() for k, v in model([rgb])[0].items()}
        try:
            r = compare(eager, detector(rgb))
        except ValueError as e:  # a static graph's input size that the image does not fit
            print(f"{path} ({rgb.shape[1]}x{rgb.shape[0]}): {e}")
            continue
        line = f"{path} ({rgb.shape[1]}x{rgb.shape[0]}): detections eager {r['detections'][0]}, exported {r['detections'][1]}"
        if "labels_equal" in r:
            line += "; labels DIFFER" if not r["labels_equal"] else (
                f"; labels identical ({r['reordered']} in another order), boxes within {r['box_diff']:.2g} px, "
                f"scores within {r['score_diff']:.2g}, mask IoU >= {r['mask_iou_min']:.4f}")
        print(line)


def main():
    args = parse_args()
    model = export(args)
    if args.check:
        check(model, args)


if __name__ == "__main__":
    report_file_errors(main)
