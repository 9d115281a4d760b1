"""COCO instances (+ COCO-stuff maps) -> (image, target dict) in the detector's data contract [impl 16.1].

COCO category ids appear only here and in the evaluation code: labels are contiguous 0..C-1 in
sorted category-id order; the ids never reach the model. Every rule that drops, fixes or replaces an
input lives in ``checks.py``; scripts/check_data.py applies the same rules to a whole dataset up front.

    dataset = CocoDataset("annotations/instances_train2017.json", "train2017",
                          stuff_dir="stuffthingmaps/train2017")
    image, target = dataset[(0, True)]     # index 0, horizontally flipped
"""
import os
import pickle
from collections import Counter

import numpy as np
import torch
from torch.utils.data import Dataset

from ..ops.masks import segmentation_to_bitmask
from . import checks
from .checks import FIXED, IGNORE_LABEL, LoadError, Problem
from .transforms import hflip, resize


# --- one image at load time (the load-time rules; scripts/check_data.py calls this too) ------------
def rasterise(annotations, height, width):
    """(G, H, W) uint8 masks at the ORIGINAL size [impl 24.22]; LoadError naming a bad segmentation."""
    masks = np.zeros((len(annotations), height, width), dtype=np.uint8)
    for i, ann in enumerate(annotations):
        try:
            masks[i] = segmentation_to_bitmask(ann["segmentation"], height, width)
        except Exception as e:  # e.g. a corrupt compressed RLE string
            raise LoadError("malformed segmentation", f"annotation {ann['id']}: {type(e).__name__}: {e}") from None
    return masks


def instance_semantic_map(masks, labels, crowd_masks, num_classes):
    """(H, W) uint8 semantic labels from instances: background C, instance labels, crowd 255.

    Crowd regions are painted first and the instances over them in annotation order (later over
    earlier): a crowd region outlines many objects and the background between them, so only the
    pixels that no individual instance claims are ignored ([impl 24.28]: crowds are not ground truth).
    """
    semantic = np.full(masks.shape[1:], num_classes, dtype=np.uint8)
    for mask in crowd_masks:
        semantic[mask > 0] = IGNORE_LABEL
    for mask, label in zip(masks, labels):
        semantic[mask > 0] = label
    return semantic


def load_record(record, image_dir, stuff_dir=None, semantic_source="none", num_semantic_classes=183, num_classes=80):
    """Decode one indexed image and build its arrays at the original size.

    Returns ``(sample, fixes, notes)``: ``sample`` holds ``image`` (H, W, 3) uint8 RGB, ``boxes``
    (G, 4) float32 xyxy clipped to the image, ``labels`` (G,) int64, ``masks`` (G, H, W) uint8 and
    ``semantic_seg`` (H, W) uint8 or None; ``fixes`` the (kind, detail) repairs made; ``notes`` the
    informational findings of ``checks.decode_image``. Raises LoadError when the image is unusable.
    """
    height, width = record["height"], record["width"]
    image, notes = checks.decode_image(os.path.join(image_dir, record["file_name"]))
    checks.check_image_size(image, height, width)
    instances = record["instances"]
    fixes = [("box partly outside the image", f"annotation {a['id']}: clipped") for a in instances if a["clipped"]]
    semantic = None
    if semantic_source == "stuff_maps":
        path = os.path.join(stuff_dir, checks.stuff_map_name(record["file_name"]))
        semantic, stuff_fixes = checks.read_stuff_map(path, height, width, num_semantic_classes)
        fixes += stuff_fixes
    masks = rasterise(instances, height, width)
    labels = np.array([a["label"] for a in instances], dtype=np.int64)
    if semantic_source == "instances":
        semantic = instance_semantic_map(masks, labels, rasterise(record["crowd"], height, width), num_classes)
    boxes = np.array([a["bbox"] for a in instances], dtype=np.float64).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]  # COCO xywh -> xyxy, no -1 [impl 24.2]
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    boxes = boxes.astype(np.float32)
    return {"image": image, "boxes": boxes, "labels": labels, "masks": masks, "semantic_seg": semantic}, fixes, notes


class _PackedList:
    """A list of records pickled into one numpy buffer.

    DataLoader workers are forked: touching 118k Python dicts bumps their refcounts and copies the
    pages into every worker, so memory grows with workers x epochs. One flat array is never copied.
    """

    def __init__(self, items):
        blobs = [np.frombuffer(pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8) for x in items]
        self._ends = np.cumsum([len(b) for b in blobs], dtype=np.int64)
        self._data = np.concatenate(blobs) if blobs else np.zeros(0, dtype=np.uint8)

    def __len__(self):
        return len(self._ends)

    def __getitem__(self, i):
        start = int(self._ends[i - 1]) if i > 0 else 0
        return pickle.loads(self._data[start : int(self._ends[i])].tobytes())


