"""Model builders: the only place that reads the config. ``ARCHITECTURES`` maps ``model.arch`` to the
builder of that architecture; the config already holds only the options it supports
(``scnet.config.MODEL_CONFIGS``), and each builder rejects the combinations that cannot work with a
ValueError naming the keys."""
import torch.nn as nn

from .backbone.resnet import ResNet
from .backbone.sc_resnet import SCResNet
from .context import ContextBranches, GlobalContextHead, SemanticHead
from .detector import TwoStageDetector
from .neck.fpn import FPN
from .neck.pafpn import PAFPN
from .roi_heads import CascadeRoIHeads, HTCRoIHeads, SCNetRoIHeads, StandardRoIHeads
from .roi_heads.box_head import BoxHead
from .roi_heads.feature_relay import FeatureRelay
from .roi_heads.mask_head import FCNMaskHead, SCNetMaskHead
from .roi_heads.mask_iou_head import MaskIoUHead
from .rpn import RPN

PANET_LEVELS = 4  # PANet's adaptive feature pooling reads P2-P5


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
    if len(m.rpn.anchor_strides) < 4:
        raise ValueError(f"model.rpn.anchor_strides needs one stride per FPN level, P2-P5 at least, got "
                         f"{m.rpn.anchor_strides}")
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


def build_context(m, semantic=None, global_context=None):
    """The image-level branches that the architecture has (its config sections, None when it has not)
    and that the config switches on; with none, the detector's context is empty."""
    c, levels = m.fpn.out_channels, len(m.rpn.anchor_strides)
    branches = {}
    if semantic is not None and semantic.enabled:
        _check_semantic(m, semantic)
        s = semantic
        branches.update(
            semantic_head=SemanticHead(c, c, levels, s.fusion_level, s.num_convs, s.residual, s.num_classes),
            semantic_stride=m.rpn.anchor_strides[s.fusion_level],
            semantic_loss_weight=s.loss_weight,
            semantic_ignore_index=s.ignore_index,
            semantic_loss_normalization=s.loss_normalization,
            semantic_pad_value=s.pad_value,
        )
    if global_context is not None and global_context.enabled:
        g = global_context
        branches.update(global_context_head=GlobalContextHead(c, g.num_res_blocks, m.num_classes),
                        global_context_loss_weight=g.loss_weight)
    return ContextBranches(**branches)


def _check_semantic(m, s):
    if not 0 <= s.fusion_level < len(m.rpn.anchor_strides):
        raise ValueError(f"model.semantic.fusion_level={s.fusion_level} is not an FPN level "
                         f"(0..{len(m.rpn.anchor_strides) - 1}, model.rpn.anchor_strides)")
    if s.residual and s.num_convs % 2:
        raise ValueError(f"model.semantic.num_convs={s.num_convs} must be even with model.semantic.residual=true "
                         "(the convs pair into residual blocks)")
    if s.loss_normalization not in ("valid", "all"):
        raise ValueError(f"model.semantic.loss_normalization must be 'valid' or 'all', got {s.loss_normalization!r}")


def _check_stages(m, one_stage=False):
    r = m.roi_heads
    counts = (len(r.stage_ious), len(r.stage_loss_weights), len(r.box_stds))
    if len(set(counts)) != 1 or counts[0] == 0:
        raise ValueError(f"model.roi_heads.stage_ious, stage_loss_weights and box_stds need one entry per box stage, "
                         f"got {counts[0]}, {counts[1]} and {counts[2]}")
    if any(len(stds) != 4 for stds in r.box_stds):
        raise ValueError(f"model.roi_heads.box_stds needs 4 values per stage, got {r.box_stds}")
    if one_stage and counts[0] != 1:
        raise ValueError(f"model.roi_heads.stage_ious has {counts[0]} entries but model.arch '{m.arch}' has one box "
                         "stage (a cascade is model.arch=cascade_mask_rcnn)")


def build_box_heads(m, levels=1):
    r = m.roi_heads
    return [BoxHead(m.fpn.out_channels, r.box_pool_size, r.fc_dim, m.num_classes, r.class_agnostic, levels)
            for _ in r.stage_ious]


def stage_settings(m, adaptive_pooling=False):
    """The keyword arguments of ``RoIHeads``: the box stages and the test-time detections."""
    r, t = m.roi_heads, m.test
    return dict(
        num_classes=m.num_classes,
        stage_ious=r.stage_ious,
        stage_loss_weights=r.stage_loss_weights,
        box_stds=r.box_stds,
        batch_size_per_image=r.batch_size_per_image,
        positive_fraction=r.positive_fraction,
        box_pool_size=r.box_pool_size,
        mask_pool_size=r.mask_pool_size,
        finest_scale=r.finest_scale,
        box_smooth_l1_beta=r.box_smooth_l1_beta,
        mask_resolution=m.mask_head.resolution,
        adaptive_pooling=adaptive_pooling,
        score_thresh=t.score_thresh,
        nms_iou=t.nms_iou,
        max_detections=t.max_detections,
    )


