"""SC-ResNet-50/101 (and -50-v1d): ResNet with self-calibrated convolutions, frozen BatchNorm.

Paper: J.-J. Liu, Q. Hou, M.-M. Cheng, C. Wang, J. Feng, "Improving Convolutional Networks with
Self-Calibrated Convolutions", CVPR 2020: SC-Conv paper §3 and Fig. 2 (the filters split into four portions
K1..K4, the input into two halves), SC-Conv paper §3.1 (self-calibration); SC-ResNets replace the 3x3 conv of every
ResNet bottleneck. The upstream repo calls these networks "SCNet"; here that name belongs to our
detector, so they are SC-ResNets.

The architecture and every module name are those of the official ``scnet.py`` (MCG-NKU/SCNet, formerly
backseason/SCNet, commit 9f28392c, the version that adds ``scnet50_v1d``): ``conv1_a``, ``bn1_a``,
``k1``, ``conv1_b``, ``bn1_b``, ``scconv.k2/k3/k4``, ``conv3``, ``bn3``, ``downsample``. Its ImageNet
checkpoints therefore load through ``resnet.load_pretrained`` (which drops ``fc.*``) without renaming.

Where the code, which the checkpoints were trained with, differs from the paper's text we follow the
code: the upsampling ``Up`` in the gate is nearest-neighbour (``F.interpolate``'s default), where SC-Conv
paper §3.1 says bilinear.

Returned features are C2..C5 (strides 4, 8, 16, 32) as a list, like ``resnet.ResNet``.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from scnet.ops.export import exporting

from .resnet import DEPTHS, FrozenBatchNorm2d, StagedBackbone

# Down-sampling rate r of the average pooling in front of k2 (official SCBottleneck.pooling_r, SC-Conv paper §3.1).
POOLING_R = 4
# Bottleneck output channels = planes * EXPANSION, as in ResNet.
EXPANSION = 4


def pool_short_sides_whole(x, r):
    """``avg_pool2d(x, r)`` with a side shorter than r pooled whole (SCConv.forward's two branches), in
    one branch-free expression for an exported graph: the short sides are zero-padded to r, the padded
    windows' means times r * r (exact for r a power of two) are their sums, divided by the pixels each
    window covers. Bit-equal to the eager branches (tests/test_export.py)."""
    h, w = x.shape[-2:]
    x = F.pad(x, (0, torch.sym_max(w, r) - w, 0, torch.sym_max(h, r) - h))
    return F.avg_pool2d(x, r) * (r * r) / (torch.sym_min(r, h) * torch.sym_min(r, w))


class SCConv(nn.Module):
    """Self-calibrated 3x3 convolution on one half of the bottleneck (SC-Conv paper §3.1, Fig. 2).

    ``k4(k3(x) * sigmoid(x + Up(k2(AvgPool_r(x)))))``; every k is a 3x3 conv + frozen BN, no bias.
    ``(N, C, H, W) -> (N, C, ceil(H / stride), ceil(W / stride))``; only ``k4`` carries the stride.
    """

    def __init__(self, channels, stride=1, pooling_r=POOLING_R):
        super().__init__()
        # indices 1/2 (after the parameter-free pool) are part of the official key names: k2.1.weight
        self.k2 = nn.Sequential(
            nn.AvgPool2d(kernel_size=pooling_r, stride=pooling_r),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            FrozenBatchNorm2d(channels),
        )
        self.k3 = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), FrozenBatchNorm2d(channels))
        self.k4 = nn.Sequential(
            nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False), FrozenBatchNorm2d(channels)
        )

    def forward(self, x):
        h, w = x.shape[-2:]
        r = self.k2[0].kernel_size
        if exporting():  # no branch on the size: one graph for every input size
            return self.calibrate(x, pool_short_sides_whole(x, r))
        if h >= r and w >= r:
            return self.calibrate(x, self.k2[0](x))  # (N, C, H // r, W // r)
        # A side shorter than r (C5 of an input of 96 px or less) pools to nothing, an error in the
        # official code; pool that side whole instead. Identical wherever the official code runs.
        return self.calibrate(x, F.avg_pool2d(x, (min(r, h), min(r, w))))

    def calibrate(self, x, pooled):
        small = self.k2[1:](pooled)
        # calibration weights from the small latent space, upsampled back (nearest, as the official code)
        gate = torch.sigmoid(x + F.interpolate(small, size=x.shape[-2:]))
        return self.k4(self.k3(x) * gate)


class SCBottleneck(nn.Module):
    """Two half-width paths, concatenated, then the 1x1 expansion (Fig. 2, official ``SCBottleneck``).

    Path a: ``conv1_a`` (1x1) -> ``k1`` (plain 3x3); path b: ``conv1_b`` (1x1) -> ``scconv``.
    Each path has ``planes // 2`` channels (official ``bottleneck_width=32`` of 64), so the conv weights
    are exactly a ResNet bottleneck's (k1..k4 are the four quarters of its 3x3 filter, Fig. 2); only the
    norms add ``2 * planes`` affine parameters per block (7,552 in SC-ResNet-50). ``avd`` (v1d only):
    both paths run at stride 1 and a 3x3 average pool with the stride follows them (ResNet-D, official
    ``avd_layer``).
    """

    def __init__(self, in_channels, planes, stride=1, downsample=None, avd=False):
        super().__init__()
        width = planes // 2  # official group_width = int(planes * 32 / 64) * cardinality(=1)
        out_channels = planes * EXPANSION
        self.conv1_a = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1_a = FrozenBatchNorm2d(width)
        self.conv1_b = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1_b = FrozenBatchNorm2d(width)
        avd = avd and stride > 1  # official: avd and (stride > 1 or is_first); is_first is True only at stride 2
        # v1d: pool (3x3, padding 1, counts the padding, as official) after the convs instead of striding them
        self.avd_layer = nn.AvgPool2d(3, stride, padding=1) if avd else None
        conv_stride = 1 if avd else stride
        self.k1 = nn.Sequential(
            nn.Conv2d(width, width, 3, stride=conv_stride, padding=1, bias=False), FrozenBatchNorm2d(width)
        )
        self.scconv = SCConv(width, conv_stride)
        self.conv3 = nn.Conv2d(2 * width, out_channels, 1, bias=False)
        self.bn3 = FrozenBatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out_a = self.relu(self.k1(self.relu(self.bn1_a(self.conv1_a(x)))))
        out_b = self.relu(self.scconv(self.relu(self.bn1_b(self.conv1_b(x)))))
        if self.avd_layer is not None:
            out_a, out_b = self.avd_layer(out_a), self.avd_layer(out_b)
        out = self.bn3(self.conv3(torch.cat([out_a, out_b], dim=1)))
        return self.relu(out + identity)


def _projection_shortcut(in_channels, out_channels, stride, avg_down):
    """1x1 conv + BN; with ``avg_down`` (v1d) a stride-sized average pool first and an unstrided conv.

    The official v1d keeps the pool at index 0 even when stride is 1 (layer1), so the conv is always
    ``downsample.1`` and the norm ``downsample.2`` there; without ``avg_down`` they are ``.0`` / ``.1``.
    """
    if not avg_down:
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), FrozenBatchNorm2d(out_channels)
        )
    return nn.Sequential(
        # ceil_mode: odd sizes give ceil(H / 2), like the strided main path
        nn.AvgPool2d(kernel_size=stride, stride=stride, ceil_mode=True, count_include_pad=False),
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        FrozenBatchNorm2d(out_channels),
    )


class SCResNet(StagedBackbone):
    """SC-ResNet backbone; returns [C2, C3, C4, C5] (strides 4, 8, 16, 32), channels ``out_channels``.

    Official variants: SC-ResNet-50 = ``SCResNet(50)``, SC-ResNet-101 = ``SCResNet(101)``,
    SC-ResNet-50-v1d = ``SCResNet(50, deep_stem=True, avg_down=True)``.

    Args:
        depth: 50 or 101.
        deep_stem: three 3x3 convs (widths base/2, base/2, base) instead of the 7x7 (v1d, "Bag of
            Tricks" ResNet-C); official ``scnet50_v1d``: stem_width = 32 for base 64.
        avg_down: ResNet-D downsampling as the official v1d (``avg_down=True, avd=True``): an average
            pool before an unstrided 1x1 in the projection shortcuts, and a 3x3 average pool after the
            unstrided 3x3s of each stride-2 block. Both are parameter-free and released together.
        base_channels: 7x7 stem width and layer1 planes (64; smaller only for tiny test models).
        frozen_stages: stem + the first ``frozen_stages`` stages get ``requires_grad=False`` (-1: none).
    """

    def __init__(self, depth=50, deep_stem=False, avg_down=False, base_channels=64, frozen_stages=1):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"SC-ResNet depth must be one of {sorted(DEPTHS)}, got {depth}")
        if deep_stem:
            stem_width = base_channels // 2  # official scnet50_v1d: stem_width=32, stem output 2 * 32 = 64
            # indices 0/3/6 (convs) and 1/4 (norms) are the official key names conv1.0.weight ... conv1.6.weight
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, stem_width, 3, stride=2, padding=1, bias=False),
                FrozenBatchNorm2d(stem_width),
                nn.ReLU(inplace=True),
                nn.Conv2d(stem_width, stem_width, 3, padding=1, bias=False),
                FrozenBatchNorm2d(stem_width),
                nn.ReLU(inplace=True),
                nn.Conv2d(stem_width, 2 * stem_width, 3, padding=1, bias=False),
            )
        else:
            self.conv1 = nn.Conv2d(3, base_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(base_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = base_channels
        self.out_channels = []
        for i, num_blocks in enumerate(DEPTHS[depth]):
            planes = base_channels * 2**i
            stride = 1 if i == 0 else 2
            # every stage's first block projects (layer1: 64 -> 256 channels at stride 1)
            downsample = _projection_shortcut(in_channels, planes * EXPANSION, stride, avg_down)
            blocks = [SCBottleneck(in_channels, planes, stride, downsample, avd=avg_down)]
            in_channels = planes * EXPANSION
            blocks += [SCBottleneck(in_channels, planes) for _ in range(1, num_blocks)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.out_channels.append(in_channels)
        self._freeze(frozen_stages)

