import glob
import os

import pytest

from scnet.config import ConfigError, Config, dump, flatten, from_dict, get_cfg, to_dict

from conftest import CONFIGS


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True)))
def test_every_yaml_loads(path):
    cfg = get_cfg(path)
    assert isinstance(cfg, Config)


def test_zoo_configs_differ_only_where_the_official_models_do():
    base = flatten(to_dict(get_cfg(os.path.join(CONFIGS, "r50_20e.yaml"))))

    def diff(name):
        other = flatten(to_dict(get_cfg(os.path.join(CONFIGS, name))))
        return {k: other[k] for k in other if other[k] != base[k]}

    assert diff("r50_1x.yaml") == {"solver.epochs": 12, "solver.lr_steps": [8, 11]}
    assert set(diff("r101_20e.yaml")) == {"model.backbone.depth", "model.backbone.pretrained"}
    x101 = diff("x101_64x4d_20e.yaml")
    assert {k: x101[k] for k in x101 if k != "model.backbone.pretrained"} == {
        "model.backbone.depth": 101,
        "model.backbone.groups": 64,
        "model.backbone.width_per_group": 4,
    }


def test_defaults_are_the_official_scnet_numbers():
    m = Config().model
    assert m.roi_heads.stage_ious == [0.5, 0.6, 0.7]
    assert m.roi_heads.stage_loss_weights == [1.0, 0.5, 0.25]
    assert m.mask_head.loss_weight == sum(m.roi_heads.stage_loss_weights)  # eq. 4
    assert (m.semantic.loss_weight, m.global_context.loss_weight) == (0.2, 3.0)
    assert (m.test.score_thresh, m.test.nms_iou, m.test.max_detections) == (0.001, 0.5, 100)
    assert Config().solver.lr_steps == [16, 19]


def test_overrides_parse_yaml_values():
    cfg = get_cfg(None, ["solver.base_lr=0.01", "model.roi_heads.stage_ious=[0.4,0.5,0.6]", "model.semantic.enabled=false"])
    assert cfg.solver.base_lr == 0.01
    assert cfg.model.roi_heads.stage_ious == [0.4, 0.5, 0.6]
    assert cfg.model.semantic.enabled is False
    assert get_cfg(None, ["solver.base_lr=1"]).solver.base_lr == 1.0  # int promoted to float
    assert get_cfg(None, ["solver.base_lr=1e-3"]).solver.base_lr == 0.001  # YAML 1.1 reads this as a str


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.backbone.dpeth=101", "model.backbone.dpeth"),
        ("modle.num_classes=3", "modle"),
        ("model.num_classes=three", "model.num_classes"),
        ("model.semantic.enabled=3", "model.semantic.enabled"),
        ("model.roi_heads.stage_ious=0.5", "model.roi_heads.stage_ious"),
        ("model.backbone=5", "model.backbone"),
        ("solver.lr", "solver.lr"),
        ("solver.accumulate_steps=0", "solver.accumulate_steps' must be at least 1"),
        ("train.eval_period=-1", "train.eval_period' must be at least 0"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        get_cfg(None, [override])


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  roi_heads:\n    stage_iou: [0.5]\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*model\.roi_heads\.stage_iou"):
        get_cfg(str(path))


def test_dump_and_reload_round_trip(tmp_path):
    cfg = get_cfg(os.path.join(CONFIGS, "x101_64x4d_20e.yaml"), ["solver.epochs=3"])
    dump(cfg, tmp_path / "cfg.yaml")
    assert get_cfg(str(tmp_path / "cfg.yaml")) == cfg
    assert from_dict(to_dict(cfg)) == cfg
