"""Every rule that drops, fixes or replaces an input of a COCO-format dataset [impl 16.1, 16.3, 24.28].

One implementation of each rule. ``CocoDataset`` applies them at construction (``index_coco``) and
in ``__getitem__`` (``load_record``); ``scripts/check_data.py`` runs the very same functions over the
whole dataset up front, decode pass included, so that it reports exactly what training would do.

Outcomes (the ``action`` of a :class:`Problem`):
    "skipped"         the annotation or image is not used (a load-time failure: the item is replaced)
    "used after fix"  the input is repaired and used (boxes clipped, stuff labels set to 255, ...)
    "error"           training cannot start (``DataError``: malformed JSON, no categories, ...)
"""
import json
import os
from collections import Counter, namedtuple

import numpy as np
from PIL import ExifTags, Image, ImageOps

from ..utils.files import FileError

SKIPPED, FIXED, ERROR = "skipped", "used after fix", "error"
SEMANTIC_SOURCES = ("stuff_maps", "instances", "none")
IGNORE_LABEL = 255  # COCO-stuff "unlabeled" and the semantic loss's ignore index [impl 16.3]
GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N"}
SIXTEEN_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}


class DataError(FileError):
    """A dataset-level problem that stops training (the checker's "error" action); scripts report it in
    one line (``report_file_errors``)."""


