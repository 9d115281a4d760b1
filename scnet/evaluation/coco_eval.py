"""COCO evaluation, [impl 13] step 8 and [impl 16.2]: detections -> COCO results -> pycocotools bbox/segm AP.

A result dict is COCO's results format: ``image_id``, ``category_id`` (the ORIGINAL COCO id,
``category_ids[label]``: contiguous labels never leave our code), ``bbox``
[x, y, w, h] with w = x2 - x1 (no "+1", [impl 24.2]), ``score`` and ``segmentation``, a compressed RLE
whose ``counts`` is a str so that the list is JSON-serialisable.

    results = instances_to_coco(model([image])[0], image_id, dataset.category_ids)
    metrics = evaluate("annotations/instances_val2017.json", results)
    print(format_summary(metrics["bbox"], "bbox"))

Numbers keep pycocotools' scale (0..1) and its convention that -1 means "no ground truth here" (e.g.
AP_small on images without small objects); per-category AP is None for a category without ground
truth in the evaluated images.
"""
import contextlib
import io
import json
import math
import warnings

import numpy as np
import torch
import pycocotools.mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

IOU_TYPES = ("bbox", "segm")
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# (kind, IoU threshold or None for 0.50:0.95, area range, max detections), in COCOeval.summarize order
SUMMARY_ROWS = (
    ("AP", None, "all", 100), ("AP", 0.5, "all", 100), ("AP", 0.75, "all", 100),
    ("AP", None, "small", 100), ("AP", None, "medium", 100), ("AP", None, "large", 100),
    ("AR", None, "all", 1), ("AR", None, "all", 10), ("AR", None, "all", 100),
    ("AR", None, "small", 100), ("AR", None, "medium", 100), ("AR", None, "large", 100),
)


# --- model output -> COCO results --------------------------------------------------------------------
def instances_to_coco(result, image_id, category_ids):
    """One image's detections (the detector's output dict) -> list of COCO result dicts.

    ``result``: boxes (D, 4) xyxy, scores (D,), labels (D,) contiguous, masks (D, H, W) bool (optional),
    mask_scores (D,) (optional, Mask Scoring R-CNN: kept as ``mask_score`` and used for segm AP).
    ``category_ids[label]`` is the COCO category id of a contiguous label.
    """
    boxes = _numpy(result["boxes"]).astype(np.float64).reshape(-1, 4)
    scores = _numpy(result["scores"]).astype(np.float64).reshape(-1)
    labels = _numpy(result["labels"]).astype(np.int64).reshape(-1)
    if len(boxes) == 0:
        return []
    if labels.min() < 0 or labels.max() >= len(category_ids):
        raise ValueError(f"image {image_id}: labels {sorted(set(labels.tolist()))} outside 0..{len(category_ids) - 1}: "
                         "does the model have more classes than the dataset?")
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)  # w = x2 - x1 [impl 13]
    rles = encode_masks(_numpy(result["masks"])) if "masks" in result else None
    image_id = int(image_id)
    coco = []
    for i in range(len(boxes)):
        entry = {"image_id": image_id, "category_id": int(category_ids[labels[i]]),
                 "bbox": [float(v) for v in xywh[i]], "score": float(scores[i])}
        if rles is not None:
            entry["segmentation"] = rles[i]
        if "mask_scores" in result:
            entry["mask_score"] = float(result["mask_scores"][i])
        coco.append(entry)
    return coco


def encode_masks(masks):
    """(D, H, W) binary masks -> D compressed RLEs with str counts, equal to pycocotools' ``encode``.

    COCO's RLE runs column by column, so the columns a mask leaves empty only lengthen its first and last
    runs: the runs are counted on the span of non-empty columns alone (a detection's mask fills a small
    part of the image) and pycocotools compresses them.
    """
    masks = np.asarray(masks, dtype=bool)
    d, h, w = masks.shape
    used = masks.any(axis=1)  # (D, W): columns holding a pixel
    rles = []
    for i in range(d):
        columns = np.flatnonzero(used[i])
        if columns.size == 0:
            runs = [h * w]
        else:
            c0, c1 = int(columns[0]), int(columns[-1]) + 1
            runs = _column_major_runs(masks[i, :, c0:c1])
            runs[0] += c0 * h  # empty columns before the span: more zeros in the first run
            if len(runs) % 2:  # the last run is zeros: empty columns after the span lengthen it
                runs[-1] += (w - c1) * h
            elif c1 < w:
                runs.append((w - c1) * h)
        rle = mask_util.frPyObjects({"counts": runs, "size": [h, w]}, h, w)
        rle["counts"] = rle["counts"].decode("ascii")  # bytes -> str, as COCO's JSON files store it
        rles.append(rle)
    return rles


def _column_major_runs(mask):
    """Run lengths of a binary (H, W) mask read column by column, starting with a (maybe empty) zero run."""
    flat = mask.T.reshape(-1)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    return [0] + runs if flat[0] else runs


