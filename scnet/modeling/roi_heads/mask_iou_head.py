"""MaskIoU head of Mask Scoring R-CNN (Huang et al., CVPR 2019), as in mmdet's ``MaskIoUHead`` [impl 21].

It regresses the IoU between each predicted mask and its whole GT instance. At test time the mask
score becomes predicted IoU x box score, so that COCO mask AP ranks the better masks first.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import kaiming_fan_out_


class MaskIoUHead(nn.Module):
    """concat(RoI feature, max-pool 2x2/2 of the mask probabilities) -> 4 convs -> 2 fcs -> IoU per class.

    (R, 256, 14, 14) ++ (R, 1, 14, 14) -> 3 x [conv 3x3 + ReLU] -> conv 3x3 stride 2 + ReLU
    -> (R, 256, 7, 7) -> flatten -> fc 1024 + ReLU -> fc 1024 + ReLU -> predictor (R, num_classes).

    Parameter names follow mmdet's state_dict (``convs.i``, ``fcs.i``), except that ``fc_mask_iou``
    is called ``predictor`` here, as in the other heads.

    Args:
        in_channels: channels of the mask RoI feature (the mask head's *input*, [impl 21]), 256.
        roi_size: side of that feature, 14; the mask probabilities are 2 * roi_size = 28.
    """

    def __init__(self, in_channels=256, conv_channels=256, fc_dim=1024, num_classes=80, roi_size=14):
        super().__init__()
        # +1 input channel: the pooled mask probability map; stride 2 on the last conv only.
        channels = [in_channels + 1] + [conv_channels] * 3
        self.convs = nn.ModuleList(
            nn.Conv2d(c, conv_channels, 3, stride=2 if i == 3 else 1, padding=1) for i, c in enumerate(channels)
        )
        pooled = math.ceil(roi_size / 2)  # 14 -> 7 (3x3, padding 1, stride 2)
        self.fcs = nn.ModuleList([nn.Linear(conv_channels * pooled * pooled, fc_dim), nn.Linear(fc_dim, fc_dim)])
        self.predictor = nn.Linear(fc_dim, num_classes)
        # Init as mmdet's init_cfg [impl 21]: 'Kaiming' (normal, fan_out, relu) on the convs,
        # 'Caffe2Xavier' (= Kaiming-uniform, a=1, fan_in) on the fcs, Normal(0, 0.01) on fc_mask_iou; biases 0.
        for conv in self.convs:
            kaiming_fan_out_(conv)
        for fc in self.fcs:
            nn.init.kaiming_uniform_(fc.weight, a=1, mode="fan_in", nonlinearity="leaky_relu")
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.predictor.weight, std=0.01)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, mask_features, mask_probs):
        """mask_features (R, 256, 14, 14); mask_probs (R, 28, 28) or (R, 1, 28, 28): sigmoid of the mask
        logits of one class per RoI (GT class in training, predicted class at test).
        Returns the predicted IoU for every class, (R, num_classes)."""
        if mask_probs.dim() == 3:
            mask_probs = mask_probs[:, None]
        pooled_probs = F.max_pool2d(mask_probs.to(mask_features.dtype), 2, 2)  # (R, 1, 14, 14)
        x = torch.cat([mask_features, pooled_probs], dim=1)  # (R, 257, 14, 14)
        for conv in self.convs:
            x = F.relu(conv(x))  # (R, 256, 7, 7) after the last
        x = x.flatten(1)
        for fc in self.fcs:
            x = F.relu(fc(x))
        return self.predictor(x)


def _gt_area_ratios(rois, gt_masks, matched_gt):
    """(P,) fraction of each matched GT mask's area that lies inside its RoI, at full resolution.

    As mmdet's ``_get_area_ratio`` + ``BitmapMasks.crop``: the box is truncated to int (numpy
    ``astype(int32)``), clipped to [0, W] x [0, H], at least 1 pixel wide and high, and the crop is
    ``[y1:y1 + h, x1:x1 + w]``; the ratio is area_in / (area_total + 1e-7), in float64 then float32.
    """
    height, width = gt_masks.shape[-2:]
    boxes = rois.to(torch.int64)  # truncation toward zero, like astype(np.int32)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    inside = [
        gt_masks[g, y1 : y1 + max(y2 - y1, 1), x1 : x1 + max(x2 - x1, 1)].sum()
        for (x1, y1, x2, y2), g in zip(boxes.tolist(), matched_gt.tolist())
    ]
    inside = torch.stack(inside).double()
    total = gt_masks.flatten(1).sum(1)[matched_gt].double()
    return (inside / (total + 1e-7)).float()


@torch.no_grad()
def mask_iou_targets(mask_probs, mask_targets, rois, gt_masks, matched_gt, threshold=0.5):
    """IoU between each binarised predicted mask and its *whole* GT instance, one image [impl 21].

    The intersection is counted on the 28x28 RoI grid. The GT area on that grid only covers the part
    of the instance inside the RoI, so it is scaled up by the full-resolution ratio
    (GT area inside the box) / (GT area): gt_full_area = sum(target) / ratio.

    Args:
        mask_probs: (P, 28, 28) predicted probabilities of each positive's GT class.
        mask_targets: (P, 28, 28) binary targets (``scnet.ops.masks.mask_targets``).
        rois: (P, 4) xyxy positive boxes (the sampled proposals, network-input pixels).
        gt_masks: (G, H, W) uint8 GT bitmaps of the image; matched_gt: (P,) index into them.
        threshold: mmdet's ``mask_thr_binary`` (0.5). mmdet, like the original MS R-CNN code, compares
            it with the mask *logits*, so a pixel is foreground when prob > sigmoid(0.5) = 0.6225.
    Returns:
        (P,) float32 IoU targets (no gradient). Where the union is empty (0 / 0, NaN in mmdet) the
        target is 0; ``mask_iou_loss`` skips targets <= 0 either way.
    """
    if rois.shape[0] == 0:
        return mask_targets.new_zeros((0,), dtype=torch.float32)
    ratios = _gt_area_ratios(rois, gt_masks, matched_gt).to(mask_targets.device)
    predicted = (mask_probs.float() > 1.0 / (1.0 + math.exp(-threshold))).float()
    targets = mask_targets.float()
    overlap = (predicted * targets).sum((1, 2))
    gt_full_area = targets.sum((1, 2)) / (ratios + 1e-7)
    union = predicted.sum((1, 2)) + gt_full_area - overlap
    return torch.where(union > 0, overlap / union.clamp(min=1e-12), torch.zeros_like(overlap))


def mask_iou_loss(pred_iou, labels, targets):
    """Mean squared error of the GT-class IoU prediction, over the RoIs whose target is > 0 [impl 21].

    The 0.5 loss weight is applied by the caller. With no such RoI the loss is an exact zero that
    still depends on ``pred_iou``, so every DDP process runs the same graph; no host sync either way.

    Args:
        pred_iou: (P, C) head output; labels: (P,) GT classes; targets: (P,) from ``mask_iou_targets``.
    """
    selected = pred_iou[torch.arange(labels.numel(), device=labels.device), labels].float()
    valid = targets > 0
    error = torch.where(valid, selected - targets, torch.zeros_like(selected))
    return (error * error).sum() / valid.sum().clamp(min=1)


def mask_iou_head_loss(head, mask_features, mask_logits, samples, mask_targets_28, targets):
    """Unweighted MaskIoU loss of one image batch's positives [impl 21].

    Args:
        head: the MaskIoUHead; mask_features: (P, 256, 14, 14) the mask head's input (without relay);
        mask_logits: (P, C, 28, 28); samples: per-image Samples (positives: boxes, labels, matched GT);
        mask_targets_28: per-image (P_i, 28, 28) mask targets; targets: per-image dicts with ``masks``.
    The mask probabilities enter the head without being detached (as mmdet); the IoU targets are.
    """
    labels = torch.cat([s.positive_labels for s in samples])
    probs = mask_logits[torch.arange(labels.numel(), device=labels.device), labels].sigmoid()
    iou_targets = [
        mask_iou_targets(p.detach(), m, s.positive_boxes, t["masks"], s.matched_gt)
        for p, m, s, t in zip(probs.split([s.num_positive for s in samples]), mask_targets_28, samples, targets)
    ]
    return mask_iou_loss(head(mask_features, probs[:, None]), labels, torch.cat(iou_targets))


def mask_scores(pred_iou, labels, box_scores):
    """Mask score of each detection = predicted IoU of its predicted class x its box score [impl 21].

    pred_iou (D, C), labels (D,), box_scores (D,) -> (D,). Used as the segm score only; the box
    results keep the box score (mmdet 2.x, which produced the zoo numbers).
    """
    return pred_iou[torch.arange(labels.numel(), device=labels.device), labels] * box_scores
