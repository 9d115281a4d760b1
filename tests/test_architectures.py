"""``model.arch`` picks the architecture: every config builds the RoI-heads class it names, each
architecture accepts only its own options, and every combination that cannot work stops at build time
with an error naming the keys."""
import glob
import os

import pytest
import torch

import scnet
from scnet.config import ConfigError, MODEL_CONFIGS, apply_overrides, get_cfg
from scnet.modeling.build import ARCHITECTURES
from scnet.modeling.roi_heads import CascadeRoIHeads, HTCRoIHeads, SCNetRoIHeads, StandardRoIHeads

from conftest import CONFIGS, tiny_overrides

STANDARD = ["baselines/mask_rcnn_r50_1x.yaml", "baselines/ms_rcnn_r50_1x.yaml", "ablations/table4_mask_rcnn.yaml",
            "ablations/table4_mask_rcnn_fr.yaml", "panet/pafpn_mask_rcnn_r50_1x.yaml",
            "panet/panet_mask_rcnn_r50_1x.yaml", "sc_resnet/mask_rcnn_sc_r50_1x.yaml"]
CASCADE = ["baselines/cascade_mask_rcnn_r50_1x.yaml", "baselines/cascade_mask_rcnn_semantic_r50_1x.yaml",
           "ablations/table2_baseline.yaml", "ablations/table2_fr.yaml", "ablations/table2_gc.yaml",
           "ablations/table4_cascade_fr.yaml"]
HTC = ["baselines/htc_r50_1x.yaml"]
ALL_CONFIGS = sorted(
    os.path.relpath(p, CONFIGS) for p in glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True)
)
EXPECTED = {name: SCNetRoIHeads for name in ALL_CONFIGS}
EXPECTED.update({name: StandardRoIHeads for name in STANDARD})
EXPECTED.update({name: CascadeRoIHeads for name in CASCADE})
EXPECTED.update({name: HTCRoIHeads for name in HTC})


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_every_config_builds_the_class_of_its_architecture(name):
    with torch.device("meta"):
        model = scnet.build_model(os.path.join(CONFIGS, name))
    assert type(model.roi_heads) is EXPECTED[name]


def test_every_architecture_has_a_schema_and_a_builder():
    assert set(MODEL_CONFIGS) == set(ARCHITECTURES) == {"mask_rcnn", "cascade_mask_rcnn", "htc", "scnet"}
    assert all(cls().arch == arch for arch, cls in MODEL_CONFIGS.items())


@pytest.mark.parametrize("arch, roi_heads", [("mask_rcnn", StandardRoIHeads), ("cascade_mask_rcnn", CascadeRoIHeads),
                                             ("htc", HTCRoIHeads), ("scnet", SCNetRoIHeads)])
def test_model_arch_on_the_command_line_builds_that_architecture(arch, roi_heads):
    """``configs/r50_20e.yaml`` says scnet; the command line's model.arch wins, with that arch's defaults."""
    with torch.device("meta"):
        model = scnet.build_model(os.path.join(CONFIGS, "r50_20e.yaml"), overrides=[f"model.arch={arch}"])
    assert type(model.roi_heads) is roi_heads
    assert model.cfg.model.test.score_thresh == {"mask_rcnn": 0.05, "cascade_mask_rcnn": 0.05}.get(arch, 0.001)


def test_htc_without_mask_information_flow_trains_every_parameter(two_samples):
    """HTC's own ablation (HTC paper Table 1): interleaved, no information flow."""
    path = os.path.join(CONFIGS, "baselines/htc_r50_1x.yaml")
    torch.manual_seed(0)
    model = scnet.build_model(path, overrides=tiny_overrides(path, "model.mask_head.info_flow=false"))
    assert all(head.info_flow is None for head in model.roi_heads.mask_heads)
    losses = model(*two_samples)
    sum(losses.values()).backward()
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert {f"s{t}.loss_mask" for t in range(3)} <= set(losses)
    model.eval()
    assert model(two_samples[0])[0]["masks"].dtype == torch.bool


