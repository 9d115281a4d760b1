"""One training step, the learning-rate schedule, and what a checkpoint holds [impl 17].

The loop that uses them is ``train`` in scripts/train.py."""
import contextlib
import hashlib
import math
import random
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import numpy as np
import torch

from ..config import to_dict
from . import dist
from .checkpoint import code_version


class NonFiniteError(RuntimeError):
    pass


@dataclass
class TrainState:
    epoch: int = 0
    iteration: int = 0  # completed iterations since the start of training
    batch_in_epoch: int = 0  # batches of ``epoch`` already consumed (the resume point)
    nonfinite_steps: int = 0
    last_step_finite: bool = True  # no checkpoint is written right after a skipped step
    best_metric: str = ""  # train.best_metric of best_value, the best evaluation so far (validation.py)
    best_value: Optional[float] = None
    best_iteration: int = 0
    load_issues: List[str] = field(default_factory=list)  # reported by the dataset while loading


def learning_rate(iteration, epoch, base_lr, lr_steps, warmup_iters=500, warmup_ratio=0.001, gamma=0.1):
    """Step decay by epoch, with a linear warm-up by iteration from ``warmup_ratio * lr`` [impl 17].

    As in mmcv: lr = base * gamma^(number of steps <= epoch); during the first ``warmup_iters``
    iterations it is multiplied by 1 - (1 - iteration / warmup_iters) * (1 - warmup_ratio).
    """
    lr = base_lr * gamma ** sum(epoch >= s for s in lr_steps)
    if iteration < warmup_iters:
        lr *= 1 - (1 - iteration / warmup_iters) * (1 - warmup_ratio)
    return lr


def total_batch(solver, world_size):
    """The images of one update: ``accumulate_steps`` micro-batches of ``images_per_gpu`` on each process."""
    return solver.images_per_gpu * world_size * solver.accumulate_steps


def scaled_base_lr(solver, world_size):
    """0.02 for a total batch of 16, scaled linearly with the real total batch [impl 17]."""
    return solver.base_lr * total_batch(solver, world_size) / solver.base_batch_size


def resume_point(checkpoint, state, sampler, log):
    """``state`` with its place in the epoch in batches of this run's ``sampler``.

    A checkpoint counts its place in batches of its own total batch (images per update). Resumed with
    the same total batch (however split over processes), the sampler gives exactly the batches that
    were still to come. With another one the same fraction of the epoch counts as done (rounded down:
    nothing of the epoch is skipped); batches are drawn for their size, so the rest of the epoch comes
    in another order. A checkpoint of an epoch's last batch resumes with the next epoch."""
    solver = checkpoint["config"]["solver"]
    before = checkpoint["world_size"] * solver["images_per_gpu"] * solver.get("accumulate_steps", 1)
    done, per_epoch = state.batch_in_epoch, sampler.batches_per_epoch(before)
    if done >= per_epoch:
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    elif done and before != sampler.batch_size * sampler.num_replicas:
        state.batch_in_epoch = done * len(sampler) // per_epoch
        log(f"WARNING: the checkpoint's steps had {before} images, this run's have "
            f"{sampler.batch_size * sampler.num_replicas}: epoch {state.epoch} goes on after {done} of its "
            f"{per_epoch} batches, from batch {state.batch_in_epoch} of {len(sampler)} (in another order: "
            "batches are drawn for their size)")
    return state


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_state(model, optimizer, scaler, state, cfg):
    """The checkpoint dict; collective (every process contributes its RNG state)."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": state.epoch,
        "iteration": state.iteration,
        "batch_in_epoch": state.batch_in_epoch,
        "sampler": {"epoch": state.epoch, "start_batch": state.batch_in_epoch},
        "train_state": {k: v for k, v in asdict(state).items() if k != "load_issues"},
        "rng": dist.all_gather_object(rng_state()),
        "world_size": dist.get_world_size(),
        "config": to_dict(cfg),
        "code_version": code_version(),
    }


def restore_state(checkpoint, model, optimizer, scaler, log):
    """Load a checkpoint into the model and optimizer; restore this process's RNG. Returns TrainState."""
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scaler.load_state_dict(checkpoint["scaler"])
    if checkpoint["world_size"] == dist.get_world_size():
        set_rng_state(checkpoint["rng"][dist.get_rank()])
    else:
        log(f"WARNING: the checkpoint was written by {checkpoint['world_size']} processes, this run has "
            f"{dist.get_world_size()}: the random RoI sampling does not repeat the uninterrupted run's")
    return TrainState(**checkpoint["train_state"])


