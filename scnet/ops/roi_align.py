"""RoIAlign whose forward is torchvision's and whose CPU backward is vectorised (spec §6, §24.1).

torchvision's CPU backward loops over RoIs, channels, bins and samples in one thread; on a CPU it took
most of a training step. The bilinear weights of RoIAlign factor into a y part and an x part (a sample
is dropped when either coordinate is out of range), so the gradient of one RoI is
``Ay^T (g / count) Ax`` per channel, with Ay (bins x rows) and Ax (bins x columns) holding the summed
sample weights inside the RoI's window: one batched matmul per chunk of RoIs, then one GEMM per RoI
that BLAS accumulates directly into the RoI's window of a channels-last gradient. The forward pass
(so inference, and the parity with the official implementation) is untouched; gradients agree with
torchvision's to float32 rounding.
"""
import torch
from torchvision.ops import roi_align as tv_roi_align

_CHUNK_ELEMENTS = 2**25  # (RoIs x channels x window) values materialised at once: 128 MB of float32


def roi_align(features, rois, output_size, spatial_scale, sampling_ratio=0, aligned=True):
    """Drop-in for ``torchvision.ops.roi_align`` with (N, C, H, W) features and (R, 5) rois."""
    if features.device.type == "cpu" and torch.is_grad_enabled() and features.requires_grad:
        return _RoIAlign.apply(features, rois, tuple(output_size), spatial_scale, sampling_ratio, aligned)
    return tv_roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)


class _RoIAlign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, rois, output_size, spatial_scale, sampling_ratio, aligned):
        ctx.save_for_backward(rois)
        ctx.args = (features.shape, output_size, spatial_scale, sampling_ratio, aligned)
        return tv_roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)

    @staticmethod
    def backward(ctx, grad_output):
        (rois,) = ctx.saved_tensors
        shape, output_size, spatial_scale, sampling_ratio, aligned = ctx.args
        grad = roi_align_backward(grad_output, rois, shape, output_size, spatial_scale, sampling_ratio, aligned)
        return grad, None, None, None, None, None


def _axis_weights(start, size, bins, samples, grid, length):
    """Summed bilinear weights of the samples of each bin along one axis, inside each RoI's window.

    Args:
        start, size: (R,) RoI start and extent in feature pixels (aligned offset applied).
        bins: pooled size along the axis; samples: (R,) samples per bin; grid: max of ``samples``.
        length: feature size along the axis.
    Returns:
        (R, bins, window) weights, the (R,) first pixel and the (R,) extent of each RoI's window.
    """
    r = start.shape[0]
    k = torch.arange(grid, dtype=start.dtype)
    b = torch.arange(bins, dtype=start.dtype)
    step = (size / bins)[:, None, None]
    pos = start[:, None, None] + b[None, :, None] * step + (k[None, None, :] + 0.5) * step / samples[:, None, None]
    used = (k[None, None, :] < samples[:, None, None]) & (pos >= -1.0) & (pos <= length)  # same rule as torchvision
    pos = pos.clamp(min=0)
    low = pos.floor().long()
    at_edge = low >= length - 1
    low = torch.where(at_edge, torch.full_like(low, length - 1), low)
    pos = torch.where(at_edge, low.to(pos.dtype), pos)
    high = torch.where(at_edge, low, low + 1)
    frac = pos - low
    w_low, w_high = (1 - frac) * used, frac * used
    first = torch.where(used, low, torch.full_like(low, length)).amin(dim=(1, 2)).clamp(max=length - 1)
    last = torch.where(used, high, torch.full_like(high, -1)).amax(dim=(1, 2))
    extent = (last - first).clamp(min=0) + 1
    window = int(extent.max())
    weights = torch.zeros(r, bins, window + 1, dtype=start.dtype)  # one spare column for unused samples
    idx_low = (low - first[:, None, None]).clamp(0, window)
    idx_high = (high - first[:, None, None]).clamp(0, window)
    weights.scatter_add_(2, idx_low, w_low)
    weights.scatter_add_(2, idx_high, w_high)
    return weights[:, :, :window], first, extent


def roi_align_backward(grad_output, rois, shape, output_size, spatial_scale, sampling_ratio, aligned):
    """Gradient of RoIAlign (avg) w.r.t. its (N, C, H, W) input, as torchvision's CPU kernel computes it."""
    n, c, h, w = shape
    ph, pw = output_size
    rois = rois.to(grad_output.dtype)
    offset = 0.5 if aligned else 0.0
    x0 = rois[:, 1] * spatial_scale - offset
    y0 = rois[:, 2] * spatial_scale - offset
    roi_w = rois[:, 3] * spatial_scale - offset - x0
    roi_h = rois[:, 4] * spatial_scale - offset - y0
    if not aligned:  # legacy mode forces a minimum size of 1
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    if sampling_ratio > 0:
        grid_h = torch.full_like(roi_h, sampling_ratio)
        grid_w = torch.full_like(roi_w, sampling_ratio)
    else:
        grid_h, grid_w = torch.ceil(roi_h / ph), torch.ceil(roi_w / pw)
    count = (grid_h * grid_w).clamp(min=1)
    grad_in = grad_output.new_zeros(n, h, w * c)  # channels last: a window row is contiguous
    batch = rois[:, 0].long()
    for sl in _chunks(roi_h, roi_w, h, w, c):
        ay, first_y, extent_y = _axis_weights(y0[sl], roi_h[sl], ph, grid_h[sl], max(int(grid_h[sl].max()), 1), h)
        ax, first_x, extent_x = _axis_weights(x0[sl], roi_w[sl], pw, grid_w[sl], max(int(grid_w[sl].max()), 1), w)
        g = grad_output[sl] / count[sl, None, None, None]  # (r, C, ph, pw)
        r, ww = g.shape[0], ax.shape[2]
        # x contracted, for every (RoI, bin row): (ww x pw) @ (pw x C) -> (r, ph, ww * C), channels last
        a = ax.transpose(1, 2)[:, None].expand(r, ph, ww, pw).reshape(r * ph, ww, pw)
        t = torch.bmm(a, g.permute(0, 2, 3, 1).reshape(r * ph, pw, c)).view(r, ph, ww * c)
        # y contracted straight into the gradient: BLAS accumulates into the strided window view
        rows = zip(batch[sl].tolist(), first_y.tolist(), extent_y.tolist(), first_x.tolist(), extent_x.tolist())
        for i, (b, fy, ey, fx, ex) in enumerate(rows):
            grad_in[b, fy : fy + ey, fx * c : (fx + ex) * c].addmm_(ay[i, :, :ey].t(), t[i, :, : ex * c])
    return grad_in.view(n, h, w, c).permute(0, 3, 1, 2)  # an NCHW view in channels-last memory


def _chunks(roi_h, roi_w, h, w, c):
    """Index tensors of RoIs of similar window size, each chunk within the memory budget."""
    # a RoI's window spans at most ceil(size) + 3 pixels per axis (one of margin on each side)
    area = ((roi_h.ceil() + 3).clamp(1, h) * (roi_w.ceil() + 3).clamp(1, w)).tolist()
    order = sorted(range(len(area)), key=area.__getitem__)
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end + 1 - start) * area[order[end]] * c <= _CHUNK_ELEMENTS:
            end += 1
        yield torch.tensor(order[start:end])
        start = end
