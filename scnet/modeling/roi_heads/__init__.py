"""RoI heads, one class per architecture: ``standard`` (Mask R-CNN, with the MaskIoU head and PANet as
options), ``cascade`` (Cascade Mask R-CNN), ``htc`` (Hybrid Task Cascade) and ``scnet`` (SCNet); the box
stages they share are in ``base``."""
from .base import RoIHeads, Samples, Stage
from .cascade import CascadeRoIHeads
from .htc import HTCRoIHeads
from .scnet import SCNetRoIHeads
from .standard import StandardRoIHeads

__all__ = ["CascadeRoIHeads", "HTCRoIHeads", "RoIHeads", "SCNetRoIHeads", "Samples", "Stage", "StandardRoIHeads"]
