"""PANet's bottom-up path augmentation (Liu et al., CVPR 2018; PANet paper §3.1) on top of FPN, as MMDetection's
PAFPN [impl 22]: N2 = P2, then N_{i+1} = 3x3 conv(P_{i+1} + stride-2 3x3 conv(N_i)); N6 = subsample."""
import torch.nn as nn

from .fpn import FPN


class PAFPN(FPN):
    """Returns [N2, N3, N4, N5, N6] with the FPN's channels."""

    def __init__(self, in_channels, out_channels=256, num_extra_levels=1):
        super().__init__(in_channels, out_channels, num_extra_levels)
        n = len(in_channels) - 1
        self.downsample_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, 2, 1) for _ in range(n))
        self.pafpn_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in range(n))
        for conv in [*self.downsample_convs, *self.pafpn_convs]:  # Xavier-uniform as the FPN convs
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, features):
        inter = self.top_down(features)
        for i in range(len(inter) - 1):  # bottom-up, each level already updated
            inter[i + 1] = inter[i + 1] + self.downsample_convs[i](inter[i])
        outs = [inter[0]] + [conv(x) for conv, x in zip(self.pafpn_convs, inter[1:])]
        return self.add_extra_levels(outs)
