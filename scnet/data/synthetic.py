"""A small synthetic COCO-format dataset with COCO-stuff maps [impl 16.1, 16.3]: tests and a quick demo.

    json_path = make_synthetic_coco("/tmp/shapes", num_images=20)
    dataset = CocoDataset(json_path, "/tmp/shapes/train", stuff_dir="/tmp/shapes/stuffthingmaps/train")

Writes ``<out_dir>/<split>/NNNNNN.jpg``, ``<out_dir>/stuffthingmaps/<split>/NNNNNN.png`` and
``<out_dir>/annotations/instances_<split>.json``. Each image holds a few textured shapes (one shape
and colour per class) on a two-region textured background. Later shapes occlude earlier ones: the
earlier annotation then describes its visible part (RLE), or is dropped when almost hidden. Shapes
may be cut by the image border. Most instances are polygons, some RLE (compressed or not), a few
crowd. Stuff maps hold raw COCO-stuff ids: background "stuff" ids >= 91, things category_id - 1,
255 on a thin unlabeled border. Everything is deterministic for a seed.

tests/bad_inputs.py corrupts such a dataset with every kind of bad input the loader handles.
"""
import json
import os

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

SHAPES = ("rectangle", "ellipse", "triangle", "diamond", "hexagon")
COLOURS = ((220, 60, 50), (50, 190, 70), (60, 80, 230), (230, 200, 40), (180, 60, 200), (40, 200, 210))
STUFF_IDS = (105, 123, 140, 156, 168)  # COCO-stuff "stuff" range is 91..181 [impl 16.3]
MIN_VISIBLE = 0.3  # an occluded instance keeps its annotation if this fraction of it is still visible


def category_ids(num_classes):
    """Non-contiguous COCO ids 2, 5, 8, ... within 1..90, so that the id -> label mapping is exercised."""
    if not 1 <= num_classes <= 29:
        raise ValueError(f"num_classes must be in 1..29 (ids within 1..90), got {num_classes}")
    return [2 + 3 * k for k in range(num_classes)]


def _shape_polygon(shape, cx, cy, half_w, half_h):
    """Vertices [(x, y), ...] of a shape centred on (cx, cy)."""
    if shape == "rectangle":
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif shape == "triangle":
        corners = [(0, -1), (1, 1), (-1, 1)]
    elif shape == "diamond":
        corners = [(0, -1), (1, 0), (0, 1), (-1, 0)]
    else:  # ellipse (24 vertices) or hexagon (6)
        n = 24 if shape == "ellipse" else 6
        angles = np.arange(n) * 2 * np.pi / n
        corners = list(zip(np.cos(angles), np.sin(angles)))
    return [(cx + half_w * u, cy + half_h * v) for u, v in corners]


def _clip_polygon(points, width, height):
    """Sutherland-Hodgman clipping of a polygon to the image rectangle [0, W] x [0, H]."""
    for axis, limit, sign in ((0, 0.0, 1), (0, width, -1), (1, 0.0, 1), (1, height, -1)):
        inside = [sign * (p[axis] - limit) >= 0 for p in points]
        out = []
        for i, point in enumerate(points):
            prev = points[i - 1]
            if inside[i] != inside[i - 1]:  # the edge crosses the line: add the crossing
                t = (limit - prev[axis]) / (point[axis] - prev[axis])
                out.append((prev[0] + t * (point[0] - prev[0]), prev[1] + t * (point[1] - prev[1])))
            if inside[i]:
                out.append(point)
        points = out
        if len(points) < 3:
            return []
    return points


def _random_object(rng, height, width, num_classes):
    """(label, clipped polygon as a flat list) of a shape at least partly inside the image."""
    while True:
        label = int(rng.randint(num_classes))
        half_w, half_h = rng.uniform(0.1, 0.3) * width, rng.uniform(0.1, 0.3) * height
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)  # near a border: cut by it
        polygon = _clip_polygon(_shape_polygon(SHAPES[label % len(SHAPES)], cx, cy, half_w, half_h), width, height)
        flat = [round(float(v), 2) for p in polygon for v in p]
        xs, ys = flat[0::2], flat[1::2]
        if len(flat) >= 6 and _polygon_area(polygon) >= 64 and min(max(xs) - min(xs), max(ys) - min(ys)) >= 4:
            return label, flat


def _polygon_area(points):
    """Shoelace area of a polygon [(x, y), ...]."""
    xs, ys = np.array(points).T
    return 0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))


def _texture(rng, colour, kind, height, width):
    """(3, H, W) float texture: noisy colour, stripes or checkerboard by ``kind``."""
    yy, xx = np.mgrid[:height, :width]
    pattern = [np.zeros((height, width)), ((xx + yy) // 4) % 2, (xx // 6 + yy // 6) % 2][kind % 3]
    noise = rng.randint(-12, 13, size=(3, height, width))
    return np.array(colour, dtype=np.float64)[:, None, None] + 35 * pattern[None] - 17 + noise


def _uncompressed_rle(mask):
    """COCO uncompressed RLE: run lengths of the column-major mask, starting with zeros."""
    flat = np.asfortranarray(mask).ravel(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]]))
    counts = ([0] if flat[0] else []) + runs.tolist()
    return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


