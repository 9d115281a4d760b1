"""SCNet paper Figure 1 as a tool: IoU of the samples that reach the mask branch, training vs inference.

    python scripts/iou_distribution.py --cfg configs/r50_20e.yaml --weights W --num-images 500 [key=value ...]

(a) Training: the model in training mode (under no_grad) on the first N images of the training set
    (``cfg.data``, built as scripts/train.py builds it, not flipped), with the RoI sampling seeded by
    ``cfg.seed``. Wrapping ``roi_heads._match_and_sample`` records the IoU of every positive RoI with
    its GT (the sampled GT boxes themselves included, IoU 1, as the mask branch sees them):
      - with sample consistency: the last stage's positives, what SCNet's single mask branch trains on;
      - without: the positives of every stage, what Cascade Mask R-CNN's stage-wise mask branches
        train on.
(b) Inference: the model in eval mode on the first N images of the val split (original sizes). Each
    detection with score >= --score-thresh counts with its IoU to the best GT box of its class (0 when
    there is none): the final detections are what the mask branch sees at test time.
(c) One PNG (matplotlib) with the three histograms (bins of 0.05 on [0.5, 1] as in the paper; bar = % of all the
    samples of that panel), the percentages of samples with IoU < 0.5 / 0.6 / 0.7 / 0.75 in red on the
    charts and on stdout, and a JSON next to the PNG with the raw numbers.
"""
import argparse
import contextlib
import json
import os
import random

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import scnet  # noqa: E402
from scnet.config import get_cfg  # noqa: E402
from scnet.data.build import build_train_dataset  # noqa: E402
from scnet.data.coco import CocoDataset  # noqa: E402
from scnet.ops.boxes import box_iou  # noqa: E402
from scnet.utils.files import report_file_errors  # noqa: E402

THRESHOLDS = (0.5, 0.6, 0.7, 0.75)  # the red percentages of the paper's Figure 1
BIN_EDGES = np.round(np.linspace(0.5, 1.0, 11), 2)  # bins of 0.05, as in the paper
PANELS = (
    ("training_without_sample_consistency", "Training w/o sample consistency", (245, 130, 49)),
    ("training_with_sample_consistency", "Training w/ sample consistency", (67, 99, 216)),
    ("inference", "Inference", (60, 180, 75)),
)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", help="YAML config (default: SCNet R-50 20e)")
    parser.add_argument("--weights", required=True, help="our checkpoint or an official MMDetection one")
    parser.add_argument("--num-images", type=int, default=100, help="images of each split (0: all)")
    parser.add_argument("--score-thresh", type=float, default=0.05, help="inference detections counted")
    parser.add_argument("--out", default="iou_distribution.png", help="the chart; the JSON goes next to it")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    return parser.parse_intermixed_args()


def matched_ious(boxes, gt_boxes):
    """(P,) IoU of each row of ``boxes`` with the same row of ``gt_boxes`` (both (P, 4) xyxy)."""
    if boxes.shape[0] == 0:
        return boxes.new_zeros(0)
    return box_iou(boxes, gt_boxes).diagonal()


@contextlib.contextmanager
def recording_positive_ious(roi_heads):
    """Wrap ``roi_heads._match_and_sample``; yields {stage: [per-image (P,) IoU tensors]}; unwraps after."""
    original = roi_heads._match_and_sample
    ious = {stage: [] for stage in range(roi_heads.num_stages)}

    def match_and_sample(stage, proposals, target):
        samples = original(stage, proposals, target)
        positives = samples.positive_boxes
        ious[stage].append(matched_ious(positives, target["boxes"][samples.matched_gt]).cpu())
        return samples

    roi_heads._match_and_sample = match_and_sample  # an instance attribute shadows the method
    try:
        yield ious
    finally:
        del roi_heads._match_and_sample  # the class's method is visible again


