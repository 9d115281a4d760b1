"""Shared test helpers: a tiny SCNet configuration and synthetic images with targets."""
import os

import numpy as np
import pytest
import torch

import scnet
from scnet.config import get_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")

def pytest_addoption(parser):
    parser.addoption(
        "--device", default="cpu",
        help="where the tests that take the `device` fixture compute (cpu, cuda, cuda:1). With a device "
        "other than the CPU only those tests run (the others would repeat the CPU run); without that "
        "device on the machine they skip, saying so.",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--device") == "cpu":
        return
    deselected = [item for item in items if "device" not in item.fixturenames]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if "device" in item.fixturenames]


@pytest.fixture(scope="session")
def device(request):
    """The device of ``--device``. On CUDA, TF32 is switched off: the tests compare float32 results."""
    name = request.config.getoption("--device")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count():
            pytest.skip(f"--device {name}: this machine has no such CUDA device")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    elif device.type != "cpu":
        pytest.skip(f"--device {name}: the tests know CPU and CUDA devices")
    return device


@pytest.fixture
def cuda(device):
    """The device, for tests that only mean something on a GPU (NCCL, moving weights between devices)."""
    if device.type != "cuda":
        pytest.skip("needs a GPU: run with --device cuda")
    return device


# Narrow widths and small proposal counts: the real code paths, in a fraction of a second per step.
TINY = [
    "model.backbone.base_channels=8",
    "model.fpn.out_channels=16",
    "model.rpn.head_channels=16",
    "model.roi_heads.fc_dim=32",
    "model.mask_head.num_convs=4",
    "model.num_classes=3",
    "model.semantic.num_classes=6",
    "model.roi_heads.batch_size_per_image=64",
    "model.rpn.pre_nms_top_n_train=300",
    "model.rpn.post_nms_top_n_train=300",
    "model.rpn.pre_nms_top_n_test=200",
    "model.rpn.post_nms_top_n_test=200",
    "model.input.test_scale=[256,192]",
]


def _has_key(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        if not hasattr(node, part):
            return False
        node = getattr(node, part)
    return True


def tiny_overrides(path=None, *extra):
    """TINY (the options the config's architecture has) + ``extra``: the config at tiny widths."""
    cfg = get_cfg(path, [o for o in extra if o.startswith("model.arch=")])
    return [o for o in TINY if _has_key(cfg, o.split("=", 1)[0])] + list(extra)


def tiny_model(*overrides, seed=0, device="cpu"):
    torch.manual_seed(seed)
    return scnet.build_model(None, overrides=TINY + list(overrides)).to(device)


def synthetic_sample(height, width, num_objects, seed, num_classes=3, stuff_classes=6):
    """A uint8 (3, H, W) image with filled rectangles and ellipses and its target dict.

    The stuff map labels the background with two "stuff" ids by image half and each object with
    its class id (offset by 3), 255 on a thin unlabeled strip, as COCO-stuff maps do.
    """
    rng = np.random.RandomState(seed)
    image = (rng.rand(3, height, width) * 60 + 40).astype(np.float32)
    semantic = np.zeros((height, width), np.uint8)
    semantic[:, width // 2 :] = 1
    semantic[:2] = 255
    boxes, labels, masks = [], [], []
    yy, xx = np.mgrid[:height, :width]
    for _ in range(num_objects):
        w, h = rng.randint(width // 5, width // 2), rng.randint(height // 5, height // 2)
        x0, y0 = rng.randint(0, width - w), rng.randint(0, height - h)
        label = rng.randint(num_classes)
        if label % 2 == 0:
            mask = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
        else:
            mask = ((xx + 0.5 - x0 - w / 2) / (w / 2)) ** 2 + ((yy + 0.5 - y0 - h / 2) / (h / 2)) ** 2 <= 1
        color = np.array([200, 60, 60]) if label == 0 else np.array([60, 200, 60]) if label == 1 else np.array([60, 60, 220])
        image[:, mask] = color[:, None]
        semantic[mask] = 3 + label % (stuff_classes - 3)
        ys, xs = np.nonzero(mask)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        labels.append(label)
        masks.append(mask)
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": torch.from_numpy(np.array(masks, dtype=np.uint8).reshape(-1, height, width)),
        "semantic_seg": torch.from_numpy(semantic),
    }
    return torch.from_numpy(image.round().clip(0, 255).astype(np.uint8)), target


def shapes_dataset(folder, num_train, num_val):
    """A generated COCO-format dataset with train and val splits (stuff maps included) in ``folder``."""
    from scnet.data.synthetic import make_synthetic_coco

    make_synthetic_coco(str(folder), num_images=num_train, seed=0, split_name="train")
    make_synthetic_coco(str(folder), num_images=num_val, seed=1, split_name="val")
    return str(folder)


@pytest.fixture
def two_samples():
    """Two images of different odd sizes; the second has no annotations."""
    image1, target1 = synthetic_sample(157, 203, 3, seed=1)
    image2, target2 = synthetic_sample(129, 171, 0, seed=2)
    return [image1, image2], [target1, target2]
