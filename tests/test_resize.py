"""scnet/ops/image.py's resizes against OpenCV itself, the official pipeline's resize (mmcv ``imresize``,
cv2 backend): bilinear on uint8 images and nearest on masks and label maps, bit for bit, reducing and
enlarging. OpenCV is a test-only oracle (requirements-test.txt); the package never imports it."""
import numpy as np
import pytest
import torch

from scnet.ops.image import rescale_size, resize_image, resize_nearest

cv2 = pytest.importorskip("cv2", reason="OpenCV (requirements-test.txt) is the oracle of these tests")



def _cases(seed, count):
    """(source (h, w), destination (h, w)): keep-ratio scales from 0.1x to 5x, free sizes, exact halves."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = (int(v) for v in rng.integers(1, 400, size=2))
        if i % 4 == 0:
            dst = tuple(int(v) for v in rng.integers(1, 600, size=2))
        elif i % 10 == 1:  # OpenCV averages 2x2 blocks instead
            h, w = 2 * max(1, h // 2), 2 * max(1, w // 2)
            dst = (h // 2, w // 2)
        else:
            s = rng.uniform(0.1, 5.0)
            dst = (max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5)))
        yield rng, (h, w), dst


def _image(rng, h, w):
    """Noise, or hard black/white edges (where the rounding of the weights shows most)."""
    if rng.random() < 0.5:
        return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return np.repeat(np.where(rng.random((h, w, 1)) < 0.5, 0, 255).astype(np.uint8), 3, axis=2)


def test_bilinear_equals_opencv_on_random_images(device):
    count, mismatches = 0, []
    for rng, (h, w), (dh, dw) in _cases(0, 240):
        image = _image(rng, h, w)
        expected = cv2.resize(image, (dw, dh), interpolation=cv2.INTER_LINEAR)
        ours = resize_image(torch.from_numpy(image).permute(2, 0, 1).to(device), (dh, dw))
        ours = ours.permute(1, 2, 0).cpu().numpy()
        count += 1
        if ours.dtype != np.uint8 or not np.array_equal(ours, expected):
            mismatches.append(((h, w), (dh, dw)))
    assert count == 240 and not mismatches, mismatches


def test_bilinear_equals_opencv_at_the_test_scale(device):
    """Photo sizes to the official (1333, 800) keep-ratio scale, enlarged and reduced."""
    rng = np.random.default_rng(1)
    for h, w in [(480, 640), (640, 480), (333, 500), (218, 640), (1600, 2666), (3000, 4000), (1200, 1600)]:
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        dh, dw = rescale_size(h, w, (1333, 800))
        expected = cv2.resize(image, (dw, dh), interpolation=cv2.INTER_LINEAR)
        ours = resize_image(torch.from_numpy(image).permute(2, 0, 1).to(device), (dh, dw))
        np.testing.assert_array_equal(ours.permute(1, 2, 0).cpu().numpy(), expected, err_msg=f"{(h, w)}")


def test_nearest_equals_opencv_on_masks_and_label_maps(device):
    mismatches = []
    for rng, (h, w), (dh, dw) in _cases(2, 200):
        labels = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
        expected = cv2.resize(labels, (dw, dh), interpolation=cv2.INTER_NEAREST)
        ours = resize_nearest(torch.from_numpy(labels).to(device), (dh, dw)).cpu().numpy()
        masks = torch.from_numpy(np.stack([labels % 2, labels // 128])).to(device)
        per_mask = resize_nearest(masks, (dh, dw)).cpu().numpy()
        expected_masks = np.stack([cv2.resize(m, (dw, dh), interpolation=cv2.INTER_NEAREST)
                                   for m in masks.cpu().numpy()])
        if not (np.array_equal(ours, expected) and np.array_equal(per_mask, expected_masks)):
            mismatches.append(((h, w), (dh, dw)))
    assert not mismatches, mismatches


def test_no_masks_and_same_size_pass_through():
    assert resize_nearest(torch.zeros((0, 5, 7), dtype=torch.uint8), (10, 14)).shape == (0, 10, 14)
    image = torch.zeros((3, 5, 7), dtype=torch.uint8)
    assert resize_image(image, (5, 7)) is image and resize_nearest(image, (5, 7)) is image
