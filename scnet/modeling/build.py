"""Model builders: the only place that reads the config. ``ARCHITECTURES`` maps ``model.arch`` to a builder."""
import torch.nn as nn

from .backbone.resnet import ResNet
from .backbone.sc_resnet import SCResNet
from .detector import TwoStageDetector
from .neck.fpn import FPN
from .neck.pafpn import PAFPN
from .roi_heads.box_head import BoxHead
from .roi_heads.feature_relay import FeatureRelay
from .roi_heads.global_context import GlobalContextHead
from .roi_heads.cascade import CascadeRoIHeads
from .roi_heads.htc import HTCRoIHeads
from .roi_heads.mask_head import FCNMaskHead, SCNetMaskHead
from .roi_heads.mask_iou_head import MaskIoUHead
from .roi_heads.semantic_head import SemanticHead
from .rpn import RPN


def build_backbone(b):
    if b.type == "resnet":
        if b.deep_stem or b.avg_down:
            raise ValueError("model.backbone.deep_stem/avg_down apply only to type 'sc_resnet'")
        return ResNet(b.depth, b.groups, b.width_per_group, b.base_channels, b.frozen_stages)
    if b.type == "sc_resnet":
        if b.groups != 1:
            raise ValueError("sc_resnet has no ResNeXt variant: model.backbone.groups must be 1")
        return SCResNet(b.depth, b.deep_stem, b.avg_down, b.base_channels, b.frozen_stages)
    raise ValueError(f"model.backbone.type must be 'resnet' or 'sc_resnet', got {b.type!r}")


def build_backbone_and_neck(m):
    backbone = build_backbone(m.backbone)
    necks = {"fpn": FPN, "pafpn": PAFPN}
    if m.fpn.type not in necks:
        raise ValueError(f"model.fpn.type must be one of {sorted(necks)}, got {m.fpn.type!r}")
    neck = necks[m.fpn.type](backbone.out_channels, m.fpn.out_channels, num_extra_levels=len(m.rpn.anchor_strides) - 4)
    return backbone, neck


def build_rpn(m):
    r = m.rpn
    return RPN(
        in_channels=m.fpn.out_channels,
        head_channels=r.head_channels,
        anchor_strides=r.anchor_strides,
        anchor_scales=r.anchor_scales,
        anchor_ratios=r.anchor_ratios,
        positive_iou=r.positive_iou,
        negative_iou=r.negative_iou,
        min_positive_iou=r.min_positive_iou,
        batch_size_per_image=r.batch_size_per_image,
        positive_fraction=r.positive_fraction,
        smooth_l1_beta=r.smooth_l1_beta,
        pre_nms_top_n=(r.pre_nms_top_n_train, r.pre_nms_top_n_test),
        post_nms_top_n=(r.post_nms_top_n_train, r.post_nms_top_n_test),
        nms_iou=r.nms_iou,
        min_box_size=r.min_box_size,
    )


def mask_loss_weights(m):
    """Weight of each mask head: the total split in proportion to alpha_t when there is one head per
    stage (Cascade Mask R-CNN, HTC, naive sample consistency); the whole of it for a single head
    (SCNet's beta = sum of alpha_t, eq. 4)."""
    alphas = m.roi_heads.stage_loss_weights
    total = m.mask_head.loss_weight
    count = len(alphas) if m.mask_head.placement == "per_stage" else m.mask_head.num_heads
    if count == 1:
        return [total]
    if count == len(alphas):
        return [a * total / sum(alphas) for a in alphas]
    return [total / count] * count


