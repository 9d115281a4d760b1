"""Max-IoU assignment and random positive/negative sampling, shared by the RPN and the box stages
[impl 5.3, 9.4]."""
import torch


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
    assigned = torch.full((num_candidates,), -1, dtype=torch.long, device=iou.device)
    if num_gt == 0 or num_candidates == 0:
        assigned.fill_(0)
        return assigned
    max_iou, argmax = iou.max(dim=0)
    assigned[(max_iou >= 0) & (max_iou < negative_iou)] = 0
    positive = max_iou >= positive_iou
    assigned[positive] = argmax[positive] + 1
    if low_quality:
        gt_max = iou.max(dim=1).values
        hits = (iou == gt_max[:, None]) & (gt_max >= min_positive_iou)[:, None]
        # the last GT with a hit wins, as in the official per-GT loop
        last = num_gt - 1 - hits.flip(0).to(torch.uint8).argmax(dim=0)
        claimed = hits.any(dim=0)
        assigned[claimed] = last[claimed] + 1
    return assigned


def _random_subset(indices, num):
    if indices.numel() > num:
        indices = indices[torch.randperm(indices.numel(), device=indices.device)[:num]]
    return indices


def sample_positive_negative(assigned, batch_size, positive_fraction):
    """Random sampling of at most ``batch_size * positive_fraction`` positives, the rest negatives.

    Both index sets come back sorted [impl 24.10]: with the GT boxes prepended to the candidates, GT rows
    come first among the positives, which the relay and mask-target slicing rely on.
    """
    positive = (assigned > 0).nonzero().view(-1)
    positive = _random_subset(positive, int(batch_size * positive_fraction)).unique()
    negative = (assigned == 0).nonzero().view(-1)
    negative = _random_subset(negative, batch_size - positive.numel()).unique()
    return positive, negative
