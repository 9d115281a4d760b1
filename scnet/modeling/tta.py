"""Test-time augmentation: horizontal flip x the official five scales, merged as the official 2.x
``aug_test`` merges them ([impl 15]; the "TTA box AP / TTA mask AP" columns of the results table).

1. Proposals of every view, mapped back to the original image, one NMS (0.7) over all, top 1000.
2. Every view runs the cascade on those proposals; its boxes (mapped back) and softmax scores are
   averaged over the views, then class-wise NMS as usual.
3. Every view predicts the masks of the final boxes; the 28x28 probabilities (flipped back) are
   averaged and pasted once into the original image.
"""
import torch
from torchvision.ops import nms

from ..ops.boxes import multiclass_nms
from ..ops.masks import paste_masks
from ..ops.image import as_chw_tensor, rescale_size, resize_image

# (short, long) maxima of the official multi-scale test [impl 15]
OFFICIAL_SCALES = ((600, 900), (800, 1200), (1000, 1500), (1200, 1800), (1400, 2100))


def _flip_boxes(boxes, width):
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


class _View:
    """One augmented copy of the image: its features, size and the geometry back to the original."""

    def __init__(self, model, image, scale, flip):
        h, w = image.shape[-2:]
        new_h, new_w = rescale_size(h, w, scale)
        resized = resize_image(image, (new_h, new_w))  # as the model's own resize (the official uint8 one)
        if flip:
            resized = resized.flip(-1)
        batch = model.normalize_and_pad([resized])
        self.features = model.extract_features(batch.tensor)
        self.context, _ = model.context(self.features)  # S and G of this view [impl 15]
        self.size = (new_h, new_w)
        self.flip = flip
        self.factors = torch.tensor([new_w / w, new_h / h, new_w / w, new_h / h], device=image.device)

    def to_view(self, boxes):
        """Original-image boxes -> this view's boxes (scale, then flip)."""
        boxes = boxes * self.factors
        return _flip_boxes(boxes, self.size[1]) if self.flip else boxes

    def to_original(self, boxes):
        """This view's boxes -> original-image boxes (unflip, then unscale)."""
        if self.flip:
            boxes = _flip_boxes(boxes, self.size[1])
        return boxes / self.factors


class TestTimeAugmentation:
    """Callable on one image ((3, H, W) tensor or (H, W, 3) uint8 array, RGB); returns the model's
    output dict (boxes, scores, labels, masks in the image's pixels).

    Args:
        model: an SCNet TwoStageDetector in eval mode.
        scales: (short, long) maxima of each scale; flip: add the horizontal flip of every scale.
    """

    __test__ = False  # not a pytest class, despite the name

    def __init__(self, model, scales=OFFICIAL_SCALES, flip=True, proposal_nms_iou=0.7, max_proposals=1000):
        self.model = model
        self.views = [(scale, f) for scale in scales for f in ((False, True) if flip else (False,))]
        self.proposal_nms_iou = proposal_nms_iou
        self.max_proposals = max_proposals

    @torch.no_grad()
    def __call__(self, image):
        model, heads = self.model, self.model.roi_heads
        image = as_chw_tensor(image).to(model.device)
        views = [_View(model, image, scale, flip) for scale, flip in self.views]
        proposals = self._merged_proposals(views)
        boxes, scores = [], []
        for v in views:
            (b,), (s,) = heads.predict_boxes(v.features, [v.to_view(proposals)], [v.size], v.context)
            boxes.append(v.to_original(b))
            scores.append(s)
        boxes, scores = torch.stack(boxes).mean(0), torch.stack(scores).mean(0)  # [impl 15] step 2
        boxes, scores, labels = multiclass_nms(boxes, scores, heads.score_thresh, heads.nms_iou, heads.max_detections)
        probs = torch.stack([self._mask_probs(v, boxes, labels) for v in views]).mean(0)
        masks = paste_masks(probs, boxes, image.shape[-2:], model.mask_threshold)
        return {"boxes": boxes, "scores": scores, "labels": labels, "masks": masks}

    def _merged_proposals(self, views):
        """Every view's RPN proposals in original coordinates, one NMS over all, the best 1000."""
        boxes, scores = [], []
        for v in views:
            (b,), (s,), _ = self.model.rpn(v.features, [v.size])
            boxes.append(v.to_original(b))
            scores.append(s)
        boxes, scores = torch.cat(boxes), torch.cat(scores)
        keep = nms(boxes, scores, self.proposal_nms_iou)[: self.max_proposals]  # sorted by score
        return boxes[keep]

    def _mask_probs(self, view, boxes, labels):
        """(D, 28, 28) probabilities of each detection's class in one view, flipped back if needed."""
        heads = self.model.roi_heads
        probs = heads.mask_probs(view.features, [view.to_view(boxes)], labels, view.context)
        return probs.flip(-1) if view.flip else probs
