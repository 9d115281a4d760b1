"""Two-stage detector: normalise + pad -> backbone -> FPN -> RPN, image-level context -> RoI heads
-> rescale + paste.

Data contract (written once, here):

Images are RGB in the 0-255 range: (3, H, W) tensors (uint8 or float) or, at inference, (H, W, 3)
uint8 numpy arrays too. The detector normalises them with the ImageNet mean/std and pads them to a
multiple of 32 with zeros *after* normalisation [impl 24.19].

Training, ``model(images, targets)``: images are already resized/flipped by the data pipeline; each
target is a dict of tensors in that image's pixels:
    boxes         float (G, 4)   xyxy, no "+1" [impl 24.2]
    labels        int64 (G,)     contiguous 0..C-1
    masks         uint8 (G, H, W) bitmaps at the image size
    semantic_seg  uint8 (H, W)   COCO-stuff labels, 255 unlabeled (only with the semantic branch on)
Returns a flat dict of weighted loss tensors; their sum is the training loss.

Inference, ``model(images)`` in eval mode: images of any sizes are resized to the test scale (keep
ratio, official rounding, [impl 24.21]), and one dict per image comes back, in that image's pixels:
    boxes   float (D, 4) xyxy;  scores float (D,);  labels int64 (D,) 0-based;  masks bool (D, H, W)
    mask_scores float (D,), only with a MaskIoU head (Mask Scoring R-CNN): the masks' own confidence
``model.inference(tensor, image_sizes, scale_factors, original_sizes)`` takes an already normalised
and padded batch instead (e.g. the official pipeline's), which the numerical parity test uses.
"""
import torch
import torch.nn as nn

from ..ops.image import as_chw_tensor, rescale_size, resize_image
from ..ops.image_list import ImageList
from ..ops.masks import paste_masks

# The image-level branches are the detector's (``context``), but their parameters keep the names of the
# official layout, which has them in the RoI head (roi_head.semantic_head, roi_head.glbctx_head,
# [impl 23.1]): the names every checkpoint so far and the converter's table use.
CHECKPOINT_NAMES = (("context.semantic_head.", "roi_heads.semantic_head."),
                    ("context.global_context.", "roi_heads.global_context."))


def _rename(state_dict, prefix, pairs):
    """Rename the keys ``prefix + a + rest`` to ``prefix + b + rest`` for each (a, b), in place. The renamed
    keys move to the end, in their order: the context's parameters are the detector's last ones anyway."""
    for old, new in pairs:
        for key in [k for k in state_dict if k.startswith(prefix + old)]:
            state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)


class TwoStageDetector(nn.Module):
    """
    Args:
        backbone, neck, rpn, roi_heads: the parts (see ``scnet.modeling.build``).
        context: the image-level branches (``ContextBranches``; without branches it gives an empty
            ImageContext), whose output every RoI head takes.
        pixel_mean, pixel_std: RGB, 0-255 scale.
        test_scale: (long, short) maximum sides of the inference resize.
    """

    def __init__(
        self,
        backbone,
        neck,
        rpn,
        roi_heads,
        context,
        pixel_mean=(123.675, 116.28, 103.53),
        pixel_std=(58.395, 57.12, 57.375),
        size_divisibility=32,
        test_scale=(1333, 800),
        mask_threshold=0.5,
    ):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.context = context  # registered last: the parameter order of the official layout
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(3, 1, 1), persistent=False)
        self.size_divisibility = size_divisibility
        self.test_scale = tuple(test_scale)
        self.mask_threshold = mask_threshold
        self.register_state_dict_post_hook(lambda module, sd, prefix, meta: _rename(sd, prefix, CHECKPOINT_NAMES))
        self.register_load_state_dict_pre_hook(
            lambda module, sd, prefix, *args: _rename(sd, prefix, [(b, a) for a, b in CHECKPOINT_NAMES])
        )

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
        normalized = [(as_chw_tensor(im).to(self.device).float() - self.pixel_mean) / self.pixel_std for im in images]
        return ImageList.from_tensors(normalized, self.size_divisibility)

    def extract_features(self, tensor):
        """[P2, P3, P4, P5, P6] of a normalised, padded (N, 3, H, W) batch."""
        return self.neck(self.backbone(tensor))

    def roi_features(self, features):
        """The FPN levels as the context branches and RoI heads read them: on the CPU, channels-last, which
        our RoIAlign reads in place (scnet/ops/roi_align.py), converted once rather than in each pooling."""
        if features[0].device.type != "cpu":
            return features
        return [f.contiguous(memory_format=torch.channels_last) for f in features]

    # ----------------------------------------------------------------------------------------------
    def forward_train(self, images, targets):
        if len(images) != len(targets):
            raise ValueError(f"got {len(images)} images but {len(targets)} targets")
        batch = self.normalize_and_pad(images)
        targets = [self._prepare_target(i, t, size) for i, (t, size) in enumerate(zip(targets, batch.image_sizes))]
        features = self.extract_features(batch.tensor)
        proposals, _, losses = self.rpn(features, batch.image_sizes, [t["boxes"] for t in targets])
        features = self.roi_features(features)
        context, context_losses = self.context(features, targets, batch.tensor.shape[-2:])
        losses.update(context_losses)
        losses.update(self.roi_heads.forward_train(features, proposals, batch.image_sizes, targets, context))
        return losses

    def _prepare_target(self, i, target, image_size):
        """Checked where it is (the data loader's CPU tensors: no host-device synchronisation), then moved
        to the model's device."""
        target = dict(target, boxes=target["boxes"].float().reshape(-1, 4), labels=target["labels"].long())
        self._check_target(i, target, image_size)
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in target.items()}

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

    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images):
        """Resize each image to the test scale, run :meth:`inference`, return results in its pixels."""
        resized, scale_factors, original_sizes = [], [], []
        for image in images:
            image = as_chw_tensor(image).to(self.device)
            h, w = image.shape[-2:]
            new_h, new_w = rescale_size(h, w, self.test_scale)
            # uint8 as the official pipeline resizes it (cv2, uint8 out); a float image with torch's bilinear
            resized.append(resize_image(image, (new_h, new_w)))
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
        features = self.roi_features(features)
        context, _ = self.context(features)
        detections = self.roi_heads.predict(features, proposals, image_sizes, context)
        return [self.postprocess(d, s, o) for d, s, o in zip(detections, scale_factors, original_sizes)]

    def postprocess(self, detection, scale_factor, original_size):
        """Network-input boxes -> original pixels (per-axis scale), masks pasted at the original size [impl 14]."""
        w_scale, h_scale = scale_factor
        boxes = detection["boxes"].float()  # float32 results under autocast too
        boxes = boxes / boxes.new_tensor([w_scale, h_scale, w_scale, h_scale])
        masks = paste_masks(detection["mask_probs"].float(), boxes, original_size, self.mask_threshold)
        result = {"boxes": boxes, "scores": detection["scores"].float(), "labels": detection["labels"], "masks": masks}
        if "mask_scores" in detection:  # Mask Scoring R-CNN
            result["mask_scores"] = detection["mask_scores"].float()
        return result
