"""What the RoI heads of every architecture share: the box stages, RoI features with the image context,
the mask loss, and inference up to the mask probabilities.

The box stages [impl 9]: at stage t, match the proposals to the GT boxes at the stage's IoU, sample 512
RoIs, run box head t on them, then regress them into stage t+1's proposals. Mask R-CNN has one stage,
the cascades three. ``box_stages`` is that loop, written once; it hands each stage to the caller as it
goes, so an architecture decides what its mask branch learns from: the same stage (Cascade Mask R-CNN),
the boxes the stage regressed (HTC), or only the last stage (SCNet's sample consistency).
"""
from typing import Dict, List, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...ops.boxes import BoxCoder, multiclass_nms
from ...ops.export import maybe_empty
from ...ops.masks import mask_targets
from ..poolers import MultiLevelRoIAlign, rois_from_boxes
from ..sampling import assign_boxes, sample_positive_negative
from .box_head import box_loss
from .mask_head import mask_loss
from .mask_iou_head import mask_iou_head_loss, mask_scores


class Samples(NamedTuple):
    """The RoIs sampled for one image at one stage: positives first, GT rows first among them [impl 24.10]."""

    boxes: torch.Tensor  # (S, 4)
    labels: torch.Tensor  # (S,) GT class of positives, num_classes for negatives
    matched_gt: torch.Tensor  # (P,) GT index of each positive
    is_gt: torch.Tensor  # (P,) bool, positive rows that are GT boxes themselves

    @property
    def num_positive(self):
        return self.matched_gt.numel()

    @property
    def positive_boxes(self):
        return self.boxes[: self.num_positive]

    @property
    def positive_labels(self):
        return self.labels[: self.num_positive]


def positive_rows(samples, device):
    """Row indices of the positives in the concatenation of ``samples`` (positives first in each)."""
    rows, start = [], 0
    for s in samples:
        rows.append(torch.arange(start, start + s.num_positive, device=device))
        start += len(s.labels)
    return torch.cat(rows)


class Stage(NamedTuple):
    """One box stage's training pass over a batch."""

    index: int
    samples: List[Samples]  # per image
    rois: torch.Tensor  # (S, 5) every image's samples, in order
    shared: torch.Tensor  # (S, fc_dim) the box head's shared feature h (feature relay's input)
    refined: List[torch.Tensor]  # per image: the samples regressed by this stage, GT rows dropped [impl 9.6]
    losses: Dict[str, torch.Tensor]

    @property
    def positive(self):
        """(P,) int64: the rows of ``rois`` that are positives (from sizes the host knows, so that indexing
        with it needs no host-device synchronisation, unlike a boolean mask)."""
        return positive_rows(self.samples, self.rois.device)


