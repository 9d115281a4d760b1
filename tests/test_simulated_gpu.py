"""The code's GPU paths on the CPU (tests/simulated_gpu.py): each architecture's inference and training
step, evaluation over a dataset and test-time augmentation, under the device rules a GPU enforces, with
the CPU's results. What a real GPU adds (its kernels, mixed precision, NCCL) is in tests/test_device.py."""
import glob
import os

import pytest
import torch

import scnet
from scnet.config import get_cfg
from scnet.data.coco import CocoDataset
from scnet.data.synthetic import make_synthetic_coco
from scnet.engine.evaluate import inference_on_dataset, input_shape_key
from scnet.engine.train import train_step
from scnet.modeling.tta import TestTimeAugmentation

from conftest import ROOT, tiny_model, tiny_overrides
from host_syncs import record_host_syncs
from simulated_gpu import DeviceMismatch, simulated_gpu

# the architectures, a config each (the zoo's configs combine their modules): 2-4 s each here;
# SCNET_SIMULATED_GPU_ALL=1 runs every config under configs/ (docs/gpu.md)
ARCHS = ["configs/r50_20e.yaml", "configs/baselines/htc_r50_1x.yaml", "configs/baselines/mask_rcnn_r50_1x.yaml",
         "configs/baselines/cascade_mask_rcnn_semantic_r50_1x.yaml", "configs/baselines/ms_rcnn_r50_1x.yaml",
         "configs/panet/panet_scnet_r50_20e.yaml", "configs/sc_resnet/scnet_sc_r50_20e.yaml"]
if os.environ.get("SCNET_SIMULATED_GPU_ALL") == "1":
    ARCHS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"),
                                                                  recursive=True))
CPU = torch.device("cpu")


def test_the_simulated_gpu_enforces_the_device_rules():
    originals = (torch.tensor, torch.as_tensor, torch.autocast, torch.Tensor.tolist, torch.Tensor.numpy)
    with simulated_gpu() as gpu:
        x = torch.arange(6.0, device=gpu.device)
        cpu = torch.ones(6)
        for mixed in (lambda: x + cpu, lambda: torch.cat([x, cpu]), lambda: torch.where(x > 2, x, cpu),
                      lambda: torch.stack([x[0], torch.tensor(1.0)]), lambda: cpu[torch.tensor([1], device=gpu.device)],
                      lambda: x.index_put_((torch.tensor([0]),), cpu[:1]), lambda: torch.tensor(1.0).add_(x[0])):
            with pytest.raises(DeviceMismatch):
                mixed()
        # what a GPU accepts: CPU scalars, CPU indices, copies both ways
        y = x * torch.tensor(2.0) + 1
        assert x.clone().index_fill_(0, torch.tensor([0], device=gpu.device), torch.tensor(7.0)).tolist()[0] == 7.0
        assert y.device == gpu.device and y[torch.tensor([0, 5])].tolist() == [1.0, 11.0]
        assert torch.equal(x.cpu(), torch.arange(6.0)) and x.sum().item() == 15.0
        assert torch.equal(cpu.to(gpu.device).cpu(), cpu)
        made = [torch.tensor([1.0, 2.0], device=gpu.device), x.new_tensor([1.0, 2.0]),
                torch.as_tensor([1.0, 2.0], device=gpu.device)]
        assert all(t.device == gpu.device and t.tolist() == [1.0, 2.0] for t in made)
        leaf = torch.ones(2, device=gpu.device, requires_grad=True)
        assert torch.as_tensor(leaf, device=gpu.device) is leaf and leaf.requires_grad
        assert torch.as_tensor([1, 2]).device == CPU and torch.tensor([1.0], requires_grad=True).requires_grad
        with pytest.raises(TypeError, match="numpy"):
            x.numpy()  # as on a GPU: .cpu() first
        w = torch.ones(3, device=gpu.device, requires_grad=True)
        (w * x[:3]).sum().backward()
        assert w.grad.device == gpu.device and w.grad.tolist() == [0.0, 1.0, 2.0]
        with pytest.raises(NotImplementedError, match="mixed precision"):
            torch.autocast(gpu.device.type, dtype=torch.bfloat16)
    assert (torch.tensor, torch.as_tensor, torch.autocast, torch.Tensor.tolist, torch.Tensor.numpy) == originals
    with pytest.raises(DeviceMismatch), simulated_gpu() as gpu:  # undone after an error too
        torch.ones(2, device=gpu.device) + torch.ones(2)
    assert (torch.tensor, torch.as_tensor, torch.autocast, torch.Tensor.tolist, torch.Tensor.numpy) == originals


