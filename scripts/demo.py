"""Run a detector on an image or a folder of images; save the drawings and the detections.

    python scripts/demo.py photo.jpg --cfg configs/r50_20e.yaml --weights scnet_r50_20e.pth
    python scripts/demo.py images/ --cfg configs/r50_20e.yaml --weights output/r50_20e/checkpoint.pth --out demo
    python scripts/demo.py images/ --cfg configs/r50_20e.yaml --weights W.pth --batch-size 4

A folder runs in batches of ``--batch-size`` images of one network-input shape (read from the file
headers; the same detections as one at a time, scnet/engine/evaluate.py), decoded ahead by
``--workers`` processes.

Every .jpg/.jpeg/.png/.bmp of a folder (sorted) is read as the dataset reads images (EXIF orientation
applied, converted to RGB). For each, ``<out>/<stem>.png`` shows the masks, boxes and labels of the
detections with score >= --score-thresh, and ``<out>/<stem>.json`` lists the same detections as COCO
result dicts: ``bbox`` [x, y, w, h], ``score``, ``category_id``, ``category_name`` and
``segmentation`` (RLE with str counts). There is no ``image_id``: the images are not in a dataset.

Class names and COCO category ids come from the first source that has one per class
(scnet/data/categories.py): ``--categories FILE``, the training annotation file named by the
checkpoint's stored config or by ``--cfg``, the names stored in an official MMDetection checkpoint,
else ``class_<label>``.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import pycocotools.mask as mask_util
import torch
from PIL import ExifTags, Image

import scnet
from scnet.config import get_cfg
from scnet.data.categories import load_categories
from scnet.data.checks import LoadError, decode_image
from scnet.engine.evaluate import input_shape_key, make_batches
from scnet.utils.files import report_file_errors
from scnet.utils.malloc import keep_freed_memory
from scnet.utils.visualize import draw_instances

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="an image file or a folder of images")
    parser.add_argument("--cfg", help="YAML config (default: SCNet R-50 20e)")
    parser.add_argument("--weights", required=True, help="our checkpoint or an official MMDetection one")
    parser.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    parser.add_argument("--score-thresh", type=float, default=0.3, help="draw and save detections >= this")
    parser.add_argument("--categories", help="COCO annotation file whose categories name the classes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass (default 1)")
    parser.add_argument("--workers", type=int, default=1, help="processes decoding the images ahead (0: none)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_intermixed_args()  # the overrides may follow the options
    if args.batch_size < 1 or args.workers < 0:
        parser.error("--batch-size must be at least 1 and --workers at least 0")
    return args


def list_images(path):
    """``[path]`` for a file, else the folder's images with a known extension, sorted by name."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no such image or folder: {path}")
    names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
    return [os.path.join(path, n) for n in names]


def output_stems(paths):
    """File stems, or the whole file name with '.' -> '_' where two images share a stem (a.jpg, a.png)."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    return [s if stems.count(s) == 1 else os.path.basename(p).replace(".", "_") for s, p in zip(stems, paths)]


def coco_results(result, keep, class_names, category_ids):
    """COCO result dicts (bbox xywh, score, category_id/_name, RLE segmentation) of the ``keep`` rows."""
    boxes, scores, labels = result["boxes"].cpu(), result["scores"].cpu(), result["labels"].cpu()
    masks = result.get("masks")
    detections = []
    for i in keep.tolist():
        x1, y1, x2, y2 = boxes[i].tolist()
        label = int(labels[i])
        detection = {"bbox": [round(v, 2) for v in (x1, y1, x2 - x1, y2 - y1)], "score": round(float(scores[i]), 4),
                     "category_id": category_ids[label], "category_name": class_names[label]}
        if masks is not None:
            rle = mask_util.encode(np.asfortranarray(masks[i].cpu().numpy().astype(np.uint8)))
            detection["segmentation"] = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
        detections.append(detection)
    return detections


def header_size(path):
    """(h, w) of an image after its EXIF orientation, from the file header alone; None if unreadable."""
    try:
        with Image.open(path) as image:
            w, h = image.size
            transposed = image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
    except Exception:  # reported when the image is decoded
        return None
    return (w, h) if transposed else (h, w)


class DecodedImages(torch.utils.data.Dataset):
    """``dataset[i]`` -> (image (H, W, 3) uint8 or None, the LoadError's text or None) of ``paths[i]``."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return decode_image(self.paths[i])[0], None
        except LoadError as e:
            return None, str(e)


def batches_of_images(paths, batch_size, model, workers):
    """(indices, [(image or None, error or None)]) per batch of images of one network-input shape."""
    sizes = [header_size(p) for p in paths]
    shape = input_shape_key(model.test_scale, model.size_divisibility, sizes)
    batches = make_batches(list(range(len(paths))), batch_size, lambda i: shape(i) if sizes[i] else ("unread", i))
    loader = torch.utils.data.DataLoader(DecodedImages(paths), batch_sampler=batches, num_workers=workers,
                                         collate_fn=list)
    return zip(batches, loader)


def timed_inference(model, images, device):
    """The model's results for (H, W, 3) uint8 images, and the seconds they took."""
    start = time.perf_counter()
    with torch.inference_mode():
        results = model(images) if images else []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return results, time.perf_counter() - start


def save_image_results(image, result, path, stem, args, class_names, category_ids):
    """``<stem>.png`` (the drawing) and ``<stem>.json`` (the detections >= --score-thresh); a log line."""
    start = time.perf_counter()
    drawing = draw_instances(image, result, class_names, args.score_thresh)
    draw_time = time.perf_counter() - start
    Image.fromarray(drawing).save(os.path.join(args.out, f"{stem}.png"))
    keep = torch.nonzero(result["scores"] >= args.score_thresh).flatten()
    with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
        json.dump(coco_results(result, keep, class_names, category_ids), f)
    return f"{path}: {keep.numel()} detections with score >= {args.score_thresh:g} (of {result['scores'].numel()}); " \
           f"drawing {draw_time * 1000:.0f} ms"


def main():
    args = parse_args()
    cfg = get_cfg(args.cfg, args.overrides)
    device = torch.device(args.device)
    if device.type == "cpu":
        keep_freed_memory()  # large activations reused, not re-mapped per image (scnet/utils/malloc.py)
    model = scnet.build_model(cfg, weights=args.weights).to(device).eval()
    class_names, category_ids, source = load_categories(args.weights, cfg, cfg.model.num_classes,
                                                         args.categories)
    print(f"class names and category ids: {source}")
    paths = list_images(args.input)
    if not paths:
        sys.exit(f"no {'/'.join(IMAGE_EXTENSIONS)} image in {args.input}")
    os.makedirs(args.out, exist_ok=True)
    stems = output_stems(paths)
    for indices, items in batches_of_images(paths, args.batch_size, model, args.workers):
        for i, (_, error) in zip(indices, items):
            if error:
                print(f"{paths[i]}: skipped ({error})")
        decoded = [(i, image) for i, (image, _) in zip(indices, items) if image is not None]
        results, model_time = timed_inference(model, [image for _, image in decoded], device)
        for (i, image), result in zip(decoded, results):
            line = save_image_results(image, result, paths[i], stems[i], args, class_names, category_ids)
            print(f"{line}; model {model_time * 1000 / len(decoded):.0f} ms per image (batch of {len(decoded)})")
    print(f"results in {args.out}")


if __name__ == "__main__":
    report_file_errors(main)