def _check_fcn_head(m, num_convs, adaptive=False, fc_fusion=False):
    needed = 1 + (1 if adaptive else 0) + (1 if fc_fusion else 0)
    if num_convs < needed:
        raise ValueError(f"model.mask_head.num_convs={num_convs} is too few: at least {needed} with "
                         f"model.panet.adaptive_pooling={adaptive}, model.panet.fc_fusion={fc_fusion}")


def _relays(m, count):
    r = m.roi_heads
    return [FeatureRelay(r.fc_dim, m.fpn.out_channels, r.box_pool_size) for _ in range(count)]


def _mask_iou_head(m):
    r = m.roi_heads
    return MaskIoUHead(m.fpn.out_channels, m.fpn.out_channels, r.fc_dim, m.num_classes, r.mask_pool_size)


def _detector(m, parts, roi_heads, context):
    backbone, neck, rpn = parts
    return TwoStageDetector(
        backbone,
        neck,
        rpn,
        roi_heads,
        context,
        pixel_mean=m.input.pixel_mean,
        pixel_std=m.input.pixel_std,
        size_divisibility=m.input.size_divisibility,
        test_scale=m.input.test_scale,
        mask_threshold=m.test.mask_threshold,
    )


def _first_parts(m, box_levels=1):
    """(backbone, neck, RPN) and the box heads. Every builder creates its parts in one order (these,
    mask heads, image-level branches, relays, MaskIoU head): a seed gives the same initial weights."""
    backbone, neck = build_backbone_and_neck(m)
    return (backbone, neck, build_rpn(m)), build_box_heads(m, box_levels)


# ----------------------------------------------------------------------------------------------------
# One builder per architecture
# ----------------------------------------------------------------------------------------------------
def build_mask_rcnn(cfg) -> nn.Module:
    """Mask R-CNN, with Mask Scoring R-CNN's MaskIoU head, PANet and feature relay as options."""
    m = cfg.model
    _check_stages(m, one_stage=True)
    p, h = m.panet, m.mask_head
    _check_fcn_head(m, h.num_convs, p.adaptive_pooling, p.fc_fusion)
    levels = PANET_LEVELS if p.adaptive_pooling else 0
    parts, (box_head,) = _first_parts(m, levels or 1)
    mask_head = FCNMaskHead(m.fpn.out_channels, h.num_convs, m.num_classes, False, levels, p.fc_fusion)
    roi_heads = StandardRoIHeads(
        box_head,
        mask_head,
        feature_relay=_relays(m, 1)[0] if m.feature_relay.enabled else None,
        mask_iou_head=_mask_iou_head(m) if m.mask_iou.enabled else None,
        mask_loss_weight=h.loss_weight,
        mask_iou_loss_weight=m.mask_iou.loss_weight,
        **stage_settings(m, p.adaptive_pooling),
    )
    return _detector(m, parts, roi_heads, build_context(m))


def build_cascade_mask_rcnn(cfg) -> nn.Module:
    """Cascade Mask R-CNN: one FCN mask head per stage; semantic branch, relay, global context optional."""
    m, h = cfg.model, cfg.model.mask_head
    _check_stages(m)
    _check_fcn_head(m, h.num_convs)
    parts, box_heads = _first_parts(m)
    mask_heads = [FCNMaskHead(m.fpn.out_channels, h.num_convs, m.num_classes) for _ in box_heads]
    context = build_context(m, m.semantic, m.global_context)
    roi_heads = CascadeRoIHeads(
        box_heads,
        mask_heads,
        feature_relays=_relays(m, len(mask_heads)) if m.feature_relay.enabled else None,
        mask_loss_weights=[a * h.loss_weight for a in m.roi_heads.stage_loss_weights],
        **stage_settings(m),
    )
    return _detector(m, parts, roi_heads, context)


def build_htc(cfg) -> nn.Module:
    """Hybrid Task Cascade: interleaved execution, mask information flow (switchable), semantic branch."""
    m, h = cfg.model, cfg.model.mask_head
    _check_stages(m)
    _check_fcn_head(m, h.num_convs)
    parts, box_heads = _first_parts(m)
    # the information flow enters every head but the first
    mask_heads = [FCNMaskHead(m.fpn.out_channels, h.num_convs, m.num_classes, h.info_flow and k > 0)
                  for k in range(len(box_heads))]
    roi_heads = HTCRoIHeads(
        box_heads,
        mask_heads,
        mask_loss_weights=[a * h.loss_weight for a in m.roi_heads.stage_loss_weights],
        info_flow=h.info_flow,
        **stage_settings(m),
    )
    return _detector(m, parts, roi_heads, build_context(m, m.semantic))


