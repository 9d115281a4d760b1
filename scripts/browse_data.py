"""Look at the training data as the model receives it: ground-truth masks, boxes and class names, and
the semantic branch's target, after the training transforms (resize to ``model.input.train_scale``,
horizontal flip), for the first N images of a split. The quickest check that a custom dataset is read
right: a box off its object, a mask of the wrong instance, a class name on the wrong object, a stuff
map that does not line up, all show at a glance.

    python scripts/browse_data.py --cfg configs/quickstart.yaml --num-images 8 --out browse
    python scripts/browse_data.py --cfg configs/r50_20e.yaml --split val --start 100 --num-images 4

Each ``<out>/<index>_<file stem>.png`` holds two panels: the image with the instances (one colour per
instance, "name" at the top-left corner of its box), and the semantic target over a grey copy of the
image, with a legend of its labels (ignored pixels, 255, black). The train split reads the images as
training does (``data.semantic_source`` decides the semantic target); ``--flip`` random flips with
``data.flip_prob`` (seeded), ``all`` or ``none``. The val split shows the original images, unflipped,
without a semantic target. Problems met while loading (and what was done) are printed per image.
"""
import argparse
import os
import random

import numpy as np
from PIL import Image, ImageDraw

from scnet.config import get_cfg, semantic_branch
from scnet.data.build import build_train_dataset
from scnet.data.coco import CocoDataset
from scnet.utils.files import report_file_errors
from scnet.utils.visualize import PALETTE, draw_instances, font_size_for, get_font

IGNORED = 255
BACKGROUND = (110, 110, 110)  # the background label of data.semantic_source=instances


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", help="YAML config (default: SCNet R-50 20e)")
    parser.add_argument("--split", choices=("train", "val"), default="train",
                        help="train: after the training transforms (default); val: the original images")
    parser.add_argument("--start", type=int, default=0, help="first dataset index (default 0)")
    parser.add_argument("--num-images", type=int, default=8, help="how many images (default 8)")
    parser.add_argument("--flip", choices=("random", "all", "none"), default="random",
                        help="train split: flip as training would (random, data.flip_prob), always or never")
    parser.add_argument("--out", default="browse_data", help="output folder (default: browse_data)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    return parser.parse_intermixed_args()


def build_dataset(cfg, split):
    if split == "train":
        return build_train_dataset(cfg)
    d = cfg.data
    return CocoDataset(os.path.join(d.root, d.val_annotations), os.path.join(d.root, d.val_images),
                       semantic_source="none", training=False)


def semantic_names(dataset):
    """Label value of the semantic target -> a name for the legend."""
    if dataset.semantic_source == "instances":  # labels 0..C-1 of the instances, C the background
        return lambda v: dataset.class_names[v] if v < dataset.num_classes else "background"
    things = dict(zip(dataset.category_ids, dataset.class_names))  # stuff maps: thing = category id - 1
    return lambda v: things.get(v + 1, f"stuff id {v + 1}")


def semantic_panel(image, semantic, name_of):
    """The target's labels in colour over a grey copy of the image, and a legend strip below it."""
    grey = np.repeat(image.mean(axis=2, keepdims=True), 3, axis=2) * 0.5 + 64
    values = sorted(int(v) for v in np.unique(semantic))
    colours = np.zeros((256, 3), np.float64)  # by rank among the labels present: neighbours differ
    labels = [v for v in values if v != IGNORED]
    for rank, v in enumerate(v for v in labels if name_of(v) != "background"):
        colours[v] = PALETTE[rank % len(PALETTE)]
    colours[[v for v in labels if name_of(v) == "background"]] = BACKGROUND
    painted = np.where((semantic == IGNORED)[..., None], 0, 0.35 * grey + 0.65 * colours[semantic])
    height, width = semantic.shape
    font = get_font(font_size_for(height, width))
    entries = [(v, "ignored" if v == IGNORED else f"{name_of(v)} ({v})") for v in values]
    line = font.getbbox("Ag")[3] + 4
    legend = Image.new("RGB", (width, line * len(entries) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    for row, (v, text) in enumerate(entries):
        y = 2 + row * line
        draw.rectangle([2, y + 1, line - 2, y + line - 3], fill=tuple(int(c) for c in colours[v]), outline=(0, 0, 0))
        draw.text((line + 2, y), text, fill=(0, 0, 0), font=font)
    return np.concatenate([painted.astype(np.uint8), np.asarray(legend)], axis=0)


def draw_item(image, target, class_names, name_of):
    """(H', W', 3) uint8: the instances panel, and the semantic panel when the target has one."""
    image = image.permute(1, 2, 0).numpy()
    ground_truth = {"boxes": target["boxes"], "labels": target["labels"], "masks": target["masks"].bool(),
                    "scores": np.ones(len(target["labels"]))}
    panels = [draw_instances(image, ground_truth, class_names, score_thresh=0, show_scores=False)]
    if "semantic_seg" in target:
        panels.append(semantic_panel(image, target["semantic_seg"].numpy(), name_of))
    height = max(p.shape[0] for p in panels)
    gap = np.full((height, 8, 3), 255, np.uint8)
    padded = [np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0)), constant_values=255) for p in panels]
    return np.concatenate([padded[0], *[np.concatenate([gap, p], axis=1) for p in padded[1:]]], axis=1)


def main():
    args = parse_args()
    cfg = get_cfg(args.cfg, args.overrides)
    if args.split == "train" and not semantic_branch(cfg.model):
        cfg.data.semantic_source = "none"
    dataset = build_dataset(cfg, args.split)
    indices = range(args.start, min(args.start + args.num_images, len(dataset)))
    if not indices:
        raise SystemExit(f"error: --start {args.start} is past the {len(dataset)} images of the {args.split} split")
    os.makedirs(args.out, exist_ok=True)
    print(f"{args.split}: {len(dataset)} images; {len(dataset.skipped)} skipped while reading the annotations")
    for index in indices:
        coin = random.Random(cfg.seed * 100003 + index).random()  # the same flip for an index, whatever --start
        flip = {"all": True, "none": False}.get(args.flip, coin < cfg.data.flip_prob)
        image, target = dataset[(index, flip and args.split == "train")]
        picture = draw_item(image, target, dataset.class_names, semantic_names(dataset))
        stem = os.path.splitext(os.path.basename(target["file_name"]))[0]
        path = os.path.join(args.out, f"{index:05d}_{stem}.png")
        Image.fromarray(picture).save(path)
        h, w = target["original_size"]
        print(f"{path}: {target['file_name']} {w}x{h} -> {image.shape[2]}x{image.shape[1]}"
              f"{', flipped' if target['flipped'] else ''}; {len(target['labels'])} instances")
        for issue in target["issues"]:
            print(f"  {issue}")


if __name__ == "__main__":
    report_file_errors(main)
