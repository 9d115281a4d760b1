"""Every config of the model zoo builds, trains a step and predicts; the ablation configs differ only in
the components their table row names (SCNet Tables 2-5)."""
import glob
import os

import pytest
import torch

import scnet
from scnet.config import flatten, get_cfg, semantic_branch, to_dict

from conftest import CONFIGS, tiny_overrides

ALL_CONFIGS = sorted(os.path.relpath(p, CONFIGS) for p in glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True))


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_config_builds_trains_and_predicts(name, two_samples, device):
    path = os.path.join(CONFIGS, name)
    with torch.device("meta"):  # the real widths build (on the meta device: shapes only, no init cost)
        full = scnet.build_model(path)
    assert sum(p.numel() for p in full.parameters()) > 1e6
    # the same components at tiny widths: a training step on two images of different sizes (the
    # second without annotations), then inference
    cfg = get_cfg(path, tiny_overrides(path))
    torch.manual_seed(0)
    model = scnet.build_model(cfg).to(device)
    images, targets = two_samples
    if semantic_branch(cfg.model) is None:
        targets = [{k: v for k, v in t.items() if k != "semantic_seg"} for t in targets]
    model.train()
    losses = model(images, targets)
    assert losses and all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    results = model(images)
    for result, image in zip(results, images):
        assert result["masks"].shape[1:] == image.shape[1:] and result["masks"].device == device
        assert result["boxes"].shape[0] <= cfg.model.test.max_detections


ABLATIONS = os.path.join(CONFIGS, "ablations")
# Rows without sample consistency are Cascade Mask R-CNN (+ SCNet's semantic head and test settings), rows
# with it SCNet: adding SC changes the architecture and its mask branch.
SC = {"model.arch", *(f"model.mask_head.{k}" for k in ("type", "num_convs", "num_heads", "loss_weight"))}
FR = {"model.feature_relay.enabled"}
GC = {"model.global_context.enabled"}
ROWS = {  # row -> (the row it adds to, the switches it may change)
    "table2_sc.yaml": ("table2_baseline.yaml", SC),
    "table2_fr.yaml": ("table2_baseline.yaml", FR),
    "table2_gc.yaml": ("table2_baseline.yaml", GC),
    "table2_sc_fr.yaml": ("table2_baseline.yaml", SC | FR),
    "table2_full.yaml": ("table2_baseline.yaml", SC | FR | GC),
    "table3_naive_sc.yaml": ("table2_baseline.yaml", SC),
    "table4_mask_rcnn_fr.yaml": ("table4_mask_rcnn.yaml", FR),
    "table4_cascade_fr.yaml": ("table2_baseline.yaml", FR),
    **{f"table5_gc_{w}.yaml": ("table2_sc_fr.yaml", GC | {"model.global_context.loss_weight"}) for w in (0, 1, 2, 5)},
    "table5_gc_3.yaml": ("table2_sc_fr.yaml", GC),  # lambda = 3 is the default weight
}


def _resolved(name, folder=ABLATIONS):
    """The resolved config, without the options an architecture has but the row leaves off (SCNet's
    MaskIoU head and PANet options), which are not part of any row."""
    flat = flatten(to_dict(get_cfg(os.path.join(folder, name))))
    for option in ("model.mask_iou.", "model.panet."):
        keys = [k for k in flat if k.startswith(option)]
        if not any(flat[k] for k in keys if not k.endswith("loss_weight")):
            flat = {k: v for k, v in flat.items() if k not in keys}
    return flat


@pytest.mark.parametrize("row", sorted(ROWS))
def test_ablation_rows_differ_only_in_their_switches(row):
    base, switches = ROWS[row]
    a, b = _resolved(base), _resolved(row)
    changed = {k for k in set(a) | set(b) if a.get(k, "absent") != b.get(k, "absent")}
    assert changed and changed <= switches, changed


def test_every_ablation_config_is_a_row():
    files = {os.path.basename(p) for p in glob.glob(os.path.join(ABLATIONS, "*.yaml"))}
    assert files == set(ROWS) | {"table2_baseline.yaml", "table4_mask_rcnn.yaml"}


def test_full_ablation_row_is_scnet():
    assert _resolved("table2_full.yaml") == _resolved("r50_20e.yaml", CONFIGS)
