"""What only a device run can show: the same detections on the device as on the CPU, mixed-precision
training steps, weights trained on a GPU loading on a CPU machine, a one-process NCCL run, evaluation.

On the CPU (the default ``--device cpu``) the first three run as well and compare the CPU with itself
through the same code; the NCCL run and the evaluation on a GPU skip (``pytest --device cuda``)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import scnet
from scnet.config import get_cfg
from scnet.data.synthetic import make_synthetic_coco
from scnet.engine.train import train_step
from scnet.utils.files import save_file

from conftest import ROOT, TINY, synthetic_sample, tiny_model, tiny_overrides

ARCHS = ["configs/r50_20e.yaml", "configs/baselines/htc_r50_1x.yaml", "configs/baselines/mask_rcnn_r50_1x.yaml",
         "configs/baselines/cascade_mask_rcnn_r50_1x.yaml", "configs/baselines/ms_rcnn_r50_1x.yaml"]


def _tiny(config, device, seed=0):
    path = os.path.join(ROOT, config)
    torch.manual_seed(seed)
    return scnet.build_model(get_cfg(path, tiny_overrides(path, "model.test.score_thresh=0.05"))).to(device).eval()


@pytest.mark.parametrize("config", ARCHS)
def test_detections_on_the_device_equal_those_on_the_cpu(config, device):
    """The same weights on both: the same labels, boxes within 1e-3 px, scores within 1e-4 and masks
    within a few pixels (those whose probability sits on the 0.5 threshold)."""
    cpu_model = _tiny(config, "cpu")
    model = _tiny(config, device)
    images = [synthetic_sample(157, 203, 3, seed=1)[0], synthetic_sample(129, 171, 2, seed=2)[0]]
    for expected, result in zip(cpu_model(images), model(images)):
        result = {k: v.cpu() for k, v in result.items()}
        assert result["boxes"].shape[0] == expected["boxes"].shape[0] > 0
        assert torch.equal(result["labels"], expected["labels"])
        torch.testing.assert_close(result["boxes"], expected["boxes"], rtol=0, atol=1e-3)
        torch.testing.assert_close(result["scores"], expected["scores"], rtol=0, atol=1e-4)
        assert (result["masks"] != expected["masks"]).float().mean() < 1e-3


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_training_steps(amp, device, two_samples):
    """Autocast steps: finite losses near the float32 ones, float32 master weights that move; fp16 with
    its gradient scaler."""
    solver = get_cfg(None, [f"solver.amp={amp}"]).solver
    images, targets = two_samples
    losses = {}
    for precision in ("", amp):
        model = tiny_model(device=device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        before = [p.detach().clone() for p in model.parameters()]
        torch.manual_seed(3)
        solver.amp = precision
        losses[precision], finite = train_step(model, optimizer, scaler, images, targets, solver, device)
        assert finite
        assert all(p.dtype == torch.float32 for p in model.parameters())
        moved = [not torch.equal(b, p) for b, p in zip(before, model.parameters()) if p.requires_grad]
        assert sum(moved) > 0.9 * len(moved)
    # the RPN's and semantic losses see the same anchors, samples and targets: close to float32; the box
    # stages' proposals come out of a top-k and NMS on lower-precision scores, so their losses may not
    for name in ("loss_rpn_cls", "loss_rpn_box", "loss_semantic", "loss_global_context"):
        assert losses[amp][name] == pytest.approx(losses[""][name], rel=0.05, abs=1e-3), name


def test_weights_trained_on_the_device_load_on_the_cpu(device, two_samples, tmp_path):
    """A checkpoint written by a device run (the training loop's save_file) and model_final-style weights
    load on a machine without that device, and give that run's detections there."""
    model = tiny_model("model.test.score_thresh=0.05", device=device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    train_step(model, optimizer, scaler, *two_samples, get_cfg(None).solver, device)
    path = str(tmp_path / "model_final.pth")
    save_file({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    loaded = scnet.build_model(None, weights=path, overrides=TINY + ["model.test.score_thresh=0.05"]).eval()
    assert all(p.device.type == "cpu" for p in loaded.state_dict().values())
    image = two_samples[0][0]
    expected = model.eval()([image])[0]
    result = loaded([image])[0]
    assert result["boxes"].shape[0] == expected["boxes"].shape[0] > 0
    torch.testing.assert_close(result["boxes"], expected["boxes"].cpu(), rtol=0, atol=1e-3)
    torch.testing.assert_close(result["scores"], expected["scores"].cpu(), rtol=0, atol=1e-4)


def _coco(tmp_path, split):
    root = tmp_path / "data"
    make_synthetic_coco(str(root), num_images=6, seed=0, split_name=split)
    return root, [f"data.root={root}", f"data.{split}_annotations=annotations/instances_{split}.json",
                  f"data.{split}_images={split}", "data.num_workers=0"]


def test_one_process_nccl_training_run(cuda, tmp_path):
    """scripts/train.py under torchrun on one GPU: NCCL, CUDA memory logged, weights written."""
    root, data = _coco(tmp_path, "train")
    overrides = TINY + data + ["data.train_stuff_maps=stuffthingmaps/train", "model.semantic.num_classes=183",
                               "model.input.train_scale=[160,128]", "solver.max_iters=4", "train.log_period=1",
                               "train.eval_period=0"]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           os.path.join(ROOT, "scripts", "train.py"), "--output-dir", str(out), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "log.jsonl") as f:
        log = [json.loads(line) for line in f]
    assert [r["iteration"] for r in log if "iteration" in r][-1] == 4
    assert all(r["max_mem_mb"] > 0 for r in log if "max_mem_mb" in r)  # only CUDA reports memory
    assert os.path.exists(out / "model_final.pth")


def test_evaluation_on_the_gpu_equals_the_cpu(cuda, tmp_path):
    """scripts/eval.py on the GPU and on the CPU (CUDA hidden): the same metrics to 1e-3 AP."""
    root, data = _coco(tmp_path, "val")
    weights = str(tmp_path / "tiny.pth")
    save_file({"model": tiny_model(seed=0).state_dict()}, weights)
    summaries = []
    for hide in (False, True):
        env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if hide else {}))
        cmd = [sys.executable, os.path.join(ROOT, "scripts", "eval.py"), "--weights", weights,
               "--output-dir", str(tmp_path / f"out{hide}"), *TINY, *data]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summaries.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    for key, value in summaries[1].items():
        if isinstance(value, float):
            assert summaries[0][key] == pytest.approx(value, abs=1e-3), key