def test_an_outer_instrument_keeps_seeing_reads_and_resizes_are_refused():
    """tolist() inside the block reaches the wrapper an outer instrument installed before it; an op that
    resizes its output in place (out= of another shape) is refused rather than followed wrongly."""
    with record_host_syncs() as counts, simulated_gpu() as gpu:
        assert torch.ones(2, device=gpu.device).tolist() == [1.0, 1.0]
        with pytest.raises(NotImplementedError, match="resizes"):
            torch.cat([torch.ones(2, device=gpu.device)] * 2, out=torch.empty(0, device=gpu.device))
    assert [kind for kind, _, _ in counts] == ["tolist"]


class _Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)
        self.scale = torch.full((2,), 3.0)  # a plain attribute, not a buffer: .to(device) leaves it behind

    def forward(self, x):
        return self.linear(x) * self.scale


def test_a_tensor_that_to_device_leaves_behind_is_caught():
    """The bug a first GPU run finds: works on the CPU, fails on the simulated GPU."""
    _Scaled()(torch.ones(1, 4))
    with simulated_gpu() as gpu:
        module = _Scaled().to(gpu.device)
        with pytest.raises(DeviceMismatch, match=r"\(1, 2\) on meta, \(2,\) on cpu"):
            module(torch.ones(1, 4, device=gpu.device))


def _build(config, device):
    path = os.path.join(ROOT, config)
    torch.manual_seed(0)
    return scnet.build_model(get_cfg(path, tiny_overrides(path, "model.test.score_thresh=0.05"))).to(device)


def _detect_then_train(config, device, samples):
    """The detections of a tiny model, then one training step: (detections, losses, weights after)."""
    model = _build(config, device).eval()
    with torch.no_grad():
        detections = [{k: v.cpu() for k, v in r.items()} for r in model(samples[0])]
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    torch.manual_seed(3)
    losses, finite = train_step(model, optimizer, scaler, *samples, get_cfg(os.path.join(ROOT, config)).solver,
                                device)
    assert finite
    return detections, losses, [p.detach().cpu() for p in model.parameters()]


def _assert_same_detections(result, expected):
    """test_device.py's tolerances: torchvision's RoIAlign here, ours on the CPU."""
    assert result["boxes"].shape[0] == expected["boxes"].shape[0] > 0
    assert torch.equal(result["labels"], expected["labels"])
    torch.testing.assert_close(result["boxes"], expected["boxes"], rtol=0, atol=1e-3)
    torch.testing.assert_close(result["scores"], expected["scores"], rtol=0, atol=1e-4)
    assert (result["masks"] != expected["masks"]).float().mean() < 1e-3


@pytest.mark.parametrize("config", ARCHS)
def test_architecture_on_the_simulated_gpu(config, two_samples):
    """Detections, losses and the weights after one SGD step equal the CPU's; torchvision's RoIAlign
    (forward and backward) ran, as on a GPU."""
    expected = _detect_then_train(config, CPU, two_samples)
    with simulated_gpu() as gpu:
        detections, losses, weights = _detect_then_train(config, gpu.device, two_samples)
    assert gpu.calls["torchvision.roi_align.default"] > 0 and gpu.calls["torchvision._roi_align_backward.default"] > 0
    for result, reference in zip(detections, expected[0]):
        _assert_same_detections(result, reference)
    assert losses == pytest.approx(expected[1], rel=1e-4, abs=1e-6)
    for weight, reference in zip(weights, expected[2]):
        torch.testing.assert_close(weight, reference, rtol=0, atol=1e-5)


def test_evaluation_and_tta_on_the_simulated_gpu(tmp_path):
    """inference_on_dataset in batches of 2, plain and with flipped TTA: the CPU's COCO results."""
    ann = make_synthetic_coco(str(tmp_path), 3, seed=4, split_name="val")
    dataset = CocoDataset(ann, str(tmp_path / "val"), semantic_source="none", training=False)

    def evaluate(device):
        model = tiny_model("model.test.score_thresh=0.05", device=device).eval()
        tta = TestTimeAugmentation(model, scales=[(192, 256)], flip=True)
        key = input_shape_key(model.test_scale, model.size_divisibility, dataset.image_sizes)
        with torch.no_grad():
            return [inference_on_dataset(predict, dataset, dataset.category_ids, progress=False, batch_size=2,
                                         batch_key=key)[0]
                    for predict in (model, lambda images: [tta(image) for image in images])]

    expected = evaluate(CPU)
    with simulated_gpu() as gpu:
        found = evaluate(gpu.device)
    assert gpu.calls["torchvision.roi_align.default"] > 0
    for results, reference in zip(found, expected):
        assert len(results) == len(reference) > 0
        for r, e in zip(results, reference):
            assert (r["image_id"], r["category_id"]) == (e["image_id"], e["category_id"])
            assert r["bbox"] == pytest.approx(e["bbox"], abs=1e-3) and r["score"] == pytest.approx(e["score"], abs=1e-4)
        same_masks = sum(r["segmentation"] == e["segmentation"] for r, e in zip(results, reference))
        assert same_masks >= 0.95 * len(results)
