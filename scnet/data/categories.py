"""Class names and COCO category ids of a trained model, for the tools that name what it detects
(scripts/demo.py draws and saves them, scripts/export.py stores them in the exported file).

A checkpoint holds weights, not always names: they come from the first source that has one per class,
  1. an annotation file given by the user (any COCO json with the training categories, e.g. the val
     json, quicker to parse than COCO's 450 MB training json);
  2. the training annotation file named by the checkpoint's stored config (scripts/train.py saves it),
     else by the config in use, when that file exists;
  3. the class names stored in an official MMDetection checkpoint (category id = label);
  4. ``class_<label>``, category id = label.
"""
import os

from scnet.data.checks import DataError, category_mapping, load_annotation_file
from scnet.utils.files import load_file


def checkpoint_metadata(path):
    """(training config dict or None, MMDetection class names or None) stored in a local checkpoint.

    mmap: the tensors are not read a second time (the model has loaded them already).
    """
    if not os.path.isfile(path):
        return None, None
    checkpoint = load_file(path, mmap=True)
    if not isinstance(checkpoint, dict):
        return None, None
    meta = checkpoint.get("meta") or {}
    names = meta.get("CLASSES") or (meta.get("dataset_meta") or {}).get("classes")  # mmdet 2.x / 3.x
    config = checkpoint.get("config")
    return (config if isinstance(config, dict) else None), (list(names) if names else None)


def load_categories(weights, cfg, num_classes, annotation_file=None):
    """(class names, COCO category ids, where they came from), in the order of the module docstring;
    a source with another number of classes than the model is skipped with a warning."""
    stored_config, mmdet_names = checkpoint_metadata(weights)
    data = stored_config["data"] if stored_config and "data" in stored_config else vars(cfg.data)
    candidates = [annotation_file] if annotation_file else []
    candidates.append(os.path.join(data["root"], data["train_annotations"]))
    for path in candidates:
        if not os.path.isfile(path):
            continue
        try:
            ids, names = category_mapping(load_annotation_file(path)["categories"])
        except DataError as e:
            print(f"warning: {e}; not used for the class names")
            continue
        if len(ids) == num_classes:
            return list(names), list(ids), path
        print(f"warning: {path} has {len(ids)} categories, the model {num_classes} classes; not used")
    if mmdet_names and len(mmdet_names) == num_classes:
        return mmdet_names, list(range(num_classes)), "the checkpoint's meta (category id = label)"
    return [f"class_{i}" for i in range(num_classes)], list(range(num_classes)), "none found (class_<label>)"
