"""MaskIoU head of Mask Scoring R-CNN [impl 21]: layout against mmdet's state_dict manifest, forward
shapes, hand-computed IoU targets (area ratio, threshold), the loss and the test-time rescoring."""
import json
import math
import os

import pytest
import torch

from scnet.modeling.roi_heads.mask_iou_head import MaskIoUHead, mask_iou_loss, mask_iou_targets, mask_scores
from scnet.ops.masks import mask_targets as crop_mask_targets

MANIFEST = os.path.join(os.path.dirname(__file__), "data", "mmdet_state_dicts", "ms-rcnn_r50_fpn_1x_coco.json")
PREFIX = "roi_head.mask_iou_head."


@pytest.fixture(scope="module")
def head():
    torch.manual_seed(0)
    return MaskIoUHead()


# ------------------------------------------------------------------------------ module layout


def test_parameters_match_mmdet_manifest_one_for_one(head):
    """Same keys (fc_mask_iou -> predictor) and shapes as the official ms-rcnn R-50 state_dict."""
    with open(MANIFEST) as f:
        manifest = json.load(f)
    expected = {
        k[len(PREFIX) :].replace("fc_mask_iou.", "predictor."): tuple(v["shape"])
        for k, v in manifest["state_dict"].items()
        if k.startswith(PREFIX)
    }
    assert len(expected) == 14
    ours = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert ours == expected
    assert sum(p.numel() for p in head.parameters()) == manifest["params_by_submodule"]["roi_head.mask_iou_head"]
    assert all(type(conv) is torch.nn.Conv2d for conv in head.convs)


def test_init_follows_mmdet_init_cfg(head):
    """Convs Kaiming-normal fan_out, fcs Kaiming-uniform a=1 fan_in, predictor N(0, 0.01), biases 0."""
    for module in [*head.convs, *head.fcs, head.predictor]:
        assert torch.count_nonzero(module.bias) == 0
    conv = head.convs[1].weight  # fan_out = 256 * 9
    assert conv.std().item() == pytest.approx(math.sqrt(2 / (256 * 9)), rel=0.02)
    for fc in head.fcs:  # gain 1 -> bound sqrt(3 / fan_in)
        bound = math.sqrt(3 / fc.weight.shape[1])
        assert fc.weight.abs().max().item() <= bound
        assert fc.weight.abs().max().item() > 0.99 * bound
    assert head.predictor.weight.std().item() == pytest.approx(0.01, rel=0.05)


# ------------------------------------------------------------------------------ forward


def test_forward_shapes_and_stride_two_last_conv(head):
    torch.manual_seed(1)
    features, probs = torch.randn(3, 256, 14, 14), torch.rand(3, 28, 28)
    sizes = []
    hooks = [conv.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape))) for conv in head.convs]
    out = head(features, probs)
    for h in hooks:
        h.remove()
    assert out.shape == (3, 80)
    assert sizes == [(3, 256, 14, 14)] * 3 + [(3, 256, 7, 7)]
    torch.testing.assert_close(head(features, probs[:, None]), out)  # (R, 1, 28, 28) accepted too
    assert head(features[:0], probs[:0]).shape == (0, 80)


def test_mask_input_is_max_pooled_and_not_detached(head):
    """Only the max of each 2x2 cell reaches the head; the IoU output back-propagates into the probs."""
    torch.manual_seed(2)
    features = torch.randn(1, 256, 14, 14)
    probs = torch.rand(1, 28, 28) * 0.5
    probs[0, 0, 0] = 0.9  # the max of cell (0, 0)
    changed = probs.clone()
    changed[0, 1, 1] = 0.8  # still below the cell max
    torch.testing.assert_close(head(features, changed), head(features, probs))
    probs.requires_grad_(True)
    head(features, probs)[0, 3].backward()
    assert probs.grad[0, 0, 0] != 0 and probs.grad[0, 1, 1] == 0


# ------------------------------------------------------------------------------ IoU targets

H = W = 20


def _square_gt():
    """One 20x20 GT mask: rows and columns 4..11 (an 8x8 square, area 64)."""
    gt = torch.zeros(1, H, W, dtype=torch.uint8)
    gt[0, 4:12, 4:12] = 1
    return gt


def _grid(rows, cols):
    m = torch.zeros(28, 28)
    m[rows, cols] = 1
    return m


def _targets_for(boxes, target, pred):
    n = len(boxes)
    matched = torch.zeros(n, dtype=torch.long)
    probs, targets = pred.expand(n, 28, 28), target.expand(n, 28, 28)
    return mask_iou_targets(probs, targets, torch.tensor(boxes), _square_gt(), matched)


def test_perfect_prediction_with_gt_inside_the_box_has_iou_one():
    """Ratio 1, so gt_full_area = target area and IoU = 1 (up to mmdet's 1e-7 guards)."""
    target = _grid(slice(4, 24), slice(4, 24))
    out = _targets_for([[2.0, 2.0, 14.0, 14.0]], target, target)
    assert out.dtype == torch.float32 and out.shape == (1,)
    assert out.item() == pytest.approx(1.0, abs=1e-6)


def test_perfect_prediction_of_the_real_crop_target_has_iou_one():
    """Same, with the training target built by scnet.ops.masks.mask_targets."""
    gt, rois = _square_gt(), torch.tensor([[2.0, 2.0, 14.0, 14.0], [3.5, 3.0, 12.5, 13.0]])
    matched = torch.zeros(2, dtype=torch.long)
    targets = crop_mask_targets(gt, rois, matched, 28)
    assert targets.sum() > 0
    out = mask_iou_targets(targets, targets, rois, gt, matched)
    torch.testing.assert_close(out, torch.ones(2), atol=1e-6, rtol=0)


