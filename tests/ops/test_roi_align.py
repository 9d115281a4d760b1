"""The vectorised CPU backward of RoIAlign against torchvision's own kernel."""
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
    assert torch.equal(ours, theirs)  # the forward is torchvision's
    ours.backward(grad_out)
    theirs.backward(grad_out)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-10, atol=1e-10)


def test_float32_large_map_and_empty_rois():
    features = torch.randn(1, 16, 100, 152, requires_grad=True)
    rois = torch.tensor([[0, 10.0, 20.0, 700.0, 500.0], [0, 0.0, 0.0, 1216.0, 800.0], [0, 3.0, 4.0, 9.0, 11.0]])
    out = roi_align(features, rois, (14, 14), 0.125, 0, True)
    out.sum().backward()
    reference = features.detach().clone().requires_grad_()
    tv_roi_align(reference, rois, (14, 14), 0.125, 0, True).sum().backward()
    torch.testing.assert_close(features.grad, reference.grad, rtol=1e-5, atol=1e-5)
    empty = roi_align(features, rois[:0], (7, 7), 0.25)
    empty.sum().backward()
    assert empty.shape == (0, 16, 7, 7)
