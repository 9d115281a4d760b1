"""SCNet's single deep mask head (SCNet §4.1 "effective sample consistency", spec §11).

The three 4-conv mask branches of a cascade are stacked into one 12-conv branch with a skip every two
convs, run once, on the last stage's boxes only.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import kaiming_fan_out_, residual_blocks


class SCNetMaskHead(nn.Module):
    """(R, C_in, 14, 14) -> 6 residual blocks -> deconv 2x2/2 -> ReLU -> 1x1 conv -> (R, num_classes, 28, 28)."""

    def __init__(self, in_channels=256, num_res_blocks=6, num_classes=80):
        super().__init__()
        self.blocks = residual_blocks(num_res_blocks, in_channels)
        self.deconv = nn.ConvTranspose2d(in_channels, in_channels, 2, stride=2)
        self.predictor = nn.Conv2d(in_channels, num_classes, 1)
        kaiming_fan_out_(self.deconv)  # §18
        kaiming_fan_out_(self.predictor)

    def forward(self, x):
        return self.predictor(F.relu(self.deconv(self.blocks(x))))


def mask_loss(mask_logits, mask_targets, labels):
    """Mean BCE between the GT-class channel of each positive's logits and its 28x28 target (§11.4).

    With no positive RoI the loss is an exact zero that still depends on every mask-head parameter,
    so that every process of a DDP job runs the same graph.
    """
    if mask_logits.shape[0] == 0:
        return mask_logits.sum() * 0.0
    selected = mask_logits[torch.arange(labels.numel(), device=labels.device), labels]
    return F.binary_cross_entropy_with_logits(selected, mask_targets, reduction="mean")
