"""Box operations in xyxy pixel coordinates, with the conventions of the official code [impl 9.2, 24.2].

No "+1" anywhere: width = x2 - x1. Every formula keeps the official operation order so that results
agree to the last bit with MMDetection's, which the parity test checks.
"""
import math

import torch
from torchvision.ops import nms

from .export import exporting, maybe_empty

# dw, dh are clamped to +-|log(16/1000)| before exp [impl 9.2, 24.4]
DEFAULT_SCALE_CLAMP = abs(math.log(16 / 1000))


def box_area(boxes):
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1, boxes2, eps=1e-6):
    """IoU matrix (N, M) of two sets of xyxy boxes; the union is clamped at ``eps`` [impl 9.4]."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = (area1[:, None] + area2[None, :] - overlap).clamp(min=eps)
    return overlap / union


def clip_boxes_(boxes, image_size):
    """Clip xyxy boxes in place to an image of ``image_size`` = (h, w) (the resized, unpadded size): ints,
    or 0-d tensors (an exported graph's input)."""
    h, w = image_size
    if torch.is_tensor(w):  # clamp takes a tensor bound only as (Tensor min, Tensor max) or one of them
        boxes[..., 0::2].clamp_(min=0).clamp_(max=w.to(boxes.dtype))
        boxes[..., 1::2].clamp_(min=0).clamp_(max=h.to(boxes.dtype))
        return boxes
    boxes[..., 0::2].clamp_(min=0, max=w)
    boxes[..., 1::2].clamp_(min=0, max=h)
    return boxes


class BoxCoder:
    """DeltaXYWH coder with target means 0 and per-coordinate ``stds`` [impl 9.2]."""

    def __init__(self, stds=(1.0, 1.0, 1.0, 1.0), scale_clamp=DEFAULT_SCALE_CLAMP):
        self.stds = tuple(float(s) for s in stds)
        self.scale_clamp = scale_clamp

    def encode(self, proposals, targets):
        """Deltas (N, 4) that map ``proposals`` onto ``targets`` (both (N, 4) xyxy)."""
        proposals = proposals.float()
        targets = targets.float()
        px = (proposals[:, 0] + proposals[:, 2]) * 0.5
        py = (proposals[:, 1] + proposals[:, 3]) * 0.5
        pw = proposals[:, 2] - proposals[:, 0]
        ph = proposals[:, 3] - proposals[:, 1]
        gx = (targets[:, 0] + targets[:, 2]) * 0.5
        gy = (targets[:, 1] + targets[:, 3]) * 0.5
        gw = targets[:, 2] - targets[:, 0]
        gh = targets[:, 3] - targets[:, 1]
        deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=1)
        return deltas / deltas.new_tensor(self.stds)

    def decode(self, boxes, deltas, image_size=None):
        """Apply (N, 4) ``deltas`` to (N, 4) ``boxes``; clip to ``image_size`` = (h, w) when given."""
        if maybe_empty(boxes.shape[0]):
            return deltas.new_zeros((0, 4))
        deltas = deltas * deltas.new_tensor(self.stds)
        pxy = (boxes[:, :2] + boxes[:, 2:]) * 0.5
        pwh = boxes[:, 2:] - boxes[:, :2]
        dwh = deltas[:, 2:].clamp(min=-self.scale_clamp, max=self.scale_clamp)
        gxy = pxy + pwh * deltas[:, :2]
        gwh = pwh * dwh.exp()
        out = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=1)
        if image_size is not None:
            clip_boxes_(out, image_size)
        return out


