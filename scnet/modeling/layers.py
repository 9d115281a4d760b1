"""Small building blocks shared by several heads."""
import torch.nn as nn
import torch.nn.functional as F


class SimplifiedBasicBlock(nn.Module):
    """conv3x3 (bias) -> ReLU -> conv3x3 (bias), plus the identity; no norm and no ReLU after the sum
    [impl 11.1, 24.16]. Used by the SCNet mask, semantic and global-context heads."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x))) + x


def residual_blocks(num_blocks, channels):
    """A plain sequence of ``num_blocks`` blocks: "num_convs = 2 * num_blocks" in the official configs."""
    return nn.Sequential(*[SimplifiedBasicBlock(channels) for _ in range(num_blocks)])


def kaiming_fan_out_(module):
    """Kaiming-normal (fan_out, ReLU) weight and zero bias: mmcv's ``kaiming_init`` default [impl 18]."""
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(module.bias)
