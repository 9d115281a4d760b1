"""scnet.utils.visualize: instance drawing (masks, outlines, boxes, labels)."""
import numpy as np
import pytest
import torch

from scnet.utils.visualize import MASK_ALPHA, PALETTE, _place_label, blend_masks, draw_instances, font_size_for

from conftest import synthetic_sample

GREY = 100


def _result(boxes, masks=None, scores=None, labels=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    n = boxes.shape[0]
    result = {
        "boxes": boxes,
        "scores": torch.tensor(scores if scores is not None else [0.9] * n),
        "labels": torch.tensor(labels if labels is not None else [0] * n),
    }
    if masks is not None:
        result["masks"] = torch.from_numpy(np.asarray(masks, dtype=bool))
    return result


def _box_mask(height, width, x0, y0, x1, y1):
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_shape_dtype_and_input_untouched_for_tensor_and_array_images():
    image, target = synthetic_sample(97, 131, 3, seed=0)
    result = {**target, "masks": target["masks"].bool(), "scores": torch.tensor([0.9, 0.8, 0.7])}
    before = image.clone()
    out_tensor = draw_instances(image, result, ["a", "b", "c"])
    out_array = draw_instances(image.permute(1, 2, 0).numpy(), result, ["a", "b", "c"])
    assert out_tensor.shape == (97, 131, 3) and out_tensor.dtype == np.uint8
    np.testing.assert_array_equal(out_tensor, out_array)
    assert torch.equal(image, before)
    with pytest.raises(ValueError, match="image"):
        draw_instances(np.zeros((3, 97, 131), np.uint8), result, ["a"])


def test_mask_pixels_change_colour_and_pixels_far_from_the_box_do_not():
    h, w = 300, 400
    image = np.full((h, w, 3), GREY, np.uint8)
    mask = _box_mask(h, w, 150, 150, 250, 250)
    out = draw_instances(image, _result([[150, 150, 250, 250]], [mask]), ["thing"])
    inner = out[170:230, 170:230].reshape(-1, 3)  # inside the mask, away from outline and label
    fill = round(MASK_ALPHA * 256)
    expected = np.round((GREY * (256 - fill) + PALETTE[0].astype(int) * fill) / 256)
    np.testing.assert_allclose(inner, np.broadcast_to(expected, inner.shape), atol=1)
    far = np.ones((h, w), bool)
    far[100:260, 140:260] = False  # the box, its label above it and a margin
    assert (out[far] == GREY).all()
    # the outline: the mask's border pixels carry the full colour
    np.testing.assert_array_equal(out[200, 150], PALETTE[0])
    np.testing.assert_array_equal(out[249, 200], PALETTE[0])


def test_no_detection_leaves_the_image_as_it_is():
    image = np.full((40, 50, 3), GREY, np.uint8)
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 40, 50, dtype=torch.bool)}
    np.testing.assert_array_equal(draw_instances(image, empty, ["a"]), image)


def test_below_threshold_is_not_drawn_and_instances_of_one_class_get_different_colours():
    h, w = 120, 200
    image = np.full((h, w, 3), GREY, np.uint8)
    masks = [_box_mask(h, w, 20, 40, 60, 100), _box_mask(h, w, 120, 40, 160, 100), _box_mask(h, w, 80, 5, 90, 15)]
    result = _result([[20, 40, 60, 100], [120, 40, 160, 100], [80, 5, 90, 15]], masks, [0.9, 0.8, 0.1], [1, 1, 1])
    out = draw_instances(image, result, ["a", "b"], score_thresh=0.3)
    assert not np.array_equal(out[70, 40], out[70, 140])
    assert (out[8:12, 83:87] == GREY).all()  # score 0.1: no mask, no box


def test_smaller_mask_is_painted_over_a_larger_overlapping_one():
    h, w = 100, 100
    big, small = _box_mask(h, w, 10, 10, 90, 90), _box_mask(h, w, 40, 40, 60, 60)
    image = np.full((h, w, 3), GREY, np.uint8)
    out = draw_instances(image, _result([[40, 40, 60, 60], [10, 10, 90, 90]], [small, big]), ["x"])
    fill = round(MASK_ALPHA * 256)
    blended_small = np.round((GREY * (256 - fill) + PALETTE[0].astype(int) * fill) / 256)
    np.testing.assert_allclose(out[50, 50], blended_small, atol=1)
    assert MASK_ALPHA <= 0.35  # a light fill: the object's own colour still shows through


def test_label_of_a_box_at_the_top_left_corner_is_drawn_inside_the_image():
    h, w = 200, 300
    image = np.full((h, w, 3), GREY, np.uint8)
    out = draw_instances(image, _result([[0, 0, 120, 80]]), ["person"])  # no masks: box and label only
    # the filled label (background + text, no grey left) covers the top rows, inside the box
    label_rows = (out[:, 2:40] != GREY).any(axis=2).all(axis=1)
    assert label_rows[: int(font_size_for(h, w) * 0.8)].all()
    assert (out[0, 2:40] == PALETTE[0]).all()  # the label's background colour at the very top


def test_label_of_a_box_at_the_right_edge_is_shifted_left_to_stay_inside():
    h, w = 200, 300
    image = np.full((h, w, 3), GREY, np.uint8)
    out = draw_instances(image, _result([[290, 100, 300, 150]], scores=[0.87]), ["a_long_class_name"])
    label = (out[60:100] != GREY).any(axis=2)  # above the box
    assert label.sum(axis=1).max() > 60  # a full-width label, not the few pixels left of the edge
    assert label[:, -1].any()  # it ends at the right edge


def test_blend_masks_empty_mask_and_no_outline():
    canvas = np.full((20, 30, 3), GREY, np.uint8)
    blend_masks(canvas, [np.zeros((20, 30), bool)], PALETTE[:1])
    assert (canvas == GREY).all()
    blend_masks(canvas, [_box_mask(20, 30, 5, 5, 15, 15)], PALETTE[:1], alpha=1.0, outline=0)
    assert (canvas[5:15, 5:15] == PALETTE[0]).all() and (canvas[:5] == GREY).all()


def test_labels_of_neighbouring_detections_do_not_cover_each_other():
    placed = []
    for box in ([40, 50, 120, 150], [44, 54, 110, 140], [42, 52, 118, 148]):  # three boxes, nearly one corner
        x, y = _place_label(box, 60, 12, (200, 300), placed)
        placed.append((x, y, x + 60, y + 12))
    assert [p[1] for p in placed] == [38, 54, 148]  # above the first box, inside the second, under the third
    for i, a in enumerate(placed):
        assert 0 <= a[0] and a[2] <= 300 and 0 <= a[1] and a[3] <= 200
        assert not any(a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3] for b in placed[i + 1:])
    # at the bottom-right corner, the label stays whole inside the image
    x, y = _place_label([280, 190, 300, 200], 60, 12, (200, 300), [])
    assert (x, y) == (240, 178)
