"""Error analysis of COCO results: where AP is lost, per-category precision-recall, class confusion.

The breakdown is the COCO toolkit's ``analyze`` (Hoiem et al., "Diagnosing Error in Object Detectors",
ECCV 2012, as the COCO detection evaluation page and MMDetection's coco_error_analysis.py compute it):
precision-recall at max 100 detections, with the errors removed one kind after another:

    C75  PR at IoU .75                      C50  PR at IoU .50
    Loc  PR at IoU .10 (localisation errors ignored, duplicate detections are still errors)
    Sim  Loc, and confusion with a class of the same supercategory ignored
    Oth  Loc, and confusion with any other class ignored
    BG   Oth, and every remaining false positive removed (precision 1 wherever Oth reached a recall)
    FN   BG, and every missed object found (precision 1 at every recall)

"Ignored" means the other classes' ground truth of the image is given the detection's class as a crowd
region (COCO's ignore), so a detection on it is neither true nor false. Categories without ground truth
in the evaluated images are left out of every mean (where the COCO toolkit counts them as 0), and the
detections are those COCOeval sees in ``evaluate`` (segm: mask areas, Mask Scoring R-CNN's mask scores),
so C75 and C50 equal its AP75 and AP50.

    breakdown = error_breakdown(coco_gt, results, "segm")      # precision (7, 101, K, 4 areas)
    table = breakdown_table(breakdown, coco_gt)                 # AP per stage, per category and overall
    matrix = confusion_matrix(coco_gt, results, "bbox")         # (K + 1, K + 1) counts
"""
import contextlib
import io

import numpy as np
import pycocotools.mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .coco_eval import detections_for, load_detections

STAGES = ("C75", "C50", "Loc", "Sim", "Oth", "BG", "FN")
AREAS = ("all", "small", "medium", "large")


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())


def _precision(coco_gt, coco_dt, iou_type, image_ids, iou_thresholds, category_ids=None):
    """COCOeval's accumulated precision, (T, R, K, A) at max 100 detections; -1 where no ground truth."""
    evaluator = COCOeval(coco_gt, coco_dt, iou_type)
    evaluator.params.imgIds = list(image_ids)
    evaluator.params.iouThrs = np.array(iou_thresholds, dtype=np.float64)
    evaluator.params.maxDets = [100]
    if category_ids is not None:
        evaluator.params.catIds = list(category_ids)
    with _quiet():
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator.eval["precision"][..., 0]


def _with_confusion_ignored(coco_gt, category_id, confusable):
    """The ground truth of ``category_id`` plus that of the ``confusable`` categories as its crowd regions."""
    annotations = []  # copies: COCOeval writes into the annotations it reads
    for ann in coco_gt.dataset["annotations"]:
        if ann["category_id"] == category_id:
            annotations.append(dict(ann))
        elif ann["category_id"] in confusable:
            annotations.append(dict(ann, category_id=category_id, iscrowd=1, ignore=1))
    gt = COCO()
    gt.dataset = dict(coco_gt.dataset, annotations=annotations)
    with _quiet():
        gt.createIndex()
    return gt


def _only_category(coco_dt, category_id):
    dt = COCO()
    dt.dataset = dict(coco_dt.dataset, annotations=[dict(a) for a in coco_dt.dataset["annotations"]
                                                    if a["category_id"] == category_id])
    with _quiet():
        dt.createIndex()
    return dt


def error_breakdown(coco_gt, results, iou_type, image_ids=None):
    """Precision (7, R, K, A) for the STAGES, R recall thresholds (0:.01:1), K categories (sorted ids),
    A areas (all, small, medium, large); NaN where a category has no ground truth in that area.
    ``image_ids``: the images evaluated (default all of ``coco_gt``; one without detections counts as
    all missed)."""
    coco_dt = load_detections(coco_gt, results, iou_type)
    image_ids = sorted(coco_gt.getImgIds()) if image_ids is None else sorted(image_ids)
    category_ids = sorted(coco_gt.getCatIds())
    base = _precision(coco_gt, coco_dt, iou_type, image_ids, [0.75, 0.5, 0.1])  # C75, C50, Loc
    out = np.zeros((len(STAGES),) + base.shape[1:])
    out[:3] = base
    supercategory = {c["id"]: c.get("supercategory", c["id"]) for c in coco_gt.loadCats(category_ids)}
    for k, cid in enumerate(category_ids):
        dt = _only_category(coco_dt, cid)
        similar = {c for c in category_ids if c != cid and supercategory[c] == supercategory[cid]}
        others = set(category_ids) - {cid}
        for stage, confusable in ((3, similar), (4, others)):
            gt = _with_confusion_ignored(coco_gt, cid, confusable)
            out[stage, :, k] = _precision(gt, dt, iou_type, image_ids, [0.1], [cid])[0, :, 0]
    missing = out[0] == -1  # (R, K, A): no ground truth of the category in the area
    out[5] = out[4] > 0
    out[6] = 1.0
    out[:, missing] = np.nan
    return out


