"""Cascade RoI heads: box stages, then mask branches, with the optional parts SCNet adds (spec §9-§13).

One class builds every cascade of the model zoo from its parts:
- Mask R-CNN: one stage, class-specific regression, one FCN mask head on that stage's positives.
- Cascade Mask R-CNN (Cai & Vasconcelos): three stages (IoU 0.5/0.6/0.7), one FCN mask head per stage,
  trained on that stage's positives; at test all heads run on the final boxes, probabilities averaged.
- SCNet (§4, Fig. 2c): the same box stages, then mask heads trained on the LAST stage's positives only,
  at training and at test: sample consistency (§4.1). One deep residual head is the "effective" form
  (Table 3), three 4-conv heads after the last stage the "naive" form.
- Optional parts, each on any of the above: the HTC semantic feature added to every RoI feature, the
  global context vector of the image (§4.2, Fig. 5), and feature relay from a stage's box head into
  the mask head trained on that stage's samples (§4.2, Fig. 4). HTC's interleaving: htc.py.
"""
from typing import List, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...ops.boxes import BoxCoder, box_iou, multiclass_nms
from ...ops.masks import mask_targets
from ..poolers import MultiLevelRoIAlign, rois_from_boxes
from .box_head import box_loss
from .global_context import add_context, global_context_loss
from .mask_head import mask_loss
from .mask_iou_head import mask_iou_loss, mask_iou_targets, mask_scores
from .sampling import assign_by_iou, sample_positive_negative
from .semantic_head import semantic_loss


class Samples(NamedTuple):
    """The RoIs sampled for one image at one stage: positives first (GT rows first among them)."""

    boxes: torch.Tensor  # (S, 4)
    labels: torch.Tensor  # (S,) GT class of positives, num_classes for negatives
    matched_gt: torch.Tensor  # (P,) GT index of each positive
    is_gt: torch.Tensor  # (P,) bool, positive rows that are GT boxes themselves

    @property
    def num_positive(self):
        return self.matched_gt.numel()


