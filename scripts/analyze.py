"""Error analysis of a COCO results file: where AP is lost, per-category precision-recall, class confusion.

    python scripts/analyze.py output/quickstart/eval/results.json datasets/shapes/annotations/instances_val.json
    python scripts/analyze.py results.json instances_val2017.json --out analysis --iou-types segm

For each IoU type (bbox, segm), into ``--out`` (default: an ``analysis`` folder next to RESULTS):
  <type>_breakdown.png               COCO's breakdown of where AP is lost, all classes, per object size:
                                     C75, C50, Loc, Sim, Oth, BG, FN (scnet/evaluation/analysis.py)
  <type>_breakdown_per_category.png  the same for each category (all sizes)
  <type>_pr_curves.png               per-category precision-recall at IoU 0.5 and 0.75
  <type>_confusion.png               class confusion at IoU 0.5 for detections >= --score-thresh: rows the
                                     true class (+ background: a detection that found no object, on the
                                     background or a duplicate), columns the detected class (+ missed),
                                     each row normalised, counts written in
and ``analysis.md`` (tables: the breakdown per size, and per category its breakdown with true positives,
false positives, misses, precision and recall at --score-thresh) with the same numbers in ``analysis.json``.
Read the breakdown as the AP gained by removing one kind of error: Loc - C50 is localisation, Oth - Loc
confusion between classes, BG - Oth false positives on background, FN - BG missed objects.

Every image of ANN is evaluated, an image without detections counting as all missed (as in eval.py);
``--max-images N`` takes the first N images of ANN, for results of ``eval.py --max-images N``.
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scnet.evaluation.analysis import (  # noqa: E402
    AREAS,
    STAGES,
    breakdown_table,
    confusion_matrix,
    error_breakdown,
)
from scnet.evaluation.coco_eval import check_results, load_ground_truth  # noqa: E402
from scnet.utils.files import report_file_errors  # noqa: E402

# one colour per stage, from the strictest (C75) to the ideal (FN)
STAGE_COLOURS = ("#4c72b0", "#c44e52", "#55a868", "#8172b2", "#ff9900", "#f2d64b", "#d9d9d9")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="COCO results JSON (eval.py's results.json)")
    parser.add_argument("ann", help="the ground-truth COCO annotation JSON")
    parser.add_argument("--out", help="output folder (default: <folder of RESULTS>/analysis)")
    parser.add_argument("--iou-types", nargs="+", choices=("bbox", "segm"), default=["bbox", "segm"])
    parser.add_argument("--max-images", type=int, default=0,
                        help="analyse the first N images of ANN only, as eval.py --max-images (0: all)")
    parser.add_argument("--score-thresh", type=float, default=0.3,
                        help="detections counted in the confusion matrix and the precision/recall columns")
    return parser.parse_args()


def load_results(path, coco_gt):
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {path}: not a readable JSON file ({e})") from None
    if not isinstance(results, list):
        raise SystemExit(f"error: {path} is not a COCO results list")
    try:
        check_results(coco_gt, results, sorted(coco_gt.getImgIds()))
    except ValueError as e:
        raise SystemExit(f"error: {path}: {e}") from None
    return results


def stacked_breakdown(ax, precision, title):
    """The COCO toolkit's plot: each stage's PR curve filled down to the previous one, AP in the legend."""
    recall = np.linspace(0, 1, precision.shape[1])
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="recall", ylabel="precision", title=title)
    if np.isnan(precision).all():
        ax.text(0.5, 0.5, "no ground truth objects here", ha="center", va="center")
        return
    with np.errstate(invalid="ignore"):
        curves = np.nan_to_num(np.nanmean(precision, axis=2) if precision.ndim == 3 else precision)
    for s in range(len(STAGES) - 1, -1, -1):  # FN (everything) first, C75 on top
        ax.fill_between(recall, curves[s], curves[s - 1] if s else 0, color=STAGE_COLOURS[s], linewidth=0)
        ax.plot(recall, curves[s], color="black", linewidth=0.6)
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=c, edgecolor="black", linewidth=0.5) for c in STAGE_COLOURS]
    labels = [f"[{curves[s].mean():.3f}] {name}" for s, name in enumerate(STAGES)]
    ax.legend(handles, labels, loc="lower left", fontsize=7, framealpha=0.9)


def _grid(n):
    cols = int(np.ceil(np.sqrt(n)))
    return int(np.ceil(n / cols)), cols


def plot_breakdown(breakdown, names, iou_type, out):
    fig, axes = plt.subplots(1, len(AREAS), figsize=(4.2 * len(AREAS), 4.2))
    for a, (ax, area) in enumerate(zip(axes, AREAS)):
        stacked_breakdown(ax, breakdown[:, :, :, a], f"{iou_type}, all classes, {area} objects")
    _save(fig, os.path.join(out, f"{iou_type}_breakdown.png"))
    rows, cols = _grid(len(names))
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.4 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k < len(names):
            stacked_breakdown(ax, breakdown[:, :, k, 0], names[k])
        else:
            ax.axis("off")
    _save(fig, os.path.join(out, f"{iou_type}_breakdown_per_category.png"))


def plot_pr_curves(breakdown, names, iou_type, out):
    recall = np.linspace(0, 1, breakdown.shape[1])
    rows, cols = _grid(len(names))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= len(names):
            ax.axis("off")
            continue
        for stage, iou, colour in ((1, "0.5", "#4c72b0"), (0, "0.75", "#c44e52")):
            curve = breakdown[stage, :, k, 0]
            if not np.isnan(curve).all():
                ax.plot(recall, curve, color=colour, label=f"IoU {iou}: AP {np.nanmean(curve):.3f}")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), title=names[k], xlabel="recall", ylabel="precision")
        ax.legend(loc="lower left", fontsize=7) if ax.lines else ax.text(0.5, 0.5, "no ground truth", ha="center")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{iou_type}: precision-recall per category (max 100 detections per image)")
    _save(fig, os.path.join(out, f"{iou_type}_pr_curves.png"))


def plot_confusion(matrix, names, iou_type, score_thresh, out):
    rows, cols = names + ["background"], names + ["missed"]
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    size = max(4.5, 0.32 * len(rows) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the row")
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7 if len(cols) > 20 else 9)
    ax.set_yticks(range(len(rows)), rows, fontsize=7 if len(rows) > 20 else 9)
    ax.set(xlabel="detected as", ylabel="true class",
           title=f"{iou_type} confusion at IoU 0.5, score >= {score_thresh:g}")
    if len(rows) <= 30:  # the counts, where they fit
        for i, j in zip(*np.nonzero(matrix)):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black")
    _save(fig, os.path.join(out, f"{iou_type}_confusion.png"))


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"  {path}")


def operating_point(matrix, names):
    """Per category at the score threshold: true positives, false positives, misses, precision, recall."""
    k = len(names)
    table = {}
    for i, name in enumerate(names):
        tp = int(matrix[i, i])
        fp = int(matrix[:, i].sum() - tp)  # background and other classes detected as this one
        fn = int(matrix[i, :].sum() - tp)  # missed, or detected as another class
        table[name] = {"tp": tp, "fp": fp, "fn": fn, "precision": tp / (tp + fp) if tp + fp else None,
                       "recall": tp / (tp + fn) if tp + fn else None}
    assert matrix.shape == (k + 1, k + 1)
    return table


def _cell(value, digits=3):
    return "-" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def markdown(report, score_thresh):
    lines = []
    for iou_type, r in report.items():
        lines += [f"## {iou_type}", "", "Where AP is lost (mean precision over recall, max 100 detections):", "",
                  "| objects | " + " | ".join(STAGES) + " |", "|---" * (len(STAGES) + 1) + "|"]
        for area, row in r["breakdown"].items():
            lines.append(f"| {area} | " + " | ".join(_cell(row[s]) for s in STAGES) + " |")
        lines += ["", f"Per category (all sizes); tp/fp/fn, precision and recall at IoU 0.5, score >= {score_thresh:g}:",
                  "", "| category | " + " | ".join(STAGES) + " | tp | fp | fn | precision | recall |",
                  "|---" * (len(STAGES) + 6) + "|"]
        for name, row in r["per_category"].items():
            point = r["operating_point"][name]
            cells = [_cell(row[s]) for s in STAGES] + [_cell(point[c]) for c in ("tp", "fp", "fn", "precision", "recall")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main():
    args = parse_args()
    coco_gt = load_ground_truth(args.ann)
    results = load_results(args.results, coco_gt)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.results)), "analysis")
    os.makedirs(out, exist_ok=True)
    names = [c["name"] for c in coco_gt.loadCats(sorted(coco_gt.getCatIds()))]
    image_ids = [image["id"] for image in coco_gt.dataset["images"]]  # the file's order, as eval.py's
    if args.max_images:
        image_ids = image_ids[: args.max_images]
        selected = set(image_ids)
        results = [r for r in results if r["image_id"] in selected]
    with_detections = len({r["image_id"] for r in results})
    if with_detections < len(image_ids):
        print(f"warning: {len(image_ids) - with_detections} of the {len(image_ids)} images have no detection: "
              "their objects count as missed (--max-images N if the results cover the first N only)")
    report = {}
    for iou_type in args.iou_types:
        if iou_type == "segm" and results and "segmentation" not in results[0]:
            print("segm: the results have no masks; skipped")
            continue
        print(f"{iou_type}: {len(results)} detections on {len(image_ids)} images, {len(names)} categories")
        breakdown = error_breakdown(coco_gt, results, iou_type, image_ids)
        matrix = confusion_matrix(coco_gt, results, iou_type, 0.5, args.score_thresh, image_ids)
        plot_breakdown(breakdown, names, iou_type, out)
        plot_pr_curves(breakdown, names, iou_type, out)
        plot_confusion(matrix, names, iou_type, args.score_thresh, out)
        report[iou_type] = {
            "breakdown": {area: breakdown_table(breakdown, coco_gt, area)["overall"] for area in AREAS},
            "per_category": breakdown_table(breakdown, coco_gt)["per_category"],
            "operating_point": operating_point(matrix, names),
            "confusion": {"rows": names + ["background"], "columns": names + ["missed"], "counts": matrix.tolist()},
        }
    with open(os.path.join(out, "analysis.json"), "w") as f:
        json.dump(report, f, indent=1)
    text = markdown(report, args.score_thresh)
    with open(os.path.join(out, "analysis.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"tables in {os.path.join(out, 'analysis.md')} and analysis.json")


if __name__ == "__main__":
    report_file_errors(main)
