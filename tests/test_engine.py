"""Training engine pieces that need no data: learning-rate schedule, checkpoint files, sampler."""
import os

import pytest
import torch

from scnet.config import get_cfg
from scnet.data.build import GroupedBatchSampler
from scnet.engine.checkpoint import list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
from scnet.engine.train import TrainState, learning_rate, resume_point, scaled_base_lr

from conftest import CONFIGS


@pytest.mark.parametrize("total_batch, base", [(16, 0.02), (2, 0.0025)])
@pytest.mark.parametrize("config, steps", [("r50_20e.yaml", (16, 19)), ("r50_1x.yaml", (8, 11))])
def test_learning_rate_schedule_values(total_batch, base, config, steps):
    """[impl 17]: linear warm-up from 0.001 x lr over 500 iterations, x0.1 at the step epochs."""
    solver = get_cfg(os.path.join(CONFIGS, config), [f"solver.images_per_gpu={total_batch}"]).solver
    lr0 = scaled_base_lr(solver, world_size=1)
    assert lr0 == pytest.approx(base, rel=1e-12)

    def lr(iteration, epoch):
        return learning_rate(iteration, epoch, lr0, solver.lr_steps, solver.warmup_iters, solver.warmup_ratio)

    assert lr(0, 0) == pytest.approx(base * 0.001, rel=1e-12)
    # 1 - (1 - 250/500) * (1 - 0.001) = 0.5005
    assert lr(250, 0) == pytest.approx(base * 0.5005, rel=1e-12)
    assert lr(500, 0) == pytest.approx(base, rel=1e-12)
    iters_per_epoch = 7330  # the first iteration of an epoch is epoch * iters_per_epoch
    assert lr(steps[0] * iters_per_epoch, steps[0]) == pytest.approx(base * 0.1, rel=1e-12)
    assert lr(steps[0] * iters_per_epoch - 1, steps[0] - 1) == pytest.approx(base, rel=1e-12)
    assert lr(steps[1] * iters_per_epoch, steps[1]) == pytest.approx(base * 0.01, rel=1e-12)


def test_linear_scaling_with_processes():
    solver = get_cfg(None).solver  # 2 images per process
    assert scaled_base_lr(solver, 8) == pytest.approx(0.02)
    assert scaled_base_lr(solver, 1) == pytest.approx(0.0025)


def _state(iteration, value=1.0):
    return {
        "model": {"w": torch.full((3,), value)},
        "optimizer": {},
        "epoch": 0,
        "iteration": iteration,
        "batch_in_epoch": iteration,
        "config": {},
    }


def test_checkpoints_are_atomic_and_only_the_newest_are_kept(tmp_path):
    for it in (10, 20, 30, 40):
        save_checkpoint(_state(it), str(tmp_path), keep=2)
    names = [os.path.basename(p) for p in list_checkpoints(str(tmp_path))]
    assert names == ["checkpoint_00000040.pth", "checkpoint_00000030.pth"]
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path))
    with pytest.raises(FloatingPointError):
        save_checkpoint(_state(50, float("nan")), str(tmp_path), keep=1)
    assert len(list_checkpoints(str(tmp_path))) == 2  # the refused save deleted nothing


def test_truncated_checkpoint_is_detected_and_the_previous_one_used(tmp_path):
    save_checkpoint(_state(10), str(tmp_path), keep=3)
    newest = save_checkpoint(_state(20), str(tmp_path), keep=3)
    size = os.path.getsize(newest)
    with open(newest, "r+b") as f:
        f.truncate(size // 2)
    messages = []
    state, path = resolve_resume("auto", str(tmp_path), messages.append)
    assert state["iteration"] == 10 and path.endswith("checkpoint_00000010.pth")
    assert len(messages) == 1 and "checkpoint_00000020.pth cannot be read" in messages[0]
    with pytest.raises(ValueError, match="cannot be read"):
        load_checkpoint(newest)


def test_resume_auto_without_checkpoints_starts_fresh(tmp_path):
    messages = []
    assert resolve_resume("auto", str(tmp_path), messages.append) == (None, None)
    assert "starting from scratch" in messages[0]


def _flatten(batches):
    return [item for batch in batches for item in batch]


def test_sampler_groups_shards_and_resumes():
    groups = [0] * 7 + [1] * 5
    sampler = GroupedBatchSampler(groups, batch_size=2, num_replicas=1, seed=3)
    batches = sampler.epoch_batches()
    assert len(batches) == len(sampler) == 4 + 3  # 7 -> 8 -> 4 batches, 5 -> 6 -> 3 batches
    for batch in batches:
        assert len({groups[i] for i, _ in batch}) == 1  # one orientation per batch
    assert set(i for i, _ in _flatten(batches)) == set(range(12))
    # two processes with 1 image each see exactly the global batches of one process with 2
    ranks = [GroupedBatchSampler(groups, 1, num_replicas=2, rank=r, seed=3).epoch_batches() for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == batches
    # resuming mid-epoch continues with the very same batches and flips
    sampler.set_epoch(0, start_batch=3)
    assert list(sampler) == batches[3:]
    sampler.set_epoch(1)
    assert list(sampler) != batches  # a new order every epoch
    assert GroupedBatchSampler(groups, 2, seed=3).epoch_batches() == batches  # deterministic


@pytest.mark.parametrize("world, images_per_gpu, done, processes, expected", [
    (8, 2, 3, 1, (0, 25)),  # 3 of 4 batches of 16 -> 25 of 34 batches of 1: the same part, never past the end
    (8, 2, 4, 1, (1, 0)),  # an epoch's last batch (older versions saved it so): the next epoch
    (1, 2, 9, 2, (0, 9)),  # the same total batch on other processes: exactly the batches still to come
    (1, 2, 18, 2, (1, 0)),
])
def test_resume_point_keeps_the_part_of_the_epoch_done(world, images_per_gpu, done, processes, expected):
    # 34 images in two aspect groups of 17; this run: 1 image on each of ``processes`` processes
    sampler = GroupedBatchSampler([0] * 17 + [1] * 17, batch_size=1, num_replicas=processes)
    checkpoint = {"world_size": world, "config": {"solver": {"images_per_gpu": images_per_gpu, "accumulate_steps": 1}}}
    state = resume_point(checkpoint, TrainState(epoch=0, batch_in_epoch=done), sampler, lambda *a: None)
    assert (state.epoch, state.batch_in_epoch) == expected


def test_console_tensorboard_and_log_show_the_same_numbers(tmp_path, capsys):
    """One definition of the logged loss and time: the mean over the last log_period iterations."""
    import json

    from scnet.engine.logger import TrainLogger

    logger = TrainLogger(str(tmp_path), total_iters=10, start_iter=0, log_period=5)
    for it in range(1, 6):
        logger.record(it, 0, {"loss_a": float(it), "loss_b": 0.5}, 0.01, 0.1 * it, 0.0, torch.device("cpu"))
    logger.close()
    record = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert record["iteration"] == 5 and record["loss_a"] == 3.0 and record["loss"] == 3.5
    assert record["time"] == pytest.approx(0.3)
    line = [ln for ln in capsys.readouterr().out.splitlines() if "iter 5/10" in ln][0]
    assert "loss_a: 3.0000" in line and "loss: 3.5000" in line and "time: 0.300s" in line
