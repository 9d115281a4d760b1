"""ResNet-50/101 and ResNeXt-101 backbones, 'pytorch' style, frozen BatchNorm [impl 3].

Parameter names are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv2``, ``layer2.0.downsample.0``,
...), so an ImageNet checkpoint of torchvision or of OpenMMLab's ResNeXt loads without renaming.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...utils.files import load_file

DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm whose statistics are never updated, in training or not (``norm_eval=True``, [impl 24.20]).

    The affine weight and bias stay parameters: the official models train and weight-decay them in
    layer2-4. ``num_batches_tracked`` is kept only so the official state dicts load key for key.
    """

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here: 'pytorch' style, [impl 3.1]) -> 1x1, plus a projection shortcut in block 0."""

    expansion = 4

    def __init__(self, in_channels, planes, stride=1, groups=1, width_per_group=64, base_channels=64):
        super().__init__()
        # ResNeXt inner width floor(planes * width_per_group / base_channels) * groups [impl 3.2]; ResNet: planes
        width = planes if groups == 1 else int(planes * width_per_group / base_channels) * groups
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = FrozenBatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = FrozenBatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = FrozenBatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), FrozenBatchNorm2d(out_channels)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class StagedBackbone(nn.Module):
    """What ResNet and SC-ResNet share: a stem (conv1, bn1, relu, maxpool) and layer1-4, returning C2-C5;
    the stem and the first ``frozen_stages`` layers frozen [impl 3]."""

    def _freeze(self, frozen_stages):
        frozen = [self.conv1, self.bn1] if frozen_stages >= 0 else []
        frozen += [getattr(self, f"layer{i}") for i in range(1, frozen_stages + 1)]
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            outs.append(x)
        return outs


class ResNet(StagedBackbone):
    """Returns C2..C5 (strides 4, 8, 16, 32) as a list.

    Args:
        depth: 50 or 101.
        groups, width_per_group: ResNeXt cardinality and base width (64, 4 for X-101-64x4d); unused
            when groups == 1.
        base_channels: stem width and layer1 planes (64; smaller only for tiny test models).
        frozen_stages: stem + the first ``frozen_stages`` stages get ``requires_grad=False`` [impl 3.1].
    """

    def __init__(self, depth=50, groups=1, width_per_group=64, base_channels=64, frozen_stages=1):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"ResNet depth must be one of {sorted(DEPTHS)}, got {depth}")
        self.conv1 = nn.Conv2d(3, base_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(base_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = base_channels
        self.out_channels = []
        for i, num_blocks in enumerate(DEPTHS[depth]):
            planes = base_channels * 2**i
            blocks = []
            for b in range(num_blocks):
                stride = 2 if (b == 0 and i > 0) else 1
                blocks.append(Bottleneck(in_channels, planes, stride, groups, width_per_group, base_channels))
                in_channels = planes * Bottleneck.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.out_channels.append(in_channels)
        self._freeze(frozen_stages)



def load_pretrained(backbone, path_or_url):
    """Load ImageNet weights (torchvision or OpenMMLab names) into ``backbone``.

    A URL goes through torch.hub's cache. The classifier (``fc.*``) is not part of the backbone and is
    dropped; any other unknown or missing key is an error that names it.
    """
    state = load_file(path_or_url)
    state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    state = {k[len("backbone.") :] if k.startswith("backbone.") else k: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = backbone.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise KeyError(f"{path_or_url}: backbone keys missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in state.items():
        if v.shape != own[k].shape:
            expected = tuple(own[k].shape)
            raise ValueError(f"{path_or_url}: {k} has shape {tuple(v.shape)}, the backbone expects {expected}")
    backbone.load_state_dict(state, strict=False)
