"""SC-ResNet backbones (self-calibrated convolutions, Liu et al. CVPR 2020): parameter counts, names, shapes.

The reference for names, shapes and counts is the official ``scnet.py`` of MCG-NKU/SCNet (formerly
backseason/SCNet) at commit 9f28392c3f92276e9d31b7d161fa4512c7aaea10, read with the code search tools
and re-derived by hand below (``official_shapes``), independently of our modules.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from scnet.modeling.backbone.resnet import FrozenBatchNorm2d, load_pretrained
from scnet.modeling.backbone.sc_resnet import SCConv, SCResNet


class SCResNetClassifier(SCResNet):
    """The official ImageNet classifier: SC-ResNet + global average pool + ``fc`` (2048 -> classes).

    Its state dict has the official checkpoint's keys one for one (backbone keys at the top level, plus
    ``fc.weight`` / ``fc.bias``); used to count the parameters reported in the official README
    (SC-ResNet-50 25.56M, -50-v1d 25.58M, -101 44.57M). Nothing is frozen. ``(N, 3, H, W) -> (N, classes)``.
    """

    def __init__(self, depth=50, deep_stem=False, avg_down=False, num_classes=1000, base_channels=64):
        super().__init__(depth, deep_stem, avg_down, base_channels, frozen_stages=-1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.out_channels[-1], num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(super().forward(x)[-1]), 1))


# name -> (SCResNet kwargs, parameters with the 1000-class fc, backbone-only parameters, README figure)
VARIANTS = {
    "sc_resnet50": (dict(depth=50), 25_564_584, 23_515_584, "25.56M"),
    "sc_resnet50_v1d": (dict(depth=50, deep_stem=True, avg_down=True), 25_583_816, 23_534_816, "25.58M"),
    "sc_resnet101": (dict(depth=101), 44_565_416, 42_516_416, "44.57M"),
}
FC_PARAMS = 2048 * 1000 + 1000


def official_shapes(depth, deep_stem=False, avg_down=False, num_classes=1000):
    """Every state-dict key -> shape of the official classifier, written from its layer definitions.

    ``SCNet.__init__``: 7x7 ``conv1`` (3 -> 64) or, with deep_stem and stem_width=32,
    ``conv1 = Sequential(conv 3->32 s2, BN, ReLU, conv 32->32, BN, ReLU, conv 32->64)``, ``bn1`` (64);
    ``_make_layer``: every stage's first block gets ``downsample = Sequential([AvgPool,] conv1x1, BN)``;
    ``SCBottleneck``: group_width = int(planes * 32 / 64), conv1_a/bn1_a, conv1_b/bn1_b,
    k1 = Sequential(conv3x3, BN), scconv = SCConv(k2 = Sequential(AvgPool, conv3x3, BN),
    k3 = Sequential(conv3x3, BN), k4 = Sequential(conv3x3, BN)), conv3 (2 * gw -> 4 * planes), bn3;
    ``fc = Linear(2048, num_classes)``.
    """
    shapes = {}

    def conv(name, c_out, c_in, k):
        shapes[f"{name}.weight"] = (c_out, c_in, k, k)

    def bn(name, c):
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{suffix}"] = (c,)
        shapes[f"{name}.num_batches_tracked"] = ()

    if deep_stem:
        conv("conv1.0", 32, 3, 3), bn("conv1.1", 32), conv("conv1.3", 32, 32, 3), bn("conv1.4", 32)
        conv("conv1.6", 64, 32, 3)
    else:
        conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    inplanes = 64
    blocks_per_stage = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    for stage, (planes, num_blocks) in enumerate(zip((64, 128, 256, 512), blocks_per_stage)):
        for b in range(num_blocks):
            p = f"layer{stage + 1}.{b}"
            gw = int(planes * (32 / 64.0))
            conv(f"{p}.conv1_a", gw, inplanes, 1), bn(f"{p}.bn1_a", gw)
            conv(f"{p}.conv1_b", gw, inplanes, 1), bn(f"{p}.bn1_b", gw)
            conv(f"{p}.k1.0", gw, gw, 3), bn(f"{p}.k1.1", gw)
            conv(f"{p}.scconv.k2.1", gw, gw, 3), bn(f"{p}.scconv.k2.2", gw)
            conv(f"{p}.scconv.k3.0", gw, gw, 3), bn(f"{p}.scconv.k3.1", gw)
            conv(f"{p}.scconv.k4.0", gw, gw, 3), bn(f"{p}.scconv.k4.1", gw)
            conv(f"{p}.conv3", planes * 4, gw * 2, 1), bn(f"{p}.bn3", planes * 4)
            if b == 0:  # stride != 1 or inplanes != planes * 4: true for every stage's first block
                i = 1 if avg_down else 0  # the AvgPool2d takes index 0 with avg_down
                conv(f"{p}.downsample.{i}", planes * 4, inplanes, 1), bn(f"{p}.downsample.{i + 1}", planes * 4)
            inplanes = planes * 4
    shapes["fc.weight"] = (num_classes, 2048)
    shapes["fc.bias"] = (num_classes,)
    return shapes


def _num_parameters(shapes):
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    return sum(math.prod(s) for k, s in shapes.items() if not k.endswith(buffers))


def _count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parameter_counts_match_the_official_models(name):
    kwargs, with_fc, backbone_only, readme = VARIANTS[name]
    classifier = SCResNetClassifier(**kwargs)
    backbone = SCResNet(**kwargs)
    print(f"{name}: {_count(classifier)} with fc, {_count(backbone)} backbone only")
    assert _count(classifier) == with_fc == _num_parameters(official_shapes(**kwargs))
    assert _count(backbone) == backbone_only == with_fc - FC_PARAMS
    assert f"{with_fc / 1e6:.2f}M" == readme  # official README table, "#Params"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_state_dict_has_the_official_keys_and_shapes(name):
    kwargs = VARIANTS[name][0]
    ours = {k: tuple(v.shape) for k, v in SCResNetClassifier(**kwargs).state_dict().items()}
    assert ours == official_shapes(**kwargs)
    assert list(ours) == list(official_shapes(**kwargs))  # same registration order as well


def test_first_bottleneck_keys_literally_as_in_the_official_file():
    """layer1.0 of SC-ResNet-50 and the v1d stem / shortcut, spelled out by hand from scnet.py."""
    state = SCResNet(50).state_dict()
    expected = {
        "layer1.0.conv1_a.weight": (32, 64, 1, 1),
        "layer1.0.bn1_a.running_var": (32,),
        "layer1.0.conv1_b.weight": (32, 64, 1, 1),
        "layer1.0.bn1_b.weight": (32,),
        "layer1.0.k1.0.weight": (32, 32, 3, 3),
        "layer1.0.k1.1.bias": (32,),
        "layer1.0.scconv.k2.1.weight": (32, 32, 3, 3),
        "layer1.0.scconv.k2.2.running_mean": (32,),
        "layer1.0.scconv.k3.0.weight": (32, 32, 3, 3),
        "layer1.0.scconv.k3.1.weight": (32,),
        "layer1.0.scconv.k4.0.weight": (32, 32, 3, 3),
        "layer1.0.scconv.k4.1.bias": (32,),
        "layer1.0.conv3.weight": (256, 64, 1, 1),
        "layer1.0.bn3.weight": (256,),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.0.downsample.1.running_var": (256,),
        "layer4.2.scconv.k4.0.weight": (256, 256, 3, 3),
    }
    assert {k: tuple(state[k].shape) for k in expected} == expected
    v1d = SCResNet(50, deep_stem=True, avg_down=True).state_dict()
    expected_v1d = {
        "conv1.0.weight": (32, 3, 3, 3),
        "conv1.1.weight": (32,),
        "conv1.3.weight": (32, 32, 3, 3),
        "conv1.4.running_var": (32,),
        "conv1.6.weight": (64, 32, 3, 3),
        "bn1.weight": (64,),
        "layer1.0.downsample.1.weight": (256, 64, 1, 1),
        "layer2.0.downsample.1.weight": (512, 256, 1, 1),
        "layer2.0.downsample.2.bias": (512,),
    }
    assert {k: tuple(v1d[k].shape) for k in expected_v1d} == expected_v1d
    assert "layer1.0.downsample.0.weight" not in v1d  # index 0 is the (parameter-free) AvgPool2d


def _synthetic_official_checkpoint(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(100, dtype=torch.long)
        elif k.endswith("running_var"):
            state[k] = torch.rand(shape, generator=g) + 0.5
        else:
            state[k] = torch.randn(shape, generator=g) * 0.05
    return state


@pytest.mark.parametrize("name", ["sc_resnet50", "sc_resnet50_v1d"])
def test_official_checkpoint_loads_with_load_pretrained(tmp_path, name):
    kwargs = VARIANTS[name][0]
    state = _synthetic_official_checkpoint(official_shapes(**kwargs), seed=1)
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)  # the official files are plain state dicts, fc.* included
    backbone = SCResNet(**kwargs)
    load_pretrained(backbone, str(path))
    own = backbone.state_dict()
    assert set(own) == set(state) - {"fc.weight", "fc.bias"}
    for k, v in own.items():  # every tensor, buffers included, arrives unchanged
        assert torch.equal(v, state[k]), k
    assert backbone.layer2[0].bn3.weight.requires_grad and not backbone.layer1[0].bn3.weight.requires_grad


def test_checkpoint_of_another_variant_is_an_error(tmp_path):
    path = tmp_path / "v1d.pth"
    torch.save(_synthetic_official_checkpoint(official_shapes(50, True, True), seed=2), path)
    with pytest.raises(KeyError, match="conv1"):
        load_pretrained(SCResNet(50), str(path))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_output_shapes_and_strides(name):
    kwargs = VARIANTS[name][0]
    backbone = SCResNet(**kwargs).eval()
    assert backbone.out_channels == [256, 512, 1024, 2048]
    with torch.no_grad():
        outs = backbone(torch.randn(2, 3, 96, 128))
        odd = backbone(torch.randn(1, 3, 97, 131))  # ceil(size / stride) in every branch, shortcut included
    strides = (4, 8, 16, 32)
    assert [tuple(o.shape) for o in outs] == [(2, c, 96 // s, 128 // s) for c, s in zip(backbone.out_channels, strides)]
    assert [tuple(o.shape[-2:]) for o in odd] == [(25, 33), (13, 17), (7, 9), (4, 5)]


def test_frozen_stages_freeze_the_stem_and_the_first_stages():
    for kwargs in (dict(), dict(deep_stem=True, avg_down=True)):
        for frozen_stages in (-1, 0, 1, 2, 4):
            backbone = SCResNet(50, base_channels=8, frozen_stages=frozen_stages, **kwargs)
            for name, p in backbone.named_parameters():
                stage = 0 if name.startswith(("conv1", "bn1")) else int(name[len("layer")])
                assert p.requires_grad == (stage > frozen_stages), (frozen_stages, name)
    backbone = SCResNet(50, base_channels=8)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    # stem, 7 per block, 4 shortcuts
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules()) == 1 + 16 * 7 + 4


def test_scconv_is_the_self_calibration_of_the_paper():
    """k4(k3(x) * sigmoid(x + Up(k2(AvgPool_4(x))))), Up nearest as in the official code; written
    out with functional ops from the module's weights."""
    torch.manual_seed(0)
    sc = SCConv(6, stride=2)
    for m in sc.modules():
        if isinstance(m, FrozenBatchNorm2d):  # non-trivial frozen statistics
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 6, 13, 18)

    def conv_bn(seq, y, stride=1):
        conv, norm = [m for m in seq if not isinstance(m, nn.AvgPool2d)]
        y = F.conv2d(y, conv.weight, stride=stride, padding=1)
        return F.batch_norm(y, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)

    small = conv_bn(sc.k2, F.avg_pool2d(x, 4))  # (2, 6, 3, 4)
    rows = torch.tensor([i * 3 // 13 for i in range(13)])  # nearest: source index floor(i * in / out)
    cols = torch.tensor([j * 4 // 18 for j in range(18)])
    gate = torch.sigmoid(x + small[:, :, rows][:, :, :, cols])
    expected = conv_bn(sc.k4, conv_bn(sc.k3, x) * gate, stride=2)
    torch.testing.assert_close(sc(x), expected)
    # a side shorter than r (the official code raises there) is pooled whole: 3x9 -> 1x2
    x = torch.randn(1, 6, 3, 9)
    small = conv_bn(sc.k2, F.avg_pool2d(x, (3, 4)))  # (1, 6, 1, 2)
    gate = torch.sigmoid(x + small[:, :, [0, 0, 0]][:, :, :, [j * 2 // 9 for j in range(9)]])
    torch.testing.assert_close(sc(x), conv_bn(sc.k4, conv_bn(sc.k3, x) * gate, stride=2))


def test_forward_backward_trains_only_the_unfrozen_parameters():
    torch.manual_seed(0)
    for kwargs in (dict(), dict(deep_stem=True, avg_down=True)):
        backbone = SCResNet(50, base_channels=8, frozen_stages=1, **kwargs).train()
        outs = backbone(torch.randn(2, 3, 64, 96))
        sum(o.square().mean() for o in outs).backward()
        for name, p in backbone.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
            else:
                assert p.grad is None, name
        # frozen BN statistics stay as they are in train mode
        assert torch.equal(backbone.layer3[0].scconv.k2[2].running_mean, torch.zeros(16))


def test_conv_weights_are_exactly_resnet50s():
    """k1..k4 split the ResNet 3x3 filter in four (Fig. 2): only the extra norms (2 * planes a block) differ."""
    import torchvision

    resnet50 = sum(p.numel() for p in torchvision.models.resnet50(weights=None).parameters())
    extra_norms = sum(2 * planes * n for planes, n in zip((64, 128, 256, 512), (3, 4, 6, 3)))
    assert VARIANTS["sc_resnet50"][1] == resnet50 + extra_norms == 25_557_032 + 7_552
