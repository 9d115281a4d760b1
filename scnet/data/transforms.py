"""Train-time geometry on (image, target), [impl 16.1] steps 3-4: keep-ratio resize and horizontal flip.

Plain functions on ``image`` (3, H, W) uint8 and a target dict in the detector's data contract
(``boxes`` float (G, 4) xyxy, ``masks`` uint8 (G, H, W), optional ``semantic_seg`` uint8 (H, W)).
They return new tensors and a new dict; other keys of the target are passed through. Normalisation,
padding and the 1/8 semantic map are the model's job (scnet/modeling/detector.py), not done here.
"""
import torch

from ..ops.image import rescale_size, resize_image, resize_nearest
from ..ops.boxes import clip_boxes_


def resize_scale(height, width, scale=(1333, 800)):
    """(new_h, new_w, w_scale, h_scale) of the keep-ratio resize to ``scale`` = (long, short) max sides.

    The rounding is the official one (int(side * s + 0.5)) and the per-axis factors are recomputed
    from the rounded size, so they differ slightly from each other [impl 24.21].
    """
    new_h, new_w = rescale_size(height, width, scale)
    return new_h, new_w, new_w / width, new_h / height


def resize(image, target, scale=(1333, 800)):
    """Keep-ratio resize of the image, boxes, masks and semantic map to ``scale`` ([impl 16.1] step 3):
    the image bilinear, masks and map nearest, each exactly as OpenCV does it (scnet/ops/image.py).

    Boxes are multiplied per axis by (w_scale, h_scale) and clipped to the new image. The target's
    ``scale_factor`` becomes (w_scale, h_scale) relative to the input of this call.
    """
    height, width = image.shape[-2:]
    new_h, new_w, w_scale, h_scale = resize_scale(height, width, scale)
    target = dict(target)
    boxes = target["boxes"] * target["boxes"].new_tensor([w_scale, h_scale, w_scale, h_scale])
    target["boxes"] = clip_boxes_(boxes, (new_h, new_w))
    if "masks" in target:
        target["masks"] = resize_nearest(target["masks"], (new_h, new_w))
    if "semantic_seg" in target:
        target["semantic_seg"] = resize_nearest(target["semantic_seg"], (new_h, new_w))
    target["scale_factor"] = (w_scale, h_scale)
    return resize_image(image, (new_h, new_w)), target


def hflip(image, target):
    """Horizontal flip of the image, boxes (x1' = W - x2, x2' = W - x1, no +1, [impl 24.2]), masks and map."""
    width = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"]
    target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    if "semantic_seg" in target:
        target["semantic_seg"] = target["semantic_seg"].flip(-1)
    target["flipped"] = not target.get("flipped", False)
    return image.flip(-1), target
