"""Test-time augmentation [impl 15]: geometry of the views, and the official 10-view merge on a tiny model."""
import torch

from scnet.modeling.tta import OFFICIAL_SCALES, TestTimeAugmentation

from conftest import synthetic_sample, tiny_model

SCALE = (192, 256)  # the tiny model's test scale, (short, long)


def _model(device):
    return tiny_model(f"model.input.test_scale=[{SCALE[1]},{SCALE[0]}]", "model.test.score_thresh=0.05",
                      device=device).eval()


def test_one_view_without_flip_is_the_plain_model(device):
    """One view at the test scale, proposal NMS disabled (IoU 1): exactly the model's own output."""
    model = _model(device)
    image, _ = synthetic_sample(150, 190, 3, seed=1)
    expected = model([image])[0]
    result = TestTimeAugmentation(model, scales=[SCALE], flip=False, proposal_nms_iou=1.0)(image)
    assert result["boxes"].shape[0] > 0
    for key in ("boxes", "scores", "labels", "masks"):
        torch.testing.assert_close(result[key], expected[key], rtol=0, atol=1e-4)


def test_flipped_view_maps_back_to_the_original_image(device):
    """The flipped view alone = the model on the mirrored image, mirrored back."""
    model = _model(device)
    image, _ = synthetic_sample(150, 190, 3, seed=2)
    tta = TestTimeAugmentation(model, scales=[SCALE], flip=True, proposal_nms_iou=1.0)
    tta.views = [(SCALE, True)]
    result = tta(image)
    mirrored = model([image.flip(-1)])[0]
    boxes = mirrored["boxes"].clone()
    boxes[:, [0, 2]] = 190 - mirrored["boxes"][:, [2, 0]]
    torch.testing.assert_close(result["boxes"], boxes, rtol=0, atol=1e-3)
    torch.testing.assert_close(result["scores"], mirrored["scores"], rtol=0, atol=1e-5)
    assert torch.equal(result["labels"], mirrored["labels"])
    disagree = (result["masks"] != mirrored["masks"].flip(-1)).float().mean()
    assert disagree < 1e-3  # pixels whose probability sits on the 0.5 threshold may differ


def test_official_ten_views_run_and_detections_lie_inside_the_image(device):
    model = _model(device)
    image, _ = synthetic_sample(120, 170, 3, seed=3)
    tta = TestTimeAugmentation(model)
    assert len(tta.views) == 10 and {s for s, _ in tta.views} == set(OFFICIAL_SCALES)
    result = tta(image.permute(1, 2, 0).numpy())
    n = result["boxes"].shape[0]
    assert 0 < n <= 100
    boxes = result["boxes"]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 170).all() and (boxes[:, 3] <= 120).all()
    assert (boxes[:, 2:] >= boxes[:, :2]).all()
    assert result["masks"].shape == (n, 120, 170) and result["masks"].dtype == torch.bool
    assert (result["scores"][:-1] >= result["scores"][1:]).all()
