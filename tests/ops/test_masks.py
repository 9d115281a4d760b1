"""Unit tests for scnet.ops.masks: COCO segmentation decoding, 28x28 mask targets, mask pasting.

Expected values are worked out by hand [impl 11.3, 14, 24.1, 24.22, 24.26].
"""
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from torchvision.ops import roi_align

from scnet.ops.masks import mask_targets, paste_masks, segmentation_to_bitmask

# ------------------------------------------------------------------------------ segmentation_to_bitmask

# 4x5 image with pixels rows 1..2, columns 1..3 set (x in [1, 4), y in [1, 3)).
TINY_H, TINY_W = 4, 5
TINY = np.zeros((TINY_H, TINY_W), dtype=np.uint8)
TINY[1:3, 1:4] = 1
# COCO polygon with pixel-edge coordinates: the rectangle x 1..4, y 1..3.
TINY_POLYGON = [[1.0, 1.0, 4.0, 1.0, 4.0, 3.0, 1.0, 3.0]]
# Uncompressed RLE, column-major runs starting with zeros:
#   col 0: 0000, col 1: 0110, col 2: 0110, col 3: 0110, col 4: 0000
#   -> 4+1 = 5 zeros, 2 ones, 1+1 = 2 zeros, 2 ones, 2 zeros, 2 ones, 1+4 = 5 zeros  (sum 20 = 4*5)
TINY_UNCOMPRESSED_RLE = {"counts": [5, 2, 2, 2, 2, 2, 5], "size": [TINY_H, TINY_W]}


def test_segmentation_polygon_rasterises_to_hand_bitmap():
    """A rectangle polygon covers exactly the pixels between its edges; output is (H, W) uint8."""
    bitmap = segmentation_to_bitmask(TINY_POLYGON, TINY_H, TINY_W)
    assert bitmap.dtype == np.uint8 and bitmap.shape == (TINY_H, TINY_W)
    np.testing.assert_array_equal(bitmap, TINY)


def test_segmentation_uncompressed_rle_built_by_hand():
    """Uncompressed RLE (integer list counts) decodes to the same bitmap."""
    bitmap = segmentation_to_bitmask(TINY_UNCOMPRESSED_RLE, TINY_H, TINY_W)
    assert bitmap.dtype == np.uint8
    np.testing.assert_array_equal(bitmap, TINY)


def test_segmentation_compressed_rle():
    """Compressed RLE (pycocotools.mask.encode of the hand bitmap) decodes to the same bitmap."""
    rle = mask_util.encode(np.asfortranarray(TINY))
    assert isinstance(rle["counts"], bytes)
    bitmap = segmentation_to_bitmask(rle, TINY_H, TINY_W)
    assert bitmap.dtype == np.uint8
    np.testing.assert_array_equal(bitmap, TINY)


def test_segmentation_compressed_rle_with_str_counts_as_in_coco_json():
    """COCO json stores compressed counts as str, not bytes; that decodes the same."""
    rle = mask_util.encode(np.asfortranarray(TINY))
    rle = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
    np.testing.assert_array_equal(segmentation_to_bitmask(rle, TINY_H, TINY_W), TINY)


def test_segmentation_polygon_parts_are_merged():
    """Two polygons of one instance are OR-ed: [1,4)x[1,3) plus the single pixel (0, 4)."""
    polygons = TINY_POLYGON + [[4.0, 0.0, 5.0, 0.0, 5.0, 1.0, 4.0, 1.0]]
    expected = TINY.copy()
    expected[0, 4] = 1
    np.testing.assert_array_equal(segmentation_to_bitmask(polygons, TINY_H, TINY_W), expected)


