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
from scnet.modeling.roi_heads.mask_head import SCNetMaskHead

REF_DIR = os.environ.get("SCNET_REF_DIR", "")
CASES = {  # official config -> ours (shared/tools/mmdet_reference builds all six)
    "scnet_r50_fpn_20e_coco": "configs/r50_20e.yaml",
    "scnet_x101-64x4d_fpn_20e_coco": "configs/x101_64x4d_20e.yaml",
    "mask-rcnn_r50_fpn_1x_coco": "configs/baselines/mask_rcnn_r50_1x.yaml",
    "cascade-mask-rcnn_r50_fpn_1x_coco": "configs/baselines/cascade_mask_rcnn_r50_1x.yaml",
    "htc_r50_fpn_1x_coco": "configs/baselines/htc_r50_1x.yaml",
    "ms-rcnn_r50_fpn_1x_coco": "configs/baselines/ms_rcnn_r50_1x.yaml",
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
        rh = self.roi_heads = model.roi_heads
        self._hook(model.backbone, lambda o: self._levels("backbone_c", o, 2))
        self._hook(model.neck, lambda o: self._levels("fpn_p", o, 2))
        self._hook(model.rpn.head, self._rpn_head)
        self._hook(model.rpn, lambda o: self.out.update(rpn_proposals=o[0][0], rpn_proposal_scores=o[1][0]))
        if model.context.semantic_head is not None:
            self._hook(model.context.semantic_head, lambda o: self.out.update(semantic_pred=o[0], semantic_feat=o[1]))
        if model.context.global_context is not None:
            self._hook(model.context.global_context, lambda o: self.out.update(glbctx_pred=o[0], glbctx_feat=o[1]))
        if rh.feature_relays is not None:
            self._hook(rh.feature_relays[0], lambda o: self.out.update(feat_relay_out=o))
        if isinstance(rh.mask_heads[0], SCNetMaskHead) or len(rh.mask_heads) == 1:
            self._hook(rh.mask_heads[0], lambda o: self.out.update(mask_head_in=o))  # the logits
        self.handles.append(rh.box_pooler.register_forward_pre_hook(lambda m, a: self._pending_rois.append(a[1])))
        for head in rh.box_heads:
            self._hook(head, lambda o: self.box_calls.append((self._pending_rois.pop(0), o)))
        mask_probs = rh.mask_probs  # the probabilities given to the paste, mean over the mask heads

        def recorded(*args):
            self.out["labels"] = args[2]
            self.out["mask_probs"] = mask_probs(*args)
            return self.out["mask_probs"]

        rh.mask_probs = recorded
        last_head = rh.mask_heads[-1]
        if hasattr(last_head, "logits"):  # FCN heads: record the last head alone (see test_masks for HTC)
            last_logits = last_head.logits

            def recorded_logits(feature):
                self.out["last_head_logits"] = last_logits(feature)
                return self.out["last_head_logits"]

            last_head.logits = recorded_logits

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
        del self.roi_heads.mask_probs
        if "logits" in vars(self.roi_heads.mask_heads[-1]):
            del self.roi_heads.mask_heads[-1].logits
        stages = self.roi_heads.num_stages
        for s, (rois, (cls, deltas, shared)) in enumerate(self.box_calls):
            prefix = f"stage{s}_" if s < stages else f"extra{s - stages}_stage-1_"
            self.out.update({prefix + "rois": rois, prefix + "cls_score": cls, prefix + "bbox_pred": deltas})
            self.out[prefix + "relayed_feat"] = shared


def _max_rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / (np.abs(a).max() + 1e-12))


@pytest.fixture(scope="module", params=list(CASES))
def parity(request, device):
    config = request.param
    if not _available(config):
        pytest.skip(f"SCNET_REF_DIR={REF_DIR!r} has no reference dump for {config}: parity NOT checked")
    meta_path, npz_path, pth_path = _ref_files(config)
    meta = json.load(open(meta_path))
    ref = dict(np.load(npz_path))
    torch.set_num_threads(2)
    model = scnet.build_model(os.path.join(ROOT, CASES[config]), weights=pth_path).to(device).eval()
    img_meta = meta["img_meta"]
    recorder = Recorder(model)
    with torch.no_grad():
        result = model.inference(
            torch.from_numpy(ref["input"]).to(device),
            [tuple(img_meta["img_shape"])],
            [tuple(img_meta["scale_factor"])],
            [tuple(img_meta["ori_shape"])],
        )[0]
    recorder.close()
    ours = {k: v.cpu().numpy() for k, v in recorder.out.items()}
    return config, ref, ours, {k: v.cpu() for k, v in result.items()}


