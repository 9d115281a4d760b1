"""Mask heads: SCNet's single deep head (SCNet paper §4.1 "effective sample consistency", [impl 11]) and the
4-conv FCN head of Mask R-CNN / Cascade Mask R-CNN / HTC [impl 20], with HTC's mask information flow.

SCNet stacks the three 4-conv mask branches of a cascade into one 12-conv branch with a skip every two
convs, run once, on the last stage's boxes only.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import kaiming_fan_out_, residual_blocks
from .panet import AdaptiveFusion, FullyConnectedFusion


class SCNetMaskHead(nn.Module):
    """(R, C_in, 14, 14) -> 6 residual blocks -> deconv 2x2/2 -> ReLU -> 1x1 conv -> (R, num_classes, 28, 28).

    Args (PANet options, off in SCNet):
        adaptive_levels: > 0 adds adaptive feature fusion of that many levels in front (``level_fusion``).
        fc_fusion: add PANet's fully-connected fusion, tapping the input of the last block.
    """

    def __init__(self, in_channels=256, num_res_blocks=6, num_classes=80, adaptive_levels=0, fc_fusion=False):
        super().__init__()
        self.level_fusion = AdaptiveFusion(in_channels, adaptive_levels) if adaptive_levels else None
        self.blocks = residual_blocks(num_res_blocks, in_channels)
        self.deconv = nn.ConvTranspose2d(in_channels, in_channels, 2, stride=2)
        self.predictor = nn.Conv2d(in_channels, num_classes, 1)
        self.fc_fusion = FullyConnectedFusion(in_channels) if fc_fusion else None
        kaiming_fan_out_(self.deconv)  # [impl 18]
        kaiming_fan_out_(self.predictor)

    def forward(self, x):
        if self.fc_fusion is None:
            return self.predictor(F.relu(self.deconv(self.blocks(x))))
        x = self.blocks[:-1](x)
        fused = self.fc_fusion(x)
        return self.predictor(F.relu(self.deconv(self.blocks[-1](x)))) + fused


class FCNMaskHead(nn.Module):
    """(R, C_in, 14, 14) -> ``num_convs`` x (3x3 conv + ReLU) -> deconv 2x2/2 -> ReLU -> 1x1 conv.

    Args:
        info_flow: HTC's mask information flow (HTC paper §3.2): the previous stage's head's last conv
            feature, through a 1x1 conv + ReLU, is added to this head's input.
        adaptive_levels, fc_fusion: PANet's adaptive feature pooling and fully-connected fusion (panet.py).
    """

    def __init__(
        self, in_channels=256, num_convs=4, num_classes=80, info_flow=False, adaptive_levels=0, fc_fusion=False
    ):
        super().__init__()
        # PANet: the first conv becomes one conv per FPN level, max-fused (adaptive feature pooling)
        self.level_fusion = AdaptiveFusion(in_channels, adaptive_levels) if adaptive_levels else None
        num_convs -= 1 if adaptive_levels else 0
        self.convs = nn.ModuleList(nn.Conv2d(in_channels, in_channels, 3, padding=1) for _ in range(num_convs))
        self.fc_fusion = FullyConnectedFusion(in_channels) if fc_fusion else None
        self.deconv = nn.ConvTranspose2d(in_channels, in_channels, 2, stride=2)
        self.predictor = nn.Conv2d(in_channels, num_classes, 1)
        self.info_flow = nn.Conv2d(in_channels, in_channels, 1) if info_flow else None
        for conv in [*self.convs, self.deconv, self.predictor] + ([self.info_flow] if info_flow else []):
            kaiming_fan_out_(conv)  # mmcv ConvModule and FCNMaskHead init [impl 18]

    def trunk(self, x, previous=None):
        """The last conv feature (R, C_in, 14, 14); ``previous``: the previous HTC stage's trunk output."""
        if previous is not None:
            x = x + F.relu(self.info_flow(previous))
        for conv in self.convs:
            x = F.relu(conv(x))
        return x

    def _forward_fc_fusion(self, x):
        for conv in self.convs[:-1]:
            x = F.relu(conv(x))
        fused = self.fc_fusion(x)  # taps the input of the last conv (PANet's conv3)
        return self.logits(F.relu(self.convs[-1](x))) + fused

    def logits(self, feature):
        """Mask logits (R, num_classes, 28, 28) of a trunk output."""
        return self.predictor(F.relu(self.deconv(feature)))

    def forward(self, x, previous=None):
        if self.fc_fusion is not None:
            return self._forward_fc_fusion(x)
        return self.logits(self.trunk(x, previous))


def mask_loss(mask_logits, mask_targets, labels):
    """Mean BCE between the GT-class channel of each positive's logits and its 28x28 target [impl 11.4].

    With no positive RoI the loss is an exact zero that still depends on every mask-head parameter,
    so that every process of a DDP job runs the same graph.
    """
    if mask_logits.shape[0] == 0:
        return mask_logits.sum() * 0.0
    selected = mask_logits[torch.arange(labels.numel(), device=labels.device), labels]
    return F.binary_cross_entropy_with_logits(selected, mask_targets, reduction="mean")
