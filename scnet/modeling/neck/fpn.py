"""Feature Pyramid Network, P2-P6 with P6 = stride-2 subsample of P5 (Lin et al. 2017; [impl 4])."""
import torch.nn as nn
import torch.nn.functional as F


class FPN(nn.Module):
    """Lateral 1x1 convs, nearest top-down merge, 3x3 output convs; all with bias, no norm or activation.

    Args:
        in_channels: channels of C2..C5.
        out_channels: channels of every output level (256).
        num_extra_levels: levels added on top by max-pool(kernel 1, stride 2) of the last one (1: P6).
    Returns:
        list [P2, P3, P4, P5, P6] of (N, out_channels, H_l, W_l).
    """

    def __init__(self, in_channels, out_channels=256, num_extra_levels=1):
        super().__init__()
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        self.num_extra_levels = num_extra_levels
        self.out_channels = out_channels
        for m in self.modules():  # Xavier-uniform, bias 0 [impl 18]
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def top_down(self, features):
        """Laterals merged from the top down, through the 3x3 output convs: [P2..P5]."""
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        for i in range(len(laterals) - 1, 0, -1):
            upsampled = F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
            laterals[i - 1] = laterals[i - 1] + upsampled
        return [conv(x) for conv, x in zip(self.output_convs, laterals)]

    def add_extra_levels(self, outs):
        for _ in range(self.num_extra_levels):
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))  # a subsample, not a conv [impl 24.24]
        return outs

    def forward(self, features):
        return self.add_extra_levels(self.top_down(features))
