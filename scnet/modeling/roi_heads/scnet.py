"""SCNet's RoI heads (Vu, Kang, Yoo, AAAI 2021; SCNet paper §4, Fig. 2c).

Three box stages as in Cascade Mask R-CNN, then the mask branch, trained on the samples of the LAST box
stage only: at test the mask branch sees the final detections, which are last-stage boxes, so it learns
from the same distribution of boxes it is applied to (sample consistency, paper §4.1, Fig. 1). The effective
form is one deep mask head (six residual blocks); the naive form of Table 3 keeps three 4-conv heads,
all after the last stage. Feature relay (paper §4.2, Fig. 4) adds the last box head's shared feature to the
mask head's input; the global context (paper §4.2, Fig. 5) reaches every RoI through the image context.
"""
import torch

from ..poolers import rois_from_boxes
from .base import RoIHeads


class SCNetRoIHeads(RoIHeads):
    """
    Args:
        box_heads: one BoxHead per stage.
        mask_heads: the mask head(s) of the last stage: one SCNetMaskHead (effective sample
            consistency), or several heads whose probabilities are averaged (naive, Table 3).
        feature_relays: None, or one FeatureRelay per mask head, from the last stage's box head.
        mask_iou_head: None, or Mask Scoring R-CNN's MaskIoU head on the (single) mask head.
        mask_loss_weights: one per mask head; a single head has beta = sum of alpha_t = 1.75 (eq. 4).
        **kwargs: the box stages' settings (``RoIHeads``).
    """

    def __init__(self, box_heads, mask_heads, feature_relays=None, mask_iou_head=None, mask_loss_weights=(1.75,),
                 mask_iou_loss_weight=0.5, **kwargs):
        super().__init__(box_heads, **kwargs)
        assert len(mask_loss_weights) == len(mask_heads)
        assert feature_relays is None or len(feature_relays) == len(mask_heads)
        assert mask_iou_head is None or len(mask_heads) == 1
        self.mask_heads = torch.nn.ModuleList(mask_heads)
        self.feature_relays = None if feature_relays is None else torch.nn.ModuleList(feature_relays)
        self.mask_iou_head = mask_iou_head
        self.mask_loss_weights = list(mask_loss_weights)
        self.mask_iou_loss_weight = mask_iou_loss_weight

    def forward_train(self, features, proposals, image_sizes, targets, context):
        """Weighted losses: ``s{t}.loss_cls``, ``s{t}.loss_box`` and ``loss_mask`` (``s{k}.loss_mask``
        with several mask heads), ``loss_mask_iou`` with a MaskIoU head. (The semantic and global-context
        losses come with the image context, from the detector's ContextBranches.)"""
        stages = list(self.box_stages(features, proposals, image_sizes, targets, context))
        losses = {name: loss for stage in stages for name, loss in stage.losses.items()}
        last = stages[-1]  # sample consistency: the mask branch learns from the last stage's samples
        for k, weight in enumerate(self.mask_loss_weights):
            relay = self.relay(k, last)  # feature relay: the last box head's features of those samples
            name = "loss_mask" if len(self.mask_heads) == 1 else f"s{k}.loss_mask"
            losses.update(self.mask_head_loss(k, last, features, targets, context, relay=relay, name=name,
                                              weight=weight))
        return losses

    def mask_probs(self, features, boxes_per_image, labels, context):
        """(D, 28, 28): every mask head on the final boxes, the relay from a second pass of the last
        box head [impl 24.8], probabilities averaged over the heads."""
        rois = rois_from_boxes(boxes_per_image)
        last = self.num_stages - 1
        total = sum(self.mask_head_probs(k, last, features, rois, labels, context) for k in range(len(self.mask_heads)))
        return total / len(self.mask_heads)