class CocoDataset(Dataset):
    """COCO-format instance segmentation dataset, optionally with COCO-stuff semantic maps [impl 16].

    Args:
        annotation_file, image_dir: COCO ``instances_*.json`` and the folder of its ``file_name``s.
        stuff_dir: folder of ``<image stem>.png`` COCO-stuff maps (semantic_source="stuff_maps").
        semantic_source: "stuff_maps", "instances" (labels of the instances on background C, crowd
            pixels 255) or "none" (no ``semantic_seg`` in the targets).
        num_semantic_classes: stuff labels >= this (other than 255) are set to 255.
        train_scale: (long, short) max sides of the training resize ([impl 16.1] step 3).
        min_size: images whose shorter side is smaller are dropped (training only).
        training: resize, allow flips, drop images without usable annotations or smaller than
            min_size; otherwise the original images are returned unflipped and every image whose
            file (and stuff map, with "stuff_maps") exists is kept.
        keep_empty: in training, keep images without usable annotations (pure negatives).

    ``dataset[i]`` or ``dataset[(i, flip)]`` -> (image (3, H, W) uint8 RGB, target): ``boxes`` float32
    (G, 4) xyxy, ``labels`` int64 (G,), ``masks`` uint8 (G, H, W), ``semantic_seg`` uint8 (H, W),
    ``image_id``, ``file_name``, ``original_size`` (h, w), ``scale_factor`` (w_scale, h_scale),
    ``flipped`` and ``issues`` (what went wrong loading this item and what was done about it).
    An image that cannot be used at load time is replaced by the next index (see ``issues``).
    """

    MAX_ATTEMPTS = 10  # consecutive unusable images before __getitem__ gives up

    def __init__(self, annotation_file, image_dir, stuff_dir=None, semantic_source="stuff_maps",
                 num_semantic_classes=183, train_scale=(1333, 800), min_size=32, training=True, keep_empty=False):
        data = checks.load_annotation_file(annotation_file)
        self.category_ids, self.class_names = checks.category_mapping(data["categories"])
        checks.check_semantic_options(semantic_source, stuff_dir, num_semantic_classes, len(self.category_ids))
        index = checks.index_coco(data, image_dir, stuff_dir, semantic_source, min_size, training, keep_empty)
        del data  # the records below hold everything that is needed
        if not index.records:
            raise checks.DataError(f"{annotation_file}: no usable image ({_count_kinds(index.problems)})")
        self.image_dir, self.stuff_dir = image_dir, stuff_dir
        self.semantic_source, self.num_semantic_classes = semantic_source, num_semantic_classes
        self.train_scale, self.training = tuple(train_scale), training
        self.image_ids = [r["id"] for r in index.records]
        self.file_names = [r["file_name"] for r in index.records]
        self.aspect_groups = [int(r["width"] / r["height"] > 1) for r in index.records]  # mmdet group flag
        self.image_sizes = [(r["height"], r["width"]) for r in index.records]  # the annotation file's
        self.skipped = [(p.file, p.reason) for p in index.problems]
        self.stats = dict(index.stats)
        self._records = _PackedList(index.records)

    @property
    def num_classes(self):
        return len(self.category_ids)

    def __len__(self):
        return len(self._records)

    def __getitem__(self, item):
        """``item`` = index or (index, flip): the sampler draws the flips, so a resumed run repeats them."""
        index, flip = item if isinstance(item, tuple) else (item, False)
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        issues = []
        for attempt in range(min(self.MAX_ATTEMPTS, len(self))):
            i = (index + attempt) % len(self)  # an unusable image is replaced by the next one
            record = self._records[i]
            try:
                sample, fixes, _ = load_record(record, self.image_dir, self.stuff_dir, self.semantic_source,
                                               self.num_semantic_classes, self.num_classes)
            except LoadError as e:
                replacement = self.file_names[(i + 1) % len(self)]
                issues.append(str(Problem(record["file_name"], e.kind, e.detail, f"replaced by {replacement}")))
                continue
            issues += [str(Problem(record["file_name"], kind, detail, FIXED)) for kind, detail in fixes]
            return self._make_target(record, sample, bool(flip) and self.training, issues)
        raise RuntimeError(f"no usable image among {attempt + 1} items from index {index}: " + "; ".join(issues))

    def _make_target(self, record, sample, flip, issues):
        """Arrays -> tensors in the data contract, then the training geometry ([impl 16.1] steps 3-4)."""
        image = torch.from_numpy(sample["image"]).permute(2, 0, 1).contiguous()  # (3, H, W)
        target = {
            "boxes": torch.from_numpy(sample["boxes"]),
            "labels": torch.from_numpy(sample["labels"]),
            "masks": torch.from_numpy(sample["masks"]),
        }
        if sample["semantic_seg"] is not None:
            target["semantic_seg"] = torch.from_numpy(sample["semantic_seg"])
        original_size = (record["height"], record["width"])
        target.update(image_id=record["id"], file_name=record["file_name"], original_size=original_size,
                      scale_factor=(1.0, 1.0), flipped=False)
        if self.training:
            image, target = resize(image, target, self.train_scale)
            if flip:
                image, target = hflip(image, target)
        target = _drop_empty_boxes(target, issues)
        target["issues"] = issues
        return image, target


def _drop_empty_boxes(target, issues):
    """Boxes that clipping left without area (a sliver at the border) would stop the model; drop them."""
    boxes = target["boxes"]
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if bool(keep.all()):
        return target
    dropped = f"{int((~keep).sum())} dropped"
    issues.append(str(Problem(target["file_name"], "box without area after clipping", dropped, FIXED)))
    return dict(target, boxes=boxes[keep], labels=target["labels"][keep], masks=target["masks"][keep])


def _count_kinds(problems):
    """A summary such as '3 x missing image file, 1 x crowd-only' for an error message."""
    counts = Counter(p.kind for p in problems)
    return ", ".join(f"{n} x {kind}" for kind, n in counts.items()) or "no images in the annotation file"
