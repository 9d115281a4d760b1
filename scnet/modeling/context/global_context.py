"""Global context branch, SCNet paper §4.2 / Fig. 5 [impl 8].

P6 -> 2 residual blocks -> global average pooling = a 256-d context vector per image, which (a) feeds a
multi-label classifier of the classes present, trained with BCE (lambda = 3), and (b) is added to every
RoI feature of its image in all box stages and in the mask branch (``ImageContext.add_to``).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import residual_blocks


class GlobalContextHead(nn.Module):
    """Returns (forward) multi-label logits (N, num_classes) and the context feature (N, C, 1, 1)."""

    def __init__(self, in_channels=256, num_res_blocks=2, num_classes=80):
        super().__init__()
        self.blocks = residual_blocks(num_res_blocks, in_channels)
        self.classifier = nn.Linear(in_channels, num_classes)
        nn.init.normal_(self.classifier.weight, std=0.01)  # [impl 18]
        nn.init.zeros_(self.classifier.bias)

    def forward(self, top_level):
        context = F.adaptive_avg_pool2d(self.blocks(top_level), 1)
        return self.classifier(context.flatten(1)), context


def global_context_loss(logits, labels_per_image):
    """Mean BCE over N x C against the set of classes present in each image [impl 8]."""
    target = torch.zeros_like(logits)
    for i, labels in enumerate(labels_per_image):
        target[i, labels] = 1.0
    return F.binary_cross_entropy_with_logits(logits, target, reduction="mean")