def test_segmentation_drops_polygons_with_fewer_than_three_points():
    """Polygons with < 6 coordinates are ignored; with none left the mask is all zero."""
    degenerate = [[1.0, 1.0, 4.0, 1.0], [2.0, 2.0]]
    empty = segmentation_to_bitmask(degenerate, TINY_H, TINY_W)
    assert empty.shape == (TINY_H, TINY_W) and empty.dtype == np.uint8
    assert empty.sum() == 0
    mixed = segmentation_to_bitmask(degenerate + TINY_POLYGON, TINY_H, TINY_W)
    np.testing.assert_array_equal(mixed, TINY)


def test_segmentation_empty_polygon_list():
    """An empty polygon list gives an all-zero mask of the requested size."""
    out = segmentation_to_bitmask([], 7, 3)
    assert out.shape == (7, 3) and out.sum() == 0


# ------------------------------------------------------------------------------------------ mask_targets


def _rect_mask(h, w, x0, y0, x1, y1):
    m = torch.zeros((1, h, w), dtype=torch.uint8)
    m[0, y0:y1, x0:x1] = 1
    return m


def test_mask_target_roi_equal_to_rectangle_is_all_ones():
    """GT rectangle x in [8, 36), y in [10, 38) (28x28); RoI = the rectangle -> all ones.
    (aligned RoIAlign: 1-pixel bins, one sample each, at pixel centres 8..35 / 10..37.)"""
    gt = _rect_mask(64, 64, 8, 10, 36, 38)
    t = mask_targets(gt, torch.tensor([[8.0, 10.0, 36.0, 38.0]]), torch.tensor([0]), 28)
    assert t.shape == (1, 28, 28) and t.dtype == torch.float32
    torch.testing.assert_close(t, torch.ones(1, 28, 28))


def test_mask_target_roi_half_on_rectangle_half_on_background():
    """RoI [22, 10, 50, 38]: its left 14 px (22..35) lie on the rectangle x in [8, 36), its right 14 px
    (36..49) on empty space -> columns 0..13 are 1, 14..27 are 0 (every row)."""
    gt = _rect_mask(64, 64, 8, 10, 36, 38)
    t = mask_targets(gt, torch.tensor([[22.0, 10.0, 50.0, 38.0]]), torch.tensor([0]), 28)
    expected = torch.zeros(1, 28, 28)
    expected[:, :, :14] = 1
    torch.testing.assert_close(t, expected)


def test_mask_target_large_roi_two_samples_per_bin():
    """RoI [8, 10, 64, 66] (56x56, 2x2 samples per bin at pixel centres 8+2j, 9+2j) over the rectangle
    x in [8, 36), y in [10, 38): bins j <= 13 cover pixels 8..35 -> the top-left 14x14 block is 1."""
    gt = _rect_mask(80, 80, 8, 10, 36, 38)
    t = mask_targets(gt, torch.tensor([[8.0, 10.0, 64.0, 66.0]]), torch.tensor([0]), 28)
    expected = torch.zeros(1, 28, 28)
    expected[:, :14, :14] = 1
    torch.testing.assert_close(t, expected)


def test_mask_target_picks_the_assigned_gt():
    """Two GTs; gt_indices selects which bitmap each RoI is sampled from."""
    gts = torch.cat([_rect_mask(64, 64, 8, 10, 36, 38), torch.zeros((1, 64, 64), dtype=torch.uint8)])
    rois = torch.tensor([[8.0, 10.0, 36.0, 38.0]] * 3)
    t = mask_targets(gts, rois, torch.tensor([1, 0, 1]), 28)
    assert t[0].sum() == 0 and t[2].sum() == 0
    torch.testing.assert_close(t[1], torch.ones(28, 28))


