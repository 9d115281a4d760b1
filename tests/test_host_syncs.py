"""The training step's host-device synchronisations: exactly the listed ones (docs/gpu.md), counted on the
CPU by tests/host_syncs.py along the code path a GPU takes (tests/simulated_gpu.py), and on a GPU by
CUDA's own sync debug mode."""
import warnings

import pytest
import torch

from scnet.config import get_cfg
from scnet.engine.train import train_step

from conftest import synthetic_sample, tiny_model
from host_syncs import record_host_syncs
from simulated_gpu import simulated_gpu

# (kind, file, function) -> calls in one step of tiny SCNet on two images: each is listed with its
# reason in docs/gpu.md. A synchronisation added to the step fails this test: remove it, or list it there
# and here.
EXPECTED = {
    ("tolist", "engine/train.py", "train_step"): 1,  # the loss values: the log, the non-finite guard
    ("item", "modeling/detector.py", "_check_target"): 8,  # on the loader's CPU tensors: none on a GPU
    ("nonzero", "modeling/rpn.py", "select_proposals"): 2,  # per image: empty boxes dropped
    ("nms", "ops/boxes.py", "_batched_nms"): 2,  # per image: the RPN's NMS
    ("nonzero", "modeling/rpn.py", "loss"): 2,  # per image: anchors inside the image
    ("nonzero", "modeling/sampling.py", "sample_positive_negative"): 16,  # per image, RPN + 3 stages: 2
    ("tolist", "modeling/poolers.py", "forward"): 4,  # per pooling: RoIs per level
    ("boolean-mask index", "modeling/roi_heads/base.py", "_refine"): 6,  # per image and stage: GT rows dropped
}
HOST_SIDE = {("item", "modeling/detector.py", "_check_target")}  # CPU tensors: no synchronisation on a GPU


def _step_setup(device):
    model = tiny_model(device=device).train()
    samples = [synthetic_sample(157, 203, 3, seed=1), synthetic_sample(129, 171, 2, seed=2)]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    args = (model, optimizer, scaler, [s[0] for s in samples], [s[1] for s in samples], get_cfg(None).solver, device)
    train_step(*args)  # first step outside: lazy initialisation is not the step
    return args


def test_training_step_synchronises_only_where_listed():
    """Counted along the GPU's code path (torchvision's RoIAlign, ...) on the simulated GPU."""
    with simulated_gpu() as gpu:
        args = _step_setup(gpu.device)
        warm_up = gpu.calls["torchvision.roi_align.default"]
        with record_host_syncs() as counts:
            train_step(*args)
    assert gpu.calls["torchvision.roi_align.default"] > warm_up
    assert dict(counts) == EXPECTED


def test_the_instrument_sees_each_kind_of_synchronisation():
    """The instrument itself: each way of reading a device value is counted (else the test above
    could pass by seeing nothing)."""
    from host_syncs import _site

    x = torch.arange(6.0)
    with record_host_syncs() as counts:
        x.sum().item(), float(x[0]), bool(x[1] > 0), x.tolist(), x.cpu(), x.numpy()
        x.nonzero(), x[x > 2], x.unique(), x.repeat_interleave(torch.tensor([1] * 6)), torch.bincount(x.long())
        x.repeat_interleave(torch.tensor([1] * 6), output_size=6)  # not one: the size is given
    assert _site() is None  # outside the package: attributed to "(outside scnet)"
    kinds = sorted(kind for kind, _, _ in counts)
    assert kinds == sorted(["item", "tolist", "cpu", "numpy", "nonzero", "boolean-mask index", "unique",
                            "repeat_interleave", "bincount"]), counts
    assert counts[("item", "(outside scnet)", "")] == 3


def test_training_step_synchronises_on_a_gpu_only_where_listed(cuda):
    """CUDA's own count (torch.cuda.set_sync_debug_mode) of the step: at most the listed ones."""
    args = _step_setup(cuda)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_step(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    expected = sum(n for site, n in EXPECTED.items() if site not in HOST_SIDE)
    assert len(syncs) <= expected, "\n".join(syncs)
