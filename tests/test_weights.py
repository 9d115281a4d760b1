"""Official checkpoints: parameter counts, conversion of every manifest key, backbone ImageNet weights."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision

import scnet
from scnet.modeling.backbone.resnet import ResNet, load_pretrained
from scnet.utils.files import FileError
from scnet.weights import (
    convert_mmdet_state_dict,
    load_matching_weights,
    mmdet_backbone_overrides,
    mmdet_config_name,
    mmdet_to_ours,
)

from conftest import CONFIGS, ROOT, TINY

MANIFESTS = os.path.join(ROOT, "tests", "data", "mmdet_state_dicts")
OFFICIAL_MODELS = {  # every manifest in tests/data, with our config of the same model
    "scnet_r50_fpn_20e_coco": "r50_20e.yaml",
    "scnet_x101-64x4d_fpn_20e_coco": "x101_64x4d_20e.yaml",
    "mask-rcnn_r50_fpn_1x_coco": "baselines/mask_rcnn_r50_1x.yaml",
    "cascade-mask-rcnn_r50_fpn_1x_coco": "baselines/cascade_mask_rcnn_r50_1x.yaml",
    "htc_r50_fpn_1x_coco": "baselines/htc_r50_1x.yaml",
    "ms-rcnn_r50_fpn_1x_coco": "baselines/ms_rcnn_r50_1x.yaml",
}


def _manifest(name):
    with open(os.path.join(MANIFESTS, name + ".json")) as f:
        return json.load(f)


def _synthesize(manifest, seed=0):
    """A state dict with the official names and shapes and random values."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, info in manifest["state_dict"].items():
        if info["dtype"] == "int64":
            out[key] = torch.randint(0, 100, info["shape"], generator=g)
        else:
            out[key] = torch.randn(info["shape"], generator=g)
    return out


@pytest.fixture(scope="module", params=list(OFFICIAL_MODELS))
def official_and_model(request):
    manifest = _manifest(request.param)
    model = scnet.build_model(os.path.join(CONFIGS, OFFICIAL_MODELS[request.param]))
    return manifest, model


def test_parameter_counts_equal_the_official_models(official_and_model):
    manifest, model = official_and_model
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == manifest["num_trainable_params"]
    assert len(model.state_dict()) == manifest["num_state_dict_keys"]


def test_synthesized_official_state_dict_converts_and_loads_strictly(official_and_model):
    manifest, model = official_and_model
    official = _synthesize(manifest)
    converted = convert_mmdet_state_dict(official, model.state_dict())
    model.load_state_dict(converted, strict=True)
    # every official tensor arrives unchanged under exactly one of our names
    ours = model.state_dict()
    targets = [mmdet_to_ours(k) for k in official]
    assert len(set(targets)) == len(official) == len(ours)
    for key, tensor in official.items():
        assert torch.equal(ours[mmdet_to_ours(key)], tensor), key
    assert mmdet_config_name(official) == OFFICIAL_MODELS[manifest["config"]].replace("x101_64x4d_20e", "r50_20e")