def test_mask_target_roi_outside_image_is_clipped_first():
    """GT = top-left 28x28 square of a 64x64 image. RoI [-28, -28, 28, 28] is clipped to [0, 0, 28, 28]
    (checked against that box given directly) -> all ones; unclipped, RoIAlign would give only the
    bottom-right quadrant."""
    gt = _rect_mask(64, 64, 0, 0, 28, 28)
    t = mask_targets(gt, torch.tensor([[-28.0, -28.0, 28.0, 28.0]]), torch.tensor([0]), 28)
    t_hand = mask_targets(gt, torch.tensor([[0.0, 0.0, 28.0, 28.0]]), torch.tensor([0]), 28)
    torch.testing.assert_close(t, t_hand)
    torch.testing.assert_close(t, torch.ones(1, 28, 28))
    unclipped = roi_align(gt[:, None].float(), torch.tensor([[0.0, -28.0, -28.0, 28.0, 28.0]]), (28, 28), 1.0, 0, True)
    assert not torch.equal((unclipped[:, 0] >= 0.5).float(), t)  # the clipping matters here


def test_mask_target_clips_right_and_bottom_to_mask_size():
    """RoI [36, 38, 100, 90] on a 64x64 (h, w) image is the same as [36, 38, 64, 64]."""
    gt = _rect_mask(64, 64, 40, 50, 60, 64)
    rois = torch.tensor([[36.0, 38.0, 100.0, 90.0], [36.0, 38.0, 64.0, 64.0]])
    t = mask_targets(gt, rois, torch.tensor([0, 0]), 28)
    torch.testing.assert_close(t[0], t[1])
    assert t[0].sum() > 0


def test_mask_target_clip_uses_width_for_x_and_height_for_y():
    """Non-square 32 (h) x 64 (w) mask: RoI [0, 0, 64, 100] is clipped to [0, 0, 64, 32], not [0, 0, 32, 64]."""
    gt = _rect_mask(32, 64, 0, 0, 64, 32)  # full image set
    t = mask_targets(gt, torch.tensor([[0.0, 0.0, 64.0, 100.0]]), torch.tensor([0]), 28)
    torch.testing.assert_close(t, torch.ones(1, 28, 28))


def test_mask_target_no_rois():
    """No RoIs -> (0, S, S)."""
    t = mask_targets(torch.zeros((2, 8, 8), dtype=torch.uint8), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 28)
    assert t.shape == (0, 28, 28)


def test_mask_targets_identical_from_polygon_compressed_and_uncompressed_rle():
    """The same shape as polygon / compressed RLE / hand-built uncompressed RLE gives identical targets."""
    polygon = segmentation_to_bitmask(TINY_POLYGON, TINY_H, TINY_W)
    compressed = segmentation_to_bitmask(mask_util.encode(np.asfortranarray(TINY)), TINY_H, TINY_W)
    uncompressed = segmentation_to_bitmask(TINY_UNCOMPRESSED_RLE, TINY_H, TINY_W)
    gts = torch.from_numpy(np.stack([polygon, compressed, uncompressed]))
    rois = torch.tensor([[0.0, 0.0, 5.0, 4.0], [1.0, 1.0, 4.0, 3.0], [0.5, 0.0, 3.5, 4.0]]).repeat(3, 1)
    gt_idx = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    t = mask_targets(gts, rois, gt_idx, 8)
    torch.testing.assert_close(t[0:3], t[3:6])
    torch.testing.assert_close(t[0:3], t[6:9])
    # RoI [1, 1, 4, 3] is exactly the set pixels. aligned RoIAlign at 8x8: x bins 3/8 wide, one sample at
    # pixel-index 0.5 + (j + 0.5) * 0.375 -> j=0: 0.6875 (between pixel 0 = 0 and pixel 1 = 1: value 0.6875),
    # j=7: 3.3125 (value 0.6875); y bins 2/8: j=0: 0.625 (value 0.625), j=7: 2.375 (value 0.625).
    # Edges stay >= 0.5, but the corners get 0.6875 * 0.625 = 0.43 < 0.5 -> 0.
    expected = torch.ones(8, 8)
    expected[0, 0] = expected[0, 7] = expected[7, 0] = expected[7, 7] = 0
    torch.testing.assert_close(t[1], expected)
    # and the same RoI on the hand bitmap itself
    torch.testing.assert_close(mask_targets(torch.from_numpy(TINY)[None], rois[1:2], torch.tensor([0]), 8)[0], expected)


