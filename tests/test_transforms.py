"""Train-time geometry ([impl 16.1] steps 3-4, [impl 24.2], [impl 24.21], [impl 24.22]) against hand-computed cases."""
import pytest
import torch

from scnet.data.transforms import hflip, resize, resize_image, resize_nearest, resize_scale


@pytest.mark.parametrize(
    "size, scale, expected",
    [
        ((480, 640), (1333, 800), (800, 1067)),  # s = 800/480; 640 * s = 1066.67 -> 1067
        ((640, 480), (1333, 800), (1067, 800)),  # portrait
        ((100, 1000), (1333, 800), (133, 1333)),  # the long side limits: s = 1.333
        ((427, 640), (1333, 800), (800, 1199)),  # 640 * 800/427 = 1199.06
        ((3, 5), (10, 4), (4, 7)),  # 5 * 4/3 = 6.67: int(x + 0.5) = 7 where int(x) would give 6
    ],
)
def test_resize_scale_official_rounding(size, scale, expected):
    new_h, new_w, w_scale, h_scale = resize_scale(*size, scale)
    assert (new_h, new_w) == expected
    # the factors are recomputed from the rounded size, per axis [impl 24.21]
    assert w_scale == new_w / size[1] and h_scale == new_h / size[0]


def test_resize_scale_factors_differ_per_axis():
    _, _, w_scale, h_scale = resize_scale(480, 640)
    assert w_scale == pytest.approx(1.6671875, abs=1e-12)
    assert h_scale == pytest.approx(800 / 480, abs=1e-12)
    assert w_scale != h_scale


def _target(boxes, masks=None, semantic=None):
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "image_id": 7}
    if masks is not None:
        target["masks"] = masks
    if semantic is not None:
        target["semantic_seg"] = semantic
    return target


def test_resize_scales_boxes_per_axis_and_clips():
    image = torch.zeros((3, 3, 5), dtype=torch.uint8)  # h=3, w=5 -> (4, 7) at scale (10, 4)
    target = _target([[1, 1, 4, 3], [2, 0, 7, 2], [-1, -1, 2, 2]])
    out_image, out = resize(image, target, (10, 4))
    assert out_image.shape == (3, 4, 7) and out_image.dtype == torch.uint8
    w_scale, h_scale = 7 / 5, 4 / 3
    expected = torch.tensor(
        [
            [1 * w_scale, 1 * h_scale, 4 * w_scale, 3 * h_scale],
            [2 * w_scale, 0, 7, 2 * h_scale],  # x2 = 9.8 clipped to the new width 7
            [0, 0, 2 * w_scale, 2 * h_scale],  # negative corner clipped to 0
        ]
    )
    torch.testing.assert_close(out["boxes"], expected)
    assert out["scale_factor"] == (w_scale, h_scale)
    assert out["image_id"] == 7 and "scale_factor" not in target  # other keys kept, input untouched


def test_resize_nearest_copies_source_pixels():
    mask = torch.tensor([[0, 1, 0, 0, 1], [1, 1, 0, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.uint8)
    out = resize_nearest(mask[None], (4, 7))[0]
    # legacy nearest (cv2 INTER_NEAREST): row floor(i * 3/4) = [0, 0, 1, 2], col floor(j * 5/7) = [0, 0, 1, 2, 2, 3, 4]
    expected = torch.tensor(
        [
            [0, 0, 1, 0, 0, 0, 1],
            [0, 0, 1, 0, 0, 0, 1],
            [1, 1, 1, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 1, 1],
        ],
        dtype=torch.uint8,
    )
    assert torch.equal(out, expected)
    labels = torch.tensor([[3, 200], [255, 17]], dtype=torch.uint8)
    assert torch.equal(resize_nearest(labels, (4, 4)), labels.repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_resize_masks_and_semantic_with_image():
    image = torch.randint(0, 256, (3, 30, 50), dtype=torch.uint8)
    masks = torch.zeros((2, 30, 50), dtype=torch.uint8)
    masks[0, 10:20, 5:25] = 1
    semantic = torch.full((30, 50), 120, dtype=torch.uint8)
    semantic[:, 40:] = 255
    out_image, out = resize(image, _target([[5, 10, 25, 20], [0, 0, 1, 1]], masks, semantic), (100, 60))
    h, w = out_image.shape[-2:]
    assert (h, w) == (60, 100)
    assert out["masks"].shape == (2, 60, 100) and out["semantic_seg"].shape == (60, 100)
    assert set(out["masks"].unique().tolist()) == {0, 1}  # never interpolated
    assert set(out["semantic_seg"].unique().tolist()) == {120, 255}
    assert torch.equal(out["masks"][0].nonzero().min(0).values, torch.tensor([20, 10]))
    assert torch.equal(out["masks"][0].nonzero().max(0).values, torch.tensor([39, 49]))


def test_resize_image_bilinear_rounds_back_to_uint8():
    image = torch.tensor([[[0, 255]]], dtype=torch.uint8).expand(3, 1, 2)
    out = resize_image(image, (1, 4))
    # half-pixel centres: samples at x = -0.25 (clamped), 0.25, 0.75, 1.25 (clamped) of [0, 255]
    assert torch.equal(out[0, 0], torch.tensor([0, 64, 191, 255], dtype=torch.uint8))
    assert resize_image(image, (1, 2)) is image


def test_resize_without_instances():
    image = torch.zeros((3, 20, 10), dtype=torch.uint8)
    out_image, out = resize(image, _target([], torch.zeros((0, 20, 10), dtype=torch.uint8)), (40, 30))
    assert out_image.shape == (3, 40, 20)
    assert out["boxes"].shape == (0, 4) and out["masks"].shape == (0, 40, 20)


def test_hflip_boxes_masks_semantic():
    image = torch.arange(15, dtype=torch.uint8).reshape(1, 3, 5).expand(3, 3, 5)
    masks = torch.zeros((1, 3, 5), dtype=torch.uint8)
    masks[0, 0:2, 1:3] = 1
    semantic = torch.tensor([[1, 2, 3, 4, 5]] * 3, dtype=torch.uint8)
    out_image, out = hflip(image, _target([[1, 0, 3, 2]], masks, semantic))
    torch.testing.assert_close(out["boxes"], torch.tensor([[2.0, 0, 4, 2]]))  # x1' = W - x2, no +1
    assert torch.equal(out_image[0, 0], torch.tensor([4, 3, 2, 1, 0], dtype=torch.uint8))
    assert out["masks"][0, :2, 2:4].all() and out["masks"].sum() == 4
    assert torch.equal(out["semantic_seg"][0], torch.tensor([5, 4, 3, 2, 1], dtype=torch.uint8))
    assert out["flipped"] is True
    # the flipped box still bounds the flipped mask
    ys, xs = out["masks"][0].nonzero(as_tuple=True)
    assert (xs.min(), xs.max() + 1) == (2, 4)
    again_image, again = hflip(out_image, out)
    assert torch.equal(again_image, image) and torch.equal(again["boxes"], torch.tensor([[1.0, 0, 3, 2]]))
    assert again["flipped"] is False


def test_a_read_only_array_from_pil_is_taken_without_a_warning():
    """README's snippet: np.asarray(PIL image) is read-only; the model takes it as it is, silently."""
    import warnings

    import numpy as np
    import PIL.Image

    from scnet.ops.image import as_chw_tensor

    array = np.asarray(PIL.Image.new("RGB", (20, 10), (1, 2, 3)))
    assert not array.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor = as_chw_tensor(array)
    assert tensor.shape == (3, 10, 20) and tensor[:, 0, 0].tolist() == [1, 2, 3]
