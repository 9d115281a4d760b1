"""Evaluate a checkpoint on a COCO-format validation set (bbox and segm AP, as the official
implementation computes them: docs/official_implementation_2.md, sections 13 and 16.2), or evaluate an
existing results file.

    python scripts/eval.py --cfg configs/r50_20e.yaml --weights scnet_r50_20e.pth [--tta] [key.sub=value ...]
    python scripts/eval.py --cfg configs/r50_20e.yaml --weights scnet_r50_20e.pth --batch-size 4
    torchrun --nproc_per_node 8 scripts/eval.py --cfg configs/r50_20e.yaml --weights W.pth
    python scripts/eval.py --results output/r50_20e/eval/results.json --ann data/coco/annotations/instances_val2017.json
    python scripts/eval.py --cfg configs/r50_20e.yaml --weights W.pth --format-only \
        data.val_annotations=annotations/image_info_test-dev2017.json data.val_images=test2017

The images (cfg.data.root / cfg.data.val_images, annotations cfg.data.val_annotations) are split over
the processes and the results gathered on rank 0, which writes ``<output-dir>/results.json`` (COCO
results format, original category ids) and ``metrics.json``, and prints pycocotools' 12-number
summaries, a per-category AP table and, as the last stdout line, a one-line JSON summary. Warnings
and the progress bar go to stderr.

On a split without public ground truth (test-dev: its annotation file has no "annotations"), or with
--format-only, nothing is evaluated: the results are checked and written as the zips COCO's evaluation
server takes, ``<output-dir>/submission/{bbox,segm}/detections_<testset>_<alg>_results.zip``
(scnet/evaluation/submission.py), and the JSON line names them.
"""
import argparse
import json
import os
import sys
import warnings

import torch

import scnet
from scnet.config import get_cfg
from scnet.data.coco import CocoDataset
from scnet.engine import dist
from scnet.engine.compile import compile_dense_parts
from scnet.engine.evaluate import gather_results, inference_on_dataset, input_shape_key
from scnet.modeling.tta import TestTimeAugmentation
from scnet.utils.files import FileError, report_file_errors
from scnet.utils.malloc import keep_freed_memory
from scnet.evaluation.coco_eval import (
    IOU_TYPES,
    check_results,
    evaluate,
    format_per_category_table,
    format_summary,
    load_ground_truth,
    summary_line,
)
from scnet.evaluation.submission import testset_name, write_submission


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", help="YAML config (default: SCNet R-50 20e)")
    parser.add_argument("--weights", help="checkpoint: ours ({'model': state_dict}) or an official MMDetection one")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation: flip x 5 scales, merged as the official implementation "
                             "merges them (docs/official_implementation_2.md, section 15)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the dense parts (scnet/engine/compile.py)")
    parser.add_argument("--output-dir", help="default: output/<config name>/eval, or the folder of --results")
    parser.add_argument("--max-images", type=int, default=0, help="evaluate the first N images only (0: all)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="images per forward pass and process, grouped by network-input shape: the same "
                             "detections as 1 (scnet/engine/evaluate.py)")
    parser.add_argument("--results", help="evaluate this COCO results JSON instead of running a model")
    parser.add_argument("--ann", help="with --results: the ground-truth annotation JSON")
    parser.add_argument("--format-only", action="store_true",
                        help="write the upload files for COCO's evaluation server instead of evaluating (implied "
                             "by an annotation file without annotations, such as image_info_test-dev2017.json)")
    parser.add_argument("--alg", help="the algorithm's name in the upload files (default: the config's name)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_args()
    if args.results and (args.weights or args.tta or args.cfg or args.overrides):
        parser.error("--results evaluates a file: it takes --ann, --output-dir, --max-images, --format-only "
                     "and --alg only")
    if args.results and not args.ann:
        parser.error("--results needs --ann (the ground-truth annotation JSON)")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if not args.results and not args.weights:
        parser.error("--weights is required to evaluate a model (or give --results and --ann)")
    return args


def build_predict(model, tta, test_cfg):
    """A list of (3, H, W) uint8 images -> the model's output dicts, plain or with test-time augmentation
    (one image at a time: it runs 10 passes of each)."""
    if tta:
        augmented = TestTimeAugmentation(model, [tuple(s) for s in test_cfg.tta_scales], test_cfg.tta_flip)
        return lambda images: [augmented(image) for image in images]
    return model


def run_model(args):
    device = dist.init_distributed()
    if device.type == "cpu":
        keep_freed_memory()  # large activations reused, not re-mapped per image (scnet/utils/malloc.py)
    cfg = get_cfg(args.cfg, args.overrides)
    log = print if dist.is_main_process() else (lambda *a: None)
    if "://" not in args.weights and not os.path.isfile(args.weights):  # before minutes of reading data
        raise FileError(f"{args.weights}: no such file")
    dataset = CocoDataset(os.path.join(cfg.data.root, cfg.data.val_annotations),
                          os.path.join(cfg.data.root, cfg.data.val_images), semantic_source="none", training=False)
    if cfg.model.num_classes != dataset.num_classes:
        raise SystemExit(f"error: the model has {cfg.model.num_classes} classes, the dataset "
                         f"{dataset.num_classes}: set model.num_classes or pick the right annotations")
    if dist.is_main_process() and dataset.skipped:  # e.g. missing image files: their ground truth is left out
        shown = "; ".join(f"{name} ({reason})" for name, reason in dataset.skipped[:10])
        more = " ..." if len(dataset.skipped) > 10 else ""
        warnings.warn(f"{len(dataset.skipped)} images not evaluated: {shown}{more}")
    model = scnet.build_model(cfg, weights=args.weights).to(device).eval()
    if args.compile:
        compile_dense_parts(model)
    indices = range(min(args.max_images, len(dataset)) if args.max_images else len(dataset))
    log(f"{len(indices)} images, {dist.get_world_size()} process(es) x batch {args.batch_size}, "
        f"{'TTA' if args.tta else 'single scale'}, "
        f"weights {args.weights}")
    with torch.no_grad():
        predict = build_predict(model, args.tta, cfg.model.test)
        key = input_shape_key(model.test_scale, model.size_divisibility, dataset.image_sizes)
        results, info = inference_on_dataset(predict, dataset, dataset.category_ids, dist.get_rank(),
                                             dist.get_world_size(), indices=indices, num_workers=cfg.data.num_workers,
                                             batch_size=args.batch_size, batch_key=key)
    results = gather_results(results)
    infos = dist.all_gather_object(info)
    if dist.is_main_process():
        output_dir = args.output_dir or os.path.join("output", _config_name(args.cfg), "eval")
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "results.json"), "w") as f:
            json.dump(results, f)
        image_ids = sorted(i for info in infos for i in info["image_ids"])
        seconds = max(info["seconds"] for info in infos)  # the processes run side by side
        skipped = len(dataset.skipped) + sum(len(info["skipped"]) for info in infos)
        extra = {"images": len(image_ids), "skipped_images": skipped, "detections": len(results),
                 "seconds": round(seconds, 3), "images_per_s": round(len(image_ids) / max(seconds, 1e-9), 3)}
        finish(args, os.path.join(cfg.data.root, cfg.data.val_annotations), results, image_ids, output_dir, extra)
    dist.cleanup()


