"""The files COCO's evaluation server takes: results on test-dev, whose ground truth is not public.

COCO's upload guidelines name a results file ``[type]_[testset]_[alg]_results.json`` (type "detections"
for boxes and for masks) and take it zipped under the same name. Box AP and mask AP are separate
submissions of the same type, so each goes in its own folder:

    submission/bbox/detections_test-dev2017_<alg>_results.zip
    submission/segm/detections_test-dev2017_<alg>_results.zip

COCO's evaluation code (pycocotools' ``loadRes``) reads a results file by its first entry, and takes a
box whenever there is one, the mask's area included. So the mask file carries no box: each detection's
area (the small/medium/large split) and box then come from its mask, as in our own segm evaluation
(``detections_for``), and Mask Scoring R-CNN's mask score ranks the masks. The box file carries no mask.
"""
import contextlib
import json
import os
import re
import zipfile

from ..utils.files import FileError, write_failure
from .coco_eval import compress_segmentations, detections_for

BOX_KEYS = ("image_id", "category_id", "bbox", "score")


def testset_name(annotation_file):
    """``image_info_test-dev2017.json`` -> "test-dev2017", ``instances_val2017.json`` -> "val2017"."""
    name = os.path.splitext(os.path.basename(annotation_file))[0]
    return re.sub(r"^(image_info|instances)_", "", name)


def submission_entries(results, iou_type, coco_gt):
    """Copies of the result dicts as the server should read them for ``iou_type`` (see the top); masks
    as compressed RLEs (polygons converted with the image sizes of ``coco_gt``)."""
    if iou_type == "bbox":
        return [{k: r[k] for k in BOX_KEYS} for r in results]
    return compress_segmentations(detections_for(results, "segm"), coco_gt)


def write_submission(results, coco_gt, output_dir, testset, alg):
    """One zip per IoU type that every entry has (a box: bbox, a mask: segm). Returns {iou type: path}.
    Underscores in ``alg`` become hyphens (the server's file name separates its fields by underscores).
    Each zip is written whole or not at all: a failed write leaves the earlier file and raises FileError;
    a zip of the other type from an earlier run under the same name is removed (it would not match)."""
    if not results:  # pycocotools' loadRes cannot read an empty list
        raise ValueError("no detections at all: nothing to upload")
    alg = alg.replace("_", "-")
    key = {"bbox": "bbox", "segm": "segmentation"}
    iou_types = [t for t in ("bbox", "segm") if all(key[t] in r for r in results)]
    if not iou_types:
        raise ValueError("some entries have no 'bbox', others no 'segmentation': neither file can be made")
    name = f"detections_{testset}_{alg}_results"
    paths = {}
    for iou_type in ("bbox", "segm"):
        path = os.path.join(output_dir, "submission", iou_type, f"{name}.zip")
        if iou_type not in iou_types:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        tmp = path + ".tmp"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                archive.writestr(f"{name}.json", json.dumps(submission_entries(results, iou_type, coco_gt)))
            os.replace(tmp, path)
        except OSError as e:  # a full disk, no permission
            reason = write_failure(e, path)
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise FileError(f"cannot write {path}: {reason}; nothing was replaced") from None
        paths[iou_type] = path
    return paths
