"""Unit tests for the RPN anchor generator and the FPN RoI level mapping [impl 5.2, 6, 24.23, 24.25]."""
import math

import pytest
import torch

from scnet.modeling.poolers import map_levels
from scnet.modeling.rpn import AnchorGenerator

S2 = math.sqrt(2.0)


def test_base_anchors_stride4_scale8_hw_ratio_convention():
    """Stride 4, scale 8 (side 32), ratios (0.5, 1, 2) as h/w, centre 0:
    r=0.5: w = 32*sqrt(2) = 45.255, h = 32/sqrt(2) = 22.627 -> [-22.627, -11.314, 22.627, 11.314]
    r=1:   w = h = 32                                        -> [-16, -16, 16, 16]
    r=2:   w = 22.627, h = 45.255                            -> [-11.314, -22.627, 11.314, 22.627]"""
    gen = AnchorGenerator(strides=(4,), scales=(8.0,), ratios=(0.5, 1.0, 2.0))
    a, b = 16 * S2, 8 * S2  # 22.627, 11.314
    expected = torch.tensor([[-a, -b, a, b], [-16.0, -16.0, 16.0, 16.0], [-b, -a, b, a]])
    torch.testing.assert_close(gen.base_anchors[0], expected, rtol=0, atol=1e-4)
    assert gen.num_anchors == 3


def test_base_anchor_sides_for_all_fpn_strides():
    """The square anchor of stride s has side 8s: 32, 64, 128, 256, 512; all float, unrounded."""
    gen = AnchorGenerator()
    for level, side in enumerate([32.0, 64.0, 128.0, 256.0, 512.0]):
        base = gen.base_anchors[level]
        torch.testing.assert_close(base[1], torch.tensor([-side / 2, -side / 2, side / 2, side / 2]))
        # ratio 0.5 at stride 64: w = 512*sqrt(2) = 724.077 (not rounded to 724)
        torch.testing.assert_close(base[0, 2] - base[0, 0], torch.tensor(side * S2), rtol=1e-6, atol=1e-4)
        torch.testing.assert_close(base[0, 3] - base[0, 1], torch.tensor(side / S2), rtol=1e-6, atol=1e-4)


def test_base_anchors_several_scales_in_ratio_major_order():
    """With scales (8, 16): order is ratio-major, scale-minor (mmdet: w_ratios[:, None] * scales[None, :])."""
    gen = AnchorGenerator(strides=(4,), scales=(8.0, 16.0), ratios=(0.5, 1.0))
    base = gen.base_anchors[0]
    assert gen.num_anchors == 4
    widths = (base[:, 2] - base[:, 0]).tolist()
    # (r=0.5, s=8): 32*sqrt2, (r=0.5, s=16): 64*sqrt2, (r=1, s=8): 32, (r=1, s=16): 64
    assert widths == pytest.approx([32 * S2, 64 * S2, 32.0, 64.0], abs=1e-4)


def test_grid_anchors_2x3_order_and_centres():
    """2x3 map at stride 4: 2*3*3 = 18 anchors in (y, x, anchor) order, centred on (4x, 4y) (offset 0)."""
    gen = AnchorGenerator(strides=(4,), scales=(8.0,), ratios=(0.5, 1.0, 2.0))
    anchors = gen.grid_anchors(0, 2, 3, torch.device("cpu"))
    assert anchors.shape == (18, 4)
    base = gen.base_anchors[0]
    for y in range(2):
        for x in range(3):
            for a in range(3):
                i = (y * 3 + x) * 3 + a
                shift = torch.tensor([4.0 * x, 4.0 * y, 4.0 * x, 4.0 * y])
                torch.testing.assert_close(anchors[i], base[a] + shift)
    # explicit values: index 5 = (y=0, x=1, r=2): centre (4, 0) -> [4-11.314, -22.627, 4+11.314, 22.627]
    torch.testing.assert_close(anchors[5], torch.tensor([4 - 8 * S2, -16 * S2, 4 + 8 * S2, 16 * S2]), rtol=0, atol=1e-4)
    # index 13 = (y=1, x=1, r=1): centre (4, 4) -> [-12, -12, 20, 20]
    torch.testing.assert_close(anchors[13], torch.tensor([-12.0, -12.0, 20.0, 20.0]))
    # index 9 = (y=1, x=0, r=0.5): centre (0, 4) -> [-22.627, 4-11.314, 22.627, 4+11.314]
    torch.testing.assert_close(anchors[9], torch.tensor([-16 * S2, 4 - 8 * S2, 16 * S2, 4 + 8 * S2]), rtol=0, atol=1e-4)