def run_results_file(args):
    try:
        with open(args.results) as f:
            results = json.load(f)
    except (OSError, ValueError) as e:  # missing, unreadable, not JSON (ValueError: JSONDecodeError, bad UTF-8)
        raise SystemExit(f"error: {args.results}: not a readable JSON file ({e})") from None
    if not isinstance(results, list):
        raise SystemExit(f"error: {args.results} is not a COCO results list")
    coco_gt = load_ground_truth(args.ann)
    # the annotation file's order, as CocoDataset's (so --max-images picks the same images)
    image_ids = [image["id"] for image in coco_gt.dataset["images"]]
    try:  # every entry well-formed (ids, a finite score, a 4-number box), before any is used
        check_results(coco_gt, results, image_ids)
    except ValueError as e:
        raise SystemExit(f"error: {args.results}: {e}") from None
    if args.max_images:
        image_ids = image_ids[: args.max_images]
        selected = set(image_ids)
        results = [r for r in results if r["image_id"] in selected]
    output_dir = args.output_dir or os.path.dirname(os.path.abspath(args.results))
    finish(args, args.ann, results, image_ids, output_dir, {"images": len(image_ids), "detections": len(results)},
           coco_gt)


def finish(args, annotation_file, results, image_ids, output_dir, extra, coco_gt=None):
    """Evaluate and report; or, with --format-only or a ground truth without annotations, write the
    upload files for COCO's evaluation server."""
    coco_gt = load_ground_truth(coco_gt or annotation_file)
    if not args.format_only and "annotations" in coco_gt.dataset:
        return report(coco_gt, results, image_ids, output_dir, extra)
    if not args.format_only:
        print(f"{annotation_file} has no annotations (a split without public ground truth): writing the upload "
              "files for COCO's evaluation server, nothing evaluated", file=sys.stderr)
    if len(image_ids) < len(coco_gt.getImgIds()):
        print(f"WARNING: results for {len(image_ids)} of the {len(coco_gt.getImgIds())} images of {annotation_file} "
              "(--max-images, or images that could not be read): the server counts the others as all missed",
              file=sys.stderr)
    alg = args.alg or (_config_name(args.cfg) if args.cfg else "scnet")
    try:
        check_results(coco_gt, results, image_ids)
        paths = write_submission(results, coco_gt, output_dir, testset_name(annotation_file), alg)
    except ValueError as e:
        raise SystemExit(f"error: {args.results or 'the results'}: {e}") from None
    for iou_type, path in paths.items():
        print(f"{iou_type}: {path} (upload to the {iou_type} track)")
    print(json.dumps(dict(extra, submission=paths)), flush=True)


def report(coco_gt, results, image_ids, output_dir, extra):
    """Evaluate, write metrics.json, print the summaries; the JSON summary is the last stdout line."""
    coco_gt = load_ground_truth(coco_gt)
    metrics = evaluate(coco_gt, results, IOU_TYPES, image_ids=image_ids)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump(dict(metrics, **extra), f, indent=1)
    for iou_type in IOU_TYPES:
        print(format_summary(metrics[iou_type], iou_type), end="\n\n")
    print("Per-category AP@[.5:.95]:")
    print(format_per_category_table(metrics), end="\n\n")
    print(f"{len(image_ids)} of the {len(coco_gt.getImgIds())} ground-truth images evaluated; "
          f"results and metrics in {output_dir}")
    print(summary_line(metrics, **extra), flush=True)


def _config_name(path):
    return os.path.splitext(os.path.basename(path))[0] if path else "default"


def main():
    args = parse_args()
    if args.results:
        run_results_file(args)
    else:
        run_model(args)


if __name__ == "__main__":
    report_file_errors(main)
