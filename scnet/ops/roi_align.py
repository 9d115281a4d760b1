"""RoIAlign on the CPU as two small GEMMs per RoI, forward and backward [impl 6, 24.1].

torchvision's CPU kernels loop over RoIs, channels, bins and samples in one thread: on a CPU they took a
quarter of SCNet's inference and most of a training step. The bilinear weights of RoIAlign factor into a
y part and an x part (a sample is dropped when either coordinate is out of range), so one RoI's output
is ``Ay F Ax^T / count`` per channel, with Ay (bins x rows) and Ax (bins x columns) holding the summed
sample weights inside the RoI's window, and its gradient is ``Ay^T (g / count) Ax``. Both run on a
channels-last copy of the map, where a window row is contiguous, so BLAS reads and accumulates the window
in place. Same samples, weights and edge rules as torchvision's kernel (equal to float64 rounding in the
tests); only the order of the float additions differs. Other devices and dtypes use torchvision's op.
"""
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align as tv_roi_align

from .export import exporting

_CHUNK_ELEMENTS = 2**25  # (RoIs x channels x window) values materialised at once: 128 MB of float32


def roi_align(features, rois, output_size, spatial_scale, sampling_ratio=0, aligned=True, group=1):
    """``torchvision.ops.roi_align`` with (N, C, H, W) features and (R, 5) rois, optionally followed by
    ``group`` x ``group`` average pooling: ``group=2`` with ``output_size=7`` is RoIAlign at 14x14 then
    ``adaptive_avg_pool2d`` to 7x7 (the semantic feature of the box branch, [impl 8]), fused on the CPU."""
    output_size = tuple(output_size)
    if features.device.type == "cpu" and features.dtype in (torch.bfloat16, torch.float16):
        # autocast: pool in float32 and give the input's dtype back, as torchvision's autocast rule does
        out = roi_align(features.float(), rois.float(), output_size, spatial_scale, sampling_ratio, aligned, group)
        return out.to(features.dtype)
    if features.device.type != "cpu" or features.dtype not in (torch.float32, torch.float64) or exporting():
        # torch.export / ONNX: torchvision's op, which has a shape function and an ONNX translation (ours
        # loops over RoIs in Python with sizes read from the data)
        full = (output_size[0] * group, output_size[1] * group)
        out = tv_roi_align(features, rois, full, spatial_scale, sampling_ratio, aligned)
        return F.adaptive_avg_pool2d(out, output_size) if group > 1 else out
    args = (output_size, spatial_scale, sampling_ratio, aligned, group)
    if torch.is_grad_enabled() and features.requires_grad:
        return _RoIAlign.apply(features, rois, *args)
    return roi_align_forward(features, rois, *args)


class _RoIAlign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, rois, *args):
        ctx.save_for_backward(rois)
        ctx.args = (features.shape,) + args
        return roi_align_forward(features, rois, *args)

    @staticmethod
    def backward(ctx, grad_output):
        (rois,) = ctx.saved_tensors
        grad = roi_align_backward(grad_output, rois, *ctx.args)
        return (grad,) + (None,) * len(ctx.args)


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


def _geometry(rois, output_size, spatial_scale, sampling_ratio, aligned):
    """Per-RoI (start, extent, samples per bin) along y and along x, and the sample count per bin, as
    torchvision's kernel computes them for ``output_size`` bins."""
    ph, pw = output_size
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
    return (y0, roi_h, grid_h), (x0, roi_w, grid_w), count


def _window_weights(geometry, sl, bins, group, length):
    """Axis weights of the RoIs ``sl`` for ``bins`` output bins, each the average of ``group`` RoIAlign bins
    (the average of adjacent bins is one bin holding all their samples)."""
    start, size, grid = (t[sl] for t in geometry)
    weights, first, extent = _axis_weights(start, size, bins * group, grid, max(int(grid.max()), 1), length)
    if group > 1:
        weights = weights.view(weights.shape[0], bins, group, -1).sum(2) / group
    return weights, first, extent


@torch.autocast("cpu", enabled=False)  # float32 matrix products, also inside an autocast region
def roi_align_forward(features, rois, output_size, spatial_scale, sampling_ratio=0, aligned=True, group=1):
    """RoIAlign (avg) of (N, C, H, W) float features as two small GEMMs per RoI: ``Ay F Ax^T / count``.

    Same samples, weights and out-of-range rule as torchvision's kernel; only the order of the float
    additions differs (results agree to float32 rounding). Returns (R, C, ph, pw).
    """
    n, c, h, w = features.shape
    ph, pw = output_size
    out = features.new_empty((rois.shape[0], ph, pw, c))
    if rois.shape[0] == 0:
        return out.permute(0, 3, 1, 2)
    rois = rois.to(features.dtype)
    geo_y, geo_x, count = _geometry(rois, (ph * group, pw * group), spatial_scale, sampling_ratio, aligned)
    cl = features.permute(0, 2, 3, 1).contiguous().view(n, h, w * c)  # a window row is contiguous
    batch = rois[:, 0].long()
    for sl in _chunks(geo_y[1], geo_x[1], h, w, c):
        ay, first_y, extent_y = _window_weights(geo_y, sl, ph, group, h)
        ax, first_x, extent_x = _window_weights(geo_x, sl, pw, group, w)
        ay = ay / count[sl, None, None]
        windows = zip(sl.tolist(), batch[sl].tolist(), first_y.tolist(), extent_y.tolist(), first_x.tolist(), extent_x.tolist())
        for i, (r, b, fy, ey, fx, ex) in enumerate(windows):
            t = torch.mm(ay[i, :, :ey], cl[b, fy : fy + ey, fx * c : (fx + ex) * c])  # (ph, ex * C): y contracted
            torch.matmul(ax[i, :, :ex], t.view(ph, ex, c), out=out[r])  # (ph, pw, C): x contracted
    return out.permute(0, 3, 1, 2)  # an NCHW view in channels-last memory


@torch.autocast("cpu", enabled=False)
def roi_align_backward(grad_output, rois, shape, output_size, spatial_scale, sampling_ratio, aligned, group=1):
    """Gradient of RoIAlign (avg) w.r.t. its (N, C, H, W) input, as torchvision's CPU kernel computes it."""
    n, c, h, w = shape
    ph, pw = output_size
    rois = rois.to(grad_output.dtype)
    geo_y, geo_x, count = _geometry(rois, (ph * group, pw * group), spatial_scale, sampling_ratio, aligned)
    grad_in = grad_output.new_zeros(n, h, w * c)  # channels last: a window row is contiguous
    batch = rois[:, 0].long()
    for sl in _chunks(geo_y[1], geo_x[1], h, w, c):
        ay, first_y, extent_y = _window_weights(geo_y, sl, ph, group, h)
        ax, first_x, extent_x = _window_weights(geo_x, sl, pw, group, w)
        g = grad_output[sl] / count[sl, None, None, None]  # (r, C, ph, pw)
        r, ww = g.shape[0], ax.shape[2]
        # x contracted, for every (RoI, bin row): (ww x pw) @ (pw x C) -> (r, ph, ww * C), channels last
        a = ax.transpose(1, 2)[:, None].expand(r, ph, ww, pw).reshape(r * ph, ww, pw)
        t = torch.bmm(a, g.permute(0, 2, 3, 1).reshape(r * ph, pw, c)).view(r, ph, ww * c)
        # y contracted straight into the gradient: BLAS accumulates into the strided window view
        windows = zip(batch[sl].tolist(), first_y.tolist(), extent_y.tolist(), first_x.tolist(), extent_x.tolist())
        for i, (b, fy, ey, fx, ex) in enumerate(windows):
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
