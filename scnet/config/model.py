"""The model's configuration: one schema per architecture (``MODEL_CONFIGS``), each with the official
model's defaults ([impl N] cites docs/official_implementation*.md) and only the options it supports.
Loading, overrides and the rest of the configuration: ``scnet.config``."""
from dataclasses import dataclass, field
from typing import List


@dataclass
class BackboneConfig:
    type: str = "resnet"  # "resnet" [impl 3.1] or "sc_resnet" (self-calibrated convs, Liu et al. CVPR 2020)
    depth: int = 50  # 50 or 101 [impl 3.1]
    groups: int = 1  # ResNeXt cardinality: 64 for X-101-64x4d [impl 3.2]
    width_per_group: int = 64  # ResNeXt bottleneck base width: 4 for X-101-64x4d (unused if groups=1)
    base_channels: int = 64  # stem width = layer1 planes; tiny test models use fewer
    frozen_stages: int = 1  # stem + layer1 never trained [impl 3.1]
    deep_stem: bool = False  # sc_resnet: three 3x3 stem convs (SC-ResNet-50-v1d)
    avg_down: bool = False  # sc_resnet: average-pool downsampling in shortcuts and blocks (SC-ResNet-50-v1d)
    # ImageNet weights with torchvision names, or the official SC-ResNet names for sc_resnet (local path
    # or URL through torch.hub's cache). Loaded by
    # the training script, never by build_model, so that building a model never downloads anything.
    pretrained: str = ""


@dataclass
class FPNConfig:
    type: str = "fpn"  # "fpn" [impl 4] or "pafpn" (PANet's bottom-up path augmentation, [impl 22])
    out_channels: int = 256  # [impl 4]


