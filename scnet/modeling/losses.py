"""Loss functions shared by several heads."""
import torch


def smooth_l1_loss(pred, target, beta):
    """Elementwise Smooth L1: 0.5 d^2 / beta if d < beta else d - 0.5 beta, with d = |pred - target| [impl 12]."""
    diff = torch.abs(pred - target)
    return torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)
