"""Every kind of bad input the data loader handles, injected into a ``make_synthetic_coco`` dataset
(tests of CocoDataset, scripts/check_data.py and scripts/train.py)."""
import json
import os

import numpy as np
from PIL import Image


# Every bad input the loader handles, with what CocoDataset does about it (scripts/check_data.py
# reports the same): "image skipped" at construction, "replaced" at load time by the next image,
# "annotation skipped" (the image stays), "fixed" (used after a repair).
BAD_INPUTS = {
    "corrupt image": "replaced",
    "truncated image": "replaced",
    "missing image file": "image skipped",
    "size differs from the JSON": "replaced",
    "no annotations": "image skipped",
    "crowd-only": "image skipped",
    "degenerate box": "annotation skipped",
    "box outside the image": "annotation skipped",
    "box partly outside the image": "fixed",
    "polygon with fewer than 3 points": "annotation skipped",
    "empty segmentation": "annotation skipped",
    "unknown category": "annotation skipped",
    "missing stuff map": "image skipped",
    "stuff map of the wrong size": "replaced",
    "RGB stuff map, equal channels": "fixed",
    "RGB stuff map, different channels": "replaced",
    "stuff labels out of range": "fixed",
}


def _corrupt_files(kind, image_path, stuff_path):
    """Damage the image or stuff-map file of one image for the file-level kinds of BAD_INPUTS."""
    if kind == "corrupt image":
        with open(image_path, "wb") as f:
            f.write(b"this is not an image\n" * 20)
    elif kind == "truncated image":
        with open(image_path, "rb") as f:
            data = f.read()
        with open(image_path, "wb") as f:
            f.write(data[: len(data) // 2])
    elif kind == "missing image file":
        os.remove(image_path)
    elif kind == "missing stuff map":
        os.remove(stuff_path)
    elif kind.startswith("stuff") or kind.startswith("RGB"):
        stuff = np.array(Image.open(stuff_path))
        if kind == "stuff map of the wrong size":
            Image.fromarray(stuff[: stuff.shape[0] // 2, : stuff.shape[1] // 2]).save(stuff_path)
        elif kind == "stuff labels out of range":
            stuff[5:15, 5:15] = 200  # COCO-stuff has 183 classes (0..182)
            Image.fromarray(stuff).save(stuff_path)
        else:
            rgb = np.repeat(stuff[..., None], 3, axis=2)
            if kind == "RGB stuff map, different channels":
                rgb[5:15, 5:15, 1] = 7
            Image.fromarray(rgb).save(stuff_path)


_ANNOTATION_KINDS = ("degenerate box", "box outside the image", "box partly outside the image",
                     "polygon with fewer than 3 points", "empty segmentation", "unknown category")


def _extra_annotation(kind, image, ann_id, category_id):
    """A new annotation of ``image`` that shows one annotation-level kind of BAD_INPUTS."""
    ann = {"id": ann_id, "image_id": image["id"], "category_id": category_id, "bbox": [4.0, 4.0, 20.0, 12.0],
           "area": 240.0, "segmentation": [[4.0, 4.0, 24.0, 4.0, 24.0, 16.0, 4.0, 16.0]], "iscrowd": 0}
    if kind == "degenerate box":
        ann["bbox"] = [4.0, 4.0, 0.5, 12.0]
    elif kind == "box outside the image":
        ann["bbox"] = [image["width"] + 10.0, 4.0, 20.0, 12.0]
    elif kind == "box partly outside the image":
        ann["bbox"] = [-4.0, 4.0, 24.0, 12.0]
        ann["segmentation"] = [[0.0, 4.0, 20.0, 4.0, 20.0, 16.0, 0.0, 16.0]]
    elif kind == "polygon with fewer than 3 points":
        ann["segmentation"] = [[4.0, 4.0, 24.0, 4.0]]
    elif kind == "empty segmentation":
        ann["segmentation"] = []
    elif kind == "unknown category":
        ann["category_id"] = 91  # not among the dataset's categories
    return ann


def inject_bad_inputs(dataset_dir, split="train"):
    """Corrupt a ``make_synthetic_coco`` dataset with every kind of BAD_INPUTS, one image each.

    The k-th image (JSON order) gets the k-th kind; the images after the last kind stay clean, so the
    dataset needs at least len(BAD_INPUTS) + 1 images. Returns {kind: file_name of the image}.
    """
    path = os.path.join(dataset_dir, "annotations", f"instances_{split}.json")
    with open(path) as f:
        data = json.load(f)
    if len(data["images"]) <= len(BAD_INPUTS):
        raise ValueError(f"need more than {len(BAD_INPUTS)} images, the dataset has {len(data['images'])}")
    next_id = max(a["id"] for a in data["annotations"]) + 1
    files = {}
    for kind, image in zip(BAD_INPUTS, data["images"]):
        files[kind] = image["file_name"]
        mine = [a for a in data["annotations"] if a["image_id"] == image["id"]]
        stem = os.path.splitext(image["file_name"])[0]
        stuff_path = os.path.join(dataset_dir, "stuffthingmaps", split, stem + ".png")
        _corrupt_files(kind, os.path.join(dataset_dir, split, image["file_name"]), stuff_path)
        if kind == "size differs from the JSON":  # the file gets 8 more columns than the JSON says
            pixels = np.array(Image.open(os.path.join(dataset_dir, split, image["file_name"])))
            Image.fromarray(np.pad(pixels, ((0, 0), (0, 8), (0, 0)), mode="edge")).save(
                os.path.join(dataset_dir, split, image["file_name"]), quality=95)
        elif kind == "no annotations":
            data["annotations"] = [a for a in data["annotations"] if a["image_id"] != image["id"]]
        elif kind == "crowd-only":
            for a in mine:
                a["iscrowd"] = 1
        elif kind in _ANNOTATION_KINDS:
            data["annotations"].append(_extra_annotation(kind, image, next_id, data["categories"][0]["id"]))
            next_id += 1
    with open(path, "w") as f:
        json.dump(data, f)
    return files