def test_gt_half_outside_the_box_doubles_the_full_area():
    """Box x from 8: GT columns 8..11 of 4..11 are inside, ratio 0.5, gt_full_area = 2 x 100.
    Perfect prediction on the grid: IoU = 100 / (100 + 200 - 100) = 0.5."""
    target = _grid(slice(0, 10), slice(0, 10))  # 100 pixels
    out = _targets_for([[8.0, 0.0, 20.0, 20.0]], target, target)
    assert out.item() == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize(
    "box, ratio",
    [
        ([7.9, 0.0, 20.0, 20.0], 40 / 64),  # x1 7.9 truncated to 7: columns 7..11
        ([-0.9, -0.9, 8.9, 20.0], 32 / 64),  # truncation toward zero: 0, 0, 8 (not 9): columns 4..7
        ([5.2, 0.0, 5.8, 20.0], 8 / 64),  # zero width after truncation: at least one column (5)
        ([4.0, 4.0, 30.0, 30.0], 1.0),  # beyond the image: clipped
        ([12.0, 12.0, 20.0, 20.0], 0.0),  # GT entirely outside
    ],
)
def test_area_ratio_integer_crop(box, ratio):
    """ratio enters as gt_full_area = target / ratio; with an empty prediction IoU = ratio * 0 / ..., so
    read it back from a prediction that covers the whole grid: IoU = t / (784 + t / ratio - t)."""
    target = _grid(slice(0, 10), slice(0, 10))
    pred = torch.ones(28, 28)
    out = _targets_for([box], target, pred).item()
    if ratio == 0:  # gt_full_area = 100 / 1e-7: IoU ~ 1e-7 (mmdet keeps it as a target of ~0)
        assert 0 <= out < 1e-6
    else:
        assert out == pytest.approx(100 / (784 + 100 / ratio - 100), rel=1e-5)


def test_partial_overlap_hand_computed():
    """Target rows 0..9, prediction rows 5..14 (10 columns each): overlap 50, union 150."""
    target = _grid(slice(0, 10), slice(0, 10))
    pred = _grid(slice(5, 15), slice(0, 10))
    out = _targets_for([[2.0, 2.0, 14.0, 14.0]], target, pred)
    assert out.item() == pytest.approx(1 / 3, rel=1e-5)


def test_threshold_is_mmdet_logit_threshold():
    """mmdet binarises the *logits* at 0.5: probability 0.6 is background, 0.65 foreground."""
    target = _grid(slice(0, 10), slice(0, 10))
    pred = target * 0.6
    assert _targets_for([[2.0, 2.0, 14.0, 14.0]], target, pred).item() == 0.0
    pred = target * 0.65
    assert _targets_for([[2.0, 2.0, 14.0, 14.0]], target, pred).item() == pytest.approx(1.0, abs=1e-6)


def test_empty_union_gives_zero_not_nan_and_no_rois_gives_empty():
    empty = torch.zeros(28, 28)
    out = _targets_for([[2.0, 2.0, 14.0, 14.0]], empty, empty)
    assert out.item() == 0.0
    no_rois = torch.zeros(0, 28, 28)
    none = mask_iou_targets(no_rois, no_rois, torch.zeros(0, 4), _square_gt(), torch.zeros(0, dtype=torch.long))
    assert none.shape == (0,)


def test_targets_carry_no_gradient():
    target = _grid(slice(0, 10), slice(0, 10))
    probs = target.clone().requires_grad_(True)
    assert not _targets_for([[2.0, 2.0, 14.0, 14.0]], target, probs).requires_grad


# ------------------------------------------------------------------------------ loss and rescoring


def test_loss_is_mse_of_gt_class_over_positive_targets():
    pred = torch.tensor([[0.9, 0.1, 0.0], [0.5, 0.2, 7.0], [3.0, 3.0, 3.0], [0.0, 0.4, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 1, 2, 1])
    targets = torch.tensor([0.6, 0.8, 0.0, -1.0])  # the last two are ignored
    loss = mask_iou_loss(pred, labels, targets)
    assert loss.item() == pytest.approx(((0.9 - 0.6) ** 2 + (0.2 - 0.8) ** 2) / 2)
    loss.backward()
    assert pred.grad[2:].abs().sum() == 0 and pred.grad[0, 1:].abs().sum() == 0


def test_loss_without_valid_target_is_exact_zero_connected_to_the_graph():
    torch.manual_seed(3)
    head = MaskIoUHead(in_channels=8, conv_channels=8, fc_dim=16, num_classes=3)
    for num in (2, 0):
        out = head(torch.randn(num, 8, 14, 14), torch.rand(num, 28, 28))
        loss = mask_iou_loss(out, torch.zeros(num, dtype=torch.long), torch.zeros(num))
        assert loss.item() == 0.0 and not torch.isnan(loss)
        assert loss.requires_grad
        head.zero_grad(set_to_none=True)
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in head.parameters())


def test_mask_scores_multiply_predicted_class_iou_by_box_score():
    pred = torch.tensor([[0.9, 0.5], [0.2, 0.8], [0.7, 0.1]])
    out = mask_scores(pred, torch.tensor([1, 1, 0]), torch.tensor([0.5, 1.0, 0.2]))
    torch.testing.assert_close(out, torch.tensor([0.25, 0.8, 0.14]))
    assert mask_scores(pred[:0], torch.zeros(0, dtype=torch.long), torch.zeros(0)).shape == (0,)
