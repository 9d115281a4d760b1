"""Hybrid Task Cascade's RoI heads (Chen et al., CVPR 2019; [impl 20.1]), the baseline of SCNet's Table 1.

Three box stages and one 4-conv FCN mask head per stage, connected in two ways (HTC paper §3.1-3.2):
- interleaved execution: the mask head of stage t trains on the boxes stage t has just regressed (the
  proposals of stage t+1), re-assigned and re-sampled at stage t's IoU;
- mask information flow: the input of head t gets a 1x1 conv of head t-1's last conv feature, computed
  on the same RoIs by running the earlier heads' trunks (``info_flow=False`` drops it, HTC's ablation).
The semantic feature comes with the image context; there is no global context and no feature relay.
"""
import torch

from ..poolers import rois_from_boxes
from .base import RoIHeads


class HTCRoIHeads(RoIHeads):
    """
    Args:
        box_heads, mask_heads: one of each per stage (FCNMaskHeads; heads 1.. with an ``info_flow``
            conv when ``info_flow``).
        mask_loss_weights: one per stage (alpha_t x the mask head's loss weight).
        **kwargs: the box stages' settings (``RoIHeads``).
    """

    def __init__(self, box_heads, mask_heads, mask_loss_weights=(1.0, 0.5, 0.25), info_flow=True, **kwargs):
        super().__init__(box_heads, **kwargs)
        assert len(mask_heads) == len(box_heads) == len(mask_loss_weights)
        assert all((head.info_flow is not None) == (info_flow and k > 0) for k, head in enumerate(mask_heads))
        self.mask_heads = torch.nn.ModuleList(mask_heads)
        self.mask_loss_weights = list(mask_loss_weights)
        self.info_flow = info_flow

    def forward_train(self, features, proposals, image_sizes, targets, context):
        """Weighted losses ``s{t}.loss_cls``, ``s{t}.loss_box`` and ``s{t}.loss_mask`` of every stage."""
        losses = {}
        for stage in self.box_stages(features, proposals, image_sizes, targets, context):
            losses.update(stage.losses)
            t = stage.index
            with torch.no_grad():  # interleaved: re-sample among the boxes this stage regressed
                samples = [self._match_and_sample(t, boxes, target) for boxes, target in zip(stage.refined, targets)]
            rois = rois_from_boxes([s.positive_boxes for s in samples])
            logits = self._mask_logits(t, self.mask_features(features, rois, context))
            loss, _ = self.mask_loss_and_targets(logits, samples, targets)
            losses[f"s{t}.loss_mask"] = self.mask_loss_weights[t] * loss
        return losses

    def _mask_logits(self, t, x):
        """Mask head t's logits; with information flow, the trunks of heads 0..t-1 run first."""
        previous = None
        for k in range(t if self.info_flow else 0):
            previous = self.mask_heads[k].trunk(x, previous)
        return self.mask_heads[t](x, previous)

    def mask_probs(self, features, boxes_per_image, labels, context):
        """All heads on the final boxes (chained by the information flow), probabilities averaged."""
        x = self.mask_features(features, rois_from_boxes(boxes_per_image), context)
        index = torch.arange(labels.numel(), device=labels.device)
        previous, total = None, 0
        for head in self.mask_heads:
            previous = head.trunk(x, previous if self.info_flow else None)
            total = total + head.logits(previous)[index, labels].sigmoid()
        return total / len(self.mask_heads)
