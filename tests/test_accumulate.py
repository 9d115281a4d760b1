"""Gradient accumulation (solver.accumulate_steps, scnet/engine/train.py): what "the same update as a
k-times larger batch" means, tested with the random RoI/anchor sampling made deterministic.

Each micro-batch keeps its own loss normalisers, as each GPU of the official multi-GPU run does:
- k accumulated micro-batches on w processes = k x w processes of one micro-batch each (the official
  large batch): every parameter equal, with a real two-process DDP (gloo) run, which also checks that
  only the last micro-batch all-reduces gradients;
- one process, batch 4 against 2 accumulated micro-batches of 2: equal wherever a loss is normalised
  by a fixed number per image (sampled anchors, sampled RoIs, all pixels). Two official normalisers
  count something of the whole batch: the mask loss (a mean over the batch's positive RoIs) and the
  semantic loss (a mean over its labelled pixels, mmdet 2.x); here the first is weighted 0 and the second
  uses the mean over all pixels (mmdet 3.x, model.semantic.loss_normalization=all).
"""
import copy
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

import scnet
from scnet.config import get_cfg
from scnet.engine.train import scaled_base_lr, train_step
from scnet.modeling import sampling

from conftest import TINY, synthetic_sample

def _first(indices, num):
    """Deterministic stand-in for the random subset: the same anchors/RoIs whatever the batch layout."""
    return indices[:num]


def _samples(n=4):
    samples = [synthetic_sample(128, 160, 3, seed=10 + i) for i in range(n)]  # one size: no batch padding
    return [s[0] for s in samples], [s[1] for s in samples]


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)


def _step(model, optimizer, images, targets, accumulate):
    solver = get_cfg(None, ["solver.clip_grad_norm=0", f"solver.accumulate_steps={accumulate}"]).solver
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses, finite = train_step(model, optimizer, scaler, images, targets, solver, torch.device("cpu"))
    assert finite
    return losses


def _assert_same_parameters(a, b, rtol, atol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def test_one_batch_of_4_equals_2_accumulated_micro_batches_of_2(monkeypatch):
    monkeypatch.setattr(sampling, "_random_subset", _first)
    torch.manual_seed(0)
    per_image = ["model.mask_head.loss_weight=0", "model.semantic.loss_normalization=all"]
    model = scnet.build_model(None, overrides=TINY + per_image).train()
    twin = copy.deepcopy(model)
    images, targets = _samples()
    sgd, twin_sgd = _sgd(model), _sgd(twin)
    for _ in range(2):  # the second step's losses and parameters: after an update with momentum
        large = _step(model, sgd, images, targets, accumulate=1)
        accumulated = _step(twin, twin_sgd, images, targets, accumulate=2)
    assert set(large) == set(accumulated)
    for name in large:
        if name != "loss_mask":
            assert accumulated[name] == pytest.approx(large[name], rel=1e-5, abs=1e-7), name
    _assert_same_parameters(model, twin, rtol=1e-5, atol=1e-7)
    # the official semantic normaliser counts the labelled pixels of the batch: that term differs (the
    # mask loss too when the micro-batches hold different numbers of positives; here each image has 16)
    torch.manual_seed(0)
    official = scnet.build_model(None, overrides=TINY).train()
    twin = copy.deepcopy(official)
    a, b = _step(twin, _sgd(twin), images, targets, 1), _step(official, _sgd(official), images, targets, 2)
    assert [k for k in a if a[k] != pytest.approx(b[k], rel=1e-5, abs=1e-7)] == ["loss_semantic"]


def _ddp_worker(rank, world, port, result_file):
    """Rank ``rank`` of a gloo run on its 2 images: a plain step (DDP builds its buckets), 2 accumulated
    micro-batches of 1 image, a plain step."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    sampling._random_subset = _first
    torch.manual_seed(0)
    model = scnet.build_model(None, overrides=TINY).train()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    calls = []

    def count(state, bucket):  # gradient all-reduces, counted
        calls.append(bucket.index())
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, count)
    images, targets = _samples()
    mine = slice(2 * rank, 2 * rank + 2)
    counts, optimizer = [], _sgd(ddp)
    for accumulate in (1, 2, 1):
        before = len(calls)
        _step(ddp, optimizer, images[mine], targets[mine], accumulate)
        counts.append(len(calls) - before)
    if rank == 0:
        torch.save({"model": model.state_dict(), "calls": counts[1:]}, result_file)
    torch.distributed.destroy_process_group()


def test_accumulation_on_two_ddp_processes_equals_one_process_accumulating_all(tmp_path, monkeypatch):
    from test_train import _free_port

    result_file = str(tmp_path / "ddp.pth")
    mp.spawn(_ddp_worker, args=(2, _free_port(), result_file), nprocs=2, join=True)
    result = torch.load(result_file)
    accumulated, plain = result["calls"]
    assert accumulated == plain > 0  # the inner micro-batch did not all-reduce

    # the same three steps on one process: 2 micro-batches of 2 images (rank r's), 4 of 1, 2 of 2
    monkeypatch.setattr(sampling, "_random_subset", _first)
    torch.manual_seed(0)
    model = scnet.build_model(None, overrides=TINY).train()
    images, targets = _samples()
    optimizer = _sgd(model)
    for accumulate in (2, 4, 2):
        _step(model, optimizer, images, targets, accumulate)
    reference = scnet.build_model(None, overrides=TINY)
    reference.load_state_dict(result["model"])
    _assert_same_parameters(reference, model, rtol=1e-5, atol=1e-7)


def test_learning_rate_scales_with_the_images_of_one_update():
    one = get_cfg(None, ["solver.images_per_gpu=2"]).solver
    accumulated = get_cfg(None, ["solver.images_per_gpu=1", "solver.accumulate_steps=2"]).solver
    assert scaled_base_lr(one, 8) == scaled_base_lr(accumulated, 8) == pytest.approx(0.02)
    assert scaled_base_lr(accumulated, 4) == pytest.approx(0.01)