@dataclass
class RPNConfig:
    anchor_strides: List[int] = field(default_factory=lambda: [4, 8, 16, 32, 64])  # [impl 5.2]
    anchor_scales: List[float] = field(default_factory=lambda: [8.0])
    anchor_ratios: List[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # h / w
    head_channels: int = 256
    positive_iou: float = 0.7  # [impl 5.3] MaxIoU assigner
    negative_iou: float = 0.3
    min_positive_iou: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    smooth_l1_beta: float = 1.0 / 9.0  # [impl 5.3]
    pre_nms_top_n_train: int = 2000  # [impl 5.4], per level
    post_nms_top_n_train: int = 2000
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_test: int = 1000
    nms_iou: float = 0.7
    # Proposals with w or h <= min_box_size are dropped before NMS. 0 is mmdet 3.x (the reference we
    # test parity against); -1 disables the filter as mmdet 2.x did [impl 19 row 4].
    min_box_size: float = 0.0


@dataclass
class RoIHeadsConfig:
    """The box stages, in every architecture (defaults: the three stages of the cascades)."""

    stage_ious: List[float] = field(default_factory=lambda: [0.5, 0.6, 0.7])  # [impl 9.1]; one per stage
    stage_loss_weights: List[float] = field(default_factory=lambda: [1.0, 0.5, 0.25])  # alpha_t, SCNet eq. 3
    box_stds: List[List[float]] = field(
        default_factory=lambda: [[0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067]]
    )
    class_agnostic: bool = True  # 4 deltas per RoI (the cascades) instead of 4 per class (Mask R-CNN)
    batch_size_per_image: int = 512  # [impl 9.4]
    positive_fraction: float = 0.25
    fc_dim: int = 1024  # [impl 9.3]
    box_pool_size: int = 7  # [impl 6]
    mask_pool_size: int = 14
    finest_scale: int = 56
    box_smooth_l1_beta: float = 1.0  # [impl 9.5]


def _one_stage():
    """Mask R-CNN's single box stage: IoU 0.5, class-specific regression."""
    return RoIHeadsConfig(
        stage_ious=[0.5], stage_loss_weights=[1.0], box_stds=[[0.1, 0.1, 0.2, 0.2]], class_agnostic=False
    )


@dataclass
class MaskHeadConfig:
    """The 4-conv FCN mask head of Mask R-CNN, Cascade Mask R-CNN and HTC (one per stage in the cascades)."""

    num_convs: int = 4
    loss_weight: float = 1.0  # per head; the cascades multiply it by the stage's alpha_t
    resolution: int = 28


@dataclass
class HTCMaskHeadConfig(MaskHeadConfig):
    info_flow: bool = True  # HTC's mask information flow between the per-stage heads (HTC paper §3.2)


@dataclass
class SCNetMaskHeadConfig:
    """SCNet's mask branch, trained on the last stage's samples (sample consistency, SCNet paper §4.1)."""

    # "residual": the deep head, pairs of convs with a skip [impl 11.2]; "fcn": plain 3x3 convs + ReLU
    type: str = "residual"
    num_convs: int = 12  # 12 convs = 6 residual blocks: the effective form of sample consistency
    num_heads: int = 1  # 3 x (fcn, 4 convs) is the naive form (Table 3), probabilities averaged at test
    # beta = sum of alpha_t (eq. 4); with one head per stage split as alpha_t, otherwise evenly
    loss_weight: float = 1.75
    resolution: int = 28


@dataclass
class PANetConfig:
    """PANet's RoI-side components (Liu et al., CVPR 2018); its neck is ``model.fpn.type=pafpn``."""

    adaptive_pooling: bool = False  # PANet paper §3.2: pool every RoI from every level, per-level first layers
    fc_fusion: bool = False  # PANet paper §3.4: a class-agnostic fc mask added to the mask head's logits


@dataclass
class SemanticConfig:
    enabled: bool = True  # switch off for datasets without stuff maps
    num_classes: int = 183  # COCO-stuff raw ids 0..181 (+1) [impl 7]
    ignore_index: int = 255
    loss_weight: float = 0.2  # gamma, SCNet eq. 3
    num_convs: int = 4  # [impl 7]
    residual: bool = True  # SCNet pairs the convs into residual blocks; HTC's head has plain convs
    fusion_level: int = 1  # P3, stride 8
    # "valid": mean over non-ignored pixels (mmdet 2.x, which trained the released models);
    # "all": mean over all pixels, ignored ones counting 0 (mmdet 3.x) [impl 19 row 2]
    loss_normalization: str = "valid"
    # Value of the padded border of the semantic map: 0 in mmdet 2.x (labels it class 0), 255 in 3.x
    # (ignored) [impl 19 row 1]
    pad_value: int = 0


@dataclass
class GlobalContextConfig:
    enabled: bool = True  # SCNet paper §4.2 [impl 8]
    loss_weight: float = 3.0  # lambda, SCNet eq. 3 and Table 5
    num_res_blocks: int = 2


@dataclass
class FeatureRelayConfig:
    enabled: bool = True  # SCNet paper §4.2 [impl 10]


@dataclass
class MaskIoUConfig:
    enabled: bool = False  # Mask Scoring R-CNN's MaskIoU head on the mask head [impl 21]
    loss_weight: float = 0.5


@dataclass
class InputConfig:
    pixel_mean: List[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])  # RGB [impl 16.1]
    pixel_std: List[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    size_divisibility: int = 32
    train_scale: List[int] = field(default_factory=lambda: [1333, 800])  # (long, short) max sides
    test_scale: List[int] = field(default_factory=lambda: [1333, 800])


@dataclass
class TestConfig:
    score_thresh: float = 0.001  # strict >, SCNet paper §5.1 [impl 13]
    nms_iou: float = 0.5
    max_detections: int = 100
    mask_threshold: float = 0.5
    # test-time augmentation (scripts/eval.py --tta): (short, long) maxima of each scale, and flips [impl 15]
    tta_scales: List[List[int]] = field(
        default_factory=lambda: [[600, 900], [800, 1200], [1000, 1500], [1200, 1800], [1400, 2100]]
    )
    tta_flip: bool = True


@dataclass
class ModelConfig:
    """What every architecture has. ``arch`` selects one of the subclasses below, each with its own
    defaults and only the options its architecture supports (``MODEL_CONFIGS``)."""

    arch: str = "scnet"
    num_classes: int = 80
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn: FPNConfig = field(default_factory=FPNConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: RoIHeadsConfig = field(default_factory=RoIHeadsConfig)
    input: InputConfig = field(default_factory=InputConfig)
    test: TestConfig = field(default_factory=TestConfig)


@dataclass
class MaskRCNNConfig(ModelConfig):
    """Mask R-CNN R-50-FPN as mmdet's mask-rcnn_r50_fpn_1x_coco; Mask Scoring R-CNN, PANet and SCNet's
    feature relay are its options."""

    arch: str = "mask_rcnn"
    rpn: RPNConfig = field(default_factory=lambda: RPNConfig(post_nms_top_n_train=1000))
    roi_heads: RoIHeadsConfig = field(default_factory=_one_stage)
    test: TestConfig = field(default_factory=lambda: TestConfig(score_thresh=0.05))
    mask_head: MaskHeadConfig = field(default_factory=MaskHeadConfig)
    feature_relay: FeatureRelayConfig = field(default_factory=lambda: FeatureRelayConfig(enabled=False))
    mask_iou: MaskIoUConfig = field(default_factory=MaskIoUConfig)
    panet: PANetConfig = field(default_factory=PANetConfig)


@dataclass
class CascadeMaskRCNNConfig(ModelConfig):
    """Cascade Mask R-CNN R-50-FPN as mmdet's cascade-mask-rcnn_r50_fpn_1x_coco [impl 20.2]; the semantic
    branch (SCNet's baseline), feature relay and global context (SCNet's ablations) are its options."""

    arch: str = "cascade_mask_rcnn"
    test: TestConfig = field(default_factory=lambda: TestConfig(score_thresh=0.05))
    mask_head: MaskHeadConfig = field(default_factory=MaskHeadConfig)
    semantic: SemanticConfig = field(default_factory=lambda: SemanticConfig(enabled=False, residual=False))
    global_context: GlobalContextConfig = field(default_factory=lambda: GlobalContextConfig(enabled=False))
    feature_relay: FeatureRelayConfig = field(default_factory=lambda: FeatureRelayConfig(enabled=False))


@dataclass
class HTCConfig(ModelConfig):
    """Hybrid Task Cascade R-50-FPN as mmdet's htc_r50_fpn_1x_coco [impl 20.1]."""

    arch: str = "htc"
    mask_head: HTCMaskHeadConfig = field(default_factory=HTCMaskHeadConfig)
    semantic: SemanticConfig = field(default_factory=lambda: SemanticConfig(residual=False))


@dataclass
class SCNetConfig(ModelConfig):
    """SCNet R-50-FPN 20e exactly as the official model; the ablations of SCNet's Tables 3 and 5 and the
    zoo's additions (MaskIoU head, PANet) are its options."""

    arch: str = "scnet"
    mask_head: SCNetMaskHeadConfig = field(default_factory=SCNetMaskHeadConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    global_context: GlobalContextConfig = field(default_factory=GlobalContextConfig)
    feature_relay: FeatureRelayConfig = field(default_factory=FeatureRelayConfig)
    mask_iou: MaskIoUConfig = field(default_factory=MaskIoUConfig)
    panet: PANetConfig = field(default_factory=PANetConfig)


MODEL_CONFIGS = {
    "mask_rcnn": MaskRCNNConfig,
    "cascade_mask_rcnn": CascadeMaskRCNNConfig,
    "htc": HTCConfig,
    "scnet": SCNetConfig,
}


def semantic_branch(model_cfg):
    """The model's SemanticConfig when it has the semantic branch and it is on, else None."""
    semantic = getattr(model_cfg, "semantic", None)
    return semantic if semantic is not None and semantic.enabled else None
