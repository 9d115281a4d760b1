"""Two-stage detector: normalise + pad -> backbone -> FPN -> RPN -> RoI heads -> rescale + paste.

Data contract (written once, here):

Images are RGB in the 0-255 range: (3, H, W) tensors (uint8 or float) or, at inference, (H, W, 3)
uint8 numpy arrays too. The detector normalises them with the ImageNet mean/std and pads them to a
multiple of 32 with zeros *after* normalisation (§24.19).

Training, ``model(images, targets)``: images are already resized/flipped by the data pipeline; each
target is a dict of tensors in that image's pixels:
    boxes         float (G, 4)   xyxy, no "+1" (§24.2)
    labels        int64 (G,)     contiguous 0..C-1
    masks         uint8 (G, H, W) bitmaps at the image size
    semantic_seg  uint8 (H, W)   COCO-stuff labels, 255 unlabeled (only with the semantic branch on)
Returns a flat dict of weighted loss tensors; their sum is the training loss.

Inference, ``model(images)`` in eval mode: images of any sizes are resized to the test scale (keep
ratio, official rounding, §24.21), and one dict per image comes back, in that image's pixels:
    boxes   float (D, 4) xyxy;  scores float (D,);  labels int64 (D,) 0-based;  masks bool (D, H, W)
    mask_scores float (D,), only with a MaskIoU head (Mask Scoring R-CNN): the masks' own confidence
``model.inference(tensor, image_sizes, scale_factors, original_sizes)`` takes an already normalised
and padded batch instead (e.g. the official pipeline's), which the numerical parity test uses.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.image_list import ImageList, pad_to
from ..ops.masks import paste_masks


def rescale_size(height, width, scale):
    """Keep-ratio size fitting (long, short) = ``scale``: int(side * s + 0.5) (§16.1, §24.21)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def _as_chw_tensor(image):
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB array, got shape {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if not torch.is_tensor(image) or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) RGB tensor, got {getattr(image, 'shape', type(image))}")
    return image