class RoIHeads(nn.Module):
    """Box stages + the inference tail; subclasses add the mask branch (``forward_train``, ``mask_probs``).

    Args:
        box_heads: one BoxHead per stage.
        stage_ious, stage_loss_weights (alpha_t, SCNet paper eq. 3), box_stds: one per stage [impl 9.1].
        batch_size_per_image, positive_fraction: RoI sampling [impl 9.4].
        adaptive_pooling: PANet's adaptive feature pooling (PANet paper §3.2): every RoI is pooled from
            every level; the heads were then built with per-level first layers.
        score_thresh, nms_iou, max_detections: class-wise NMS of the detections [impl 13].
    """

    def __init__(
        self,
        box_heads,
        num_classes=80,
        stage_ious=(0.5, 0.6, 0.7),
        stage_loss_weights=(1.0, 0.5, 0.25),
        box_stds=((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067)),
        batch_size_per_image=512,
        positive_fraction=0.25,
        box_pool_size=7,
        mask_pool_size=14,
        finest_scale=56,
        box_smooth_l1_beta=1.0,
        mask_resolution=28,
        adaptive_pooling=False,
        score_thresh=0.001,
        nms_iou=0.5,
        max_detections=100,
    ):
        super().__init__()
        assert len(box_heads) == len(stage_ious) == len(stage_loss_weights) == len(box_stds)
        self.box_heads = nn.ModuleList(box_heads)
        self.mask_heads = None  # subclasses: an nn.ModuleList of their mask heads
        self.feature_relays = None  # subclasses with feature relay: one per mask head
        self.mask_iou_head = None  # subclasses with Mask Scoring R-CNN's head on their (only) mask head
        self.mask_iou_loss_weight = 0.0
        self.box_pooler = MultiLevelRoIAlign(box_pool_size, finest_scale=finest_scale)
        self.mask_pooler = MultiLevelRoIAlign(mask_pool_size, finest_scale=finest_scale)
        self.box_coders = [BoxCoder(stds) for stds in box_stds]
        self.num_classes = num_classes
        self.stage_ious = list(stage_ious)
        self.stage_loss_weights = list(stage_loss_weights)
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.box_pool_size, self.mask_pool_size = box_pool_size, mask_pool_size
        self.box_smooth_l1_beta = box_smooth_l1_beta
        self.mask_resolution = mask_resolution
        self.adaptive_pooling = adaptive_pooling
        self.score_thresh, self.nms_iou, self.max_detections = score_thresh, nms_iou, max_detections

    @property
    def num_stages(self):
        return len(self.box_heads)

    # ----------------------------------------------------------------------------------------------
    # Training: the box stages
    # ----------------------------------------------------------------------------------------------
    def box_stages(self, features, proposals, image_sizes, targets, context):
        """Yield each stage of the box cascade in turn (match, sample, run, losses, refine) [impl 9.4, 9.5, 9.6].

        Args:
            features: [P2..P6]; proposals: per-image (K_i, 4) RPN boxes; image_sizes: per-image (h, w);
            targets: per-image dicts with ``boxes`` (G, 4), ``labels`` (G,), ``masks`` (G, h, w);
            context: the ImageContext of the batch.
        """
        for t in range(self.num_stages):
            samples = [self._match_and_sample(t, p, target) for p, target in zip(proposals, targets)]
            rois = rois_from_boxes([s.boxes for s in samples])
            cls_logits, deltas, shared = self.run_box_head(t, features, rois, context)
            losses = self._box_losses(t, samples, cls_logits, deltas, targets)
            proposals = self._refine(t, samples, deltas, image_sizes)  # after the last stage: HTC's mask samples
            yield Stage(t, samples, rois, shared, proposals, losses)

    def _match_and_sample(self, stage, proposals, target):
        """Assign at this stage's IoU, prepend the GTs (assigned to themselves), sample 512 [impl 9.4]."""
        gt_boxes, gt_labels = target["boxes"], target["labels"]
        iou = self.stage_ious[stage]
        assigned = assign_boxes(gt_boxes, proposals, iou, iou, iou)
        candidates = torch.cat([gt_boxes, proposals])
        gt_self = torch.arange(1, gt_boxes.shape[0] + 1, device=assigned.device)
        assigned = torch.cat([gt_self, assigned])
        positive, negative = sample_positive_negative(assigned, self.batch_size_per_image, self.positive_fraction)
        matched_gt = assigned[positive] - 1
        labels = torch.cat([gt_labels[matched_gt], gt_labels.new_full((negative.numel(),), self.num_classes)])
        return Samples(candidates[torch.cat([positive, negative])], labels, matched_gt, positive < gt_boxes.shape[0])

    def _box_losses(self, stage, samples, cls_logits, deltas, targets):
        labels = torch.cat([s.labels for s in samples])
        coder = self.box_coders[stage]
        box_targets = [coder.encode(s.positive_boxes, t["boxes"][s.matched_gt]) for s, t in zip(samples, targets)]
        deltas = self.box_heads[stage].select_deltas(deltas, labels)
        positive = positive_rows(samples, labels.device)
        loss_cls, loss_box, _ = box_loss(cls_logits, deltas, labels, torch.cat(box_targets), self.box_smooth_l1_beta,
                                         positive)
        weight = self.stage_loss_weights[stage]  # alpha_t, SCNet paper eq. 3
        return {f"s{stage}.loss_cls": weight * loss_cls, f"s{stage}.loss_box": weight * loss_box}

    @torch.no_grad()
    def _refine(self, stage, samples, deltas, image_sizes):
        """Regress the sampled RoIs with this stage's deltas, then drop the GT rows [impl 9.6, 24.9]."""
        labels = torch.cat([s.labels for s in samples])
        deltas = self.box_heads[stage].select_deltas(deltas.detach(), labels)
        refined = []
        for s, d, size in zip(samples, deltas.split([len(s.labels) for s in samples]), image_sizes):
            boxes = self.box_coders[stage].decode(s.boxes, d, size)
            keep = torch.ones(len(s.labels), dtype=torch.bool, device=boxes.device)
            keep[: s.num_positive] = ~s.is_gt
            refined.append(boxes[keep])
        return refined

    # ----------------------------------------------------------------------------------------------
    # Training: the mask branch
    # ----------------------------------------------------------------------------------------------
    def relay(self, k, stage):
        """Feature relay into mask head ``k`` (SCNet paper §4.2, Fig. 4): the box head's shared features of
        the stage's positives, through head k's relay; None without relays [impl 10]."""
        return None if self.feature_relays is None else self.feature_relays[k](stage.shared[stage.positive])

    def mask_head_loss(self, k, stage, features, targets, context, relay=None, name="loss_mask", weight=1.0):
        """``{name: weight x loss}`` of mask head ``k`` on the positives of ``stage`` (their input boxes
        [impl 24.13]), ``relay`` added to its input; plus ``loss_mask_iou`` with a MaskIoU head."""
        rois = stage.rois[stage.positive]
        x = self.mask_features(features, rois, context, k)
        logits = self.mask_heads[k](x if relay is None else x + relay)
        loss, targets_28 = self.mask_loss_and_targets(logits, stage.samples, targets)
        losses = {name: weight * loss}
        if self.mask_iou_head is not None:  # Mask Scoring R-CNN, on the mask features without the relay
            loss = mask_iou_head_loss(self.mask_iou_head, x, logits, stage.samples, targets_28, targets)
            losses["loss_mask_iou"] = self.mask_iou_loss_weight * loss
        return losses

    def mask_loss_and_targets(self, logits, samples, targets):
        """BCE of the positives' GT-class logits against their 28x28 targets [impl 11.3, 11.4]; also
        returns the per-image targets."""
        targets_28 = [
            mask_targets(t["masks"], s.positive_boxes, s.matched_gt, self.mask_resolution)
            for s, t in zip(samples, targets)
        ]
        labels = torch.cat([s.positive_labels for s in samples])
        return mask_loss(logits, torch.cat(targets_28), labels), targets_28

    # ----------------------------------------------------------------------------------------------
    # RoI features, shared by training and inference
    # ----------------------------------------------------------------------------------------------
    def _pool(self, pooler, features, rois):
        """(R, C, S, S) from each RoI's level, or (L, R, C, S, S) from all levels (adaptive pooling)."""
        return pooler.pool_all_levels(features, rois) if self.adaptive_pooling else pooler(features, rois)

    def run_box_head(self, stage, features, rois, context):
        """Box head ``stage`` on pooled FPN features + the image context [impl 8, 9.3]."""
        # the semantic feature is pooled at the mask RoI size for both branches [impl 8]
        x = context.add_to(self._pool(self.box_pooler, features, rois), rois, semantic_size=self.mask_pool_size)
        return self.box_heads[stage](x)

    def mask_features(self, features, rois, context, k=None):
        """Pooled FPN features + the image context: the (R, 256, 14, 14) input of a mask head [impl 2].
        With adaptive pooling, mask head ``k``'s per-level first layer fuses the levels (PANet paper §3.2)."""
        x = context.add_to(self._pool(self.mask_pooler, features, rois), rois, semantic_size=self.mask_pool_size)
        fusion = None if k is None else self.mask_heads[k].level_fusion
        return x if fusion is None else fusion(x)

    # ----------------------------------------------------------------------------------------------
    # Inference
    # ----------------------------------------------------------------------------------------------
    def predict(self, features, proposals, image_sizes, context) -> List[dict]:
        """Box stages, class-wise NMS, then the mask branch on the final detections [impl 13].

        Returns per image: ``boxes`` (D, 4) in network-input coordinates, ``scores`` (D,), ``labels``
        (D,), ``mask_probs`` (D, 28, 28) of each detection's class, and with a MaskIoU head
        ``mask_scores`` (D,) (predicted mask IoU x box score).
        """
        detections = []
        for boxes, scores in zip(*self.predict_boxes(features, proposals, image_sizes, context)):
            boxes, scores, labels = multiclass_nms(boxes, scores, self.score_thresh, self.nms_iou, self.max_detections)
            detections.append({"boxes": boxes, "scores": scores, "labels": labels})
        labels = torch.cat([d["labels"] for d in detections])
        boxes = [d["boxes"] for d in detections]
        probs = self.mask_probs(features, boxes, labels, context)
        counts = [b.shape[0] for b in boxes]
        for d, p in zip(detections, probs.split(counts)):
            d["mask_probs"] = p
        if self.mask_iou_head is not None:  # Mask Scoring R-CNN [impl 21]
            rois = rois_from_boxes(boxes)
            x = self.mask_features(features, rois, context, len(self.mask_heads) - 1)
            iou = self.mask_iou_head(x, probs[:, None])
            for d, i in zip(detections, iou.split(counts)):
                d["mask_scores"] = mask_scores(i, d["labels"], d["scores"])
        return detections

    def predict_boxes(self, features, proposals, image_sizes, context):
        """Every stage on all proposals [impl 9.7]. Returns per-image lists of (R, C + 1) scores, the
        softmax of the mean of the stages' logits [impl 24.6], and the last stage's boxes, (R, 4), or
        (R, C, 4) with class-specific regression, before NMS."""
        counts = [p.shape[0] for p in proposals]
        rois = rois_from_boxes(proposals)
        stage_logits = []
        for stage in range(self.num_stages):
            cls_logits, deltas, _ = self.run_box_head(stage, features, rois, context)
            stage_logits.append(cls_logits)
            if stage < self.num_stages - 1:
                labels = cls_logits[:, :-1].argmax(dim=1)  # only used by class-specific regression
                deltas = self.box_heads[stage].select_deltas(deltas, labels)
                rois = torch.cat([rois[:, :1], self._decode(stage, rois, deltas, counts, image_sizes)], dim=1)
        scores = F.softmax(sum(stage_logits) / float(self.num_stages), dim=1)
        last = self.num_stages - 1
        if self.box_heads[last].class_agnostic:
            boxes = self._decode(last, rois, deltas, counts, image_sizes)
        else:  # one box per class, every one of them goes to the class-wise NMS
            per_class = rois[:, None, :].expand(-1, self.num_classes, 5).reshape(-1, 5)
            class_counts = [c * self.num_classes for c in counts]
            boxes = self._decode(last, per_class, deltas.reshape(-1, 4), class_counts, image_sizes)
            boxes = boxes.view(-1, self.num_classes, 4)
        return boxes.split(counts), scores.split(counts)

    def mask_head_probs(self, k, stage, features, rois, labels, context):
        """(D, 28, 28) sigmoid of mask head ``k``'s logits for each RoI's class; with feature relay, its
        input comes from a second pass of box head ``stage`` on these RoIs [impl 24.8]."""
        x = self.mask_features(features, rois, context, k)
        if self.feature_relays is not None and not maybe_empty(rois.shape[0]):
            _, _, shared = self.run_box_head(stage, features, rois, context)
            x = x + self.feature_relays[k](shared)
        return self.mask_heads[k](x)[torch.arange(labels.numel(), device=labels.device), labels].sigmoid()

    def _decode(self, stage, rois, deltas, counts, image_sizes):
        """Decode (R, 4) boxes for each image, clipped to its (h, w)."""
        coder = self.box_coders[stage]
        parts = zip(rois[:, 1:].split(counts), deltas.split(counts), image_sizes)
        return torch.cat([coder.decode(r, d, size) for r, d, size in parts])