def test_fine_tuning_from_an_official_checkpoint_with_other_classes(tmp_path):
    """load_matching_weights (train.init_weights): an official SCNet R-50 file into a 20-class SCNet loads
    every tensor but those whose shape follows the number of classes, which keep their initialisation."""
    official = _synthesize(_manifest("scnet_r50_fpn_20e_coco"))
    path = tmp_path / "official.pth"
    torch.save({"meta": {}, "state_dict": official}, path)
    torch.manual_seed(0)
    model = scnet.build_model(os.path.join(CONFIGS, "r50_20e.yaml"), overrides=["model.num_classes=20"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_matching_weights(model, str(path))
    official_name = {mmdet_to_ours(k): k for k in official}
    classes = {k for k, v in before.items() if v.shape != official[official_name[k]].shape}
    assert classes == {f"roi_heads.box_heads.{t}.cls_score.{p}" for t in range(3) for p in ("weight", "bias")} | {
        f"roi_heads.{m}.{p}" for m in ("mask_heads.0.predictor", "global_context.classifier") for p in ("weight", "bias")}
    assert report["loaded"] == len(before) - len(classes) and not report["missing"] and not report["unused"]
    assert sorted(entry.split()[0] for entry in report["shape"]) == sorted(classes)
    after = model.state_dict()
    for key in before:
        expected = before[key] if key in classes else official[official_name[key]]
        assert torch.equal(after[key], expected), key


def test_fine_tuning_from_an_official_single_stage_detector_takes_its_backbone_and_fpn(tmp_path):
    """An official RetinaNet-like file (backbone, neck, no rpn_head/roi_head keys): its FPN's official
    names are renamed too."""
    official = {k: v for k, v in _synthesize(_manifest("scnet_r50_fpn_20e_coco")).items()
                if k.startswith(("backbone.", "neck."))}
    official["bbox_head.retina_cls.weight"] = torch.zeros(720, 256, 3, 3)
    path = tmp_path / "retinanet.pth"
    torch.save({"state_dict": official}, path)
    model = scnet.build_model(os.path.join(CONFIGS, "r50_20e.yaml"))
    report = load_matching_weights(model, str(path))
    assert report["loaded"] == len(official) - 1 and report["unused"] == ["bbox_head.retina_cls.weight"]
    assert torch.equal(model.state_dict()["neck.output_convs.3.weight"], official["neck.fpn_convs.3.conv.weight"])


def test_fine_tuning_weights_that_fit_nothing_are_an_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": {"encoder.weight": torch.zeros(3)}}, path)
    with pytest.raises(FileError, match="none of its 1 tensors fits this model"):
        load_matching_weights(scnet.build_model(None, overrides=TINY), str(path))


def test_backbone_shape_inference(official_and_model):
    manifest, model = official_and_model
    official = _synthesize(manifest)
    cfg = scnet.get_cfg(None, mmdet_backbone_overrides(official))
    b = model.cfg.model.backbone
    assert (cfg.model.backbone.depth, cfg.model.backbone.groups) == (b.depth, b.groups)
    if b.groups > 1:
        assert cfg.model.backbone.width_per_group == b.width_per_group


def test_conversion_errors_name_the_keys():
    manifest = _manifest("scnet_r50_fpn_20e_coco")
    model = scnet.build_model(os.path.join(CONFIGS, "r50_20e.yaml"))
    reference = model.state_dict()
    official = _synthesize(manifest)

    missing = dict(official)
    del missing["roi_head.glbctx_head.fc.bias"]
    with pytest.raises(KeyError, match=r"roi_heads\.global_context\.classifier\.bias"):
        convert_mmdet_state_dict(missing, reference)

    extra = dict(official, **{"roi_head.mystery_head.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match=r"roi_head\.mystery_head\.weight"):
        convert_mmdet_state_dict(extra, reference)

    wrong = dict(official, **{"roi_head.mask_head.conv_logits.weight": torch.zeros(81, 256, 1, 1)})
    with pytest.raises(KeyError, match=r"roi_head\.mask_head\.conv_logits\.weight \(81, 256, 1, 1\)"):
        convert_mmdet_state_dict(wrong, reference)

    # a model without the semantic branch cannot take a checkpoint that has one, and says so
    no_semantic = scnet.build_model(None, overrides=["model.semantic.enabled=false"]).state_dict()
    with pytest.raises(KeyError, match=r"roi_head\.semantic_head\.conv_logits\.weight"):
        convert_mmdet_state_dict(official, no_semantic)


def test_convert_script_and_build_model_read_the_official_file(tmp_path):
    manifest = _manifest("scnet_r50_fpn_20e_coco")
    official = _synthesize(manifest, seed=3)
    src = tmp_path / "official.pth"
    torch.save({"meta": {"mmdet_version": "2.8.0", "CLASSES": ["person"]}, "state_dict": official}, src)
    dst = tmp_path / "ours.pth"
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "convert_mmdet.py"), str(src), str(dst)], check=True)
    converted = scnet.build_model(os.path.join(CONFIGS, "r50_20e.yaml"), weights=str(dst))
    direct = scnet.build_model(os.path.join(CONFIGS, "r50_20e.yaml"), weights=str(src))
    for (k, a), (_, b) in zip(converted.state_dict().items(), direct.state_dict().items()):
        assert torch.equal(a, b), k
    assert torch.equal(converted.rpn.head.cls_logits.weight, official["rpn_head.rpn_cls.weight"])


def test_torchvision_imagenet_checkpoint_loads_into_the_backbone(tmp_path):
    """torchvision ResNet-50 names (incl. fc.*, dropped) load without renaming."""
    reference = torchvision.models.resnet50(weights=None)
    path = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), path)
    backbone = ResNet(50)
    load_pretrained(backbone, str(path))
    assert torch.equal(backbone.layer4[2].conv3.weight, reference.layer4[2].conv3.weight)
    assert torch.equal(backbone.layer2[0].bn2.running_var, reference.layer2[0].bn2.running_var)
    # same features as torchvision's network in eval mode
    reference.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = backbone(x)[-1]
        theirs = torch.nn.Sequential(*list(reference.children())[:-2])(x)
    torch.testing.assert_close(ours, theirs)


def test_torchvision_resnext_checkpoint_loads_into_the_x101_backbone(tmp_path):
    reference = torchvision.models.resnext101_64x4d(weights=None)
    path = tmp_path / "x101.pth"
    torch.save({"state_dict": reference.state_dict()}, path)
    backbone = ResNet(101, groups=64, width_per_group=4)
    load_pretrained(backbone, str(path))
    assert torch.equal(backbone.layer3[22].conv2.weight, reference.layer3[22].conv2.weight)


def test_wrong_backbone_checkpoint_is_an_error(tmp_path):
    path = tmp_path / "resnet101.pth"
    torch.save(ResNet(101).state_dict(), path)
    with pytest.raises(KeyError, match="layer3.6"):
        load_pretrained(ResNet(50), str(path))
