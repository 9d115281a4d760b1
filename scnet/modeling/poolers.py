"""RoI feature extraction: multi-level RoIAlign with FPN level mapping [impl 6]."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from ..ops.export import exporting
from ..ops.roi_align import roi_align


def map_levels(rois, num_levels, finest_scale=56):
    """Level index 0..num_levels-1 of each (R, 5) RoI: floor(log2(sqrt(w h) / 56 + 1e-6)) [impl 24.25]."""
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()


def rois_from_boxes(boxes_per_image):
    """Per-image (K_i, 4) boxes -> (R, 5) [image index, x1, y1, x2, y2], the RoIAlign format."""
    rois = [torch.cat([b.new_full((b.shape[0], 1), i), b[:, :4]], dim=1) for i, b in enumerate(boxes_per_image)]
    return torch.cat(rois, dim=0)


class MultiLevelRoIAlign(nn.Module):
    """RoIAlign (aligned=True, adaptive sampling, average) on the level each RoI maps to [impl 24.1].

    Args:
        output_size: 7 for the box branch, 14 for the mask branch.
        strides: strides of the levels used (P2-P5); P6 is never pooled [impl 4].
    """

    def __init__(self, output_size, strides=(4, 8, 16, 32), finest_scale=56, sampling_ratio=0):
        super().__init__()
        self.output_size = (output_size, output_size)
        self.strides = tuple(strides)
        self.finest_scale = finest_scale
        self.sampling_ratio = sampling_ratio

    def pool_all_levels(self, features, rois):
        """(L, R, C, S, S): every RoI pooled from every level (PANet's adaptive feature pooling)."""
        return torch.stack([
            roi_align(f, rois, self.output_size, 1.0 / s, self.sampling_ratio, True)
            for f, s in zip(features, self.strides)
        ])

    def forward(self, features, rois, pooled_size=None):
        """features: list of at least len(strides) maps (N, C, H, W); rois: (R, 5). -> (R, C, S, S).

        ``pooled_size``: adaptive-average-pool the (S, S) grids down to this size (done inside RoIAlign
        when it divides S: the semantic feature of the box branch, 14x14 pooled to 7x7, [impl 8]).
        """
        size, group = self.output_size, 1
        if pooled_size is not None and pooled_size != size[0]:
            if size[0] % pooled_size or size[1] % pooled_size:
                return F.adaptive_avg_pool2d(self(features, rois), pooled_size)
            size, group = (pooled_size, pooled_size), size[0] // pooled_size
        if len(self.strides) == 1:
            return roi_align(features[0], rois, size, 1.0 / self.strides[0], self.sampling_ratio, True, group)
        levels = map_levels(rois, len(self.strides), self.finest_scale)
        out = features[0].new_zeros((rois.shape[0], features[0].shape[1]) + size)
        if exporting():  # each level's RoIs found in the graph (their counts are not known when tracing)
            for level, stride in enumerate(self.strides):
                idx = (levels == level).nonzero().view(-1)
                out[idx] = roi_align(features[level], rois[idx], size, 1.0 / stride, self.sampling_ratio, True, group)
            return out
        # RoIs grouped by level with one sort; the per-level counts are the one host-device
        # synchronisation (a nonzero per level would be one each)
        order = levels.argsort(stable=True)
        level_ids = torch.arange(len(self.strides), device=levels.device)
        counts = (levels == level_ids[:, None]).sum(dim=1).tolist()  # (bincount synchronises twice on CUDA)
        for level, idx in enumerate(order.split(counts)):
            if idx.numel() > 0:
                scale = 1.0 / self.strides[level]
                out[idx] = roi_align(features[level], rois[idx], size, scale, self.sampling_ratio, True, group)
        return out
