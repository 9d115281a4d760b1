"""Image-level context: HTC's semantic segmentation branch (HTC paper §3.3) and SCNet's global context
(SCNet paper §4.2, Fig. 5), owned by the detector.

Both branches run once per image on whole FPN maps. What they give the RoI heads travels as one
``ImageContext``: the semantic feature S, pooled over every RoI, and the context vector G, added to every
RoI feature of its image, in all box stages and in the mask branch [impl 8]. Their losses need only the
image's targets, so they are computed here, not in the RoI heads.
"""
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from ...ops.image_list import pad_to
from ..poolers import MultiLevelRoIAlign
from .global_context import GlobalContextHead, global_context_loss
from .semantic_head import SemanticHead, semantic_loss

__all__ = ["ContextBranches", "GlobalContextHead", "ImageContext", "SemanticHead"]


class ImageContext(NamedTuple):
    """What the image-level branches give the RoI heads (either part None when its branch is off)."""

    semantic: Optional[torch.Tensor] = None  # (N, C, H/s, W/s) semantic feature S
    vector: Optional[torch.Tensor] = None  # (N, C, 1, 1) global context G
    semantic_stride: int = 8

    def add_to(self, roi_features, rois, semantic_size):
        """RoI features + S pooled over each RoI + G of its image, in that order [impl 8].

        ``roi_features``: (R, C, k, k), or (L, R, C, k, k) with PANet's adaptive pooling; S is pooled
        at ``semantic_size`` (14) and average-pooled to k x k when k is smaller (the box branch, 7x7).
        """
        if self.semantic is not None:
            pooler = MultiLevelRoIAlign(semantic_size, strides=(self.semantic_stride,))
            roi_features = roi_features + pooler([self.semantic], rois, pooled_size=roi_features.shape[-1])
        if self.vector is not None:
            roi_features = roi_features + self.vector[rois[:, 0].long()]
        return roi_features


class ContextBranches(nn.Module):
    """The semantic head (on P2-P6, fused at ``semantic_stride``) and the global-context head (on P6);
    None switches a branch off.

    Args:
        semantic_pad_value: label of the padded border of the semantic target ([impl 19 row 1]: 0 in
            mmdet 2.x, 255 = ignored in 3.x).
        semantic_loss_normalization: "valid" (2.x) or "all" (3.x) [impl 19 row 2].
    """

    def __init__(
        self,
        semantic_head=None,
        global_context_head=None,
        semantic_stride=8,
        semantic_loss_weight=0.2,
        semantic_ignore_index=255,
        semantic_loss_normalization="valid",
        semantic_pad_value=0,
        global_context_loss_weight=3.0,
    ):
        super().__init__()
        self.semantic_head = semantic_head
        self.global_context = global_context_head
        self.semantic_stride = semantic_stride
        self.semantic_loss_weight = semantic_loss_weight
        self.semantic_ignore_index = semantic_ignore_index
        self.semantic_loss_normalization = semantic_loss_normalization
        self.semantic_pad_value = semantic_pad_value
        self.global_context_loss_weight = global_context_loss_weight

    def forward(self, features, targets=None, padded_size=None):
        """(ImageContext, losses) of a batch's [P2..P6]; the losses need ``targets`` (training) and the
        batch's ``padded_size`` (h, w), and are empty without them."""
        semantic = vector = None
        losses = {}
        if self.semantic_head is not None:
            logits, semantic = self.semantic_head(features)
            if targets is not None:
                target = self.semantic_target(targets, padded_size)
                loss = semantic_loss(logits, target, self.semantic_ignore_index, self.semantic_loss_normalization)
                losses["loss_semantic"] = self.semantic_loss_weight * loss
        if self.global_context is not None:
            logits, vector = self.global_context(features[-1])  # P6 [impl 24.17]
            if targets is not None:
                loss = global_context_loss(logits, [t["labels"] for t in targets])
                losses["loss_global_context"] = self.global_context_loss_weight * loss
        return ImageContext(semantic, vector, self.semantic_stride), losses

    def semantic_target(self, targets, padded_size):
        """Pad the full-resolution label maps, then take the pixels (s i, s j) [impl 16.1 step 7, 24.14]."""
        for i, t in enumerate(targets):
            if "semantic_seg" not in t:
                raise KeyError(
                    f"target {i} has no 'semantic_seg' but the semantic branch is on; give stuff maps or "
                    "set model.semantic.enabled=false"
                )
        maps = pad_to([t["semantic_seg"].long() for t in targets], padded_size, self.semantic_pad_value)
        return maps[:, :: self.semantic_stride, :: self.semantic_stride]