def training_ious(model, dataset, num_images, seed, device):
    """{stage: (P_total,) IoUs of that stage's positives} over the first ``num_images`` images."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # the RoI sampler draws with torch's generator
    model.train()
    with recording_positive_ious(model.roi_heads) as ious, torch.no_grad():
        for i in range(num_images):
            image, target = dataset[i]
            model([image.to(device)], [target])
    return {stage: torch.cat(values).numpy() if values else np.zeros(0) for stage, values in ious.items()}


def best_same_class_ious(result, target, score_thresh):
    """(D,) for the detections with score >= score_thresh: max IoU with a GT box of the same class, else 0."""
    keep = result["scores"] >= score_thresh
    boxes, labels = result["boxes"][keep].cpu(), result["labels"][keep].cpu()
    gt_boxes, gt_labels = target["boxes"].float(), target["labels"]
    if gt_boxes.shape[0] == 0 or boxes.shape[0] == 0:
        return np.zeros(boxes.shape[0])
    iou = box_iou(boxes, gt_boxes) * (labels[:, None] == gt_labels[None, :])
    return iou.max(dim=1).values.numpy()


def inference_ious(model, dataset, num_images, score_thresh, device):
    model.eval()
    ious = []
    with torch.inference_mode():
        for i in range(num_images):
            image, target = dataset[i]
            result = model([image.to(device)])[0]
            ious.append(best_same_class_ious(result, target, score_thresh))
    return np.concatenate(ious) if ious else np.zeros(0)


def summarise(ious):
    """Sample count, % below each threshold (None without samples), % of all samples per bin."""
    n = int(ious.size)
    below = {f"{t:g}": (100.0 * float(np.mean(ious < t)) if n else None) for t in THRESHOLDS}
    counts, _ = np.histogram(ious, BIN_EDGES)  # IoU 1.0 falls in the last bin
    return {"num_samples": n, "percent_below": below, "histogram_percent": (100.0 * counts / max(n, 1)).tolist()}


def _percent(value):
    return "n/a" if value is None else f"{value:.1f}%"


def plot_panel(ax, summary, title, colour, description):
    """One histogram: bars of % of the samples per IoU bin, a dashed line at each threshold with the % of
    the samples below it in red, the sample count and what the samples are under the axis."""
    below = summary["percent_below"]
    heights = summary["histogram_percent"]
    ax.bar(BIN_EDGES[:-1], heights, width=np.diff(BIN_EDGES), align="edge", color=np.array(colour) / 255,
           edgecolor="white", linewidth=0.5)
    top = max(max(heights, default=0), 1.0) * 1.25
    for t in THRESHOLDS:
        ax.axvline(t, color="#dc1414", linestyle="--", linewidth=1)
        ax.text(t + 0.005, top * 0.97, _percent(below[f"{t:g}"]), color="#dc1414", fontsize=9, va="top")
    ax.set(xlim=(BIN_EDGES[0], BIN_EDGES[-1]), ylim=(0, top), title=title, xlabel="IoU with the ground truth",
           ylabel="% of samples")
    ax.text(0.0, -0.2, f"{description}\nn = {summary['num_samples']}; IoU < 0.5: {_percent(below['0.5'])} "
            "(left of the axis)\nred: % of the samples with an IoU below the dashed line",
            transform=ax.transAxes, fontsize=8, va="top")


def print_table(summaries):
    header = f"{'':40s}{'samples':>9s}" + "".join(f"{'< ' + format(t, 'g'):>9s}" for t in THRESHOLDS)
    print(header)
    for key, title, _ in PANELS:
        s = summaries[key]
        print(f"{title:40s}{s['num_samples']:9d}" + "".join(f"{_percent(v):>9s}" for v in s["percent_below"].values()))


def main():
    args = parse_args()
    cfg = get_cfg(args.cfg, args.overrides)
    device = torch.device(args.device)
    model = scnet.build_model(cfg, weights=args.weights).to(device)
    train_set = build_train_dataset(cfg)
    d = cfg.data
    val_set = CocoDataset(os.path.join(d.root, d.val_annotations), os.path.join(d.root, d.val_images),
                          semantic_source="none", training=False)
    num_train = min(args.num_images or len(train_set), len(train_set))
    num_val = min(args.num_images or len(val_set), len(val_set))

    # inference first: a training-mode forward would update the statistics of any unfrozen norm layer
    inference = inference_ious(model, val_set, num_val, args.score_thresh, device)
    per_stage = training_ious(model, train_set, num_train, cfg.seed, device)
    last = max(per_stage)
    samples = {
        "training_without_sample_consistency": np.concatenate(list(per_stage.values())),
        "training_with_sample_consistency": per_stage[last],
        "inference": inference,
    }
    summaries = {key: summarise(values) for key, values in samples.items()}
    summaries["training_without_sample_consistency"]["num_samples_per_stage"] = [len(v) for v in per_stage.values()]
    descriptions = {
        "training_without_sample_consistency": f"positives of all {last + 1} stages, {num_train} train images",
        "training_with_sample_consistency": f"positives of the last stage, {num_train} train images",
        "inference": f"detections with score >= {args.score_thresh:g}, {num_val} val images",
    }
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5.6 * len(PANELS), 5.2))
    for ax, (key, title, colour) in zip(axes, PANELS):
        plot_panel(ax, summaries[key], title, colour, descriptions[key])
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=100)
    plt.close(fig)
    report = {"weights": args.weights, "num_images": {"train": num_train, "val": num_val},
              "score_thresh": args.score_thresh, "thresholds": list(THRESHOLDS), "bin_edges": BIN_EDGES.tolist(),
              "distributions": {key: dict(summaries[key], description=descriptions[key]) for key in summaries}}
    json_path = os.path.splitext(args.out)[0] + ".json"
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    print_table(summaries)
    print(f"chart: {args.out}; numbers: {json_path}")


if __name__ == "__main__":
    report_file_errors(main)
