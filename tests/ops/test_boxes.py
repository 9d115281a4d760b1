"""Unit tests for scnet.ops.boxes: DeltaXYWH coder, IoU, clipping, batched / multi-class NMS.

Expected values are worked out by hand ([impl 9.2, 9.4, 13 step 5, 24.2, 24.4, 24.27]).
"""
import math

import pytest
import torch

from scnet.ops.boxes import DEFAULT_SCALE_CLAMP, BoxCoder, batched_nms, box_iou, clip_boxes_, multiclass_nms

CASCADE_STDS = [(0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067)]


def _random_boxes(n, generator, max_xy=60.0, min_wh=2.0, max_wh=40.0):
    xy = torch.rand(n, 2, generator=generator) * max_xy
    wh = min_wh + torch.rand(n, 2, generator=generator) * (max_wh - min_wh)
    return torch.cat([xy, xy + wh], dim=1)


# --------------------------------------------------------------------------------------------- coder


def test_scale_clamp_constant_is_log_1000_over_16():
    """The dw/dh clamp is |log(16/1000)| = log(62.5) ~= 4.1352."""
    assert DEFAULT_SCALE_CLAMP == pytest.approx(4.135166556742356, abs=1e-12)


def test_encode_matches_hand_computed_deltas_with_stage1_stds():
    """Encode p=[10,20,50,100] -> g=[20,30,80,130] with stds (0.1, 0.1, 0.2, 0.2)."""
    proposals = torch.tensor([[10.0, 20.0, 50.0, 100.0]])
    targets = torch.tensor([[20.0, 30.0, 80.0, 130.0]])
    deltas = BoxCoder((0.1, 0.1, 0.2, 0.2)).encode(proposals, targets)
    # p: px = 30, py = 60, pw = 40, ph = 80;  g: gx = 50, gy = 80, gw = 60, gh = 100
    # dx = (50-30)/40 = 0.5        -> /0.1 = 5.0
    # dy = (80-60)/80 = 0.25       -> /0.1 = 2.5
    # dw = log(60/40) = 0.405465   -> /0.2 = 2.0273255
    # dh = log(100/80) = 0.223144  -> /0.2 = 1.1157178
    expected = torch.tensor([[5.0, 2.5, math.log(1.5) / 0.2, math.log(1.25) / 0.2]])
    torch.testing.assert_close(deltas, expected, rtol=1e-6, atol=1e-6)


def test_encode_identity_is_zero_and_no_plus_one_in_widths():
    """A pure shift by one width gives dx = 1 exactly (with a "+1" width it would be 40/41)."""
    proposals = torch.tensor([[0.0, 0.0, 40.0, 10.0]])
    targets = torch.tensor([[40.0, 0.0, 80.0, 10.0]])
    deltas = BoxCoder().encode(proposals, targets)
    # px = 20, gx = 60, pw = 40 -> dx = 40/40 = 1; dy = 0; dw = dh = log(1) = 0
    torch.testing.assert_close(deltas, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_decode_hand_computed_with_stage1_stds():
    """Decode deltas [5, 2.5, 2.0273, 1.1157] (stds 0.1/0.2) back onto [10,20,50,100] gives [20,30,80,130]."""
    coder = BoxCoder((0.1, 0.1, 0.2, 0.2))
    deltas = torch.tensor([[5.0, 2.5, math.log(1.5) / 0.2, math.log(1.25) / 0.2]])
    out = coder.decode(torch.tensor([[10.0, 20.0, 50.0, 100.0]]), deltas)
    # d*std = [0.5, 0.25, log 1.5, log 1.25]; gx = 30 + 40*0.5 = 50, gy = 60 + 80*0.25 = 80,
    # gw = 40*1.5 = 60, gh = 80*1.25 = 100 -> [50-30, 80-50, 50+30, 80+50]
    torch.testing.assert_close(out, torch.tensor([[20.0, 30.0, 80.0, 130.0]]), rtol=0, atol=1e-4)


@pytest.mark.parametrize("stds", [(1.0, 1.0, 1.0, 1.0), (0.5, 0.25, 2.0, 3.0)] + CASCADE_STDS)
def test_decode_of_encode_round_trips(stds):
    """decode(p, encode(p, g)) == g to 1e-5 for random valid boxes (size ratios well inside the clamp)."""
    gen = torch.Generator().manual_seed(0)
    proposals = _random_boxes(200, gen)
    targets = _random_boxes(200, gen)
    coder = BoxCoder(stds)
    deltas = coder.encode(proposals, targets)
    assert deltas.shape == (200, 4)
    decoded = coder.decode(proposals, deltas)
    torch.testing.assert_close(decoded, targets, rtol=1e-5, atol=1e-5)


def test_decode_uses_the_stds_it_was_built_with():
    """The same deltas decoded with different stds give different boxes (stds are applied)."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    deltas = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    # stds 1: gx = 5 + 10*1 = 15 -> [10, 0, 20, 10];  stds 0.1: gx = 5 + 10*0.1 = 6 -> [1, 0, 11, 10]
    torch.testing.assert_close(BoxCoder().decode(boxes, deltas), torch.tensor([[10.0, 0.0, 20.0, 10.0]]))
    torch.testing.assert_close(
        BoxCoder((0.1, 0.1, 0.2, 0.2)).decode(boxes, deltas), torch.tensor([[1.0, 0.0, 11.0, 10.0]])
    )


def test_decode_clamps_dw_dh_at_log_62_5():
    """dw = dh = +10 (stds 1) scales the box by exp(4.1352) = 62.5, not exp(10); -10 by 1/62.5."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 20.0], [0.0, 0.0, 10.0, 20.0]])
    deltas = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, -10.0, -10.0]])
    out = BoxCoder().decode(boxes, deltas)
    # centre (5, 10); row 0: gw = 10*62.5 = 625, gh = 20*62.5 = 1250 -> [5-312.5, 10-625, 5+312.5, 10+625]
    # row 1: gw = 10/62.5 = 0.16, gh = 20/62.5 = 0.32 -> [5-0.08, 10-0.16, 5+0.08, 10+0.16]
    expected = torch.tensor([[-307.5, -615.0, 317.5, 635.0], [4.92, 9.84, 5.08, 10.16]])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    width = out[0, 2] - out[0, 0]
    assert width.item() == pytest.approx(10 * math.exp(abs(math.log(16 / 1000))), rel=1e-5)
    assert width.item() < 10 * math.exp(10) / 100  # far from the unclamped 220265