class TwoStageDetector(nn.Module):
    """
    Args:
        backbone, neck, rpn, roi_heads: the four parts (see ``scnet.modeling.build``).
        pixel_mean, pixel_std: RGB, 0-255 scale.
        test_scale: (long, short) maximum sides of the inference resize.
        semantic_pad_value: label of the padded border of the semantic targets (§19 row 1).
        semantic_stride: stride of the semantic logits (8: P3).
    """

    def __init__(
        self,
        backbone,
        neck,
        rpn,
        roi_heads,
        pixel_mean=(123.675, 116.28, 103.53),
        pixel_std=(58.395, 57.12, 57.375),
        size_divisibility=32,
        test_scale=(1333, 800),
        mask_threshold=0.5,
        semantic_pad_value=0,
        semantic_stride=8,
    ):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(3, 1, 1), persistent=False)
        self.size_divisibility = size_divisibility
        self.test_scale = tuple(test_scale)
        self.mask_threshold = mask_threshold
        self.semantic_pad_value = semantic_pad_value
        self.semantic_stride = semantic_stride

    @property
    def device(self):
        return self.pixel_mean.device

    def forward(self, images, targets=None):
        if self.training:
            if targets is None:
                raise ValueError("in training mode the model needs targets: model(images, targets)")
            return self.forward_train(images, targets)
        return self.predict(images)

    def normalize_and_pad(self, images):
        """(3, H_i, W_i) RGB 0-255 images -> ImageList of the normalised, zero-padded batch."""
        normalized = [(_as_chw_tensor(im).to(self.device).float() - self.pixel_mean) / self.pixel_std for im in images]
        return ImageList.from_tensors(normalized, self.size_divisibility)

    def extract_features(self, tensor):
        """[P2, P3, P4, P5, P6] of a normalised, padded (N, 3, H, W) batch."""
        return self.neck(self.backbone(tensor))

    def roi_features(self, features):
        """The FPN levels as the RoI heads read them: on the CPU, channels-last, which our RoIAlign reads
        in place (scnet/ops/roi_align.py), converted once rather than in each pooling of the cascade."""
        if features[0].device.type != "cpu":
            return features
        return [f.contiguous(memory_format=torch.channels_last) for f in features]

    # ----------------------------------------------------------------------------------------------
    def forward_train(self, images, targets):
        if len(images) != len(targets):
            raise ValueError(f"got {len(images)} images but {len(targets)} targets")
        batch = self.normalize_and_pad(images)
        targets = [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        for i, (t, size) in enumerate(zip(targets, batch.image_sizes)):
            t["boxes"] = t["boxes"].float().reshape(-1, 4)
            t["labels"] = t["labels"].long()
            self._check_target(i, t, size)
        features = self.extract_features(batch.tensor)
        proposals, _, losses = self.rpn(features, batch.image_sizes, [t["boxes"] for t in targets])
        semantic_target = None
        if self.roi_heads.semantic_head is not None:
            semantic_target = self._semantic_target(targets, batch.tensor.shape[-2:])
        features = self.roi_features(features)
        losses.update(self.roi_heads.forward_train(features, proposals, batch.image_sizes, targets, semantic_target))
        return losses

    def _check_target(self, i, target, image_size):
        """Stop with a message naming the image and the problem, never deep inside a head."""
        boxes, labels = target["boxes"], target["labels"]
        problem = None
        if labels.shape != (boxes.shape[0],):
            problem = f"{boxes.shape[0]} boxes but labels of shape {tuple(labels.shape)}"
        elif labels.numel() and (labels.min() < 0 or labels.max() >= self.roi_heads.num_classes):
            problem = f"labels outside 0..{self.roi_heads.num_classes - 1}: {labels.unique().tolist()}"
        elif not torch.isfinite(boxes).all():
            problem = "non-finite box coordinates"
        elif ((boxes[:, 2:] - boxes[:, :2]) <= 0).any():
            bad = boxes[(boxes[:, 2:] <= boxes[:, :2]).any(1)].tolist()
            problem = f"boxes with zero or negative width/height: {bad}"
        elif "masks" in target and tuple(target["masks"].shape) != (boxes.shape[0], *image_size):
            problem = f"masks of shape {tuple(target['masks'].shape)}, expected {(boxes.shape[0], *image_size)}"
        elif "semantic_seg" in target and tuple(target["semantic_seg"].shape) != tuple(image_size):
            problem = f"semantic_seg of shape {tuple(target['semantic_seg'].shape)}, expected {tuple(image_size)}"
        if problem:
            raise ValueError(f"target of image {i} (image_id {target.get('image_id', '?')}): {problem}")

    def _semantic_target(self, targets, padded_size):
        """Pad the full-resolution stuff maps, then take the pixels (8i, 8j) (§16.1 step 7, §24.14)."""
        for i, t in enumerate(targets):
            if "semantic_seg" not in t:
                raise KeyError(
                    f"target {i} has no 'semantic_seg' but the semantic branch is on; give stuff maps or "
                    "set model.semantic.enabled=false"
                )
        maps = pad_to([t["semantic_seg"].long() for t in targets], padded_size, self.semantic_pad_value)
        return maps[:, :: self.semantic_stride, :: self.semantic_stride]

    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images):
        """Resize each image to the test scale, run :meth:`inference`, return results in its pixels."""
        resized, scale_factors, original_sizes = [], [], []
        for image in images:
            image = _as_chw_tensor(image).to(self.device)
            h, w = image.shape[-2:]
            new_h, new_w = rescale_size(h, w, self.test_scale)
            if (new_h, new_w) != (h, w):
                out = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
                # the official pipeline resizes uint8 images and gets uint8 back
                image = out.round().clamp(0, 255) if image.dtype == torch.uint8 else out
            resized.append(image)
            scale_factors.append((new_w / w, new_h / h))
            original_sizes.append((h, w))
        batch = self.normalize_and_pad(resized)
        return self.inference(batch.tensor, batch.image_sizes, scale_factors, original_sizes)

    @torch.no_grad()
    def inference(self, tensor, image_sizes, scale_factors=None, original_sizes=None):
        """Detections of a normalised, padded batch.

        Args:
            tensor: (N, 3, H, W); image_sizes: per-image (h, w) of the resized, unpadded image.
            scale_factors: per-image (w_scale, h_scale) from the original to the resized image (1, 1 if None).
            original_sizes: per-image (h, w) to paste masks into (``image_sizes`` if None).
        """
        scale_factors = scale_factors or [(1.0, 1.0)] * len(image_sizes)
        original_sizes = original_sizes or image_sizes
        features = self.extract_features(tensor)
        proposals, _, _ = self.rpn(features, image_sizes)
        detections = self.roi_heads.predict(self.roi_features(features), proposals, image_sizes)
        return [self.postprocess(d, s, o) for d, s, o in zip(detections, scale_factors, original_sizes)]

    def postprocess(self, detection, scale_factor, original_size):
        """Network-input boxes -> original pixels (per-axis scale), masks pasted at the original size (§14)."""
        w_scale, h_scale = scale_factor
        boxes = detection["boxes"].float()  # float32 results under autocast too
        boxes = boxes / boxes.new_tensor([w_scale, h_scale, w_scale, h_scale])
        masks = paste_masks(detection["mask_probs"].float(), boxes, original_size, self.mask_threshold)
        result = {"boxes": boxes, "scores": detection["scores"].float(), "labels": detection["labels"], "masks": masks}
        if "mask_scores" in detection:  # Mask Scoring R-CNN
            result["mask_scores"] = detection["mask_scores"].float()
        return result
