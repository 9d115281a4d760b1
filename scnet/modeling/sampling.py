"""Max-IoU assignment and random positive/negative sampling, shared by the RPN and the box stages
[impl 5.3, 9.4]."""
import torch

from ..ops.boxes import box_iou


# An IoU matrix of more elements than this is computed in chunks of GT rows: box_iou's intermediates
# take about nine floats per element, so a chunk stays under ~150 MB whatever the number of GT boxes
# (an image with 1,000 boxes against the ~270,000 anchors of 800x1333 would otherwise need ~10 GB).
MAX_IOU_ELEMENTS = 1 << 22


def assign_boxes(gt_boxes, candidates, positive_iou, negative_iou, min_positive_iou, low_quality=True,
                 max_elements=MAX_IOU_ELEMENTS):
    """``assign_by_iou(box_iou(gt_boxes, candidates), ...)`` in bounded memory: the same result, with
    the (G, A) IoU matrix computed ``max_elements`` at a time (twice, with the low-quality step)."""
    num_gt, num_candidates = gt_boxes.shape[0], candidates.shape[0]
    if num_gt * num_candidates <= max_elements or num_gt <= 1:
        return assign_by_iou(box_iou(gt_boxes, candidates), positive_iou, negative_iou, min_positive_iou, low_quality)
    rows = max(1, max_elements // num_candidates)
    starts = range(0, num_gt, rows)
    max_iou = candidates.new_full((num_candidates,), -1.0)
    argmax = torch.zeros(num_candidates, dtype=torch.long, device=candidates.device)
    gt_max = candidates.new_empty(num_gt)
    for start in starts:
        iou = box_iou(gt_boxes[start : start + rows], candidates)
        chunk_max, chunk_arg = iou.max(dim=0)
        better = chunk_max > max_iou  # strict: ties keep the earlier GT, as one max over all rows does
        max_iou = torch.where(better, chunk_max, max_iou)
        argmax = torch.where(better, chunk_arg + start, argmax)
        gt_max[start : start + iou.shape[0]] = iou.max(dim=1).values
    assigned = _assign_by_max(max_iou, argmax, positive_iou, negative_iou)
    if low_quality:
        for start in starts:  # in GT order: later GTs overwrite earlier claims
            iou = box_iou(gt_boxes[start : start + rows], candidates)
            _claim_low_quality(assigned, iou, gt_max[start : start + iou.shape[0]], min_positive_iou, start)
    return assigned


def assign_by_iou(iou, positive_iou, negative_iou, min_positive_iou, low_quality=True):
    """Assign each candidate to a GT (mmdet MaxIoUAssigner with ``gt_max_assign_all``).

    Args:
        iou: (G, A) IoU of the G ground truths with the A candidates.
        positive_iou: max IoU >= this makes a candidate positive, matched to its best GT.
        negative_iou: 0 <= max IoU < this makes it negative; in between it is ignored.
        min_positive_iou: low-quality step: a GT whose best IoU reaches this claims every candidate
            with exactly that IoU, later GTs overwriting earlier ones.
    Returns:
        (A,) int64: -1 ignored, 0 negative, k + 1 matched to GT k.
    """
    num_gt, num_candidates = iou.shape
    if num_gt == 0 or num_candidates == 0:
        return torch.zeros(num_candidates, dtype=torch.long, device=iou.device)
    max_iou, argmax = iou.max(dim=0)
    assigned = _assign_by_max(max_iou, argmax, positive_iou, negative_iou)
    if low_quality:
        _claim_low_quality(assigned, iou, iou.max(dim=1).values, min_positive_iou, 0)
    return assigned


def _assign_by_max(max_iou, argmax, positive_iou, negative_iou):
    # torch.where rather than boolean-mask assignment: no nonzero, so no host-device synchronisation
    assigned = torch.where((max_iou >= 0) & (max_iou < negative_iou), 0, -1)
    return torch.where(max_iou >= positive_iou, argmax + 1, assigned)


def _claim_low_quality(assigned, iou, gt_max, min_positive_iou, first_gt):
    """GT rows ``first_gt + i`` of ``iou`` claim the candidates at their best IoU (if >= the minimum);
    the last GT with a hit wins, as in the official per-GT loop."""
    hits = (iou == gt_max[:, None]) & (gt_max >= min_positive_iou)[:, None]
    last = first_gt + iou.shape[0] - 1 - hits.flip(0).to(torch.uint8).argmax(dim=0)
    assigned.copy_(torch.where(hits.any(dim=0), last + 1, assigned))  # in place, without a synchronisation


def _random_subset(indices, num):
    if indices.numel() > num:
        indices = indices[torch.randperm(indices.numel(), device=indices.device)[:num]]
    return indices


def sample_positive_negative(assigned, batch_size, positive_fraction):
    """Random sampling of at most ``batch_size * positive_fraction`` positives, the rest negatives.

    Both index sets come back sorted [impl 24.10]: with the GT boxes prepended to the candidates, GT rows
    come first among the positives, which the relay and mask-target slicing rely on.
    """
    # the two nonzero calls are this function's host-device synchronisations: how many candidates of
    # each kind there are decides how many are drawn (docs/gpu.md); sort, not unique, orders the
    # (distinct) drawn indices without another one
    positive = (assigned > 0).nonzero().view(-1)
    positive = _random_subset(positive, int(batch_size * positive_fraction)).sort().values
    negative = (assigned == 0).nonzero().view(-1)
    negative = _random_subset(negative, batch_size - positive.numel()).sort().values
    return positive, negative