def _encode(mask):
    """COCO compressed RLE of a (H, W) mask, counts as a str."""
    rle = mask_util.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")  # as COCO's JSON stores it
    return rle


def _annotation(rng, flat, full, visible, is_last):
    """(segmentation, bbox, area, iscrowd) of one painted shape, or None when it is almost hidden."""
    if visible.sum() < max(MIN_VISIBLE * full.sum(), 16):
        return None
    crowd = not is_last and rng.rand() < 0.2  # the last shape stays a usable non-crowd instance
    if (visible == full).all() and not crowd:
        kind = rng.rand()
        if kind < 0.75:  # polygon, box from its vertices as in COCO
            xs, ys = flat[0::2], flat[1::2]
            return [flat], [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)], float(full.sum()), 0
        segmentation = _uncompressed_rle(visible) if kind < 0.85 else _encode(visible)
    else:  # occluded or crowd: the visible part as compressed RLE
        segmentation = _encode(visible)
    rle = mask_util.encode(np.asfortranarray(visible))
    return segmentation, [float(v) for v in mask_util.toBbox(rle)], float(visible.sum()), int(crowd)


def _make_image(rng, height, width, num_classes, ids):
    """(image (H, W, 3) uint8, stuff map (H, W) uint8, [(category_id, segmentation, bbox, area, crowd)])."""
    split = rng.randint(height // 4, 3 * height // 4)
    top, bottom = rng.choice(len(STUFF_IDS), size=2, replace=False)
    image = np.where(np.arange(height)[None, :, None] < split,
                     _texture(rng, (150, 190, 230), 0, height, width), _texture(rng, (120, 100, 80), 1, height, width))
    stuff = np.full((height, width), STUFF_IDS[bottom], dtype=np.uint8)
    stuff[:split] = STUFF_IDS[top]
    objects = [_random_object(rng, height, width, num_classes) for _ in range(rng.randint(1, 5))]
    masks = []
    for label, flat in objects:
        rle = mask_util.merge(mask_util.frPyObjects([flat], height, width))
        mask = mask_util.decode(rle).astype(bool)
        image[:, mask] = _texture(rng, COLOURS[label % len(COLOURS)], label, height, width)[:, mask]
        stuff[mask] = ids[label] - 1  # COCO-stuff thing ids are category_id - 1
        masks.append(mask)
    stuff[:2], stuff[-2:], stuff[:, :2], stuff[:, -2:] = 255, 255, 255, 255
    covered, annotations = np.zeros((height, width), dtype=bool), []
    for i in reversed(range(len(objects))):  # from the front: what is hidden behind later shapes
        ann = _annotation(rng, objects[i][1], masks[i], masks[i] & ~covered, i == len(objects) - 1)
        covered |= masks[i]
        if ann is not None:
            annotations.insert(0, (ids[objects[i][0]],) + ann)
    return image.round().clip(0, 255).astype(np.uint8).transpose(1, 2, 0), stuff, annotations


def make_synthetic_coco(out_dir, num_images, seed=0, size=(96, 160), num_classes=3, split_name="train",
                        image_format="jpg"):
    """Write the dataset (see the module docstring); returns the path of the annotations JSON.

    ``size`` = (min, max) range of both image sides in pixels.
    """
    rng = np.random.RandomState(seed)
    ids = category_ids(num_classes)
    image_dir = os.path.join(out_dir, split_name)
    stuff_dir = os.path.join(out_dir, "stuffthingmaps", split_name)
    for d in (image_dir, stuff_dir, os.path.join(out_dir, "annotations")):
        os.makedirs(d, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        height, width = (int(v) for v in rng.randint(size[0], size[1] + 1, size=2))
        image, stuff, objects = _make_image(rng, height, width, num_classes, ids)
        name = f"{image_id:06d}.{image_format}"
        Image.fromarray(image).save(os.path.join(image_dir, name), quality=95)
        Image.fromarray(stuff).save(os.path.join(stuff_dir, f"{image_id:06d}.png"))
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
        for category_id, segmentation, bbox, area, crowd in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                                "segmentation": segmentation, "bbox": [round(v, 2) for v in bbox], "area": area,
                                "iscrowd": crowd})
    names = [SHAPES[k % len(SHAPES)] + ("" if k < len(SHAPES) else f"-{k}") for k in range(num_classes)]
    categories = [{"id": c, "name": name, "supercategory": "shape"} for c, name in zip(ids, names)]
    path = os.path.join(out_dir, "annotations", f"instances_{split_name}.json")
    with open(path, "w") as f:
        json.dump({"info": {"description": f"scnet synthetic shapes, seed {seed}"}, "images": images,
                   "annotations": annotations, "categories": categories}, f)
    return path
