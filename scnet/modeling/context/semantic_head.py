"""Semantic segmentation branch of HTC as SCNet uses it (HTC paper §3.3; [impl 7]).

All FPN levels are resized to P3 and fused; a residual trunk gives the 183-way COCO-stuff logits and,
through a 1x1 conv + ReLU, the semantic feature that is added to every RoI feature.
"""
import torch.nn as nn
import torch.nn.functional as F

from ..layers import kaiming_fan_out_, residual_blocks


class SemanticHead(nn.Module):
    """
    Args:
        num_levels: FPN levels fused (5: P2-P6).
        fusion_level: index of the level whose size is kept (1: P3, stride 8).
        num_convs: convs of the trunk; ``residual`` pairs them into SimplifiedBasicBlocks (SCNet),
            otherwise they are plain 3x3 conv + ReLU layers (HTC's FusedSemanticHead).
    Returns (forward):
        logits (N, num_classes, H/8, W/8) and semantic feature (N, channels, H/8, W/8).
    """

    def __init__(
        self, in_channels=256, channels=256, num_levels=5, fusion_level=1, num_convs=4, residual=True, num_classes=183
    ):
        super().__init__()
        self.fusion_level = fusion_level
        self.lateral_convs = nn.ModuleList(nn.Conv2d(in_channels, channels, 1) for _ in range(num_levels))
        self.blocks = residual_blocks(num_convs // 2, channels) if residual else None
        plain = None if residual else [nn.Conv2d(channels, channels, 3, padding=1) for _ in range(num_convs)]
        self.convs = None if residual else nn.ModuleList(plain)
        self.logits = nn.Conv2d(channels, num_classes, 1)
        self.embedding = nn.Conv2d(channels, channels, 1)
        for conv in [*self.lateral_convs, self.embedding, self.logits, *(self.convs or [])]:  # [impl 18]
            kaiming_fan_out_(conv)

    def forward(self, features):
        x = F.relu(self.lateral_convs[self.fusion_level](features[self.fusion_level]))
        size = x.shape[-2:]
        for i, feature in enumerate(features):
            if i != self.fusion_level:
                # resize *before* the lateral conv, bilinear with align_corners=True [impl 24.15]
                feature = F.interpolate(feature, size=size, mode="bilinear", align_corners=True)
                x = x + F.relu(self.lateral_convs[i](feature))
        if self.blocks is not None:
            x = self.blocks(x)
        else:
            for conv in self.convs:
                x = F.relu(conv(x))
        return self.logits(x), F.relu(self.embedding(x))


def semantic_loss(logits, target, ignore_index=255, normalization="valid"):
    """Per-pixel cross-entropy at 1/8 resolution [impl 7].

    Args:
        target: (N, H/8, W/8) int64 labels, ``ignore_index`` where unlabeled.
        normalization: "valid" divides by the labeled pixels (mmdet 2.x), "all" by all pixels (3.x).
            A map with no labeled pixel gives 0, not NaN.
    """
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    if normalization == "valid":
        count = (target != ignore_index).sum().clamp(min=1)
    elif normalization == "all":
        count = target.numel()
    else:
        raise ValueError(f"semantic loss normalization must be 'valid' or 'all', got {normalization!r}")
    return total / count
