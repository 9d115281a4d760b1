"""scripts/train.py end to end on generated data: resume after a kill, DDP with torchrun, bad data, NaN guard."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from scnet.data.synthetic import make_synthetic_coco

from conftest import ROOT, TINY

TRAIN = os.path.join(ROOT, "scripts", "train.py")


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_coco(str(root), num_images=8, seed=0, split_name="train")
    return str(root)


def _overrides(root, *extra):
    return TINY + [
        f"data.root={root}",
        "data.train_annotations=annotations/instances_train.json",
        "data.train_images=train",
        "data.train_stuff_maps=stuffthingmaps/train",
        "data.num_workers=0",
        "model.semantic.num_classes=183",
        "model.input.train_scale=[160,128]",
        "solver.warmup_iters=4",
        "train.log_period=1",
        *extra,
    ]


def _run(args, output_dir, timeout=300, launcher=(sys.executable,)):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [*launcher, TRAIN, "--output-dir", str(output_dir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _log(output_dir):
    with open(os.path.join(output_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def _final_weights(output_dir):
    from scnet.engine.checkpoint import list_checkpoints

    return torch.load(list_checkpoints(str(output_dir))[0], map_location="cpu", weights_only=False)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args):
    return (sys.executable, "-m", "torch.distributed.run", *args)


def test_killed_run_resumed_with_auto_ends_with_the_same_weights(dataset_dir, tmp_path):
    args = _overrides(dataset_dir, "solver.epochs=3", "solver.images_per_gpu=2", "train.checkpoint_period=2")
    full = _run(args, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    expected = _final_weights(tmp_path / "full")

    # the same run, killed (SIGKILL) as soon as its first checkpoint exists, then resumed
    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, TRAIN, "--output-dir", str(out), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not os.path.exists(out / "checkpoint_00000002.pth") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    resumed = _run(["--resume", "auto", *args], out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    result = _final_weights(out)
    assert result["iteration"] == expected["iteration"] > 2
    for key in expected["model"]:
        assert torch.equal(expected["model"][key], result["model"][key]), key
