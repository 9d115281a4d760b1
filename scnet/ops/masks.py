"""Instance masks: COCO polygons/RLE -> bitmaps, bitmaps -> 28x28 RoI targets, 28x28 -> image [impl 11.3, 14]."""
import math

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align


def segmentation_to_bitmask(segmentation, height, width):
    """One COCO ``segmentation`` (polygon list, RLE or uncompressed RLE) -> (H, W) uint8 array.

    The parts of a polygon instance are merged, as pycocotools does for COCO itself [impl 24.22].
    """
    if isinstance(segmentation, list):  # polygons
        polygons = [p for p in segmentation if len(p) >= 6]  # a polygon needs 3 points
        if not polygons:
            return np.zeros((height, width), dtype=np.uint8)
        rle = mask_util.merge(mask_util.frPyObjects(polygons, height, width))
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = mask_util.frPyObjects(segmentation, height, width)
    else:  # compressed RLE
        rle = segmentation
    return mask_util.decode(rle).astype(np.uint8)


def mask_targets(gt_masks, rois, gt_indices, resolution):
    """Binary training targets (P, resolution, resolution) for the mask head [impl 11.3].

    RoIAlign (aligned, adaptive sampling) of each RoI on its assigned GT bitmap, then >= 0.5. The
    bitmaps are the "feature map" batch and ``gt_indices`` the batch index, so each GT mask is
    converted to float once, however many RoIs hit it.

    Args:
        gt_masks: (G, H, W) uint8/bool bitmaps of one image (at the network input size).
        rois: (P, 4) xyxy boxes; clipped to the mask size first, as the official code does.
        gt_indices: (P,) index into ``gt_masks`` of each RoI's GT.
    """
    if rois.shape[0] == 0:
        return rois.new_zeros((0, resolution, resolution))
    h, w = gt_masks.shape[-2:]
    boxes = rois.clone()
    boxes[:, 0::2].clamp_(min=0, max=w)
    boxes[:, 1::2].clamp_(min=0, max=h)
    boxes = torch.cat([gt_indices.to(boxes)[:, None], boxes], dim=1)
    sampled = roi_align(gt_masks[:, None].to(boxes.dtype), boxes, (resolution, resolution), 1.0, 0, True)
    return (sampled[:, 0] >= 0.5).to(rois.dtype)


def _paste_window(box, height, width):
    """Integer canvas window that can hold a mask pasted at ``box`` (one pixel of margin)."""
    x0 = max(math.floor(box[0]) - 1, 0)
    y0 = max(math.floor(box[1]) - 1, 0)
    x1 = min(math.ceil(box[2]) + 1, width)
    y1 = min(math.ceil(box[3]) + 1, height)
    return x0, y0, x1, y1


def paste_masks(masks, boxes, image_size, threshold=0.5):
    """Paste (N, M, M) mask probabilities into an image of ``image_size`` = (h, w) [impl 14].

    Canvas pixel centres (i + 0.5) are mapped into each box and sampled bilinearly from the mask with
    ``grid_sample(align_corners=False)``, then thresholded at ``>= threshold``. Each mask is pasted
    only inside its own box window, so memory stays at the (N, h, w) boolean output plus one window:
    100 detections on a 1333x800 image need about 110 MB.
    """
    height, width = image_size
    out = torch.zeros((masks.shape[0], height, width), dtype=torch.bool, device=masks.device)
    for i, box in enumerate(boxes.tolist()):
        x0, y0, x1, y1 = _paste_window(box, height, width)
        if x1 <= x0 or y1 <= y0:
            continue
        bx0, by0, bx1, by1 = boxes[i : i + 1].float().unbind(1)
        xs = torch.arange(x0, x1, device=masks.device, dtype=torch.float32) + 0.5
        ys = torch.arange(y0, y1, device=masks.device, dtype=torch.float32) + 0.5
        xs = (xs - bx0) / (bx1 - bx0) * 2 - 1
        ys = (ys - by0) / (by1 - by0) * 2 - 1
        xs = torch.where(torch.isinf(xs), torch.zeros_like(xs), xs)  # zero-width box
        ys = torch.where(torch.isinf(ys), torch.zeros_like(ys), ys)
        grid = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]), dim=-1)[None]
        pasted = F.grid_sample(masks[i : i + 1, None].float(), grid, align_corners=False)
        out[i, y0:y1, x0:x1] = pasted[0, 0] >= threshold
    return out
