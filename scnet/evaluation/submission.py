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
from .coco_eval import detections_for

BOX_KEYS = ("image_id", "category_id", "bbox", "score")


def testset_name(annotation_file):
    """``image_info_test-dev2017.json`` -> "test-dev2017", ``instances_val2017.json`` -> "val2017"."""
    name = os.path.splitext(os.path.basename(annotation_file))[0]
    return re.sub(r"^(image_info|instances)_", "", name)


def submission_entries(results, iou_type):
    """Copies of our result dicts as the server should read them for ``iou_type`` (see the top)."""
    if iou_type == "bbox":
        return [{k: r[k] for k in BOX_KEYS} for r in results]
    return detections_for(results, "segm")


def write_submission(results, output_dir, testset, alg):
    """One zip per IoU type: bbox, and segm when every entry has a mask. Returns {iou type: path}.
    Underscores in ``alg`` become hyphens (the server's file name separates its fields by underscores).
    Each zip is written whole or not at all: a failed write leaves the earlier file and raises FileError."""
    alg = alg.replace("_", "-")
    iou_types = ["bbox"] + (["segm"] if all("segmentation" in r for r in results) else [])
    name = f"detections_{testset}_{alg}_results"
    paths = {}
    for iou_type in iou_types:
        path = os.path.join(output_dir, "submission", iou_type, f"{name}.zip")
        tmp = path + ".tmp"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                archive.writestr(f"{name}.json", json.dumps(submission_entries(results, iou_type)))
            os.replace(tmp, path)
        except OSError as e:  # a full disk, no permission
            reason = write_failure(e, path)
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise FileError(f"cannot write {path}: {reason}; nothing was replaced") from None
        paths[iou_type] = path
    return paths