def _numpy(x):
    if hasattr(x, "detach"):
        x = x.detach()
        return (x.float() if x.dtype in (torch.bfloat16, torch.float16) else x).cpu().numpy()
    return np.asarray(x)


# --- pycocotools evaluation --------------------------------------------------------------------------
def load_ground_truth(coco_gt):
    """A pycocotools COCO object from a path (or the object itself), without pycocotools' prints."""
    if isinstance(coco_gt, COCO):
        return coco_gt
    with _quiet():
        return COCO(str(coco_gt))


def evaluate(coco_gt, results, iou_types=IOU_TYPES, image_ids=None):
    """COCO AP of ``results`` against ``coco_gt`` (a COCO object or an annotation file path).

    ``image_ids``: the images to evaluate (default: all in the ground truth); an image in it without
    detections counts as all missed. Returns ``{iou_type: {"AP": ..., ..., "ARl": ...,
    "per_category": {category name: AP or None}}}``.
    Zero detections: a warning and AP 0 (pycocotools' loadRes would crash on an empty list).
    """
    coco_gt = load_ground_truth(coco_gt)
    image_ids = sorted(coco_gt.getImgIds()) if image_ids is None else sorted({int(i) for i in image_ids})
    check_results(coco_gt, results, image_ids)
    if not results:
        warnings.warn(f"no detections at all on {len(image_ids)} images: every AP is 0", stacklevel=2)
    return {iou_type: _evaluate_one(coco_gt, results, iou_type, image_ids) for iou_type in iou_types}


def check_results(coco_gt, results, image_ids):
    """Stop with a clear message when an entry is malformed, or results or image ids do not belong to
    this ground truth."""
    for index, entry in enumerate(results):
        problem = _entry_problem(entry)
        if problem:
            raise ValueError(f"entry {index} ({_short(entry)}): {problem}")
    known_images = set(coco_gt.getImgIds())
    unknown = sorted(set(image_ids) - known_images)
    if unknown:
        raise ValueError(f"{len(unknown)} image ids to evaluate are not in the ground truth, e.g. {unknown[:5]}")
    unknown = sorted({r["image_id"] for r in results} - known_images)
    if unknown:
        raise ValueError(f"results for {len(unknown)} image ids that are not in the ground truth, e.g. "
                         f"{unknown[:5]}: wrong annotation file?")
    known_categories = set(coco_gt.getCatIds())
    unknown = sorted({r["category_id"] for r in results} - known_categories)
    if unknown:
        raise ValueError(f"results with category ids {unknown[:10]} that are not among the ground truth's "
                         f"{sorted(known_categories)[:10]}...: results must use the original COCO ids "
                         "(category_ids[label]), not contiguous labels")


def _entry_problem(entry):
    """What is wrong with one result entry, or None: integer ids, a finite score, a box of four finite
    numbers with non-negative width and height, and an RLE or polygon segmentation if any."""
    if not isinstance(entry, dict):
        return f"a {type(entry).__name__}, not an object"
    for key in ("image_id", "category_id"):
        if not isinstance(entry.get(key), int) or isinstance(entry.get(key), bool):
            return f"'{key}' must be an integer, got {entry.get(key)!r}"
    if not _finite_number(entry.get("score")):
        return f"'score' must be a finite number, got {entry.get('score')!r}"
    box = entry.get("bbox")
    if box is not None and not (isinstance(box, list) and len(box) == 4 and all(map(_finite_number, box))
                                and box[2] >= 0 and box[3] >= 0):
        return f"'bbox' must be [x, y, width, height], four finite numbers with width, height >= 0, got {box!r}"
    mask = entry.get("segmentation")
    if mask is not None and not (isinstance(mask, dict) and {"size", "counts"} <= set(mask)) and \
            not (isinstance(mask, list) and all(isinstance(p, list) and len(p) >= 6 for p in mask)):
        return "'segmentation' must be an RLE {'size', 'counts'} or a list of polygons"
    if box is None and mask is None:
        return "neither 'bbox' nor 'segmentation'"
    return None


def _finite_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short(entry, limit=120):
    text = json.dumps(entry, default=str) if isinstance(entry, (dict, list)) else repr(entry)
    return text if len(text) <= limit else text[:limit] + "..."


def _evaluate_one(coco_gt, results, iou_type, image_ids):
    coco_dt = load_detections(coco_gt, results, iou_type)
    with _quiet():
        coco_eval = COCOeval(coco_gt, coco_dt, iou_type)
        coco_eval.params.imgIds = image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    stats = {name: float(v) for name, v in zip(STAT_NAMES, coco_eval.stats)}
    stats["per_category"] = per_category_ap(coco_eval, coco_gt)
    return stats


