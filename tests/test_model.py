"""The whole detector on a tiny configuration: losses, gradients, learning, empty images, inference."""
import math

import numpy as np
import pytest
import torch

from scnet.ops.boxes import box_iou
from scnet.ops.image import resize_image

from conftest import synthetic_sample, tiny_model

LOSS_KEYS = {
    "loss_rpn_cls",
    "loss_rpn_box",
    "loss_semantic",
    "loss_global_context",
    "loss_mask",
    *(f"s{t}.loss_{k}" for t in range(3) for k in ("cls", "box")),
}


def _train_step(model, images, targets):
    model.train()
    model.zero_grad()
    losses = model(images, targets)
    sum(losses.values()).backward()
    return losses


def test_every_loss_term_is_present_and_finite_and_every_parameter_gets_a_gradient(two_samples):
    model = tiny_model()
    losses = _train_step(model, *two_samples)
    assert set(losses) == LOSS_KEYS
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values()), losses
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("backbone.conv1", "backbone.bn1", "backbone.layer1")) for n in frozen)


@pytest.fixture(scope="module")
def overfit():
    """60 SGD steps on one fixed image (the official optimiser settings, lr 0.02)."""
    model = tiny_model()
    image, target = synthetic_sample(192, 240, 3, seed=1)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.02, momentum=0.9, weight_decay=1e-4)
    totals = []
    for _ in range(60):
        losses = _train_step(model, [image], [target])
        totals.append(sum(losses.values()).item())
        optimizer.step()
    return model.eval(), image, target, totals


def test_sixty_steps_on_one_image_cut_the_loss_below_a_third(overfit):
    _, _, _, totals = overfit
    assert all(math.isfinite(t) for t in totals)
    assert totals[-1] < totals[0] / 3, (totals[0], totals[-1])


def test_image_without_annotations_gives_zero_box_and_mask_losses():
    model = tiny_model()
    image, target = synthetic_sample(129, 171, 0, seed=2)
    losses = _train_step(model, [image], [target])
    for t in range(3):
        assert losses[f"s{t}.loss_box"].item() == 0.0
        assert losses[f"s{t}.loss_cls"].item() > 0  # all sampled RoIs are background, still classified
    assert losses["loss_mask"].item() == 0.0
    assert losses["loss_rpn_box"].item() == 0.0
    assert all(torch.isfinite(v) for v in losses.values())
    # the same graph as with annotations: every parameter still gets a (zero) gradient, as DDP needs
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_empty_image_adds_nothing_to_the_box_and_mask_numerators():
    """With one annotated and one empty image the positives are those of the annotated image only."""
    model = tiny_model()
    annotated, t1 = synthetic_sample(157, 203, 3, seed=1)
    empty, t2 = synthetic_sample(157, 203, 0, seed=2)
    torch.manual_seed(5)
    both = _train_step(model, [annotated, empty], [t1, t2])
    assert both["loss_mask"].item() > 0 and both["s0.loss_box"].item() > 0
    assert all(torch.isfinite(v) for v in both.values())


def test_semantic_global_context_and_relay_switch_off():
    model = tiny_model("model.semantic.enabled=false", "model.global_context.enabled=false", "model.feature_relay.enabled=false")
    assert model.context.semantic_head is None and model.context.global_context is None
    image, target = synthetic_sample(150, 190, 2, seed=3)
    del target["semantic_seg"]  # a dataset without stuff maps
    losses = _train_step(model, [image], [target])
    assert set(losses) == LOSS_KEYS - {"loss_semantic", "loss_global_context"}
    model.eval()
    assert model([image])[0]["masks"].shape[1:] == (150, 190)


def test_missing_stuff_map_with_the_semantic_branch_on_is_a_clear_error():
    model = tiny_model()
    image, target = synthetic_sample(150, 190, 2, seed=3)
    del target["semantic_seg"]
    with pytest.raises(KeyError, match="semantic_seg.*model.semantic.enabled=false"):
        _train_step(model, [image], [target])


def test_semantic_target_is_padded_then_sampled_every_eighth_pixel():
    model = tiny_model("model.semantic.pad_value=255")
    seg = torch.arange(70 * 50, dtype=torch.int64).reshape(70, 50) % 200
    target = model.context.semantic_target([{"semantic_seg": seg}], (96, 64))
    assert target.shape == (1, 12, 8)
    assert torch.equal(target[0, :9, :7], seg[::8, ::8])  # pixels (8i, 8j)
    assert (target[0, 9:] == 255).all() and (target[0, :, 7:] == 255).all()


