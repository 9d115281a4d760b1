"""The separable CPU RoIAlign (forward and backward) against torchvision's own kernel."""
import pytest
import torch
from torchvision.ops import roi_align as tv_roi_align

from scnet.ops.roi_align import roi_align


def _rois(n, h, w, count, scale, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(count, 2, generator=g) * torch.tensor([w, h]) / scale * 1.2 - 5  # some outside
    wh = torch.rand(count, 2, generator=g) * torch.tensor([w, h]) / scale * 0.8
    wh[:3] = 0  # degenerate RoIs
    wh[3:5] = -2  # inverted RoIs
    batch = torch.randint(0, n, (count, 1), generator=g).float()
    return torch.cat([batch, xy, xy + wh], dim=1)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("output_size, scale, hw", [((7, 7), 0.25, (37, 53)), ((14, 14), 0.125, (20, 31))])
def test_gradient_matches_torchvision(aligned, sampling_ratio, output_size, scale, hw):
    features = torch.randn(2, 5, *hw, dtype=torch.float64)
    rois = _rois(2, *hw, 60, scale, seed=sampling_ratio + aligned).double()
    grad_out = torch.randn(60, 5, *output_size, dtype=torch.float64)
    ours_in = features.clone().requires_grad_()
    theirs_in = features.clone().requires_grad_()
    ours = roi_align(ours_in, rois, output_size, scale, sampling_ratio, aligned)
    theirs = tv_roi_align(theirs_in, rois, output_size, scale, sampling_ratio, aligned)
    # same samples and weights, additions in another order: equal to float64 rounding
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    ours.backward(grad_out)
    theirs.backward(grad_out)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-10, atol=1e-10)


def test_float32_large_map_and_empty_rois():
    features = torch.randn(1, 16, 100, 152, requires_grad=True)
    rois = torch.tensor([[0, 10.0, 20.0, 700.0, 500.0], [0, 0.0, 0.0, 1216.0, 800.0], [0, 3.0, 4.0, 9.0, 11.0]])
    out = roi_align(features, rois, (14, 14), 0.125, 0, True)
    out.sum().backward()
    reference = features.detach().clone().requires_grad_()
    expected = tv_roi_align(reference, rois, (14, 14), 0.125, 0, True)
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the inference path
        torch.testing.assert_close(roi_align(features, rois, (14, 14), 0.125, 0, True), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(features.grad, reference.grad, rtol=1e-5, atol=1e-5)
    empty = roi_align(features, rois[:0], (7, 7), 0.25)
    empty.sum().backward()
    assert empty.shape == (0, 16, 7, 7)


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_grouped_equals_roi_align_then_average_pooling(sampling_ratio):
    """group=2 at 7x7 is RoIAlign at 14x14 followed by adaptive_avg_pool2d to 7x7, forward and backward."""
    features = torch.randn(2, 4, 30, 41, dtype=torch.float64)
    rois = _rois(2, 30, 41, 40, 0.125, seed=7).double()
    grad_out = torch.randn(40, 4, 7, 7, dtype=torch.float64)
    ours_in = features.clone().requires_grad_()
    theirs_in = features.clone().requires_grad_()
    ours = roi_align(ours_in, rois, (7, 7), 0.125, sampling_ratio, True, group=2)
    theirs = torch.nn.functional.adaptive_avg_pool2d(tv_roi_align(theirs_in, rois, (14, 14), 0.125, sampling_ratio, True), 7)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    ours.backward(grad_out)
    theirs.backward(grad_out)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(roi_align(features, rois, (7, 7), 0.125, sampling_ratio, True, 2), theirs.detach())
