"""Box head of one cascade stage: two shared FCs, a classifier and a box regressor [impl 9.3, 9.5]."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..losses import smooth_l1_loss


class BoxHead(nn.Module):
    """flatten (C x H x W order) -> fc -> ReLU -> fc -> ReLU = shared feature h -> cls / deltas.

    Args:
        num_classes: foreground classes C; the classifier has C + 1 outputs, background last.
        class_agnostic: 4 deltas per RoI (SCNet and the cascades) instead of 4 per class.
        num_levels: > 1 for PANet's adaptive feature pooling (one first fc per FPN level).
    Returns (forward):
        cls_logits (R, C + 1), deltas (R, 4 or 4C), shared feature h (R, fc_dim) (used by feature relay).
    """

    def __init__(self, in_channels=256, pool_size=7, fc_dim=1024, num_classes=80, class_agnostic=True, num_levels=1):
        super().__init__()
        flat = in_channels * pool_size * pool_size
        # PANet's adaptive feature pooling (num_levels > 1): one fc1 per FPN level, max-fused (PANet paper §3.2)
        if num_levels == 1:
            self.fc1 = nn.Linear(flat, fc_dim)
        else:
            self.fc1 = nn.ModuleList(nn.Linear(flat, fc_dim) for _ in range(num_levels))
        self.fc2 = nn.Linear(fc_dim, fc_dim)
        self.cls_score = nn.Linear(fc_dim, num_classes + 1)
        self.bbox_pred = nn.Linear(fc_dim, 4 if class_agnostic else 4 * num_classes)
        self.num_classes = num_classes
        self.class_agnostic = class_agnostic
        for fc in [*(self.fc1 if num_levels > 1 else [self.fc1]), self.fc2]:  # [impl 18]
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x):
        """x: (R, C, S, S), or (L, R, C, S, S) grids of every level with adaptive feature pooling."""
        if isinstance(self.fc1, nn.ModuleList):
            h = F.relu(torch.stack([fc(g.flatten(1)) for fc, g in zip(self.fc1, x)]).amax(dim=0))
        else:
            h = F.relu(self.fc1(x.flatten(1)))
        h = F.relu(self.fc2(h))
        return self.cls_score(h), self.bbox_pred(h), h

    def select_deltas(self, deltas, labels):
        """(R, 4) deltas of each RoI's class (class-specific regression); the deltas themselves when
        class-agnostic. Background labels (= C) are clamped: their deltas are never used."""
        if self.class_agnostic:
            return deltas
        index = torch.arange(deltas.shape[0], device=deltas.device)
        return deltas.view(deltas.shape[0], -1, 4)[index, labels.clamp(max=self.num_classes - 1)]


def box_loss(cls_logits, deltas, labels, box_targets, beta=1.0, positive=None):
    """Cross-entropy over the sampled RoIs and Smooth L1 on the positives, both divided by the number
    of sampled RoIs [impl 9.5, 24.11].

    Args:
        cls_logits: (R, C + 1); deltas: (R, 4) (class-agnostic, or already selected for the GT class).
        labels: (R,) GT class of positives, C (background) for negatives.
        box_targets: (P, 4) encoded targets of the positives (rows where labels < C, in order).
        positive: (P,) indices of those rows, when the caller knows them (saves a host-device
            synchronisation); else found from ``labels``.
    Returns:
        loss_cls, loss_box, accuracy (a float in percent, for logging).
    """
    num_classes = cls_logits.shape[1] - 1
    num_sampled = max(labels.numel(), 1)
    loss_cls = F.cross_entropy(cls_logits, labels, reduction="sum") / num_sampled
    if positive is None:
        positive = labels < num_classes
    loss_box = smooth_l1_loss(deltas[positive], box_targets, beta).sum() / num_sampled
    with torch.no_grad():
        accuracy = (cls_logits.argmax(1) == labels).float().mean() * 100 if labels.numel() else cls_logits.new_zeros(())
    return loss_cls, loss_box, accuracy
