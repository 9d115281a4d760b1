"""Drawing detections over an image, with numpy + PIL (the charts of the scripts use matplotlib).

    canvas = draw_instances(image, model([image])[0], dataset.class_names)   # (H, W, 3) uint8
    Image.fromarray(canvas).save("detections.png")

Each mask is only read inside its own bounding window, then the whole image is blended in one pass,
so the cost grows with the objects' area plus the image size, not with (number of masks) x (image
size): ~50 ms for 100 masks of ~170x170 px on an 800x1333 image, on one CPU core.
"""
import functools
import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# Saturated colours from Trubetskoy's "20 distinct colours", the pale ones left out (they vanish when
# blended over bright pixels); neighbours in the list differ in hue, so consecutive instances do.
PALETTE = np.array(
    [
        (230, 25, 75), (60, 180, 75), (255, 225, 25), (67, 99, 216), (245, 130, 49), (145, 30, 180),
        (66, 212, 244), (240, 50, 230), (191, 239, 69), (70, 153, 144), (154, 99, 36), (128, 0, 0),
        (128, 128, 0), (0, 0, 117), (250, 190, 212), (220, 190, 255),
    ],
    dtype=np.uint8,
)
MASK_ALPHA = 0.3  # a light fill and an opaque outline: the object's own colour stays visible


@functools.lru_cache(maxsize=32)
def get_font(size):
    """A TrueType font of ``size`` px (Pillow's bundled one), or the fixed bitmap font without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError, ValueError):  # Pillow built without FreeType, or < 10.1
        return ImageFont.load_default()


def font_size_for(height, width):
    """Label font size: ~2% of the image's geometric mean side, never below a readable 10 px."""
    return max(10, round(0.018 * math.sqrt(height * width)))


def _as_hwc_uint8(image):
    """(3, H, W) tensor (the data contract) or (H, W, 3) array -> (H, W, 3) uint8 numpy array."""
    if torch.is_tensor(image):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) image tensor, got {tuple(image.shape)}")
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image array, got {image.shape}")
    return np.clip(image, 0, 255).astype(np.uint8) if image.dtype != np.uint8 else image


def _numpy(value):
    return value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)


def _select(result, score_thresh):
    """Numpy boxes (K, 4), scores, labels of the K scores >= score_thresh, their indices, and all masks.

    The (D, H, W) masks are not indexed here: that would copy ~100 MB for 100 masks on 800x1333.
    """
    scores = _numpy(result["scores"]).astype(np.float64).reshape(-1)
    keep = np.flatnonzero(scores >= score_thresh)
    boxes = _numpy(result["boxes"]).reshape(-1, 4)[keep].astype(np.float64)
    labels = _numpy(result["labels"]).reshape(-1)[keep].astype(np.int64)
    masks = result.get("masks")
    if masks is not None:
        masks = _numpy(masks).astype(bool, copy=False)
    return boxes, scores[keep], labels, keep, masks


def _text_colour(background):
    """Black on light backgrounds, white on dark ones (ITU-R BT.601 luma)."""
    r, g, b = (int(c) for c in background)
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def _erode(mask, iterations):
    """4-neighbour binary erosion by shifted ANDs; pixels outside the array count as background."""
    for _ in range(iterations):
        padded = np.pad(mask, 1)
        mask = mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask


def _bounding_window(mask):
    """(row slice, column slice) of the smallest window holding every pixel of ``mask``, or None."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    rows = slice(rows[0], rows[-1] + 1)
    cols = np.flatnonzero(mask[rows].any(axis=0))  # only the band of rows: a third of the cost
    return rows, slice(cols[0], cols[-1] + 1)


def blend_masks(canvas, masks, colours, alpha=MASK_ALPHA, outline=1):
    """Blend masks into ``canvas`` (H, W, 3) uint8 in place, each with its colour; later masks on top.

    Args:
        masks: sequence of (H, W) bool masks, in painting order; colours: (K, 3) uint8, one per mask.
        outline: width in pixels of the fully opaque border drawn along each mask's edge.
    Each mask only paints, inside its bounding window, a map of the top-most mask of each pixel and
    its edge; then the whole image is blended at once with contiguous 8-bit fixed-point operations
    (fancy-indexed gathers of the covered pixels were 3x slower). Where masks overlap, the top one's
    colour shows at ``alpha`` rather than a muddy stack of colours.
    """
    top = np.zeros(canvas.shape[:2], dtype=np.int32)  # 0: no mask, k + 1: mask k
    edge = np.zeros(canvas.shape[:2], dtype=bool)
    for k, mask in enumerate(masks):
        window = _bounding_window(mask)
        if window is None:
            continue
        inside = mask[window]
        top[window][inside] = k + 1
        edge[window][inside] = (~_erode(inside, outline))[inside] if outline > 0 else False
    fill = round(alpha * 256)
    weight = np.where(top > 0, np.where(edge, np.uint16(256), np.uint16(fill)), np.uint16(0))  # (H, W)
    table = np.concatenate([np.zeros((1, 3)), np.asarray(colours).reshape(-1, 3)]).astype(np.uint16)
    for c in range(3):
        colour = np.take(table[:, c], top)  # (H, W)
        channel = canvas[..., c].astype(np.uint16)
        canvas[..., c] = (channel * (256 - weight) + colour * weight + 128) >> 8


def _overlap(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _place_label(box, label_w, label_h, image_size, placed):
    """Top-left corner of a label for ``box``: above its top-left corner, else just inside it, else under
    or inside its bottom; the first place inside the image that covers no label in ``placed`` (the first
    candidate when all do). Clamped into the image, so that no label is cut at an edge."""
    height, width = image_size
    x1, y1, x2, y2 = box
    x = min(max(x1, 0), max(width - label_w, 0))
    candidates = [y1 - label_h, y1, y2, y2 - label_h]
    clamped = [min(max(y, 0), max(height - label_h, 0)) for y in candidates]
    for y in clamped:
        rect = (x, y, x + label_w, y + label_h)
        if not any(_overlap(rect, other) for other in placed):
            return x, y
    return x, clamped[0] if candidates[0] >= 0 else clamped[1]


def _draw_label(draw, text, box, colour, font, image_size, placed):
    """A filled label near the box (``_place_label``); its rectangle is added to ``placed``."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(1, (bottom - top) // 6)
    label_w, label_h = right - left + 2 * pad, bottom - top + 2 * pad
    x, y = _place_label(box, label_w, label_h, image_size, placed)
    draw.rectangle([x, y, x + label_w - 1, y + label_h - 1], fill=tuple(int(c) for c in colour))
    draw.text((x + pad - left, y + pad - top), text, fill=_text_colour(colour), font=font)
    placed.append((x, y, x + label_w, y + label_h))


def draw_instances(image, result, class_names, score_thresh=0.3, alpha=MASK_ALPHA, show_scores=True):
    """Masks, boxes and "name 0.87" labels of the detections with score >= ``score_thresh``.

    Args:
        image: (3, H, W) uint8 tensor or (H, W, 3) uint8 RGB array.
        result: the model's dict for this image: ``boxes`` (D, 4) xyxy, ``scores`` (D,), ``labels``
            (D,) 0-based, optional ``masks`` (D, H, W) bool (tensors or arrays).
        class_names: names indexed by label; a label past its end is shown as "class_<label>".
        show_scores: False for ground truth (``scores`` all 1): the labels are the names alone.
    Returns:
        (H, W, 3) uint8 array. Each instance has its own palette colour (by detection rank, so two
        neighbouring objects of one class differ); larger objects are painted first so that small
        ones stay visible on top.
    """
    canvas = np.array(_as_hwc_uint8(image), order="C")  # a copy: the caller's image stays as it is
    height, width = canvas.shape[:2]
    boxes, scores, labels, keep, masks = _select(result, score_thresh)
    colours = PALETTE[np.arange(len(scores)) % len(PALETTE)]
    order = np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), kind="stable")
    thickness = 1 if max(height, width) < 600 else 2
    if masks is not None and len(order):
        if masks.shape[1:] != (height, width):
            raise ValueError(f"masks of shape {masks.shape[1:]} for an image of {(height, width)}")
        blend_masks(canvas, [masks[keep[i]] for i in order], colours[order], alpha, thickness)
    canvas = Image.fromarray(canvas)
    draw = ImageDraw.Draw(canvas)
    for i in order:
        draw.rectangle([float(v) for v in boxes[i]], outline=tuple(int(c) for c in colours[i]), width=thickness)
    font = get_font(font_size_for(height, width))
    placed = []  # the labels drawn so far: a label is placed where it covers none of them
    for i in order[::-1]:  # the smallest objects first: their labels take the places nearest to them
        name = class_names[labels[i]] if 0 <= labels[i] < len(class_names) else f"class_{labels[i]}"
        text = f"{name} {scores[i]:.2f}" if show_scores else name
        _draw_label(draw, text, boxes[i].round().astype(int).tolist(), colours[i], font, (height, width), placed)
    return np.array(canvas)