def breakdown_table(breakdown, coco_gt, area="all"):
    """{"overall": {stage: AP}, "per_category": {name: {stage: AP or None}}}: the mean precision over the
    recall thresholds, per category and over the categories with ground truth."""
    a = AREAS.index(area)
    names = [c["name"] for c in coco_gt.loadCats(sorted(coco_gt.getCatIds()))]
    per_category = {}
    for k, name in enumerate(names):
        values = breakdown[:, :, k, a].mean(axis=1)
        per_category[name] = {s: (None if np.isnan(v) else float(v)) for s, v in zip(STAGES, values)}
    with np.errstate(invalid="ignore"):
        overall = np.nanmean(breakdown[:, :, :, a].mean(axis=1), axis=1) if breakdown.shape[2] else []
    return {"overall": {s: (None if np.isnan(v) else float(v)) for s, v in zip(STAGES, overall)},
            "per_category": per_category}


def _regions(anns, iou_type, coco_gt):
    """Boxes (xywh) or RLEs (from polygons too) of ground-truth annotations or detections."""
    if iou_type == "bbox":
        return [a["bbox"] for a in anns]
    return [coco_gt.annToRLE(a) for a in anns]


def confusion_matrix(coco_gt, results, iou_type="bbox", iou_threshold=0.5, score_threshold=0.3, image_ids=None):
    """(K + 1, K + 1) counts; rows: the ground-truth class, then "background" (a detection that found no
    object: on the background, or a duplicate of an object already found); columns: the detected class,
    then "missed" (an object no detection found).

    Per image, the detections with score >= ``score_threshold`` (segm: Mask Scoring R-CNN's mask score
    where there is one, as in ``evaluate``) are matched in descending score, each to one unmatched object
    of IoU >= ``iou_threshold``: one of its own class if there is one (the highest IoU), else the other
    class of highest IoU. A detection on a crowd region counts nowhere.
    """
    category_ids = sorted(coco_gt.getCatIds())
    index = {c: k for k, c in enumerate(category_ids)}
    k_bg = len(category_ids)
    matrix = np.zeros((k_bg + 1, k_bg + 1), dtype=np.int64)
    by_image = {}
    for r in detections_for(results, iou_type):
        if r["score"] >= score_threshold:
            by_image.setdefault(r["image_id"], []).append(r)
    for image_id in sorted(coco_gt.getImgIds()) if image_ids is None else sorted(image_ids):
        anns = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=image_id))
        objects = [a for a in anns if not a.get("iscrowd", 0)]
        crowds = [a for a in anns if a.get("iscrowd", 0)]
        dets = sorted(by_image.get(image_id, []), key=lambda r: -r["score"])
        matched = np.zeros(len(objects), dtype=bool)
        if dets and objects:
            ious = mask_util.iou(_regions(dets, iou_type, coco_gt), _regions(objects, iou_type, coco_gt),
                                 [0] * len(objects))
        for d, det in enumerate(dets):
            label = index[det["category_id"]]
            row = _match(ious[d], matched, objects, det, iou_threshold) if objects else None
            if row is not None:
                matched[row] = True
                matrix[index[objects[row]["category_id"]], label] += 1
            elif not _on_crowd(det, crowds, iou_type, coco_gt, iou_threshold):
                matrix[k_bg, label] += 1
        for obj, found in zip(objects, matched):
            if not found:
                matrix[index[obj["category_id"]], k_bg] += 1
    return matrix


def _match(ious, matched, objects, det, threshold):
    """The unmatched object for ``det``: its own class first, then any class; None below ``threshold``."""
    free = (~matched) & (ious >= threshold)
    same = free & np.array([o["category_id"] == det["category_id"] for o in objects], dtype=bool)
    for candidates in (same, free):
        if candidates.any():
            return int(np.argmax(np.where(candidates, ious, -1)))
    return None


def _on_crowd(det, crowds, iou_type, coco_gt, threshold):
    if not crowds:
        return False
    ious = mask_util.iou(_regions([det], iou_type, coco_gt), _regions(crowds, iou_type, coco_gt), [1] * len(crowds))
    return bool((ious >= threshold).any())