def test_decode_clamp_applies_after_stds():
    """The clamp acts on delta*std: dw=10 with std 0.2 is 2.0 (inside), so it is not clamped."""
    out = BoxCoder((1.0, 1.0, 0.2, 0.2)).decode(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[0.0, 0.0, 10.0, 0.0]]))
    # gw = 10 * exp(2) = 73.890561 -> x1 = 5 - 36.94528, x2 = 5 + 36.94528
    torch.testing.assert_close(out, torch.tensor([[5 - 5 * math.exp(2), 0.0, 5 + 5 * math.exp(2), 10.0]]))


def test_decode_clips_x_to_width_and_y_to_height():
    """image_size is (h, w) = (50, 100): x is clipped to [0, 100], y to [0, 50]."""
    boxes = torch.tensor([[-5.0, -5.0, 200.0, 200.0], [10.0, 10.0, 20.0, 20.0]])
    out = BoxCoder().decode(boxes, torch.zeros(2, 4), image_size=(50, 100))
    # zero deltas reproduce the boxes; then x in [0, 100], y in [0, 50]
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 100.0, 50.0], [10.0, 10.0, 20.0, 20.0]]))


def test_clip_boxes_inplace_hw_order():
    """clip_boxes_ with (h, w) = (30, 70) clamps x1,x2 to [0,70] and y1,y2 to [0,30], in place."""
    boxes = torch.tensor([[-1.0, -2.0, 80.0, 40.0], [60.0, 25.0, 75.0, 35.0]])
    ret = clip_boxes_(boxes, (30, 70))
    assert ret.data_ptr() == boxes.data_ptr()
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.0, 70.0, 30.0], [60.0, 25.0, 70.0, 30.0]]))


def test_decode_empty():
    """No boxes -> (0, 4)."""
    out = BoxCoder().decode(torch.zeros(0, 4), torch.zeros(0, 4), image_size=(10, 10))
    assert out.shape == (0, 4)


# ----------------------------------------------------------------------------------------------- IoU


def test_box_iou_hand_cases():
    """Identical = 1, disjoint = 0, touching = 0, half overlap = 50/150, contained = 25/100, no "+1"."""
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # identical: 100/100 = 1
            [20.0, 20.0, 30.0, 30.0],  # disjoint: 0
            [10.0, 0.0, 20.0, 10.0],  # shares an edge: overlap 0 -> 0
            [5.0, 0.0, 15.0, 10.0],  # overlap 5*10 = 50, union 100+100-50 = 150 -> 1/3
            [2.0, 2.0, 7.0, 7.0],  # contained: 25 / 100 = 0.25
            [0.0, 0.0, 10.0, 5.0],  # half: 50 / 100 = 0.5 (with "+1": 66/121 = 0.545)
        ]
    )
    iou = box_iou(a, b)
    assert iou.shape == (1, 6)
    torch.testing.assert_close(iou[0], torch.tensor([1.0, 0.0, 0.0, 1 / 3, 0.25, 0.5]))


