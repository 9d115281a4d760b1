"""Numerical parity with the official implementation (MMDetection 3.3.0 SCNet), stage by stage.

The reference files come from ``shared/tools/mmdet_reference/run_ref.py``: the official model with
seeded weights, run on one image, with its weights (``.pth``) and every intermediate tensor (``.npz``).
We load those weights through our converter, feed the very same preprocessed input tensor and compare.

Runs when ``SCNET_REF_DIR`` holds ``<config>_seed0_bncalib_synth0.{json,npz,pth}``; skipped otherwise
(``.ci/run`` builds them when the reference environment can be installed).
"""
import json
import os

import numpy as np
import pytest
import torch

import scnet

REF_DIR = os.environ.get("SCNET_REF_DIR", "")
CASES = {
    "scnet_r50_fpn_20e_coco": "configs/r50_20e.yaml",
    "scnet_x101-64x4d_fpn_20e_coco": "configs/x101_64x4d_20e.yaml",
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ref_files(config):
    stem = os.path.join(REF_DIR, f"{config}_seed0_bncalib_synth0")
    return stem + ".json", stem + ".npz", stem + ".pth"


def _available(config):
    return bool(REF_DIR) and all(os.path.exists(p) for p in _ref_files(config))


class Recorder:
    """Forward hooks that keep what each part of our model produced, in call order."""

    def __init__(self, model):
        self.out = {}
        self.box_calls = []  # (rois, (cls_logits, deltas, shared)) per box-head call
        self._pending_rois = []
        self.handles = []
        rh = model.roi_heads
        self._hook(model.backbone, lambda o: self._levels("backbone_c", o, 2))
        self._hook(model.neck, lambda o: self._levels("fpn_p", o, 2))
        self._hook(model.rpn.head, self._rpn_head)
        self._hook(model.rpn, lambda o: self.out.update(rpn_proposals=o[0][0], rpn_proposal_scores=o[1][0]))
        self._hook(rh.semantic_head, lambda o: self.out.update(semantic_pred=o[0], semantic_feat=o[1]))
        self._hook(rh.global_context, lambda o: self.out.update(glbctx_pred=o[0], glbctx_feat=o[1]))
        self._hook(rh.feature_relays[0], lambda o: self.out.update(feat_relay_out=o))
        self._hook(rh.mask_heads[0], lambda o: self.out.update(mask_head_in=o))
        self.handles.append(rh.box_pooler.register_forward_pre_hook(lambda m, a: self._pending_rois.append(a[1])))
        for head in rh.box_heads:
            self._hook(head, lambda o: self.box_calls.append((self._pending_rois.pop(0), o)))

    def _hook(self, module, fn):
        self.handles.append(module.register_forward_hook(lambda m, i, o: fn(o)))

    def _levels(self, prefix, outs, first):
        for i, t in enumerate(outs):
            self.out[f"{prefix}{i + first}"] = t

    def _rpn_head(self, o):
        for i, (c, r) in enumerate(zip(*o)):
            self.out[f"rpn_cls_l{i}"] = c
            self.out[f"rpn_reg_l{i}"] = r

    def close(self):
        for h in self.handles:
            h.remove()
        for s, (rois, (cls, deltas, shared)) in enumerate(self.box_calls):
            prefix = f"stage{s}_" if s < 3 else "extra0_stage-1_"
            self.out.update({prefix + "rois": rois, prefix + "cls_score": cls, prefix + "bbox_pred": deltas})
            self.out[prefix + "relayed_feat"] = shared


def _max_rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / (np.abs(a).max() + 1e-12))


@pytest.fixture(scope="module", params=list(CASES))
def parity(request):
    config = request.param
    if not _available(config):
        pytest.skip(f"SCNET_REF_DIR={REF_DIR!r} has no reference dump for {config}: parity NOT checked")
    meta_path, npz_path, pth_path = _ref_files(config)
    meta = json.load(open(meta_path))
    ref = dict(np.load(npz_path))
    torch.set_num_threads(2)
    model = scnet.build_model(os.path.join(ROOT, CASES[config]), weights=pth_path).eval()
    img_meta = meta["img_meta"]
    recorder = Recorder(model)
    with torch.no_grad():
        result = model.inference(
            torch.from_numpy(ref["input"]),
            [tuple(img_meta["img_shape"])],
            [tuple(img_meta["scale_factor"])],
            [tuple(img_meta["ori_shape"])],
        )[0]
    recorder.close()
    ours = {k: v.numpy() for k, v in recorder.out.items()}
    return config, ref, ours, result


FEATURES = [f"backbone_c{i}" for i in range(2, 6)] + [f"fpn_p{i}" for i in range(2, 7)]
FEATURES += [f"rpn_{k}_l{i}" for i in range(5) for k in ("cls", "reg")]
FEATURES += ["semantic_pred", "semantic_feat", "glbctx_pred", "glbctx_feat"]


def test_features(parity):
    """Backbone, FPN, RPN head, semantic and context outputs agree to float32 rounding."""
    _, ref, ours, _ = parity
    worst = {k: _max_rel(ref[k], ours[k]) for k in FEATURES}
    assert max(worst.values()) < 1e-5, worst


def test_proposals(parity):
    _, ref, ours, _ = parity
    assert ours["rpn_proposals"].shape == ref["rpn_proposals"].shape
    np.testing.assert_allclose(ours["rpn_proposals"], ref["rpn_proposals"], atol=1e-2, rtol=0)
    np.testing.assert_allclose(ours["rpn_proposal_scores"], ref["rpn_proposal_scores"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("stage", ["stage0", "stage1", "stage2", "extra0_stage-1"])
def test_cascade_stages(parity, stage):
    """Each stage's RoIs (input boxes), logits, deltas and shared feature; the relay's second pass too."""
    _, ref, ours, _ = parity
    np.testing.assert_allclose(ours[stage + "_rois"], ref[stage + "_rois"], atol=1e-2, rtol=0)
    for key in ("cls_score", "bbox_pred", "relayed_feat"):
        assert _max_rel(ref[f"{stage}_{key}"], ours[f"{stage}_{key}"]) < 1e-5, key


def test_detections(parity):
    """Same detections: count, labels, boxes within 0.01 px, scores within 1e-4."""
    _, ref, _, result = parity
    assert result["boxes"].shape[0] == ref["det_bboxes"].shape[0]
    np.testing.assert_array_equal(result["labels"].numpy(), ref["det_labels"])
    np.testing.assert_allclose(result["boxes"].numpy(), ref["det_bboxes"], atol=1e-2, rtol=0)
    np.testing.assert_allclose(result["scores"].numpy(), ref["det_scores"], atol=1e-4, rtol=0)


def test_masks(parity):
    """Relay output and mask logits within 1e-3 of their spread; final binary masks nearly identical."""
    _, ref, ours, result = parity
    for key in ("feat_relay_out", "mask_head_in"):
        spread = float(ref[key].std())
        assert np.abs(ours[key] - ref[key]).max() / spread < 1e-3, key
    shape = tuple(ref["det_masks_shape"])
    ref_masks = np.unpackbits(ref["det_masks_packed"], axis=-1)[..., : shape[-1]].astype(bool)
    disagree = (ref_masks != result["masks"].numpy()).mean()
    # a pixel can flip only where a probability sits within float rounding of the 0.5 threshold
    assert disagree < 1e-6, disagree