def test_inference_on_two_images_of_different_sizes(overfit):
    model, image, _, _ = overfit
    other = image[:, :171, :203]  # a crop: a different size, and objects the model knows
    batch = model([image, other.permute(1, 2, 0).numpy()])  # a CHW tensor and an HWC array
    for result, (h, w) in zip(batch, [(192, 240), (171, 203)]):
        assert set(result) == {"boxes", "scores", "labels", "masks"}
        n = result["boxes"].shape[0]
        assert 0 < n <= 100
        assert result["masks"].shape == (n, h, w) and result["masks"].dtype == torch.bool
        boxes = result["boxes"]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert (result["scores"][:-1] >= result["scores"][1:]).all()
        assert result["labels"].min() >= 0 and result["labels"].max() < 3
    # A batch differs from a lone image only by its padding, which reaches the detections through
    # the global context (it pools the padded P6) and border convolutions: every confident lone
    # detection is in the batch result with the same label, nearly the same box and score.
    for i, single in enumerate([image, other]):
        alone = model([single])[0]
        confident = alone["scores"] > 0.3
        assert confident.sum() >= 1
        iou = box_iou(alone["boxes"][confident], batch[i]["boxes"])
        same_label = alone["labels"][confident][:, None] == batch[i]["labels"][None]
        close_score = (alone["scores"][confident][:, None] - batch[i]["scores"][None]).abs() < 0.05
        assert ((iou > 0.9) & same_label & close_score).any(dim=1).all()


def test_model_gradients_equal_those_with_torchvisions_roi_align(two_samples, monkeypatch):
    """Our CPU RoIAlign (forward, backward, fused 2x2 average) changes no gradient of the whole model
    (float rounding only)."""
    import scnet.modeling.poolers as poolers
    from torchvision.ops import roi_align as torchvision_roi_align

    def reference(features, rois, size, scale, sampling_ratio, aligned, group=1):
        full = (size[0] * group, size[1] * group)
        out = torchvision_roi_align(features, rois, full, scale, sampling_ratio, aligned)
        return torch.nn.functional.adaptive_avg_pool2d(out, size) if group > 1 else out

    grads = []
    for roi_align in (poolers.roi_align, reference):
        monkeypatch.setattr(poolers, "roi_align", roi_align)
        model = tiny_model()
        torch.manual_seed(7)
        _train_step(model, *two_samples)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7, msg=name)


def test_inference_resizes_to_the_test_scale_and_back(overfit):
    """A half-size image is resized up to the test scale inside the model, and its results come back in
    its own pixels: exactly the detections of that upsampled image, with boxes halved."""
    model, image, _, _ = overfit
    half = torch.nn.functional.interpolate(image[None].float(), scale_factor=0.5, mode="area")[0]
    half = half.round().to(torch.uint8)  # (3, 96, 120); the test scale (256, 192) doubles it
    up = resize_image(half, (192, 240))  # the model's resize (OpenCV's, scnet/ops/image.py)
    small, large = model([half])[0], model([up])[0]
    assert small["masks"].shape[1:] == (96, 120) and large["masks"].shape[1:] == (192, 240)
    assert small["boxes"].shape[0] > 0
    torch.testing.assert_close(small["boxes"] * 2, large["boxes"])
    assert torch.equal(small["scores"], large["scores"]) and torch.equal(small["labels"], large["labels"])


def test_same_seed_same_outputs(two_samples):
    images, targets = two_samples
    runs = []
    for _ in range(2):
        model = tiny_model(seed=11)
        torch.manual_seed(3)
        losses = _train_step(model, images, targets)
        model.eval()
        runs.append((losses, model(images)))
    (l1, p1), (l2, p2) = runs
    assert {k: v.item() for k, v in l1.items()} == {k: v.item() for k, v in l2.items()}
    for a, b in zip(p1, p2):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_no_detection_is_handled():
    model = tiny_model("model.test.score_thresh=1.0").eval()  # no score is strictly above 1
    image, _ = synthetic_sample(100, 140, 1, seed=5)
    result = model([image])[0]
    assert result["boxes"].shape == (0, 4) and result["masks"].shape == (0, 100, 140)


def test_masks_of_100_detections_on_a_large_image_fit_in_a_few_hundred_mb():
    """Pasting goes box window by box window: the output (N, H, W) bool is the only large tensor."""
    from scnet.ops.masks import paste_masks

    probs = torch.rand(100, 28, 28)
    boxes = torch.tensor([[0.0, 0.0, 1333.0, 800.0]]).repeat(100, 1)
    masks = paste_masks(probs, boxes, (800, 1333))
    assert masks.shape == (100, 800, 1333) and masks.element_size() == 1  # 107 MB
    assert np.isclose(masks.float().mean().item(), 0.5, atol=0.05)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda t: t.update(boxes=t["boxes"] * torch.tensor([1.0, 1, 0, 1])), "zero or negative width"),
        (lambda t: t.update(labels=t["labels"] + 10), "labels outside 0..2"),
        (lambda t: t.update(boxes=t["boxes"] * float("nan")), "non-finite"),
        (lambda t: t.update(masks=t["masks"][:, :-1]), "masks of shape"),
        (lambda t: t.update(semantic_seg=t["semantic_seg"][:-1]), "semantic_seg of shape"),
        (lambda t: t.update(labels=t["labels"][:1]), "labels of shape"),
    ],
)
def test_bad_targets_stop_with_a_message_naming_the_image(corrupt, message):
    model = tiny_model()
    image, target = synthetic_sample(150, 190, 2, seed=3)
    target["image_id"] = 42
    corrupt(target)
    with pytest.raises(ValueError, match=f"image 0 \\(image_id 42\\): .*{message}"):
        _train_step(model, [image], [target])
