"""Run an exported SCNet (or any model of the zoo) without torch or the scnet package: numpy + onnxruntime.

    from scnet_runtime import OnnxDetector
    detector = OnnxDetector("scnet_r50.onnx")
    result = detector(rgb)          # (H, W, 3) uint8 RGB, any size
    result["boxes"], result["scores"], result["labels"], result["masks"]   # as scnet's model([rgb])[0]

``scripts/export.py`` writes the file; this module is the part of inference that stays outside the
graph, written in numpy so that a deployment needs only onnxruntime (copy this one file next to the
model). Before the graph: the keep-ratio resize to the test scale (OpenCV's fixed-point INTER_LINEAR,
bit for bit, as the official pipeline and scnet.ops.image do), the ImageNet normalisation and the zero
padding to a multiple of 32 (at least 96, a dynamic graph's smallest input). After it: boxes back to
the image's pixels and each 28x28 mask probability map pasted into the image (bilinear, half-pixel
centres, >= 0.5: scnet.ops.masks.paste_masks). The settings (test scale, mean, std, padding, mask
threshold, class names and COCO category ids) travel in the file's metadata, which ``scripts/export.py``
fills from the config and the training annotations.

``ExportedDetector`` does the same around a ``torch.export`` program (.pt2), with torch but without the
scnet package.
"""
import json
import math

import numpy as np

COEF_SCALE = 2048  # OpenCV's bilinear weights are multiples of 1/2048 (INTER_RESIZE_COEF_BITS = 11)


def rescale_size(height, width, scale):
    """Keep-ratio size fitting (long, short) = ``scale``: int(side * s + 0.5), as mmcv rescales."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def _linear_taps(src, dst, clamp_weights):
    """Source indices and fixed-point weights of OpenCV's bilinear resize along one axis."""
    position = ((np.arange(dst, dtype=np.float64) + 0.5) * (1.0 / (dst / src)) - 0.5).astype(np.float32)
    start = np.floor(position)
    fraction = (position - start).astype(np.float32)
    start = start.astype(np.int64)
    if clamp_weights:  # columns beyond the border take the edge pixel with weights (2048, 0)
        fraction[(start < 0) | (start >= src - 1)] = 0
    one = np.float32(COEF_SCALE)
    weights = np.stack([np.rint((np.float32(1) - fraction) * one), np.rint(fraction * one)]).astype(np.int32)
    return np.clip(start, 0, src - 1), np.clip(start + 1, 0, src - 1), weights


def resize_bilinear(image, size):
    """(H, W, 3) uint8 -> (h, w, 3) uint8, equal to ``cv2.resize(image, (w, h), cv2.INTER_LINEAR)``."""
    (h, w), (dh, dw) = image.shape[:2], size
    if (h, w) == (dh, dw):
        return image
    if (h, w) == (2 * dh, 2 * dw):  # OpenCV's area average for an exact 2x reduction
        x = image.astype(np.int32)
        return ((x[0::2, 0::2] + x[0::2, 1::2] + x[1::2, 0::2] + x[1::2, 1::2] + 2) >> 2).astype(np.uint8)
    x0, x1, ax = _linear_taps(w, dw, clamp_weights=True)
    y0, y1, by = _linear_taps(h, dh, clamp_weights=False)

    def horizontal(rows):  # (R, W, 3) uint8 -> (R, dw, 3) int32: the weighted sum, then >> 4
        return (rows[:, x0].astype(np.int32) * ax[0][:, None] + rows[:, x1].astype(np.int32) * ax[1][:, None]) >> 4

    if 2 * dh < h:  # reducing: only the source rows that are used
        top, bottom = horizontal(image[y0]), horizontal(image[y1])
    else:
        rows = horizontal(image)
        top, bottom = rows[y0], rows[y1]
    # 16-bit products as OpenCV's vertical pass: ((b0 * top) >> 16) + ((b1 * bottom) >> 16), rounded >> 2
    top = (top * by[0][:, None, None]) >> 16
    bottom = (bottom * by[1][:, None, None]) >> 16
    return np.clip((top + bottom + 2) >> 2, 0, 255).astype(np.uint8)