def batched_nms(boxes, scores, idxs, iou_threshold, split_threshold=10000, max_detections=None, num_groups=None):
    """NMS done independently per value of ``idxs``; returns kept indices sorted by decreasing score.

    Below ``split_threshold`` boxes the groups are separated by offsetting the boxes by
    ``idx * (max coordinate + 1)`` and running one NMS; above it, one NMS per group. This is the
    official (mmcv) procedure, reproduced so that kept boxes and their order match it exactly.

    ``max_detections``: only the first ones are wanted. Whether greedy NMS keeps a box depends only on
    the higher-scoring boxes of its group, so NMS over every candidate scoring at least the k-th highest
    score (ties included, original order kept) keeps exactly the full run's kept boxes above that score:
    when that gives ``max_detections`` of them they are the full run's first ones, else k grows. Same
    procedure (offset or per group, offsets from all boxes) as the full run, so the same float results.

    While exporting, nothing may depend on sizes read from the data: no shortcut, every candidate goes
    through NMS. With ``num_groups`` (the ids are 0..num_groups-1, e.g. the classes) that is one NMS per
    group, a loop the graph unrolls: the cost of greedy NMS grows with the square of its input, and one
    NMS over all the candidates of 80 classes was a third of onnxruntime's time. Each group's boxes are
    moved by the offset eager would use (none from ``split_threshold`` candidates, chosen in the graph):
    the IoUs are computed on the same float coordinates, so an IoU at the threshold is decided as in
    eager. Without ``num_groups``, the offset path.
    """
    if exporting():
        offset = torch.cat([boxes.flatten(), boxes.new_zeros(1)]).max() + 1  # boxes.max() + 1, empty-safe
        if num_groups is not None:
            offset = torch.where(torch.ones_like(scores).sum() < split_threshold, offset, 0)  # n < split
            moved = boxes + (idxs.to(boxes) * offset)[:, None]
            return _nms_each_group(moved, scores, idxs, iou_threshold, num_groups)[:max_detections]
        return _batched_nms(boxes, scores, idxs, iou_threshold, offset)[:max_detections]
    n = scores.numel()
    if n == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    per_group = n >= split_threshold
    offset = None if per_group else boxes.max() + torch.tensor(1).to(boxes)
    k = 8 * max_detections if max_detections else n  # 100 detections: 800 candidates first
    while k < n:
        subset = (scores >= scores.topk(k).values[-1]).nonzero().view(-1)
        keep = _batched_nms(boxes[subset], scores[subset], idxs[subset], iou_threshold, offset)
        if keep.numel() >= max_detections:
            return subset[keep[:max_detections]]
        k *= 4
    return _batched_nms(boxes, scores, idxs, iou_threshold, offset)[:max_detections]


def _batched_nms(boxes, scores, idxs, iou_threshold, offset=None):
    """One NMS over boxes moved apart by ``idxs * offset``, or (``offset`` None) one NMS per group."""
    if offset is not None:
        return nms(boxes + (idxs.to(boxes) * offset)[:, None], scores, iou_threshold)
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for group in torch.unique(idxs):
        members = (idxs == group).nonzero().view(-1)
        keep_mask[members[nms(boxes[members], scores[members], iou_threshold)]] = True
    keep = keep_mask.nonzero().view(-1)
    return keep[scores[keep].sort(descending=True, stable=True)[1]]  # ties: in index order, as the offset path


def _nms_each_group(boxes, scores, idxs, iou_threshold, num_groups):
    """One NMS per group id 0..num_groups-1, a loop of known length; kept indices by decreasing score.
    (topk, not a stable sort, which the ONNX exporter lacks: ONNX's TopK puts equal scores in index
    order, as the per-group path of ``_batched_nms`` does; torch's leaves their order unspecified.)"""
    kept = []
    for group in range(num_groups):
        members = (idxs == group).nonzero().view(-1)
        kept.append(members[nms(boxes[members], scores[members], iou_threshold)])
    keep = torch.cat(kept).sort().values
    return keep[scores[keep].topk(keep.shape[0]).indices]


def multiclass_nms(boxes, scores, score_thresh, iou_threshold, max_detections):
    """Class-wise NMS over class-agnostic boxes ([impl 13] step 5, [impl 24.27]).

    Args:
        boxes: (R, 4) boxes shared by all classes, or (R, C, 4) class-specific boxes.
        scores: (R, C + 1) softmax scores, background last.
    Returns:
        boxes (D, 4), scores (D,), labels (D,) with D <= max_detections, sorted by decreasing score.
        The same box can appear under several classes.
    """
    num_classes = scores.shape[1] - 1
    scores = scores[:, :num_classes]
    candidates = (scores > score_thresh).nonzero()  # row-major: (box, class) pairs in box order
    box_idx, labels = candidates[:, 0], candidates[:, 1]
    cand_boxes = boxes[box_idx] if boxes.dim() == 2 else boxes[box_idx, labels]
    cand_scores = scores[box_idx, labels]
    keep = batched_nms(cand_boxes, cand_scores, labels, iou_threshold, max_detections=max_detections,
                       num_groups=num_classes)
    return cand_boxes[keep], cand_scores[keep], labels[keep]