def _scnet_mask_heads(m):
    h, p, c = m.mask_head, m.panet, m.fpn.out_channels
    levels = PANET_LEVELS if p.adaptive_pooling else 0
    if h.num_heads < 1:
        raise ValueError(f"model.mask_head.num_heads must be at least 1, got {h.num_heads}")
    if h.type == "residual":
        if h.num_convs < 2 or h.num_convs % 2:
            raise ValueError(f"model.mask_head.num_convs={h.num_convs} must be even and >= 2 with "
                             "model.mask_head.type=residual (the convs pair into residual blocks)")
        return [SCNetMaskHead(c, h.num_convs // 2, m.num_classes, levels, p.fc_fusion) for _ in range(h.num_heads)]
    if h.type == "fcn":
        _check_fcn_head(m, h.num_convs, p.adaptive_pooling, p.fc_fusion)
        return [FCNMaskHead(c, h.num_convs, m.num_classes, False, levels, p.fc_fusion) for _ in range(h.num_heads)]
    raise ValueError(f"model.mask_head.type must be 'residual' or 'fcn', got {h.type!r}")


def scnet_mask_loss_weights(m):
    """beta (eq. 4) for a single head; with one head per stage (naive sample consistency, Table 3) the
    cascade's alpha_t-proportional split; otherwise an even split."""
    alphas, total, count = m.roi_heads.stage_loss_weights, m.mask_head.loss_weight, m.mask_head.num_heads
    if count == 1:
        return [total]
    if count == len(alphas):
        return [a * total / sum(alphas) for a in alphas]
    return [total / count] * count


def build_scnet(cfg) -> nn.Module:
    """SCNet: box cascade, the mask branch on the last stage's samples, feature relay, global context."""
    m = cfg.model
    _check_stages(m)
    if m.mask_iou.enabled and m.mask_head.num_heads != 1:
        raise ValueError(f"model.mask_iou.enabled needs a single mask head, got model.mask_head.num_heads="
                         f"{m.mask_head.num_heads}")
    adaptive = m.panet.adaptive_pooling
    parts, box_heads = _first_parts(m, PANET_LEVELS if adaptive else 1)
    mask_heads = _scnet_mask_heads(m)
    context = build_context(m, m.semantic, m.global_context)
    roi_heads = SCNetRoIHeads(
        box_heads,
        mask_heads,
        feature_relays=_relays(m, len(mask_heads)) if m.feature_relay.enabled else None,
        mask_iou_head=_mask_iou_head(m) if m.mask_iou.enabled else None,
        mask_loss_weights=scnet_mask_loss_weights(m),
        mask_iou_loss_weight=m.mask_iou.loss_weight,
        **stage_settings(m, adaptive),
    )
    return _detector(m, parts, roi_heads, context)


ARCHITECTURES = {
    "mask_rcnn": build_mask_rcnn,
    "cascade_mask_rcnn": build_cascade_mask_rcnn,
    "htc": build_htc,
    "scnet": build_scnet,
}


def _check_roi_sizes(m):
    """The RoI sizes the heads are wired for: every mask head (and the MaskIoU head) upsamples its
    mask_pool_size input 2x, the relay upsamples box_pool_size 2x, PANet's fc fusion is 14 -> 28."""
    r, h = m.roi_heads, m.mask_head
    if h.resolution != 2 * r.mask_pool_size:
        raise ValueError(f"model.mask_head.resolution={h.resolution} must be 2 x model.roi_heads.mask_pool_size="
                         f"{r.mask_pool_size} (the mask heads upsample their RoI features 2x)")
    relay = getattr(m, "feature_relay", None)
    if relay is not None and relay.enabled and r.mask_pool_size != 2 * r.box_pool_size:
        raise ValueError(f"model.feature_relay needs model.roi_heads.mask_pool_size={r.mask_pool_size} to be 2 x "
                         f"model.roi_heads.box_pool_size={r.box_pool_size} (the relay upsamples box features 2x)")
    panet = getattr(m, "panet", None)
    if panet is not None and panet.fc_fusion and (r.mask_pool_size, h.resolution) != (14, 28):
        raise ValueError(f"model.panet.fc_fusion is built for model.roi_heads.mask_pool_size=14 and "
                         f"model.mask_head.resolution=28, got {r.mask_pool_size} and {h.resolution}")


def build_detector(cfg) -> nn.Module:
    if cfg.model.arch not in ARCHITECTURES:
        raise ValueError(f"unknown model.arch {cfg.model.arch!r}; choose from {sorted(ARCHITECTURES)}")
    if cfg.model.num_classes < 1:
        raise ValueError(f"model.num_classes must be at least 1, got {cfg.model.num_classes}")
    _check_roi_sizes(cfg.model)
    return ARCHITECTURES[cfg.model.arch](cfg)
