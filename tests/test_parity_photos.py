"""Official outputs on real photos through the public API: ``model([rgb])`` on a COCO image at its own
size (so the test-time resize runs) against the official ``inference_detector`` on the same file.

The reference dumps come from ``shared/tools/mmdet_reference/run_ref.py --image FILE`` (SCNet R-50,
seeded weights calibrated on that image, saved with the dump); ``scripts/run_tests.sh`` builds them for
the photos below when the tool and the COCO sample are next to the repository. The photos are enlarged
to the (1333, 800) test scale, as nearly every COCO image is; the official pipeline resizes the uint8
image with OpenCV, ours with scnet/ops/image.py, and the network's input must be identical.
"""
import json
import os

import numpy as np
import pytest
import torch

import scnet
from scnet.data.checks import decode_image

from parity_batch import SAMPLE

REF_DIR = os.environ.get("SCNET_REF_DIR", "")
CONFIG = "scnet_r50_fpn_20e_coco"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 640x480 -> 800x1067, 480x640 -> 1067x800 (portrait), 500x333 -> 800x1201
PHOTOS = ["000000000009", "000000000064", "000000000260"]


def _stem(photo):
    return os.path.join(REF_DIR, f"{CONFIG}_seed0_bncalib_{photo}")


@pytest.fixture(scope="module", params=PHOTOS)
def photo(request, device):
    stem, image_path = _stem(request.param), os.path.join(SAMPLE, "train2017", request.param + ".jpg")
    if not (REF_DIR and all(os.path.exists(stem + ext) for ext in (".json", ".npz", ".pth"))):
        pytest.skip(f"SCNET_REF_DIR={REF_DIR!r} has no reference dump for {request.param}: parity NOT checked")
    if not os.path.exists(image_path):
        pytest.skip(f"{image_path} not found (SCNET_COCO_SAMPLE): parity NOT checked")
    meta = json.load(open(stem + ".json"))
    ref = np.load(stem + ".npz")
    torch.set_num_threads(2)
    model = scnet.build_model(os.path.join(ROOT, "configs/r50_20e.yaml"), weights=stem + ".pth").to(device).eval()
    rgb, _ = decode_image(image_path)
    inputs = []
    normalize_and_pad = model.normalize_and_pad

    def recorded(images):
        inputs.append(normalize_and_pad(images))
        return inputs[-1]

    model.normalize_and_pad = recorded
    result = {k: v.cpu() for k, v in model([rgb])[0].items()}
    return meta, ref, rgb, inputs[0], result


def test_network_input_is_the_official_one(photo):
    """The resized (OpenCV-exact), normalised and padded input: the same tensor, bit for bit."""
    meta, ref, rgb, batch, _ = photo
    assert rgb.shape[:2] != tuple(meta["img_meta"]["img_shape"])  # the resize did run
    assert list(batch.image_sizes[0]) == meta["img_meta"]["img_shape"]
    np.testing.assert_array_equal(batch.tensor.cpu().numpy(), ref["input"])


def test_detections(photo):
    """Labels equal; boxes (original pixels) within 0.01 px, scores within 1e-4: the inference parity
    test's tolerances."""
    _, ref, _, _, result = photo
    assert result["boxes"].shape[0] == ref["det_bboxes"].shape[0] == 100
    np.testing.assert_array_equal(result["labels"].numpy(), ref["det_labels"])
    np.testing.assert_allclose(result["boxes"].numpy(), ref["det_bboxes"], atol=1e-2, rtol=0)
    np.testing.assert_allclose(result["scores"].numpy(), ref["det_scores"], atol=1e-4, rtol=0)


def test_masks(photo):
    """Binary masks pasted at the photo's own size: a pixel may flip only within float rounding of 0.5."""
    _, ref, rgb, _, result = photo
    shape = tuple(ref["det_masks_shape"])
    assert shape[1:] == rgb.shape[:2]
    ref_masks = np.unpackbits(ref["det_masks_packed"], axis=-1)[..., : shape[-1]].astype(bool)
    disagree = (ref_masks != result["masks"].numpy()).mean()
    assert disagree < 1e-6, disagree