def detections_for(results, iou_type):
    """Copies of the result dicts as COCOeval should see them for ``iou_type``: for segm without "bbox"
    (pycocotools then takes the mask area for the small/medium/large split, as detectron2 and mmdet >=
    2.12 do) and ranked by ``mask_score`` where there is one (Mask Scoring R-CNN [impl 21])."""
    if iou_type == "segm" and any("segmentation" not in r for r in results):
        raise ValueError("segm evaluation needs a 'segmentation' in every result")
    drop = {"bbox", "mask_score"} if iou_type == "segm" else {"mask_score"}
    detections = [{k: v for k, v in r.items() if k not in drop} for r in results]
    if iou_type == "segm":
        for d, r in zip(detections, results):
            d["score"] = r.get("mask_score", r["score"])
    return detections


def compress_segmentations(detections, coco_gt):
    """Polygons and uncompressed RLEs -> compressed RLEs with str counts, in place: without a box,
    pycocotools' loadRes reads a segmentation only as a compressed RLE."""
    for d in detections:
        mask = d.get("segmentation")
        if isinstance(mask, list) or (isinstance(mask, dict) and isinstance(mask["counts"], list)):
            image = coco_gt.imgs[d["image_id"]]
            rle = mask_util.frPyObjects(mask, image["height"], image["width"])
            rle = mask_util.merge(rle) if isinstance(rle, list) else rle
            d["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    return detections


def load_detections(coco_gt, results, iou_type):
    """The pycocotools COCO object of ``detections_for(results, iou_type)`` (loadRes, quiet; copies, since
    loadRes writes area/id/iscrowd into the dicts; an empty one for no detection)."""
    detections = detections_for(results, iou_type)
    if iou_type == "segm":
        compress_segmentations(detections, coco_gt)
    with _quiet():
        return coco_gt.loadRes(detections) if detections else _empty_results(coco_gt)


def _empty_results(coco_gt):
    """A results COCO object with no detection: what loadRes([]) should have returned."""
    empty = COCO()
    empty.dataset = {"images": list(coco_gt.dataset["images"]), "annotations": [],
                     "categories": list(coco_gt.dataset["categories"])}
    empty.createIndex()
    return empty


def per_category_ap(coco_eval, coco_gt):
    """{category name: AP@[.5:.95], area all, 100 detections}; None without ground truth."""
    precision = coco_eval.eval["precision"]  # (T iou thresholds, R recall points, K categories, A areas, M maxDets)
    per_category = {}
    for k, category_id in enumerate(coco_eval.params.catIds):
        values = precision[:, :, k, 0, -1]
        valid = values[values > -1]  # -1: no ground truth of this category in the evaluated images
        per_category[coco_gt.cats[category_id]["name"]] = float(valid.mean()) if valid.size else None
    return per_category


@contextlib.contextmanager
def _quiet():
    """pycocotools prints progress ("Loading and preparing results...") to stdout: keep it clean."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


# --- printing -------------------------------------------------------------------------------------
def format_summary(stats, iou_type=None):
    """The 12 lines COCOeval.summarize prints, rebuilt from ``stats`` (one IoU type's dict)."""
    row = " {:<18} {} @[ IoU={:<9} | area={:>6s} | maxDets={:>3d} ] = {:0.3f}"
    lines = [f"IoU type: {iou_type}"] if iou_type else []
    for name, (kind, iou, area, max_dets) in zip(STAT_NAMES, SUMMARY_ROWS):
        title = "Average Precision" if kind == "AP" else "Average Recall"
        iou_text = "0.50:0.95" if iou is None else f"{iou:0.2f}"
        lines.append(row.format(title, f"({kind})", iou_text, area, max_dets, stats[name]))
    return "\n".join(lines)


def format_per_category_table(metrics, columns=3, name_width=16):
    """Per-category AP, ``columns`` categories side by side: name, then one AP per IoU type."""
    iou_types = [t for t in IOU_TYPES if t in metrics]
    names = list(metrics[iou_types[0]]["per_category"])
    header = f"{'category':<{name_width}}" + "".join(f" {t:>6}" for t in iou_types)
    cells = [f"{name[:name_width]:<{name_width}}" + "".join(f" {_ap_text(metrics[t]['per_category'].get(name)):>6}"
                                                            for t in iou_types) for name in names]
    rows = [cells[i : i + columns] for i in range(0, len(cells), columns)]
    lines = [" | ".join([header] * min(columns, len(cells)))]
    lines += [" | ".join(row) for row in rows]
    return "\n".join(lines)


def _ap_text(value):
    return "-" if value is None else f"{value:0.3f}"


def summary_line(metrics, **extra):
    """One JSON line for scripts: AP, AP50, AP75 per IoU type, then ``extra`` (images, images/s, ...)."""
    summary = {f"{t}_{name}": metrics[t][name] for t in IOU_TYPES if t in metrics for name in ("AP", "AP50", "AP75")}
    summary.update(extra)
    return json.dumps(summary)