FEATURES = [f"backbone_c{i}" for i in range(2, 6)] + [f"fpn_p{i}" for i in range(2, 7)]
FEATURES += [f"rpn_{k}_l{i}" for i in range(5) for k in ("cls", "reg")]
FEATURES += ["semantic_pred", "semantic_feat", "glbctx_pred", "glbctx_feat"]


def test_features(parity):
    """Backbone, FPN, RPN head, semantic and context outputs (those the model has) agree to float32 rounding."""
    _, ref, ours, _ = parity
    worst = {k: _max_rel(ref[k], ours[k]) for k in FEATURES if k in ref}
    assert max(worst.values()) < 1e-5, worst


def test_proposals(parity):
    _, ref, ours, _ = parity
    assert ours["rpn_proposals"].shape == ref["rpn_proposals"].shape
    np.testing.assert_allclose(ours["rpn_proposals"], ref["rpn_proposals"], atol=1e-2, rtol=0)
    np.testing.assert_allclose(ours["rpn_proposal_scores"], ref["rpn_proposal_scores"], atol=1e-5, rtol=0)


def test_cascade_stages(parity):
    """Each stage's RoIs (input boxes), logits, deltas (and shared feature, SCNet); the relay pass too."""
    _, ref, ours, _ = parity
    stages = sorted({k[: -len("_rois")] for k in ref if k.endswith("_rois") and "stage" in k})
    assert stages and all(f"{s}_rois" in ours for s in stages), (stages, sorted(ours))
    for stage in stages:
        np.testing.assert_allclose(ours[stage + "_rois"], ref[stage + "_rois"], atol=1e-2, rtol=0)
        for key in ("cls_score", "bbox_pred", "relayed_feat"):
            if f"{stage}_{key}" in ref:
                assert _max_rel(ref[f"{stage}_{key}"], ours[f"{stage}_{key}"]) < 1e-5, (stage, key)


def test_detections(parity):
    """Same detections: count, labels, boxes within 0.01 px, scores within 1e-4 (for Mask Scoring R-CNN
    the official 3.x output carries the mask scores, IoU x box score)."""
    config, ref, _, result = parity
    assert result["boxes"].shape[0] == ref["det_bboxes"].shape[0]
    np.testing.assert_array_equal(result["labels"].numpy(), ref["det_labels"])
    np.testing.assert_allclose(result["boxes"].numpy(), ref["det_bboxes"], atol=1e-2, rtol=0)
    np.testing.assert_allclose(result["scores"].numpy(), ref["nms_dets"][:, 4], atol=1e-4, rtol=0)
    scores = result["mask_scores"] if "mask_scores" in result else result["scores"]
    np.testing.assert_allclose(scores.numpy(), ref["det_scores"], atol=1e-4, rtol=0)


def test_masks(parity):
    """Relay output and mask logits within 1e-3 of their spread, mask probabilities (averaged over the
    heads of Cascade Mask R-CNN and HTC) within 1e-3; final binary masks nearly identical.

    Our CPU RoIAlign adds its samples in another order than the official kernel (scnet/ops/roi_align.py),
    and twelve 3x3 convs amplify that float32 rounding: X-101's mask logits differ by 6e-5 of their
    spread, its probabilities by 2.5e-4 (R-50: 9e-5); no pasted mask pixel differs."""
    config, ref, ours, result = parity
    for key in ("feat_relay_out", "mask_head_in"):
        if key in ours:
            assert np.abs(ours[key] - ref[key]).max() / float(ref[key].std()) < 1e-3, key
    if config.startswith("htc"):
        # MMDetection 3.3.0's HTC keeps only the LAST head's masks at test (in HTCRoIHead._mask_forward,
        # `aug_masks.append` sits outside the loop over the heads); 2.x, which trained the released
        # models, and [impl 20.1] average the three heads, as we do. So the reference equals our last
        # head (run through the same information flow), and our averaged masks legitimately differ.
        last = ours["last_head_logits"][np.arange(len(ours["labels"])), ours["labels"]]
        np.testing.assert_allclose(1 / (1 + np.exp(-last)), ref["mask_probs"], atol=1e-3, rtol=0)
        return
    np.testing.assert_allclose(ours["mask_probs"], ref["mask_probs"], atol=1e-3, rtol=0)
    shape = tuple(ref["det_masks_shape"])
    ref_masks = np.unpackbits(ref["det_masks_packed"], axis=-1)[..., : shape[-1]].astype(bool)
    disagree = (ref_masks != result["masks"].numpy()).mean()
    # a pixel can flip only where a probability sits within float rounding of the 0.5 threshold
    assert disagree < 1e-6, disagree