def test_box_iou_matrix_shape_and_orientation():
    """(N, M) matrix with iou[i, j] = IoU(boxes1[i], boxes2[j])."""
    boxes1 = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 20.0, 20.0]])
    boxes2 = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [0.0, 0.0, 20.0, 10.0]])
    iou = box_iou(boxes1, boxes2)
    # row 1 (area 400): with [0,0,10,10] 100/400; with [5,0,15,10] 100/400; with [0,0,20,10] 200/400
    # row 0 with [0,0,20,10]: overlap 100, union 100 + 200 - 100 = 200 -> 0.5
    expected = torch.tensor([[1.0, 1 / 3, 0.5], [0.25, 0.25, 0.5]])
    torch.testing.assert_close(iou, expected)


def test_box_iou_zero_area_is_zero_not_nan():
    """Degenerate boxes: union clamped at eps, so IoU = 0 rather than 0/0 = NaN."""
    degenerate = torch.tensor([[5.0, 5.0, 5.0, 5.0], [3.0, 0.0, 3.0, 10.0]])
    iou = box_iou(degenerate, torch.cat([degenerate, torch.tensor([[0.0, 0.0, 10.0, 10.0]])]))
    assert not torch.isnan(iou).any()
    torch.testing.assert_close(iou, torch.zeros(2, 3))


# ----------------------------------------------------------------------------------------------- NMS


def _nms_case():
    # boxes 0/1 overlap with IoU 90/110 = 0.818 ([0,0,10,10] vs [1,0,11,10]: overlap 9*10, union 110)
    # box 2 overlaps box 0 with IoU 1/3 ([5,0,15,10]); box 3 is identical to box 0 but in group 1
    boxes = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [5.0, 0.0, 15.0, 10.0], [0.0, 0.0, 10.0, 10.0]]
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    idxs = torch.tensor([0, 0, 0, 1])
    return boxes, scores, idxs


@pytest.mark.parametrize("split_threshold", [10000, 1])
def test_batched_nms_groups_and_suppression(split_threshold):
    """Box 1 (IoU 0.818 with the better box 0) is removed at 0.5; box 2 (IoU 1/3) survives; the identical
    box 3 survives because it is in another group. Output sorted by decreasing score: 3, 0, 2.
    split_threshold=1 forces the per-group path."""
    boxes, scores, idxs = _nms_case()
    keep = batched_nms(boxes, scores, idxs, 0.5, split_threshold=split_threshold)
    assert keep.tolist() == [3, 0, 2]


def test_batched_nms_threshold_is_strict_iou_greater():
    """At threshold 0.9 box 1 (IoU 0.818) is kept; at 0.3, box 2 (IoU 1/3 > 0.3) goes too."""
    boxes, scores, idxs = _nms_case()
    assert batched_nms(boxes, scores, idxs, 0.9).tolist() == [3, 0, 1, 2]
    assert batched_nms(boxes, scores, idxs, 0.3).tolist() == [3, 0]


def test_batched_nms_identical_boxes_in_many_groups_all_kept():
    """Five identical boxes in five groups: none suppresses another; sorted by score."""
    boxes = torch.tensor([[2.0, 3.0, 12.0, 13.0]]).repeat(5, 1)
    scores = torch.tensor([0.1, 0.5, 0.3, 0.9, 0.2])
    keep = batched_nms(boxes, scores, torch.arange(5), 0.5)
    assert keep.tolist() == [3, 1, 2, 4, 0]


def test_batched_nms_empty():
    """No boxes -> empty int64."""
    keep = batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5)
    assert keep.shape == (0,) and keep.dtype == torch.int64


def test_batched_nms_split_path_matches_offset_path_on_12000_boxes():
    """>= 10000 boxes take the per-group path; it keeps the same boxes, in the same order, as the offset
    path (forced with a huge split_threshold) and as a plain per-group NMS."""
    from torchvision.ops import nms

    gen = torch.Generator().manual_seed(0)
    n = 12000
    xy = torch.rand(n, 2, generator=gen) * 400
    wh = 5 + torch.rand(n, 2, generator=gen) * 60
    boxes = torch.cat([xy, xy + wh], dim=1)
    scores = torch.randperm(n, generator=gen).float() / n  # distinct scores, no ties in the ordering
    idxs = torch.randint(0, 3, (n,), generator=gen)
    keep_split = batched_nms(boxes, scores, idxs, 0.5)
    keep_offset = batched_nms(boxes, scores, idxs, 0.5, split_threshold=10**9)
    assert keep_split.numel() > 100
    assert keep_split.tolist() == keep_offset.tolist()
    # independent reference: NMS within each group separately
    ref = []
    for g in range(3):
        members = (idxs == g).nonzero().view(-1)
        ref.append(members[nms(boxes[members], scores[members], 0.5)])
    ref = torch.cat(ref)
    assert sorted(ref.tolist()) == sorted(keep_split.tolist())
    assert (scores[keep_split][1:] <= scores[keep_split][:-1]).all()


