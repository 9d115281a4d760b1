"""Region Proposal Network on P2-P6: anchors, shared head, training loss, per-level NMS [impl 5]."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.boxes import BoxCoder, batched_nms
from ..ops.export import exporting
from .losses import smooth_l1_loss
from .sampling import assign_boxes, sample_positive_negative


class AnchorGenerator(nn.Module):
    """Anchors centred on (x * stride, y * stride) (offset 0, [impl 24.23]), in ratio order, float sizes."""

    def __init__(self, strides=(4, 8, 16, 32, 64), scales=(8.0,), ratios=(0.5, 1.0, 2.0)):
        super().__init__()
        self.strides = list(strides)
        self.base_anchors = [self._base_anchors(s, scales, ratios) for s in self.strides]
        self.num_anchors = len(scales) * len(ratios)
        self._cache = {}

    @staticmethod
    def _base_anchors(stride, scales, ratios):
        ratios = torch.tensor(ratios, dtype=torch.float32)
        scales = torch.tensor(scales, dtype=torch.float32)
        h_ratios = torch.sqrt(ratios)  # ratio = h / w
        w_ratios = 1 / h_ratios
        ws = (stride * w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (stride * h_ratios[:, None] * scales[None, :]).view(-1)
        return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)

    def grid_anchors(self, level, height, width, device):
        key = (level, height, width, str(device))
        if exporting():  # symbolic sizes: computed in the graph, not cached
            return self._grid_anchors(level, height, width, device)
        if key not in self._cache:
            if len(self._cache) > 256:  # bounded: training sees a limited set of padded sizes anyway
                self._cache.clear()
            self._cache[key] = self._grid_anchors(level, height, width, device)
        return self._cache[key]

    def _grid_anchors(self, level, height, width, device):
        stride = self.strides[level]
        xs = torch.arange(0, width, device=device).float() * stride
        ys = torch.arange(0, height, device=device).float() * stride
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
        return (shifts + self.base_anchors[level].to(device)[None]).reshape(-1, 4)

    def forward(self, features):
        """List over levels of (H_l * W_l * A, 4) anchors in (H, W, A) order."""
        return [self.grid_anchors(i, f.shape[-2], f.shape[-1], f.device) for i, f in enumerate(features)]


def _best_in_graph(scores, k):
    """The eager selection of a level's anchors without a branch on its (symbolic) size: the best k by
    score when it has more than k, else all in anchor order. Eager leaves a small level unsorted, and
    that order decides between equal scores in NMS (a padded region's anchors score alike)."""
    n = torch.sym_min(scores.shape[0], k)
    best = scores.sort(descending=True)[1][:n]
    more_than_k = torch.ones_like(scores).sum() > k  # the size as a tensor: a choice in the graph
    return torch.where(more_than_k, best, torch.arange(n, device=scores.device))


class RPNHead(nn.Module):
    """3x3 conv + ReLU shared by all levels, then 1x1 objectness (A) and 1x1 deltas (4A) [impl 5.1]."""

    def __init__(self, in_channels, num_anchors, channels=256):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.cls_logits = nn.Conv2d(channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(channels, num_anchors * 4, 1)
        for layer in (self.conv, self.cls_logits, self.bbox_pred):  # [impl 18]
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features):
        logits, deltas = [], []
        for x in features:
            x = F.relu(self.conv(x))
            logits.append(self.cls_logits(x))
            deltas.append(self.bbox_pred(x))
        return logits, deltas


def _flatten(level_output, n, k):
    """(N, A * k, H, W) -> (N, H * W * A, k), matching the anchor order."""
    return level_output.permute(0, 2, 3, 1).reshape(n, -1, k)


class RPN(nn.Module):
    """Returns per-image proposals (detached) and, in training, ``loss_rpn_cls`` / ``loss_rpn_box``."""

    def __init__(
        self,
        in_channels=256,
        head_channels=256,
        anchor_strides=(4, 8, 16, 32, 64),
        anchor_scales=(8.0,),
        anchor_ratios=(0.5, 1.0, 2.0),
        positive_iou=0.7,
        negative_iou=0.3,
        min_positive_iou=0.3,
        batch_size_per_image=256,
        positive_fraction=0.5,
        smooth_l1_beta=1.0 / 9.0,
        pre_nms_top_n=(2000, 1000),  # (train, test), per level
        post_nms_top_n=(2000, 1000),
        nms_iou=0.7,
        min_box_size=0.0,
    ):
        super().__init__()
        self.anchor_generator = AnchorGenerator(anchor_strides, anchor_scales, anchor_ratios)
        self.head = RPNHead(in_channels, self.anchor_generator.num_anchors, head_channels)
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.assign_args = (positive_iou, negative_iou, min_positive_iou)
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.smooth_l1_beta = smooth_l1_beta
        self.pre_nms_top_n = pre_nms_top_n
        self.post_nms_top_n = post_nms_top_n
        self.nms_iou = nms_iou
        self.min_box_size = min_box_size

    def forward(self, features, image_sizes, gt_boxes=None):
        """
        Args:
            features: [P2..P6], each (N, C, H_l, W_l).
            image_sizes: per-image (h, w) of the resized, unpadded images.
            gt_boxes: training only, per-image (G_i, 4) boxes.
        Returns:
            proposals: per-image (K_i, 4) boxes, sorted by decreasing objectness;
            scores: per-image (K_i,) sigmoid objectness;
            losses: dict, empty at inference.
        """
        logits, deltas = self.head(features)
        anchors = self.anchor_generator(features)
        n = len(image_sizes)
        logits = [_flatten(x, n, 1)[..., 0] for x in logits]  # per level (N, HWA)
        deltas = [_flatten(x, n, 4) for x in deltas]  # per level (N, HWA, 4)
        with torch.no_grad():
            proposals, scores = self.select_proposals(logits, deltas, anchors, image_sizes)
        losses = {}
        if self.training:
            losses = self.loss(torch.cat(logits, 1), torch.cat(deltas, 1), torch.cat(anchors), image_sizes, gt_boxes)
        return proposals, scores, losses

    def select_proposals(self, logits, deltas, anchors, image_sizes):
        """Top-k per level by score, decode + clip, drop empty boxes, NMS per level, top-k overall [impl 5.4]."""
        pre_nms = self.pre_nms_top_n[0 if self.training else 1]
        post_nms = self.post_nms_top_n[0 if self.training else 1]
        proposals, scores = [], []
        for i, image_size in enumerate(image_sizes):
            level_scores, level_deltas, level_anchors, level_ids = [], [], [], []
            for lvl, (lg, dl, an) in enumerate(zip(logits, deltas, anchors)):
                s = lg[i].sigmoid()
                d = dl[i]
                if exporting():
                    order = _best_in_graph(s, pre_nms)
                    s, d, an = s[order], d[order], an[order]
                elif s.numel() > pre_nms:
                    s, order = s.sort(descending=True)
                    s, order = s[:pre_nms], order[:pre_nms]
                    d, an = d[order], an[order]
                level_scores.append(s)
                level_deltas.append(d)
                level_anchors.append(an)
                level_ids.append(torch.full_like(s, lvl, dtype=torch.long))
            s = torch.cat(level_scores)
            boxes = self.box_coder.decode(torch.cat(level_anchors), torch.cat(level_deltas), image_size)
            ids = torch.cat(level_ids)
            if self.min_box_size >= 0:
                wh = boxes[:, 2:] - boxes[:, :2]
                valid = (wh > self.min_box_size).all(dim=1).nonzero().view(-1)  # one synchronisation
                boxes, s, ids = boxes[valid], s[valid], ids[valid]
            keep = batched_nms(boxes, s, ids, self.nms_iou)[:post_nms]
            proposals.append(boxes[keep])
            scores.append(s[keep])
        return proposals, scores

    def loss(self, logits, deltas, anchors, image_sizes, gt_boxes):
        """BCE objectness + Smooth L1 (beta 1/9), both summed over the sampled anchors of the batch and
        divided by sum_i max(#pos_i, 1) + sum_i max(#neg_i, 1) (mmdet 2.x, [impl 5.3])."""
        cls_terms, box_terms, normaliser = [], [], 0
        for i, (h, w) in enumerate(image_sizes):
            inside = (anchors[:, 0] >= 0) & (anchors[:, 1] >= 0) & (anchors[:, 2] < w) & (anchors[:, 3] < h)
            inside = inside.nonzero().view(-1)  # allowed_border = 0, strict < [impl 24.3]
            gt = gt_boxes[i]
            assigned = assign_boxes(gt, anchors[inside], *self.assign_args)  # bounded memory, any number of GTs
            pos, neg = sample_positive_negative(assigned, self.batch_size_per_image, self.positive_fraction)
            sampled = torch.cat([pos, neg])
            target = torch.zeros_like(sampled, dtype=logits.dtype)
            target[: pos.numel()] = 1
            cls_terms.append(F.binary_cross_entropy_with_logits(logits[i, inside[sampled]], target, reduction="sum"))
            pos_anchors = anchors[inside[pos]]
            box_target = self.box_coder.encode(pos_anchors, gt[assigned[pos] - 1])
            box_terms.append(smooth_l1_loss(deltas[i, inside[pos]], box_target, self.smooth_l1_beta).sum())
            normaliser += max(pos.numel(), 1) + max(neg.numel(), 1)
        return {
            "loss_rpn_cls": torch.stack(cls_terms).sum() / normaliser,
            "loss_rpn_box": torch.stack(box_terms).sum() / normaliser,
        }