# ------------------------------------------------------------------------------------------ paste_masks


def _expected_rect(h, w, x0, y0, x1, y1):
    out = torch.zeros((h, w), dtype=torch.bool)
    out[y0:y1, x0:x1] = True
    return out


def test_paste_all_ones_integer_box():
    """All-ones 28x28 at [10, 20, 50, 60] in 100x100 -> exactly x in [10, 50), y in [20, 60).
    Mask coordinate of pixel centre x: ix = (x - 10) * 28/40 - 0.5; bilinear with zero padding gives
    value 1 + ix for ix in [-1, 0], so value >= 0.5 <=> x >= 10 (and symmetrically x <= 50).
    Column 9 (centre 9.5): ix = -0.85 -> 0.15 (out); column 10 (10.5): ix = -0.15 -> 0.85 (in);
    column 49 (49.5): ix = 27.15 -> 0.85 (in); column 50 (50.5): ix = 27.85 -> 0.15 (out)."""
    out = paste_masks(torch.ones(1, 28, 28), torch.tensor([[10.0, 20.0, 50.0, 60.0]]), (100, 100))
    assert out.dtype == torch.bool and out.shape == (1, 100, 100)
    assert torch.equal(out[0], _expected_rect(100, 100, 10, 20, 50, 60))
    # edge pixels explicitly
    assert out[0, 40, 10] and out[0, 40, 49] and not out[0, 40, 9] and not out[0, 40, 50]
    assert out[0, 20, 30] and out[0, 59, 30] and not out[0, 19, 30] and not out[0, 60, 30]
    # corners: 0.85 * 0.85 = 0.7225 >= 0.5
    assert out[0, 20, 10] and out[0, 59, 49]


def test_paste_all_ones_non_integer_box():
    """[10.4, 20.6, 49.5, 59.2]: for an all-ones mask value >= 0.5 <=> pixel centre inside [x0, x1] x [y0, y1].
    x: centre i + 0.5 in [10.4, 49.5] -> i in 10..49. Column 10: ix = 0.1/39.1*28 - 0.5 = -0.428 -> 0.572 (in);
       column 9: ix = -0.9/39.1*28 - 0.5 = -1.144 -> 0 (out); column 49: centre 49.5 = x1 exactly,
       ix = 28 - 0.5 = 27.5 -> 0.5 (in, threshold is >=); column 50: ix = 28.22 -> 0 (out).
    y: centre j + 0.5 in [20.6, 59.2] -> j in 21..58. Row 20: iy = -0.1/38.6*28 - 0.5 = -0.573 -> 0.427
       (out); row 21: iy = 0.153 -> 1 (in); row 58: iy = 37.9/38.6*28 - 0.5 = 26.99 -> 1 (in);
       row 59: iy = 38.9/38.6*28 - 0.5 = 27.72 -> 0.28 (out)."""
    out = paste_masks(torch.ones(1, 28, 28), torch.tensor([[10.4, 20.6, 49.5, 59.2]]), (100, 100))
    assert torch.equal(out[0], _expected_rect(100, 100, 10, 21, 50, 59))
    assert out[0, 40, 10] and out[0, 40, 49] and not out[0, 40, 9] and not out[0, 40, 50]
    assert out[0, 21, 30] and out[0, 58, 30] and not out[0, 20, 30] and not out[0, 59, 30]


def test_paste_left_half_mask_lands_on_left_half_of_box():
    """Mask = 1 on columns 0..13 only, box [10, 20, 50, 60]: value >= 0.5 <=> ix <= 13.5
    <=> (x - 10) * 0.7 <= 14 <=> x <= 30 -> columns 10..29 (the left half of the 40-px box)."""
    mask = torch.zeros(1, 28, 28)
    mask[:, :, :14] = 1
    out = paste_masks(mask, torch.tensor([[10.0, 20.0, 50.0, 60.0]]), (100, 100))
    assert torch.equal(out[0], _expected_rect(100, 100, 10, 20, 30, 60))