@pytest.mark.parametrize("n", [3000, 30000])  # the offset path and the per-group path
@pytest.mark.parametrize("max_detections", [1, 100, 2500])
def test_batched_nms_first_k_equal_the_full_run(n, max_detections):
    """With ``max_detections`` NMS starts on the top candidates only; the first ones must be the full
    run's, index for index: clustered boxes (heavy suppression, so k has to grow for 2500) over 80
    classes, scores rounded to 1/64 so that many tie, including at every cut."""
    gen = torch.Generator().manual_seed(n)
    centres = torch.rand(40, 2, generator=gen) * 600
    xy = centres[torch.randint(0, 40, (n,), generator=gen)] + torch.randn(n, 2, generator=gen) * 8
    wh = 20 + torch.rand(n, 2, generator=gen) * 40
    boxes = torch.cat([xy, xy + wh], dim=1)
    scores = (torch.rand(n, generator=gen) * 64).floor() / 64
    idxs = torch.randint(0, 80, (n,), generator=gen)
    full = batched_nms(boxes, scores, idxs, 0.5)
    first = batched_nms(boxes, scores, idxs, 0.5, max_detections=max_detections)
    assert full.numel() > max_detections
    assert first.tolist() == full[:max_detections].tolist()


def test_multiclass_nms_threshold_is_strict_and_boxes_shared_across_classes():
    """scores (R, C+1), background last. Score == score_thresh is dropped; one box can be kept under two
    classes; the background column is never used; output sorted by decreasing score."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    scores = torch.tensor(
        [
            # cls0  cls1  bg
            [0.50, 0.30, 0.99],
            [0.40, 0.25, 0.99],  # cls1 score == 0.25 == score_thresh -> dropped
            [0.25, 0.60, 0.99],  # cls0 score == 0.25 -> dropped
        ]
    )
    out_boxes, out_scores, labels = multiclass_nms(boxes, scores, 0.25, 0.5, 100)
    # candidates (box, cls): (0,0) .5, (0,1) .3, (1,0) .4, (2,1) .6
    # class 0: box 1 overlaps box 0 (IoU 0.818 > 0.5), lower score -> removed
    # kept, by score: (2,1) .6, (0,0) .5, (0,1) .3  -- box 0 survives under both classes
    torch.testing.assert_close(out_scores, torch.tensor([0.6, 0.5, 0.3]))
    assert labels.tolist() == [1, 0, 1]
    torch.testing.assert_close(out_boxes, boxes[[2, 0, 0]])


def test_multiclass_nms_max_detections_truncates_to_top_scores():
    """Four disjoint boxes, one class: max_detections=2 keeps the two best."""
    boxes = torch.tensor([[0.0, 0.0, 5.0, 5.0], [10.0, 0.0, 15.0, 5.0], [20.0, 0.0, 25.0, 5.0], [30.0, 0.0, 35.0, 5.0]])
    scores = torch.tensor([[0.2, 0.0], [0.9, 0.0], [0.5, 0.0], [0.7, 0.0]])
    out_boxes, out_scores, labels = multiclass_nms(boxes, scores, 0.001, 0.5, 2)
    torch.testing.assert_close(out_scores, torch.tensor([0.9, 0.7]))
    torch.testing.assert_close(out_boxes, boxes[[1, 3]])
    assert labels.tolist() == [0, 0]


def test_multiclass_nms_class_specific_boxes():
    """(R, C, 4) boxes: each class uses its own box."""
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]])
    scores = torch.tensor([[0.3, 0.8, 0.0]])
    out_boxes, out_scores, labels = multiclass_nms(boxes, scores, 0.05, 0.5, 100)
    assert labels.tolist() == [1, 0]
    torch.testing.assert_close(out_boxes, torch.tensor([[20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 10.0, 10.0]]))
    torch.testing.assert_close(out_scores, torch.tensor([0.8, 0.3]))


def test_multiclass_nms_nothing_above_threshold():
    """No score above the threshold -> empty outputs."""
    out_boxes, out_scores, labels = multiclass_nms(torch.tensor([[0.0, 0.0, 5.0, 5.0]]).repeat(3, 1), torch.full((3, 3), 0.001), 0.001, 0.5, 100)
    assert out_boxes.shape == (0, 4) and out_scores.shape == (0,) and labels.shape == (0,)