def build_mask_heads(m):
    c, h = m.fpn.out_channels, m.mask_head
    count = len(m.roi_heads.stage_ious) if h.placement == "per_stage" else h.num_heads
    levels = 4 if m.roi_heads.adaptive_pooling else 0  # PANet: P2-P5
    if h.type == "residual":
        return [SCNetMaskHead(c, h.num_convs // 2, m.num_classes, levels, h.fc_fusion) for _ in range(count)]
    if h.type == "fcn":  # HTC's information flow enters every head but the first
        return [
            FCNMaskHead(c, h.num_convs, m.num_classes, h.info_flow and k > 0, levels, h.fc_fusion) for k in range(count)
        ]
    raise ValueError(f"model.mask_head.type must be 'residual' or 'fcn', got {h.type!r}")


def build_roi_heads(m):
    c, r = m.fpn.out_channels, m.roi_heads
    levels = 4 if r.adaptive_pooling else 1
    box_heads = [BoxHead(c, r.box_pool_size, r.fc_dim, m.num_classes, r.class_agnostic, levels) for _ in r.stage_ious]
    mask_heads = build_mask_heads(m)
    semantic = global_context = relays = None
    if m.semantic.enabled:
        s = m.semantic
        levels = len(m.rpn.anchor_strides)
        semantic = SemanticHead(c, c, levels, s.fusion_level, s.num_convs, s.residual, s.num_classes)
    if m.global_context.enabled:
        global_context = GlobalContextHead(c, m.global_context.num_res_blocks, m.num_classes)
    if m.feature_relay.enabled:
        relays = [FeatureRelay(r.fc_dim, c, r.box_pool_size) for _ in mask_heads]
    mask_iou = MaskIoUHead(c, c, r.fc_dim, m.num_classes, r.mask_pool_size) if m.mask_iou.enabled else None
    heads_class = CascadeRoIHeads
    if m.mask_head.interleaved:
        if m.mask_head.type != "fcn" or m.mask_head.placement != "per_stage" or relays or r.adaptive_pooling:
            raise ValueError(
                "model.mask_head.interleaved (HTC) needs per_stage FCN heads, no relay and no adaptive pooling"
            )
        heads_class = HTCRoIHeads
    return heads_class(
        box_heads,
        mask_heads,
        mask_placement=m.mask_head.placement,
        feature_relays=relays,
        mask_iou_head=mask_iou,
        semantic_head=semantic,
        global_context_head=global_context,
        adaptive_pooling=r.adaptive_pooling,
        num_classes=m.num_classes,
        stage_ious=r.stage_ious,
        stage_loss_weights=r.stage_loss_weights,
        box_stds=r.box_stds,
        batch_size_per_image=r.batch_size_per_image,
        positive_fraction=r.positive_fraction,
        box_pool_size=r.box_pool_size,
        mask_pool_size=r.mask_pool_size,
        finest_scale=r.finest_scale,
        semantic_stride=m.rpn.anchor_strides[m.semantic.fusion_level],
        box_smooth_l1_beta=r.box_smooth_l1_beta,
        mask_resolution=m.mask_head.resolution,
        mask_loss_weights=mask_loss_weights(m),
        semantic_loss_weight=m.semantic.loss_weight,
        semantic_ignore_index=m.semantic.ignore_index,
        semantic_loss_normalization=m.semantic.loss_normalization,
        global_context_loss_weight=m.global_context.loss_weight,
        mask_iou_loss_weight=m.mask_iou.loss_weight,
        score_thresh=m.test.score_thresh,
        nms_iou=m.test.nms_iou,
        max_detections=m.test.max_detections,
    )


def build_two_stage(cfg) -> nn.Module:
    """Backbone + FPN + RPN + cascade RoI heads: every architecture of the zoo, as the config describes."""
    m = cfg.model
    backbone, neck = build_backbone_and_neck(m)
    return TwoStageDetector(
        backbone,
        neck,
        build_rpn(m),
        build_roi_heads(m),
        pixel_mean=m.input.pixel_mean,
        pixel_std=m.input.pixel_std,
        size_divisibility=m.input.size_divisibility,
        test_scale=m.input.test_scale,
        mask_threshold=m.test.mask_threshold,
        semantic_pad_value=m.semantic.pad_value,
        semantic_stride=m.rpn.anchor_strides[m.semantic.fusion_level],
    )


# The architectures differ only in their configs (configs/, spec §20): one builder serves them all.
ARCHITECTURES = {
    "scnet": build_two_stage,
    "mask_rcnn": build_two_stage,
    "cascade_mask_rcnn": build_two_stage,
    "htc": build_two_stage,
}


def build_detector(cfg) -> nn.Module:
    if cfg.model.arch not in ARCHITECTURES:
        raise ValueError(f"unknown model.arch {cfg.model.arch!r}; choose from {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[cfg.model.arch](cfg)
