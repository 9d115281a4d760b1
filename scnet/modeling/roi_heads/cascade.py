"""Cascade Mask R-CNN's RoI heads (Cai & Vasconcelos, TPAMI 2019; [impl 20.2]).

Three box stages at IoU 0.5 / 0.6 / 0.7, each with its own 4-conv FCN mask head trained on that stage's
positives (the stage's input boxes), the loss weighted by the stage's alpha_t. At test every head runs
on the final boxes and their probabilities are averaged. With the semantic branch on, this is the
baseline of SCNet's Tables 1-2; SCNet's feature relay (one relay per head, from its stage's box head,
Table 4) and global context (Table 2) are options.
"""
import torch

from ..poolers import rois_from_boxes
from .base import RoIHeads


class CascadeRoIHeads(RoIHeads):
    """
    Args:
        box_heads, mask_heads: one of each per stage.
        feature_relays: None, or one FeatureRelay per stage.
        mask_loss_weights: one per stage (alpha_t x the mask head's loss weight).
        **kwargs: the box stages' settings (``RoIHeads``).
    """

    def __init__(self, box_heads, mask_heads, feature_relays=None, mask_loss_weights=(1.0, 0.5, 0.25), **kwargs):
        super().__init__(box_heads, **kwargs)
        assert len(mask_heads) == len(box_heads) == len(mask_loss_weights)
        assert feature_relays is None or len(feature_relays) == len(mask_heads)
        self.mask_heads = torch.nn.ModuleList(mask_heads)
        self.feature_relays = None if feature_relays is None else torch.nn.ModuleList(feature_relays)
        self.mask_loss_weights = list(mask_loss_weights)

    def forward_train(self, features, proposals, image_sizes, targets, context):
        """Weighted losses ``s{t}.loss_cls``, ``s{t}.loss_box`` and ``s{t}.loss_mask`` of every stage."""
        losses = {}
        for stage in self.box_stages(features, proposals, image_sizes, targets, context):
            losses.update(stage.losses)
            t = stage.index  # mask head t learns from stage t's samples, with relay t from box head t
            losses.update(self.mask_head_loss(t, stage, features, targets, context, relay=self.relay(t, stage),
                                              name=f"s{t}.loss_mask", weight=self.mask_loss_weights[t]))
        return losses

    def mask_probs(self, features, boxes_per_image, labels, context):
        """(D, 28, 28): every stage's mask head on the final boxes, probabilities averaged [impl 20.2]."""
        rois = rois_from_boxes(boxes_per_image)
        total = sum(self.mask_head_probs(k, k, features, rois, labels, context) for k in range(len(self.mask_heads)))
        return total / len(self.mask_heads)
