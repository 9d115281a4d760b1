"""Feature relay, SCNet paper §4.2 / Fig. 4 [impl 10]: box features -> fc -> (256, 7, 7) -> 2x upsample,
added to the mask features of the same RoIs."""
import torch.nn as nn
import torch.nn.functional as F


class FeatureRelay(nn.Module):
    """(R, in_dim) shared box feature -> (R, channels, 2 * size, 2 * size); fc without activation."""

    def __init__(self, in_dim=1024, channels=256, size=7):
        super().__init__()
        self.fc = nn.Linear(in_dim, channels * size * size)
        self.channels = channels
        self.size = size
        nn.init.kaiming_normal_(self.fc.weight, mode="fan_out", nonlinearity="relu")  # [impl 18]
        nn.init.zeros_(self.fc.bias)

    def forward(self, h):
        x = self.fc(h).view(h.shape[0], self.channels, self.size, self.size)  # C-major reshape
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)  # [impl 24.18]