class CascadeRoIHeads(nn.Module):
    """
    Args:
        box_heads: one BoxHead per stage.
        mask_heads: the mask heads; ``mask_placement`` says which samples train them:
            "per_stage": head t on stage t's positives (len(mask_heads) == number of stages);
            "last_stage": every head on the last stage's positives (sample consistency).
        feature_relays: None, or one FeatureRelay per mask head (from the box head of its stage).
        mask_iou_head: None, or a MaskIoUHead on the last mask head (Mask Scoring R-CNN, spec §21).
        adaptive_pooling: pool every RoI from every FPN level (PANet §3.2); the box heads and mask heads
            must then be built with per-level first layers (``num_levels`` / ``adaptive_levels``).
        semantic_head, global_context_head: None switches the branch off.
        stage_ious, stage_loss_weights, box_stds: per stage (§9.1).
        mask_loss_weights: one weight per mask head (SCNet: beta = sum(alpha_t), eq. 4).
    """

    def __init__(
        self,
        box_heads,
        mask_heads,
        mask_placement="last_stage",
        feature_relays=None,
        mask_iou_head=None,
        semantic_head=None,
        global_context_head=None,
        adaptive_pooling=False,
        num_classes=80,
        stage_ious=(0.5, 0.6, 0.7),
        stage_loss_weights=(1.0, 0.5, 0.25),
        box_stds=((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067)),
        batch_size_per_image=512,
        positive_fraction=0.25,
        box_pool_size=7,
        mask_pool_size=14,
        finest_scale=56,
        semantic_stride=8,
        box_smooth_l1_beta=1.0,
        mask_resolution=28,
        mask_loss_weights=(1.75,),
        semantic_loss_weight=0.2,
        semantic_ignore_index=255,
        semantic_loss_normalization="valid",
        global_context_loss_weight=3.0,
        mask_iou_loss_weight=0.5,
        score_thresh=0.001,
        nms_iou=0.5,
        max_detections=100,
    ):
        super().__init__()
        assert len(box_heads) == len(stage_ious) == len(stage_loss_weights) == len(box_stds)
        assert mask_placement in ("per_stage", "last_stage"), mask_placement
        assert mask_placement == "last_stage" or len(mask_heads) == len(box_heads)
        assert len(mask_loss_weights) == len(mask_heads)
        assert feature_relays is None or len(feature_relays) == len(mask_heads)
        self.box_heads = nn.ModuleList(box_heads)
        self.mask_heads = nn.ModuleList(mask_heads)
        self.mask_placement = mask_placement
        self.feature_relays = None if feature_relays is None else nn.ModuleList(feature_relays)
        self.mask_iou_head = mask_iou_head
        self.mask_iou_loss_weight = mask_iou_loss_weight
        self.adaptive_pooling = adaptive_pooling
        self.semantic_head = semantic_head
        self.global_context = global_context_head
        self.box_pooler = MultiLevelRoIAlign(box_pool_size, finest_scale=finest_scale)
        self.mask_pooler = MultiLevelRoIAlign(mask_pool_size, finest_scale=finest_scale)
        self.semantic_pooler = MultiLevelRoIAlign(mask_pool_size, strides=(semantic_stride,))
        self.box_coders = [BoxCoder(stds) for stds in box_stds]
        self.num_classes = num_classes
        self.stage_ious = list(stage_ious)
        self.stage_loss_weights = list(stage_loss_weights)
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.box_smooth_l1_beta = box_smooth_l1_beta
        self.box_pool_size = box_pool_size
        self.mask_resolution = mask_resolution
        self.mask_loss_weights = list(mask_loss_weights)
        self.semantic_loss_weight = semantic_loss_weight
        self.semantic_ignore_index = semantic_ignore_index
        self.semantic_loss_normalization = semantic_loss_normalization
        self.global_context_loss_weight = global_context_loss_weight
        self.score_thresh = score_thresh
        self.nms_iou = nms_iou
        self.max_detections = max_detections

    @property
    def num_stages(self):
        return len(self.box_heads)

    def mask_head_stage(self, k):
        """The box stage whose samples (and relayed features) feed mask head ``k``."""
        return k if self.mask_placement == "per_stage" else self.num_stages - 1

    # ----------------------------------------------------------------------------------------------
    # Training
    # ----------------------------------------------------------------------------------------------
    def forward_train(self, features, proposals, image_sizes, targets, semantic_target=None):
        """
        Args:
            features: [P2..P6]; proposals: per-image (K_i, 4) RPN boxes; image_sizes: per-image (h, w).
            targets: per-image dicts with ``boxes`` (G, 4), ``labels`` (G,), ``masks`` (G, h, w).
            semantic_target: (N, H/8, W/8) int64 stuff labels, when the semantic branch is on.
        Returns:
            dict of weighted losses: s{t}.loss_cls, s{t}.loss_box, the mask losses (``loss_mask``, or
            ``s{k}.loss_mask`` with several heads), loss_semantic, loss_global_context.
        """
        semantic, context, losses = self._semantic_and_context(features, targets, semantic_target)
        for stage in range(self.num_stages):
            samples = [self._match_and_sample(stage, p, t) for p, t in zip(proposals, targets)]
            rois = rois_from_boxes([s.boxes for s in samples])
            cls_logits, deltas, shared = self._run_box_stage(stage, features, rois, semantic, context)
            losses.update(self._box_losses(stage, samples, cls_logits, deltas, targets))
            for k in range(len(self.mask_heads)):
                if self.mask_head_stage(k) == stage:
                    losses.update(self._mask_losses(k, features, samples, rois, shared, targets, semantic, context))
            if stage < self.num_stages - 1:
                proposals = self._refine_boxes(stage, samples, deltas, image_sizes)
        return losses

    def _semantic_and_context(self, features, targets=None, semantic_target=None):
        """Run the semantic and global-context branches; their losses too when ``targets`` are given.

        Returns the semantic feature (N, C, H/8, W/8), the context vectors (N, C, 1, 1) (either None
        when its branch is off) and a dict of losses.
        """
        semantic = context = None
        losses = {}
        if self.semantic_head is not None:
            semantic_logits, semantic = self.semantic_head(features)
            if targets is not None:
                loss = semantic_loss(
                    semantic_logits, semantic_target, self.semantic_ignore_index, self.semantic_loss_normalization
                )
                losses["loss_semantic"] = self.semantic_loss_weight * loss
        if self.global_context is not None:
            context_logits, context = self.global_context(features[-1])  # P6 (§24.17)
            if targets is not None:
                loss = global_context_loss(context_logits, [t["labels"] for t in targets])
                losses["loss_global_context"] = self.global_context_loss_weight * loss
        return semantic, context, losses

    def _match_and_sample(self, stage, proposals, target):
        """Assign at this stage's IoU, prepend the GTs (assigned to themselves), sample 512 (§9.4)."""
        gt_boxes, gt_labels = target["boxes"], target["labels"]
        iou = self.stage_ious[stage]
        assigned = assign_by_iou(box_iou(gt_boxes, proposals), iou, iou, iou)
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
        box_targets = [
            coder.encode(s.boxes[: s.num_positive], t["boxes"][s.matched_gt]) for s, t in zip(samples, targets)
        ]
        deltas = self.box_heads[stage].select_deltas(deltas, labels)
        loss_cls, loss_box, _ = box_loss(cls_logits, deltas, labels, torch.cat(box_targets), self.box_smooth_l1_beta)
        weight = self.stage_loss_weights[stage]  # alpha_t, eq. 3
        return {f"s{stage}.loss_cls": weight * loss_cls, f"s{stage}.loss_box": weight * loss_box}

    def _mask_losses(self, k, features, samples, rois, shared, targets, semantic, context):
        """Mask head ``k`` on the positives of ``samples`` (their input boxes, §24.13)."""
        positive = torch.cat([torch.arange(len(s.labels), device=rois.device) < s.num_positive for s in samples])
        relay = self.feature_relays[k](shared[positive]) if self.feature_relays is not None else None
        x = self._fuse_levels(k, self._mask_features(features, rois[positive], semantic, context))
        logits = self.mask_heads[k](x if relay is None else x + relay)
        targets_28 = [
            mask_targets(t["masks"], s.boxes[: s.num_positive], s.matched_gt, self.mask_resolution)
            for s, t in zip(samples, targets)
        ]
        labels = torch.cat([s.labels[: s.num_positive] for s in samples])
        name = "loss_mask" if len(self.mask_heads) == 1 else f"s{k}.loss_mask"
        losses = {name: self.mask_loss_weights[k] * mask_loss(logits, torch.cat(targets_28), labels)}
        if self.mask_iou_head is not None and k == len(self.mask_heads) - 1:
            losses["loss_mask_iou"] = self._mask_iou_loss(x, logits, labels, targets_28, samples, targets)
        return losses

    def _mask_iou_loss(self, x, logits, labels, targets_28, samples, targets):
        """MaskIoU head on the positives' mask features and (not detached, as mmdet) predicted masks."""
        probs = logits[torch.arange(labels.numel(), device=labels.device), labels].sigmoid()
        predicted = self.mask_iou_head(x, probs[:, None])
        counts = [s.num_positive for s in samples]
        iou_targets = [
            mask_iou_targets(p.detach(), m, s.boxes[: s.num_positive], t["masks"], s.matched_gt)
            for p, m, s, t in zip(probs.split(counts), targets_28, samples, targets)
        ]
        return self.mask_iou_loss_weight * mask_iou_loss(predicted, labels, torch.cat(iou_targets))

    @torch.no_grad()
    def _refine_boxes(self, stage, samples, deltas, image_sizes):
        """Regress the sampled RoIs with this stage's deltas, then drop the GT rows (§9.6, §24.9)."""
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
    # Shared by training and inference
    # ----------------------------------------------------------------------------------------------
    def _pool(self, pooler, features, rois):
        """(R, C, S, S) from each RoI's level, or (L, R, C, S, S) from all levels (adaptive pooling)."""
        return pooler.pool_all_levels(features, rois) if self.adaptive_pooling else pooler(features, rois)

    def _run_box_stage(self, stage, features, rois, semantic, context):
        """Pooled FPN feature + semantic feature (14x14 pooled to 7x7) + context -> box head (§8, §9)."""
        x = self._pool(self.box_pooler, features, rois)  # (R, 256, 7, 7)
        if semantic is not None:
            x = x + self.semantic_pooler([semantic], rois, pooled_size=self.box_pool_size)
        if context is not None:
            x = add_context(x, context, rois)
        return self.box_heads[stage](x)

    def _mask_features(self, features, rois, semantic, context):
        """Pooled FPN feature + semantic + context: the (R, 256, 14, 14) input of every mask head (§2);
        (L, R, 256, 14, 14) grids of every level with adaptive pooling, see ``_fuse_levels``."""
        x = self._pool(self.mask_pooler, features, rois)
        if semantic is not None:
            x = x + self.semantic_pooler([semantic], rois)
        if context is not None:
            x = add_context(x, context, rois)
        return x

    def _fuse_levels(self, k, x):
        """Mask head k's per-level layer and max fusion (PANet), a no-op without adaptive pooling."""
        fusion = self.mask_heads[k].level_fusion if self.adaptive_pooling else None
        return x if fusion is None else fusion(x)

    def _run_mask_head(self, k, features, rois, semantic, context, relay):
        x = self._fuse_levels(k, self._mask_features(features, rois, semantic, context))
        if relay is not None:
            x = x + relay
        return self.mask_heads[k](x)  # (R, C, 28, 28)

    # ----------------------------------------------------------------------------------------------
    # Inference
    # ----------------------------------------------------------------------------------------------
    def predict(self, features, proposals, image_sizes) -> List[dict]:
        """Cascade, class-wise NMS, then the mask branch on the final detections (§13).

        Returns per image: ``boxes`` (D, 4) in network-input coordinates, ``scores`` (D,), ``labels``
        (D,) and ``mask_probs`` (D, 28, 28), each detection's class channel (mean over mask heads).
        """
        semantic, context = self.context_features(features)
        detections = []
        for boxes, scores in zip(*self.cascade(features, proposals, image_sizes, semantic, context)):
            boxes, scores, labels = multiclass_nms(boxes, scores, self.score_thresh, self.nms_iou, self.max_detections)
            detections.append({"boxes": boxes, "scores": scores, "labels": labels})
        labels = torch.cat([d["labels"] for d in detections])
        boxes = [d["boxes"] for d in detections]
        probs = self.mask_probs(features, boxes, labels, semantic, context)
        counts = [b.shape[0] for b in boxes]
        for d, p in zip(detections, probs.split(counts)):
            d["mask_probs"] = p
        if self.mask_iou_head is not None:  # mask score = predicted mask IoU x box score (spec §21)
            x = self._mask_features(features, rois_from_boxes(boxes), semantic, context)
            x = self._fuse_levels(len(self.mask_heads) - 1, x)
            iou = self.mask_iou_head(x, probs[:, None])
            for d, i in zip(detections, iou.split(counts)):
                d["mask_scores"] = mask_scores(i, d["labels"], d["scores"])
        return detections

    def context_features(self, features):
        """Semantic feature and global context vectors of a batch (None for a branch that is off)."""
        semantic, context, _ = self._semantic_and_context(features)
        return semantic, context

    def cascade(self, features, proposals, image_sizes, semantic, context):
        """Run the stages on all proposals (§9.7). Returns per-image lists of (R, C + 1) scores, the
        softmax of the mean of the stages' logits (§24.6), and the last stage's boxes, (R, 4), or
        (R, C, 4) with class-specific regression, before NMS."""
        counts = [p.shape[0] for p in proposals]
        rois = rois_from_boxes(proposals)
        stage_logits = []
        for stage in range(self.num_stages):
            cls_logits, deltas, _ = self._run_box_stage(stage, features, rois, semantic, context)
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

    def mask_probs(self, features, boxes_per_image, labels, semantic, context):
        """(D, 28, 28) mask probabilities of the given boxes' classes: the sigmoid of each mask head,
        averaged over the heads; a head with feature relay gets it from a second pass of its stage's
        box head on these boxes (§24.8)."""
        rois = rois_from_boxes(boxes_per_image)
        index = torch.arange(labels.numel(), device=labels.device)
        total = 0
        for k in range(len(self.mask_heads)):
            relay = None
            if self.feature_relays is not None and rois.shape[0] > 0:
                _, _, shared = self._run_box_stage(self.mask_head_stage(k), features, rois, semantic, context)
                relay = self.feature_relays[k](shared)
            total = total + self._run_mask_head(k, features, rois, semantic, context, relay)[index, labels].sigmoid()
        return total / len(self.mask_heads)

    def _decode(self, stage, rois, deltas, counts, image_sizes):
        """Decode (R, 4) boxes for each image, clipped to its (h, w)."""
        coder = self.box_coders[stage]
        parts = zip(rois[:, 1:].split(counts), deltas.split(counts), image_sizes)
        return torch.cat([coder.decode(r, d, size) for r, d, size in parts])
