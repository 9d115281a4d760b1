"""PANet's RoI-side components (Liu et al., CVPR 2018): adaptive feature pooling (PANet paper §3.2)
and fully-connected fusion (PANet paper §3.4). The bottom-up path augmentation is the neck in neck/pafpn.py.

Adaptive feature pooling pools every RoI from every FPN level; each level's grid goes through its own
parameter layer, and the results are fused by an element-wise max. The box head's per-level layer is
its first fc (``BoxHead(num_levels=4)``); the mask branch's is a 3x3 conv + ReLU (``AdaptiveFusion``),
which replaces the first conv of an FCN mask head, or comes before SCNet's residual head.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import kaiming_fan_out_


class AdaptiveFusion(nn.Module):
    """(L, R, C, S, S) grids of every level -> per-level 3x3 conv + ReLU -> max over levels -> (R, C, S, S)."""

    def __init__(self, channels=256, num_levels=4):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(num_levels))
        for conv in self.convs:
            kaiming_fan_out_(conv)

    def forward(self, grids):
        return torch.stack([F.relu(conv(g)) for conv, g in zip(self.convs, grids)]).amax(dim=0)


class FullyConnectedFusion(nn.Module):
    """A class-agnostic fc mask (PANet paper §3.4): 3x3 conv (C) -> 3x3 conv (C/2) -> fc to 28x28, added to every
    class's FCN mask logits. It taps the feature entering the head's last conv (conv3 of four)."""

    def __init__(self, channels=256, roi_size=14, resolution=28):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels // 2, 3, padding=1)  # halved to save computation
        self.fc = nn.Linear(channels // 2 * roi_size * roi_size, resolution * resolution)
        self.resolution = resolution
        for conv in (self.conv1, self.conv2):
            kaiming_fan_out_(conv)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(x.flatten(1)).view(-1, 1, self.resolution, self.resolution)