# Each combination that cannot work, the keys its error must name. An option an architecture does not
# have is an unknown key of its schema (a ConfigError, also a ValueError).
INVALID = [
    # HTC's information flow on a cascade whose heads do not chain: parameters without gradients
    ("cascade_mask_rcnn", ["model.mask_head.info_flow=true"], ["model.mask_head.info_flow", "cascade_mask_rcnn"]),
    # a MaskIoU head on HTC's three heads: never trained, yet rescoring the masks
    ("htc", ["model.mask_iou.enabled=true"], ["model.mask_iou", "htc"]),
    ("htc", ["model.feature_relay.enabled=true"], ["model.feature_relay"]),
    ("htc", ["model.global_context.enabled=true"], ["model.global_context"]),
    ("mask_rcnn", ["model.semantic.enabled=true"], ["model.semantic", "mask_rcnn"]),
    ("mask_rcnn", ["model.global_context.enabled=true"], ["model.global_context"]),
    ("cascade_mask_rcnn", ["model.panet.adaptive_pooling=true"], ["model.panet"]),
    ("scnet", ["model.mask_head.placement=per_stage"], ["model.mask_head.placement", "scnet"]),
    ("scnet", ["model.mask_iou.enabled=true", "model.mask_head.num_heads=3"],
     ["model.mask_iou.enabled", "model.mask_head.num_heads"]),
    ("scnet", ["model.mask_head.num_heads=0"], ["model.mask_head.num_heads"]),
    ("scnet", ["model.mask_head.num_convs=5"], ["model.mask_head.num_convs", "model.mask_head.type"]),
    ("scnet", ["model.mask_head.type=deep"], ["model.mask_head.type"]),
    ("scnet", ["model.mask_head.type=fcn", "model.mask_head.num_convs=1", "model.panet.fc_fusion=true"],
     ["model.mask_head.num_convs", "model.panet.fc_fusion"]),
    ("mask_rcnn", ["model.roi_heads.stage_ious=[0.5,0.6,0.7]", "model.roi_heads.stage_loss_weights=[1,0.5,0.25]",
                   "model.roi_heads.box_stds=[[1,1,1,1],[1,1,1,1],[1,1,1,1]]"], ["model.roi_heads.stage_ious"]),
    ("cascade_mask_rcnn", ["model.roi_heads.stage_ious=[0.5,0.6]"],
     ["model.roi_heads.stage_ious", "stage_loss_weights", "box_stds"]),
    ("scnet", ["model.roi_heads.box_stds=[[0.1,0.1,0.2],[1,1,1,1],[1,1,1,1]]"], ["model.roi_heads.box_stds"]),
    ("scnet", ["model.semantic.fusion_level=5"], ["model.semantic.fusion_level"]),
    ("htc", ["model.semantic.residual=true", "model.semantic.num_convs=3"],
     ["model.semantic.num_convs", "model.semantic.residual"]),
    ("scnet", ["model.semantic.loss_normalization=mean"], ["model.semantic.loss_normalization"]),
    ("scnet", ["model.backbone.type=sc_resnet", "model.backbone.groups=64"], ["model.backbone.groups"]),
    ("scnet", ["model.num_classes=0"], ["model.num_classes"]),
    ("scnet", ["model.mask_head.resolution=14"], ["model.mask_head.resolution", "model.roi_heads.mask_pool_size"]),
    ("scnet", ["model.roi_heads.box_pool_size=6"], ["model.feature_relay", "model.roi_heads.box_pool_size"]),
    ("mask_rcnn", ["model.panet.fc_fusion=true", "model.roi_heads.mask_pool_size=12", "model.mask_head.resolution=24"],
     ["model.panet.fc_fusion", "model.roi_heads.mask_pool_size"]),
    ("rcnn", [], ["model.arch"]),
]


@pytest.mark.parametrize("arch, overrides, keys", INVALID, ids=[" ".join(o) or a for a, o, _ in INVALID])
def test_invalid_combination_is_an_error_naming_the_keys(arch, overrides, keys):
    with pytest.raises(ValueError) as error, torch.device("meta"):
        scnet.build_model(None, overrides=[f"model.arch={arch}"] + overrides)
    assert all(key in str(error.value) for key in keys), str(error.value)


def test_yaml_options_of_another_architecture_are_rejected_by_name(tmp_path):
    """SCNet's YAML with model.arch=htc on the command line: its global_context is not an HTC option."""
    path = tmp_path / "scnet_gc.yaml"
    path.write_text("model:\n  arch: scnet\n  global_context: {loss_weight: 2}\n")
    with pytest.raises(ConfigError, match=r"scnet_gc\.yaml.*model\.global_context.*htc"):
        get_cfg(str(path), ["model.arch=htc"])


def test_the_architecture_of_an_existing_config_cannot_change():
    with pytest.raises(ConfigError, match=r"model\.arch"):
        apply_overrides(get_cfg(None), ["model.arch=htc"])
    assert apply_overrides(get_cfg(None), ["model.arch=scnet"]).model.arch == "scnet"