class LoadError(Exception):
    """One image cannot be used as it is on disk; CocoDataset replaces the item by the next one."""

    def __init__(self, kind, detail=""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind, self.detail = kind, detail


class Problem(namedtuple("Problem", "file kind detail action")):
    """One finding: ``file`` it belongs to, short ``kind`` (counted in summaries), ``detail``, ``action``.

    ``reason`` is "kind: detail", so ``reason.split(":")[0]`` is the kind.
    """

    @property
    def reason(self):
        return f"{self.kind}: {self.detail}" if self.detail else self.kind

    def __str__(self):
        return f"{self.file}: {self.reason} -> {self.action}"


# --- annotation file --------------------------------------------------------------------------------
def load_annotation_file(path):
    """The parsed COCO JSON; DataError when it is missing, malformed or lacks images/categories."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError(f"annotation file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with 'images', 'annotations', 'categories'")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: no '{key}' list in the annotation file")
    if not isinstance(data.setdefault("annotations", []), list):
        raise DataError(f"{path}: 'annotations' is not a list")
    return data


def category_mapping(categories):
    """(sorted COCO category ids, their names): contiguous label i <-> category_ids[i] ([impl 16.1] step 2)."""
    names = {}
    for c in categories:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or isinstance(c.get("id"), bool):
            raise DataError(f"malformed category entry {c!r}: needs an integer 'id'")
        if c["id"] in names:
            raise DataError(f"duplicate category id {c['id']}")
        names[c["id"]] = str(c.get("name", c["id"]))
    if not names:
        raise DataError("the annotation file has no categories")
    category_ids = sorted(names)
    return category_ids, [names[i] for i in category_ids]


# --- per-annotation rules ---------------------------------------------------------------------------
def _is_number(v):
    """A finite int or float (JSON booleans are ints in Python: not numbers here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def segmentation_problem(segmentation, height, width):
    """(kind, detail) when a segmentation cannot give a mask, else None [impl 24.22]."""
    if segmentation is None or (isinstance(segmentation, (list, dict)) and len(segmentation) == 0):
        return "empty segmentation", ""
    if isinstance(segmentation, list):
        if not all(isinstance(p, list) and all(_is_number(v) for v in p) for p in segmentation):
            return "malformed segmentation", "polygons must be lists of numbers"
        if not any(len(p) >= 6 for p in segmentation):  # the shorter polygons are dropped
            return "polygon with fewer than 3 points", f"{max(len(p) for p in segmentation) // 2} points at most"
        return None
    if not isinstance(segmentation, dict):
        return "malformed segmentation", f"type {type(segmentation).__name__}"
    size, counts = segmentation.get("size"), segmentation.get("counts")
    if not (isinstance(size, (list, tuple)) and len(size) == 2):
        return "malformed segmentation", f"RLE size {size!r}"
    if list(size) != [height, width]:
        return "RLE size differs from the image", f"RLE {size[1]}x{size[0]}, image {width}x{height}"
    if isinstance(counts, list):  # uncompressed RLE: the runs cover the image exactly
        if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != height * width:
            return "malformed segmentation", "uncompressed RLE runs do not add up to the image"
    elif not isinstance(counts, (str, bytes)) or len(counts) == 0:
        return "malformed segmentation", f"RLE counts of type {type(counts).__name__}"
    elif _compressed_rle_length(counts) != height * width:  # pycocotools would read past the runs
        return "malformed segmentation", "compressed RLE runs do not add up to the image"
    return None


def _compressed_rle_length(counts):
    """Pixels covered by a COCO compressed RLE string (pycocotools' rleFrString), -1 if it is invalid."""
    data = counts.encode("ascii", "replace") if isinstance(counts, str) else counts
    runs, p = [], 0
    while p < len(data):
        value, k, more = 0, 0, True
        while more:
            if p >= len(data) or not 48 <= data[p] < 112:
                return -1
            c = data[p] - 48
            value |= (c & 0x1F) << (5 * k)
            more, p, k = c & 0x20, p + 1, k + 1
            if not more and c & 0x10:
                value |= -1 << (5 * k)  # sign extension
        runs.append(value + (runs[-2] if len(runs) > 2 else 0))  # runs after the 3rd are deltas
    return sum(runs) if all(r >= 0 for r in runs) else -1


def annotation_problem(ann, height, width, category_to_label):
    """(kind, detail) of the first rule that drops ``ann``, or None when it is usable [impl 16.1].

    The box rules are mmdet 2.x ``CocoDataset._parse_ann_info``; crowd is decided by the caller.
    """
    bbox = ann.get("bbox")
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        return "malformed box", f"bbox {bbox!r}"
    category_id = ann.get("category_id")
    if not isinstance(category_id, int) or category_id not in category_to_label:
        return "unknown category", f"category_id {ann.get('category_id')!r} is not in 'categories'"
    if ann.get("ignore", False):
        return "ignore flag", ""
    x, y, w, h = bbox
    if w < 1 or h < 1:
        return "degenerate box", f"w={w:g}, h={h:g}"
    if "area" in ann and not (_is_number(ann["area"]) and ann["area"] > 0):
        return "non-positive area", f"area {ann['area']!r}"
    inside_w = min(x + w, width) - max(x, 0)
    inside_h = min(y + h, height) - max(y, 0)
    if inside_w <= 0 or inside_h <= 0:
        return "box outside the image", f"bbox {[round(v, 2) for v in bbox]} in a {width}x{height} image"
    return segmentation_problem(ann.get("segmentation"), height, width)


def box_partly_outside(bbox, height, width):
    """True when a usable box crosses the image border; it is clipped after the resize ([impl 16.1] step 3)."""
    x, y, w, h = bbox
    return x < 0 or y < 0 or x + w > width or y + h > height


# --- per-image rules (construction time) ------------------------------------------------------------
def image_entry_problem(info):
    """(kind, detail) when an ``images`` entry lacks a usable id, file_name, width or height."""
    if not isinstance(info, dict):
        return "malformed image entry", repr(info)[:80]
    for key in ("id", "width", "height"):
        if not isinstance(info.get(key), int) or isinstance(info.get(key), bool) or info[key] < (key != "id"):
            return "malformed image entry", f"{key} = {info.get(key)!r}"
    if not isinstance(info.get("file_name"), str) or not info["file_name"]:
        return "malformed image entry", f"file_name = {info.get('file_name')!r}"
    return None


def stuff_map_name(file_name):
    """COCO-stuff map of an image: same relative path, extension .png ([impl 16.1] step 2)."""
    return os.path.splitext(file_name)[0] + ".png"


def check_stuff_dir(stuff_dir):
    """DataError unless ``stuff_dir`` exists and holds at least one PNG."""
    hint = "; without COCO-stuff maps set data.semantic_source=instances or model.semantic.enabled=false"
    if not stuff_dir or not os.path.isdir(stuff_dir):
        raise DataError(f"stuff map directory {stuff_dir!r} does not exist{hint}")
    with os.scandir(stuff_dir) as entries:
        if not any(e.name.lower().endswith(".png") for e in entries):
            raise DataError(f"stuff map directory {stuff_dir!r} holds no PNG file{hint}")


def check_semantic_options(semantic_source, stuff_dir, num_semantic_classes, num_classes):
    """DataError when the semantic targets cannot be built as configured (before any image is read)."""
    if semantic_source not in SEMANTIC_SOURCES:
        raise DataError(f"semantic_source must be one of {SEMANTIC_SOURCES}, got {semantic_source!r}")
    if semantic_source == "stuff_maps":
        check_stuff_dir(stuff_dir)
    if semantic_source == "instances" and not num_classes + 1 <= num_semantic_classes <= IGNORE_LABEL:
        raise DataError(
            f"semantic_source=instances labels the background {num_classes} (the number of categories), so it "
            f"needs {num_classes + 1} <= num_semantic_classes <= 255, got {num_semantic_classes}: set "
            f"model.semantic.num_classes >= model.num_classes + 1"
        )


class _Listing:
    """File existence through one directory listing: 118k ``os.path.exists`` calls are slow on NFS."""

    def __init__(self, directory):
        self.directory = directory
        self.names = set(os.listdir(directory)) if directory and os.path.isdir(directory) else set()

    def __contains__(self, name):
        if "/" in name or os.sep in name:
            return os.path.isfile(os.path.join(self.directory, name))
        return name in self.names


def image_problem(entry, training, min_size, images, stuff_maps=None, keep_empty=False):
    """(kind, detail) when an image is dropped at construction, else None ([impl 16.1], mmdet ``_filter_imgs``).

    ``entry`` holds the image ``info``, its usable ``instances``, and counts of its annotations.
    ``keep_empty`` keeps training images without usable annotations (pure negatives; the official
    pipeline drops them).
    """
    info = entry["info"]
    if info["file_name"] not in images:
        return "missing image file", os.path.join(images.directory, info["file_name"])
    if training and min(info["width"], info["height"]) < min_size:
        return "image too small", f"{info['width']}x{info['height']}, shorter side < {min_size}"
    if training and not entry["instances"] and not keep_empty:
        if entry["num_annotations"] == 0:
            return "no annotations", ""
        if entry["num_crowd"] == entry["num_annotations"]:
            return "crowd-only", f"{entry['num_crowd']} crowd annotation(s); crowds are not ground truth, [impl 24.28]"
        return "no usable annotation", f"all {entry['num_annotations']} annotations dropped"
    if stuff_maps is not None and stuff_map_name(info["file_name"]) not in stuff_maps:
        return "missing stuff map", os.path.join(stuff_maps.directory, stuff_map_name(info["file_name"]))
    return None


# --- the index built at construction ----------------------------------------------------------------
CocoIndex = namedtuple("CocoIndex", "records category_ids class_names problems stats")


def _image_entries(images, problems):
    """image id -> entry, in JSON order; malformed and duplicate entries are recorded and dropped. A
    file listed a second time (under another id) maps to None: that entry and its annotations are
    skipped, or the image would be trained on twice."""
    entries, ids_of_files = {}, {}
    for info in images:
        problem = image_entry_problem(info)
        if problem is None and info["id"] in entries:
            first = entries[info["id"]]["info"]["file_name"]
            problem = ("duplicate image id", f"id {info['id']} already used by {first}")
        elif problem is None and info["file_name"] in ids_of_files:
            entries[info["id"]] = None
            detail = f"already image id {ids_of_files[info['file_name']]}; entry id {info['id']} and its annotations"
            problems.append(Problem(info["file_name"], "image file listed twice", detail, SKIPPED))
            continue
        if problem:
            name = info.get("file_name", "?") if isinstance(info, dict) else "?"
            problems.append(Problem(name, *problem, SKIPPED))
            continue
        entries[info["id"]] = {"info": info, "instances": [], "crowd": [], "num_annotations": 0, "num_crowd": 0}
        ids_of_files[info["file_name"]] = info["id"]
    return entries


def _add_annotation(ann, entries, category_to_label, problems, stats):
    """Apply the annotation rules to one annotation and file it under its image (JSON order kept)."""
    ann = ann if isinstance(ann, dict) else {}
    entry = entries.get(ann.get("image_id"))
    if entry is None and ann.get("image_id") in entries:  # of a file listed twice: reported with its entry
        return
    if entry is None:
        name = f"<image_id {ann.get('image_id')!r}>"
        problems.append(Problem(name, "unknown image id", f"annotation {ann.get('id')}", SKIPPED))
        return
    info, crowd = entry["info"], bool(ann.get("iscrowd", 0))
    entry["num_annotations"] += 1
    entry["num_crowd"] += crowd
    stats["crowd annotations"] += crowd
    problem = annotation_problem(ann, info["height"], info["width"], category_to_label)
    if problem:
        detail = f"annotation {ann.get('id')}{' (crowd)' if crowd else ''}" + (f": {problem[1]}" if problem[1] else "")
        problems.append(Problem(info["file_name"], problem[0], detail, SKIPPED))
        return
    odd = [len(p) for p in ann["segmentation"] if len(p) % 2] if isinstance(ann["segmentation"], list) else []
    if odd:  # pycocotools would drop the last number silently; do it here, with a word
        ann = dict(ann, segmentation=[p[: len(p) - len(p) % 2] for p in ann["segmentation"]])
        detail = f"annotation {ann.get('id')}: polygons of {odd} numbers, the last one dropped"
        problems.append(Problem(info["file_name"], "odd-length polygon", detail, FIXED))
    if crowd:  # neither ground truth nor ignore region [impl 24.28]; kept for "instances" semantic maps
        entry["crowd"].append({"id": ann.get("id"), "segmentation": ann["segmentation"]})
    else:
        entry["instances"].append({
            "id": ann.get("id"),
            "bbox": [float(v) for v in ann["bbox"]],
            "label": category_to_label[ann["category_id"]],
            "segmentation": ann["segmentation"],
            "clipped": box_partly_outside(ann["bbox"], info["height"], info["width"]),
        })


def index_coco(data, image_dir, stuff_dir=None, semantic_source="none", min_size=32, training=True, keep_empty=False):
    """Apply every construction-time rule to a parsed COCO JSON (see ``load_annotation_file``).

    Returns a CocoIndex: ``records`` (one dict per kept image, JSON order: id, file_name, height,
    width, instances, crowd), category ids/names, the ``problems`` found and counts in ``stats``.
    """
    if not os.path.isdir(image_dir):
        raise DataError(f"image directory {image_dir!r} does not exist")
    category_ids, class_names = category_mapping(data["categories"])
    category_to_label = {c: i for i, c in enumerate(category_ids)}
    problems, stats = [], Counter(images=len(data["images"]), annotations=len(data["annotations"]))
    entries = _image_entries(data["images"], problems)
    for ann in data["annotations"]:
        _add_annotation(ann, entries, category_to_label, problems, stats)
    images = _Listing(image_dir)
    stuff_maps = _Listing(stuff_dir) if semantic_source == "stuff_maps" else None
    records = []
    for entry in filter(None, entries.values()):
        problem = image_problem(entry, training, min_size, images, stuff_maps, keep_empty)
        if problem:
            problems.append(Problem(entry["info"]["file_name"], *problem, SKIPPED))
            continue
        info = entry["info"]
        records.append({k: info[k] for k in ("id", "file_name", "height", "width")})
        records[-1].update(instances=entry["instances"], crowd=entry["crowd"])
    stats["usable annotations"] = sum(len(r["instances"]) for r in records)
    return CocoIndex(records, category_ids, class_names, problems, stats)


# --- load-time rules (decode) -----------------------------------------------------------------------
def _to_rgb(image):
    """A decoded Pillow image in any common mode -> (H, W, 3) uint8 RGB array."""
    if image.mode in SIXTEEN_BIT_MODES:  # scale 16 -> 8 bits (as cv2 does), never clip at 255
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
        return np.repeat(values.astype(np.uint8)[..., None], 3, axis=2)
    if image.mode in ("P", "PA"):  # through RGBA: Pillow warns on palette transparency otherwise
        image = image.convert("RGBA")
    if image.mode != "RGB":  # L, LA, RGBA (alpha dropped, like cv2), CMYK, YCbCr, 1
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8)


def decode_image(path):
    """(H, W, 3) uint8 RGB array and (kind, detail) notes (grayscale, conversions; not problems).

    EXIF orientation is applied, as cv2's IMREAD_COLOR of the official pipeline does. Any failure,
    a truncated file included (Pillow's ImageFile.LOAD_TRUNCATED_IMAGES must stay False), raises
    LoadError.
    """
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so that a truncated file fails here
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
            mode = image.mode
            array = _to_rgb(ImageOps.exif_transpose(image))
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise LoadError("unreadable image", f"{type(e).__name__}: {e}") from None
    notes = []
    if mode in GRAYSCALE_MODES:
        notes.append(("grayscale image", f"mode {mode}, converted to RGB"))
    elif mode != "RGB":
        notes.append(("non-RGB image", f"mode {mode}, converted to RGB"))
    if mode in SIXTEEN_BIT_MODES:
        notes.append(("16-bit image", "scaled to 8 bits"))
    if orientation not in (1, None):
        notes.append(("EXIF orientation", f"tag {orientation} applied"))
    return array, notes


def check_image_size(array, height, width):
    """LoadError when the decoded image is not the JSON's width x height (boxes would not fit it)."""
    h, w = array.shape[:2]
    if (h, w) != (height, width):
        hint = " (EXIF orientation?)" if (w, h) == (height, width) else ""
        raise LoadError("image size differs from the JSON", f"decoded {w}x{h}, JSON {width}x{height}{hint}")


def read_stuff_map(path, height, width, num_classes):
    """(H, W) uint8 COCO-stuff ids read unchanged (255 = unlabeled) and the fixes applied [impl 16.3]."""
    try:
        with Image.open(path) as image:
            mode, labels = image.mode, np.array(image)
    except Exception as e:
        raise LoadError("unreadable stuff map", f"{type(e).__name__}: {e}") from None
    if labels.shape[:2] != (height, width):
        size = f"map {labels.shape[1]}x{labels.shape[0]}, image {width}x{height}"
        raise LoadError("stuff map size differs from the image", size)
    fixes = []
    if labels.ndim == 3:  # a label map saved as RGB(A)/LA: usable only if it is a gray image
        colour = labels[..., :1] if mode in ("LA", "PA") else labels[..., :3]
        if not (colour == colour[..., :1]).all():
            raise LoadError("RGB stuff map with different channels", f"mode {mode}; ids must be single-channel")
        labels = labels[..., 0]
        fixes.append(("RGB stuff map", f"mode {mode} with equal channels, channel 0 used"))
    labels = labels.astype(np.int64)
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != IGNORE_LABEL)
    if bad.any():
        values = np.unique(labels[bad])
        fixes.append(("stuff labels out of range", f"values {values[:5].tolist()} >= {num_classes} set to 255"))
        labels[bad] = IGNORE_LABEL
    return labels.astype(np.uint8), fixes