def preprocess(image, test_scale, mean, std, size_divisibility, input_size=None, min_side=0):
    """(H, W, 3) uint8 RGB -> the graph's inputs ((1, 3, H', W') float32, (2,) int64 [h, w]) and the
    (w, h) scale factors from the image to the network input. ``input_size``: a static graph's (H', W');
    ``min_side``: a dynamic graph's smallest H', W' (a multiple of the size divisibility)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    new_h, new_w = rescale_size(h, w, test_scale)
    resized = resize_bilinear(image, (new_h, new_w))
    normalized = (resized.astype(np.float32) - np.float32(mean)) / np.float32(std)
    pad_h, pad_w = (max(-(-v // size_divisibility) * size_divisibility, min_side) for v in (new_h, new_w))
    if input_size is not None:
        if new_h > input_size[0] or new_w > input_size[1]:
            raise ValueError(f"the image resized to {new_h}x{new_w} does not fit the graph's fixed input "
                             f"{input_size[0]}x{input_size[1]}: export it with dynamic sizes, or --size")
        pad_h, pad_w = input_size
    tensor = np.zeros((1, 3, pad_h, pad_w), dtype=np.float32)
    tensor[0, :, :new_h, :new_w] = normalized.transpose(2, 0, 1)
    return tensor, np.array([new_h, new_w], dtype=np.int64), (new_w / w, new_h / h)


def paste_masks(probs, boxes, image_size, threshold=0.5):
    """(D, M, M) mask probabilities -> (D, h, w) bool at ``boxes`` (D, 4) xyxy in the image's pixels.

    Each canvas pixel centre (i + 0.5) is mapped into its box and sampled bilinearly from the M x M map
    (``grid_sample``, align_corners=False, zeros outside), then thresholded; only the box's window, with
    one pixel of margin, is computed."""
    height, width = image_size
    out = np.zeros((probs.shape[0], height, width), dtype=bool)
    m = probs.shape[-1]
    for i, (bx0, by0, bx1, by1) in enumerate(boxes.astype(np.float32)):
        x0, y0 = max(math.floor(bx0) - 1, 0), max(math.floor(by0) - 1, 0)
        x1, y1 = min(math.ceil(bx1) + 1, width), min(math.ceil(by1) + 1, height)
        if x1 <= x0 or y1 <= y0:
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            gx = ((np.arange(x0, x1, dtype=np.float32) + 0.5) - bx0) / (bx1 - bx0) * 2 - 1
            gy = ((np.arange(y0, y1, dtype=np.float32) + 0.5) - by0) / (by1 - by0) * 2 - 1
        gx[np.isinf(gx)], gy[np.isinf(gy)] = 0, 0  # a zero-width box
        out[i, y0:y1, x0:x1] = _bilinear(probs[i], gy, gx, m) >= threshold
    return out


def _bilinear(grid, gy, gx, m):
    """grid_sample of one (m, m) map at normalised rows gy and columns gx (zeros outside)."""
    def taps(g):  # unnormalise (align_corners=False), then the two neighbours and their weights
        pos = ((g + 1) * m - 1) / 2
        low = np.floor(pos)
        frac = (pos - low).astype(np.float32)
        low = low.astype(np.int64)
        return [(low, 1 - frac), (low + 1, frac)]

    padded = np.zeros((m + 2, m + 2), dtype=np.float32)  # a ring of zeros: out-of-range taps read 0
    padded[1:-1, 1:-1] = grid
    out = np.zeros((gy.size, gx.size), dtype=np.float32)
    for iy, wy in taps(gy):
        iy = np.clip(iy, -1, m) + 1
        for ix, wx in taps(gx):
            ix = np.clip(ix, -1, m) + 1
            out += padded[iy][:, ix] * (wy[:, None] * wx[None, :])
    return out


class _Detector:
    """Pre- and post-processing around a graph ``run(tensor, image_size) -> dict of arrays``."""

    def __init__(self, meta):
        self.test_scale = tuple(meta["test_scale"])
        self.mean, self.std = meta["pixel_mean"], meta["pixel_std"]
        self.size_divisibility = meta["size_divisibility"]
        self.mask_threshold = meta["mask_threshold"]
        self.class_names = meta.get("class_names")  # indexed by label, or None
        self.category_ids = meta.get("category_ids")
        self.input_size = meta.get("input_size")
        self.min_side = meta.get("min_input_side") or 0

    def __call__(self, image):
        tensor, image_size, (w_scale, h_scale) = preprocess(
            np.asarray(image), self.test_scale, self.mean, self.std, self.size_divisibility, self.input_size,
            self.min_side)
        out = self.run(tensor, image_size)
        boxes = out["boxes"] / np.array([w_scale, h_scale, w_scale, h_scale], dtype=np.float32)
        result = {"boxes": boxes, "scores": out["scores"], "labels": out["labels"],
                  "masks": paste_masks(out["mask_probs"], boxes, image.shape[:2], self.mask_threshold)}
        if "mask_scores" in out:
            result["mask_scores"] = out["mask_scores"]
        return result


class OnnxDetector(_Detector):
    """An exported ONNX file in onnxruntime; settings from its metadata."""

    def __init__(self, path, providers=("CPUExecutionProvider",), session_options=None):
        import onnxruntime

        self.session = onnxruntime.InferenceSession(path, sess_options=session_options, providers=list(providers))
        super().__init__(json.loads(self.session.get_modelmeta().custom_metadata_map["scnet"]))
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, tensor, image_size):
        values = self.session.run(None, {"image": tensor, "image_size": image_size})
        return dict(zip(self.output_names, values))


class ExportedDetector(_Detector):
    """A ``torch.export`` program (.pt2) of scripts/export.py; needs torch (and torchvision, whose
    roi_align and nms the program calls), not scnet."""

    def __init__(self, path):
        import torch
        import torchvision  # noqa: F401  registers torchvision::roi_align / nms, which the program calls

        extra = {"scnet.json": ""}
        self.program = torch.export.load(path, extra_files=extra)
        super().__init__(json.loads(extra["scnet.json"]))
        self.module = self.program.module()

    def run(self, tensor, image_size):
        import torch

        with torch.no_grad():
            out = self.module(torch.from_numpy(tensor), torch.from_numpy(image_size))
        return {k: v.numpy() for k, v in out.items()}
