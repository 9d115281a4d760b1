"""Mask R-CNN's RoI heads (He et al., ICCV 2017), and the systems built on it in the model zoo.

One box stage with class-specific regression, and one FCN mask head trained on the positives of that
stage. Options, each a published addition to Mask R-CNN:
- Mask Scoring R-CNN (Huang et al., CVPR 2019; [impl 21]): a MaskIoU head predicts each mask's IoU, and
  the mask score becomes predicted IoU x box score;
- PANet (Liu et al., CVPR 2018): adaptive feature pooling (PANet paper §3.2, per-level first layers of the box and
  mask heads) and fully-connected fusion (PANet paper §3.4, in the mask head); its neck is neck/pafpn.py;
- SCNet's feature relay (SCNet paper Table 4): the box head's shared feature added to the mask input.
"""
import torch

from ..poolers import rois_from_boxes
from .base import RoIHeads


class StandardRoIHeads(RoIHeads):
    """
    Args:
        box_head: the BoxHead (class-specific regression); mask_head: an FCNMaskHead.
        feature_relay: None or a FeatureRelay; mask_iou_head: None or a MaskIoUHead.
        **kwargs: the box stage's settings (``RoIHeads``, with one entry per stage list).
    """

    def __init__(self, box_head, mask_head, feature_relay=None, mask_iou_head=None, mask_loss_weight=1.0,
                 mask_iou_loss_weight=0.5, **kwargs):
        super().__init__([box_head], **kwargs)
        self.mask_heads = torch.nn.ModuleList([mask_head])  # lists, for the names the zoo's checkpoints use
        self.feature_relays = None if feature_relay is None else torch.nn.ModuleList([feature_relay])
        self.mask_iou_head = mask_iou_head
        self.mask_loss_weight = mask_loss_weight
        self.mask_iou_loss_weight = mask_iou_loss_weight

    def forward_train(self, features, proposals, image_sizes, targets, context):
        """Weighted losses ``s0.loss_cls``, ``s0.loss_box``, ``loss_mask`` (and ``loss_mask_iou``)."""
        (stage,) = self.box_stages(features, proposals, image_sizes, targets, context)
        mask_losses = self.mask_head_loss(0, stage, features, targets, context, relay=self.relay(0, stage),
                                          weight=self.mask_loss_weight)
        return {**stage.losses, **mask_losses}

    def mask_probs(self, features, boxes_per_image, labels, context):
        """(D, 28, 28): the mask head on the final boxes."""
        return self.mask_head_probs(0, 0, features, rois_from_boxes(boxes_per_image), labels, context)
