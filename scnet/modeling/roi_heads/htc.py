"""Hybrid Task Cascade's RoI heads (Chen et al., CVPR 2019; spec §20.1), the baseline of SCNet's Table 1.

What differs from the cascade of cascade.py:
- interleaved execution: after box stage t, its sampled RoIs are regressed (GT rows dropped) and then
  re-assigned and re-sampled with stage t's own IoU; mask head t trains on the positives of that
  re-sampling (boxes *after* regression), and the regressed boxes are stage t+1's proposals;
- mask information flow: head t's input gets a 1x1 conv of head t-1's last conv feature, computed on
  the same RoIs by running the earlier heads' trunks.
The semantic feature is fused as in SCNet; there is no global context and no feature relay.
"""
import torch

from ...ops.masks import mask_targets
from ..poolers import rois_from_boxes
from .cascade import CascadeRoIHeads
from .mask_head import mask_loss


class HTCRoIHeads(CascadeRoIHeads):
    """A CascadeRoIHeads with one FCNMaskHead per stage (``mask_placement="per_stage"``), heads 1.. built
    with ``info_flow=True``."""

    def forward_train(self, features, proposals, image_sizes, targets, semantic_target=None):
        semantic, context, losses = self._semantic_and_context(features, targets, semantic_target)
        for stage in range(self.num_stages):
            samples = [self._match_and_sample(stage, p, t) for p, t in zip(proposals, targets)]
            rois = rois_from_boxes([s.boxes for s in samples])
            cls_logits, deltas, _ = self._run_box_stage(stage, features, rois, semantic, context)
            losses.update(self._box_losses(stage, samples, cls_logits, deltas, targets))
            proposals = self._refine_boxes(stage, samples, deltas, image_sizes)
            with torch.no_grad():  # interleaved: re-sample among the regressed boxes for the mask head
                mask_samples = [self._match_and_sample(stage, p, t) for p, t in zip(proposals, targets)]
            losses.update(self._interleaved_mask_loss(stage, features, mask_samples, targets, semantic, context))
        return losses

    def _interleaved_mask_loss(self, stage, features, samples, targets, semantic, context):
        rois = rois_from_boxes([s.boxes[: s.num_positive] for s in samples])
        x = self._mask_features(features, rois, semantic, context)
        previous = None
        for k in range(stage):  # the information flow through the earlier heads, on these RoIs
            previous = self.mask_heads[k].trunk(x, previous)
        logits = self.mask_heads[stage](x, previous)
        targets_28 = [
            mask_targets(t["masks"], s.boxes[: s.num_positive], s.matched_gt, self.mask_resolution)
            for s, t in zip(samples, targets)
        ]
        labels = torch.cat([s.labels[: s.num_positive] for s in samples])
        loss = mask_loss(logits, torch.cat(targets_28), labels)
        return {f"s{stage}.loss_mask": self.mask_loss_weights[stage] * loss}

    def mask_probs(self, features, boxes_per_image, labels, semantic, context):
        """All heads on the final boxes, chained through the information flow; probabilities averaged."""
        rois = rois_from_boxes(boxes_per_image)
        x = self._mask_features(features, rois, semantic, context)
        index = torch.arange(labels.numel(), device=labels.device)
        previous, total = None, 0
        for head in self.mask_heads:
            previous = head.trunk(x, previous)
            total = total + head.logits(previous)[index, labels].sigmoid()
        return total / len(self.mask_heads)