def weights_digest(model):
    """SHA-1 of every tensor of the state dict: equal across processes iff their weights are equal."""
    digest = hashlib.sha1()
    for value in model.state_dict().values():
        digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _autocast(device, amp):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def set_learning_rate(optimizer, state, solver, base_lr):
    lr = learning_rate(state.iteration, state.epoch, base_lr, solver.lr_steps, solver.warmup_iters, solver.warmup_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def train_step(model, optimizer, scaler, images, targets, solver, device):
    """Forward, backward and SGD step on one batch. Returns ({loss name: float}, finite).

    Gradient accumulation: with ``solver.accumulate_steps`` = k the batch (k x ``images_per_gpu``
    images) runs as k micro-batches, each loss divided by k, and one SGD step follows. Each micro-batch
    keeps its own loss normalisers (the number of sampled anchors and RoIs, of positive RoIs for the mask
    loss, of pixels for the semantic loss), exactly as each GPU of the official 8-GPU run normalises over
    its own 2 images before DDP averages the gradients: k accumulated micro-batches on w processes give
    the update of k x w processes (tests/test_accumulate.py). Under DDP only the last micro-batch
    synchronises gradients.

    The loss values are read into the host once, after the backward passes are queued: the step's own
    host-device synchronisation (the model's are listed in docs/gpu.md). It gives the log its numbers
    (the mean over the micro-batches) and decides whether to step: when a loss is not finite on some
    process, no process steps (the same branch everywhere; the backward runs in any case, since under DDP
    every process must join its gradient all-reduce)."""
    optimizer.zero_grad(set_to_none=True)
    k = solver.accumulate_steps
    size = -(-len(images) // k)
    terms = []
    for j in range(k):
        part = slice(j * size, (j + 1) * size)
        last = j == k - 1
        no_sync = model.no_sync if not last and hasattr(model, "no_sync") else contextlib.nullcontext
        with no_sync():
            with _autocast(device, solver.amp):
                losses = model(images[part], targets[part])
            scaler.scale(sum(losses.values()) / k).backward()
        terms.append(torch.stack([v.detach().float() for v in losses.values()]))
    values = dict(zip(losses, (sum(terms) / k).tolist()))
    finite = dist.all_true(all(math.isfinite(v) for v in values.values()), device)
    if finite:
        if solver.clip_grad_norm > 0:
            scaler.unscale_(optimizer)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, solver.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
    return values, finite


def count_nonfinite_step(state, losses, targets, max_steps, logger):
    """Log what went wrong (image ids of every process's batch, the loss terms) and count the skipped
    step (collective). Raises NonFiniteError after ``max_steps`` of them. Called before the iteration
    counter advances: the iteration it names is ``state.iteration + 1``, numbered from 1 as in the log
    and the checkpoint names.

    What the guard keeps: no checkpoint is written right after a skipped step and none with NaN/Inf
    weights, so the newest checkpoint is the newest finite one. Finite is not healthy: a run whose loss
    explodes (a learning rate far too high) has finite, already diverged weights for a while before the
    first NaN. ``train.keep_checkpoints`` older ones stay; resume from one of those with a lower rate."""
    state.nonfinite_steps += 1
    image_ids = sum(dist.all_gather_object([t.get("image_id") for t in targets]), [])
    terms = {k: float(v) for k, v in losses.items()}
    logger.info(
        f"WARNING: non-finite loss at iteration {state.iteration + 1} (step skipped, {state.nonfinite_steps}/"
        f"{max_steps} allowed); image ids {image_ids}; loss terms {terms}"
    )
    if state.nonfinite_steps > max_steps:
        raise NonFiniteError(
            f"{state.nonfinite_steps} non-finite losses (limit train.max_nonfinite_steps={max_steps}); "
            "stopping with the last good checkpoint intact"
        )
