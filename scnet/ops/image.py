"""Image geometry shared by the data pipeline and the detector: the keep-ratio size, and resizes equal,
bit for bit, to OpenCV's ``cv2.resize``, which the official pipeline uses (mmcv ``imresize``, cv2 backend;
[impl 24.21, 24.22]).

Bilinear on uint8 (``INTER_LINEAR``) is fixed-point in OpenCV: each output pixel's source position is
computed in float32, its two weights per axis are rounded to 11-bit integers, the horizontal pass sums
in integers, and the vertical pass combines two rows with 16-bit products and a final rounding shift.
Float bilinear rounded back to uint8 differs from it by one grey level on about 12% of the pixels, enough
to change detections. Nearest (``INTER_NEAREST``, masks and label maps) copies source pixel
floor(i * (1 / (dst / src))) in double precision. Both are written here in torch (any device); OpenCV is
the tests' oracle, not a dependency (tests/test_resize.py).
"""
import numpy as np
import torch
import torch.nn.functional as F

COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS: bilinear weights are multiples of 1/2048
COEF_SCALE = 1 << COEF_BITS


def rescale_size(height, width, scale):
    """Keep-ratio size fitting (long, short) = ``scale``: int(side * s + 0.5) [impl 16.1, 24.21]."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def as_chw_tensor(image):
    """An (H, W, 3) numpy array or a (3, H, W) tensor as a (3, H, W) tensor (no copy of a tensor)."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB array, got shape {image.shape}")
        if not image.flags.writeable:  # np.asarray(PIL image) is read-only, and torch warns on those
            image = image.copy()
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if not torch.is_tensor(image) or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) RGB tensor, got {getattr(image, 'shape', type(image))}")
    return image


def resize_image(image, size):
    """(C, H, W) image -> (C, h, w) bilinear, ``size`` = (h, w). uint8: exactly ``cv2.resize(...,
    INTER_LINEAR)``; float: torch's bilinear (half-pixel centres, no antialiasing), unrounded."""
    size = tuple(int(s) for s in size)
    if tuple(image.shape[-2:]) == size:
        return image
    if image.dtype != torch.uint8:
        return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    (h, w), (dh, dw) = image.shape[-2:], size
    if (h, w) == (2 * dh, 2 * dw):  # OpenCV switches to its area average for an exact 2x reduction
        x = image.to(torch.int32)
        total = x[:, 0::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 0::2] + x[:, 1::2, 1::2]
        return ((total + 2) >> 2).to(torch.uint8)
    x0, x1, ax = _linear_taps(w, dw, image.device, clamp_weights=True)
    y0, y1, by = _linear_taps(h, dh, image.device, clamp_weights=False)

    def horizontal(rows):  # (C, R, W) uint8 -> (C, R, dw) int32: the weighted sum, then >> 4
        left = rows.index_select(-1, x0).to(torch.int32).mul_(ax[0])
        return left.add_(rows.index_select(-1, x1).to(torch.int32).mul_(ax[1])).bitwise_right_shift_(4)

    if 2 * dh < h:  # reducing: only the source rows that are used
        top, bottom = horizontal(image.index_select(1, y0)), horizontal(image.index_select(1, y1))
    else:
        rows = horizontal(image)
        top, bottom = rows.index_select(1, y0), rows.index_select(1, y1)
    # 16-bit products as OpenCV's vertical pass: ((b0 * top) >> 16) + ((b1 * bottom) >> 16), rounded >> 2
    top.mul_(by[0][:, None]).bitwise_right_shift_(16)
    bottom.mul_(by[1][:, None]).bitwise_right_shift_(16)
    return top.add_(bottom).add_(2).bitwise_right_shift_(2).clamp_(0, 255).to(torch.uint8)


def _linear_taps(src, dst, device, clamp_weights):
    """Source indices (i0, i1) and fixed-point weights (2, dst) of OpenCV's bilinear along one axis.

    Position (d + 0.5) * (1 / (dst / src)) - 0.5 in double, kept as float32; weights round(2048 * (1 - f))
    and round(2048 * f), half to even. Columns beyond the border take the edge pixel with weights
    (2048, 0); rows beyond it read the edge row twice with their unclamped weights (OpenCV does both).
    """
    position = ((np.arange(dst, dtype=np.float64) + 0.5) * (1.0 / (dst / src)) - 0.5).astype(np.float32)
    start = np.floor(position)
    fraction = (position - start).astype(np.float32)
    start = start.astype(np.int64)
    if clamp_weights:
        fraction[(start < 0) | (start >= src - 1)] = 0
    one = np.float32(COEF_SCALE)
    weights = np.stack([np.rint((np.float32(1) - fraction) * one), np.rint(fraction * one)]).astype(np.int32)
    i0, i1 = np.clip(start, 0, src - 1), np.clip(start + 1, 0, src - 1)
    return (torch.from_numpy(i0).to(device), torch.from_numpy(i1).to(device), torch.from_numpy(weights).to(device))


def resize_nearest(tensor, size):
    """Masks (G, H, W) or a label map (H, W) -> spatial ``size``, exactly ``cv2.resize(..., INTER_NEAREST)``:
    pixel (i, j) copies source (floor(i * H'), floor(j * W')), H' = 1 / (h / H) in double, clamped to
    the image. Label values are never interpolated [impl 24.22]."""
    size = tuple(int(s) for s in size)
    (h, w), (dh, dw) = tensor.shape[-2:], size
    if (h, w) == size:
        return tensor
    rows = torch.from_numpy(_nearest_index(h, dh)).to(tensor.device)
    cols = torch.from_numpy(_nearest_index(w, dw)).to(tensor.device)
    return tensor.index_select(-2, rows).index_select(-1, cols)


def _nearest_index(src, dst):
    return np.minimum(np.floor(np.arange(dst, dtype=np.float64) * (1.0 / (dst / src))), src - 1).astype(np.int64)