def test_paste_probabilities_thresholded_at_half():
    """A constant mask of 0.55 passes the >= 0.5 threshold inside the box; 0.45 never does."""
    boxes = torch.tensor([[10.0, 20.0, 50.0, 60.0]] * 2)
    masks = torch.stack([torch.full((28, 28), 0.55), torch.full((28, 28), 0.45)])
    out = paste_masks(masks, boxes, (100, 100))
    # interior pixels (ix, iy in [0, 27]) sample only in-range mask pixels -> 0.55
    assert torch.equal(out[0, 21:59, 11:49], torch.ones(38, 38, dtype=torch.bool))
    assert not out[1].any()


def test_paste_several_masks_shape_and_independence():
    """N masks -> (N, H, W) with (h, w) order; each mask only in its own box."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 5.0], [20.0, 10.0, 40.0, 30.0]])
    out = paste_masks(torch.ones(2, 28, 28), boxes, (30, 50))
    assert out.shape == (2, 30, 50) and out.dtype == torch.bool
    assert torch.equal(out[0], _expected_rect(30, 50, 0, 0, 10, 5))
    assert torch.equal(out[1], _expected_rect(30, 50, 20, 10, 40, 30))


def test_paste_box_partly_outside_image():
    """[-20, -20, 30, 30] in 100x100: the visible part x, y in [0, 30)."""
    out = paste_masks(torch.ones(1, 28, 28), torch.tensor([[-20.0, -20.0, 30.0, 30.0]]), (100, 100))
    assert torch.equal(out[0], _expected_rect(100, 100, 0, 0, 30, 30))
    out = paste_masks(torch.ones(1, 28, 28), torch.tensor([[80.0, 90.0, 130.0, 120.0]]), (100, 100))
    assert torch.equal(out[0], _expected_rect(100, 100, 80, 90, 100, 100))


@pytest.mark.parametrize(
    "box", [[200.0, 200.0, 250.0, 250.0], [-50.0, -50.0, -10.0, -10.0], [120.0, 10.0, 150.0, 40.0], [10.0, -60.0, 40.0, -5.0]]
)
def test_paste_box_fully_outside_image_is_empty(box):
    """Boxes entirely off the canvas give an all-False mask (and do not crash)."""
    out = paste_masks(torch.ones(1, 28, 28), torch.tensor([box]), (100, 100))
    assert out.shape == (1, 100, 100) and not out.any()


def test_paste_zero_width_box_does_not_crash():
    """Zero-width [30, 30, 30, 60] and zero-size [5, 5, 5, 5] boxes: no error, and [impl 14] the infinite
    normalised coordinates are set to 0, i.e. the mask centre. The paste window has one pixel of margin:
    x in [floor(30) - 1, ceil(30) + 1) = [29, 31). So columns 29, 30 sample the mask centre (value 1) and
    rows follow the 30-px box height as usual: y in [30, 60). For [5, 5, 5, 5] both axes are infinite ->
    the whole window [4, 6) x [4, 6) samples the centre -> True."""
    out = paste_masks(torch.ones(2, 28, 28), torch.tensor([[30.0, 30.0, 30.0, 60.0], [5.0, 5.0, 5.0, 5.0]]), (100, 100))
    assert out.shape == (2, 100, 100) and out.dtype == torch.bool
    assert torch.equal(out[0], _expected_rect(100, 100, 29, 30, 31, 60))
    assert torch.equal(out[1], _expected_rect(100, 100, 4, 4, 6, 6))


def test_paste_no_masks():
    """N = 0 -> (0, H, W)."""
    out = paste_masks(torch.zeros(0, 28, 28), torch.zeros(0, 4), (10, 20))
    assert out.shape == (0, 10, 20) and out.dtype == torch.bool