def test_forward_one_tensor_per_level_with_h_w_a_counts():
    """forward gives per level (H*W*3, 4) anchors; a 3x5 (H x W) stride-8 map has centres x = 0..32, y = 0..16."""
    gen = AnchorGenerator(strides=(4, 8), scales=(8.0,), ratios=(0.5, 1.0, 2.0))
    feats = [torch.zeros(1, 2, 6, 10), torch.zeros(1, 2, 3, 5)]
    out = gen(feats)
    assert [o.shape for o in out] == [(6 * 10 * 3, 4), (3 * 5 * 3, 4)]
    centres = (out[1][:, :2] + out[1][:, 2:]) / 2
    # last location (y=2, x=4): centre (32, 16); location 1 is (y=0, x=1): centre (8, 0)
    torch.testing.assert_close(centres[-1], torch.tensor([32.0, 16.0]))
    torch.testing.assert_close(centres[3], torch.tensor([8.0, 0.0]))
    # square anchor of the stride-8 level at (y=0, x=0): side 64
    torch.testing.assert_close(out[1][1], torch.tensor([-32.0, -32.0, 32.0, 32.0]))


# ------------------------------------------------------------------------------------------- map_levels


def _square_rois(sides, image_index=3.0, x0=17.0, y0=5.0):
    sides = torch.tensor(sides, dtype=torch.float32)
    n = sides.numel()
    return torch.stack(
        [torch.full((n,), image_index), torch.full((n,), x0), torch.full((n,), y0), x0 + sides, y0 + sides], dim=1
    )


def test_map_levels_thresholds():
    """level = floor(log2(sqrt(wh)/56 + 1e-6)) clamped to [0, 3]:
    10/56 = 0.18 -> -2.5 -> 0;  111.9/56 = 1.998 -> 0;  112/56 = 2 -> 1;  223.9/56 = 3.998 -> 1;
    224/56 = 4 -> 2;  447/56 = 7.98 -> 2;  448/56 = 8 -> 3;  2000/56 = 35.7 -> 5.2 -> clamped 3."""
    sides = [10.0, 111.9, 112.0, 223.9, 224.0, 447.0, 448.0, 2000.0]
    levels = map_levels(_square_rois(sides), 4)
    assert levels.dtype == torch.int64
    assert levels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_map_levels_uses_columns_1_to_4_not_the_image_index():
    """rois are [image index, x1, y1, x2, y2]; non-square boxes use sqrt(w*h) (no +1):
    [7, 100, 50, 324, 106]: w = 224, h = 56 -> sqrt = 112 -> level 1 (with +1: sqrt(225*57) = 113.2, same);
    [0, 100, 50, 155.9, 274]: w = 55.9, h = 224 -> sqrt = 111.9 -> level 0;
    [9, 0, 0, 111, 113]: w*h = 12543 -> sqrt = 111.996 -> level 0 (with "+1": sqrt(112*114) = 113 -> 1);
    [2, 0, 0, 0, 0]: zero area -> 0."""
    rois = torch.tensor(
        [[7.0, 100.0, 50.0, 324.0, 106.0], [0.0, 100.0, 50.0, 155.9, 274.0], [9.0, 0.0, 0.0, 111.0, 113.0], [2.0, 0.0, 0.0, 0.0, 0.0]]
    )
    assert map_levels(rois, 4).tolist() == [1, 0, 0, 0]


def test_map_levels_epsilon_absorbs_float_rounding_at_a_boundary():
    """A 224x224 box at x1 = y1 = 33.3 in float32: x2 - x1 = 257.29999 - 33.29999924 = 223.99998 (rounded),
    scale/56 = 3.9999997; without the 1e-6 this would be floor(log2) = 1, with it 4.0000007 -> level 2."""
    rois = torch.tensor([[0.0, 33.3, 33.3, 33.3 + 224.0, 33.3 + 224.0]], dtype=torch.float32)
    assert (rois[0, 3] - rois[0, 1]).item() < 224.0  # the rounding this test is about
    assert map_levels(rois, 4).tolist() == [2]


def test_map_levels_respects_num_levels():
    """Clamp to num_levels - 1: with 2 levels, 448 goes to level 1."""
    assert map_levels(_square_rois([50.0, 200.0, 448.0]), 2).tolist() == [0, 1, 1]
