"""scripts/train.py end to end on generated data: resume after a kill, DDP with torchrun, bad data, NaN guard."""
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from scnet.data.synthetic import make_synthetic_coco

from conftest import ROOT, TINY, tiny_model

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
        "train.eval_period=0",  # no val split here (tests/test_validation.py covers the evaluation)
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


def _children(pid):
    """The processes whose parent is ``pid`` (torchrun's workers), from /proc."""
    children = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after the (command name)
            children.append(int(entry))
    return children


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


def test_resumed_with_another_batch_size_stops_at_the_same_epoch(dataset_dir, tmp_path):
    # one epoch in batches of 2, then the second in batches of 1 (twice as many iterations)
    first = _run(_overrides(dataset_dir, "solver.epochs=1", "solver.images_per_gpu=2"), tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    done = _final_weights(tmp_path)
    assert done["epoch"] == 1
    resumed = _run(["--resume", "auto", *_overrides(dataset_dir, "solver.epochs=2", "solver.images_per_gpu=1")],
                   tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    per_epoch = int(re.search(r"(\d+) iterations/epoch", resumed.stdout).group(1))
    assert per_epoch > done["iteration"]
    result = _final_weights(tmp_path)
    assert (result["epoch"], result["iteration"]) == (2, done["iteration"] + per_epoch)


def test_resumed_mid_epoch_with_another_batch_size_keeps_its_place_in_the_epoch(dataset_dir, tmp_path):
    # two steps of 2 images, stopped by solver.max_iters; the rest of the epoch in steps of 1 image
    first = _run(_overrides(dataset_dir, "solver.epochs=1", "solver.images_per_gpu=2", "solver.max_iters=2"),
                 tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (_final_weights(tmp_path)["iteration"], _final_weights(tmp_path)["batch_in_epoch"]) == (2, 2)
    resumed = _run(["--resume", "auto", *_overrides(dataset_dir, "solver.epochs=1", "solver.images_per_gpu=1")],
                   tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    before, now = (int(re.search(r"(\d+) iterations/epoch", run.stdout).group(1)) for run in (first, resumed))
    start = 2 * now // before  # the same part of the epoch; in batches of 1 (the old code took batch 2)
    assert now == 8 and start > 2
    assert f"epoch 0 goes on after 2 of its {before} batches, from batch {start} of 8" in resumed.stdout
    result = _final_weights(tmp_path)
    assert (result["epoch"], result["iteration"]) == (1, 2 + now - start)


def test_fine_tuning_starts_from_the_checkpoint_where_it_fits(dataset_dir, tmp_path):
    # a checkpoint of a 7-class model; this run has 3 classes; lr 0 keeps the initial weights to compare
    checkpoint = tmp_path / "seven_classes.pth"
    torch.save({"model": tiny_model("model.num_classes=7", "model.semantic.num_classes=183", seed=5).state_dict()}, checkpoint)
    args = _overrides(dataset_dir, "solver.max_iters=1", "solver.base_lr=0", f"train.init_weights={checkpoint}")
    run = _run(args, tmp_path / "out")
    assert run.returncode == 0, run.stderr[-3000:]
    source, result = torch.load(checkpoint)["model"], _final_weights(tmp_path / "out")["model"]
    kept = {k for k in result if result[k].shape != source[k].shape}
    assert kept and all(".cls_score." in k or ".predictor." in k or ".classifier." in k for k in kept), kept
    assert f"initialised {len(result) - len(kept)} of the model's {len(result)} tensors from {checkpoint}" in run.stdout
    assert "kept (another shape in the checkpoint): roi_heads." in run.stdout
    for key in result.keys() - kept:
        assert torch.equal(result[key], source[key]), key


def _losses(output_dir):
    """Per-iteration total loss (log_period=1), averaged over processes by the logger."""
    return {r["iteration"]: r["loss"] for r in _log(output_dir) if "loss" in r}


def _digests(output_dir):
    return [r for r in _log(output_dir) if "weights_sha1" in r][-1]["weights_sha1"]


def test_ddp_two_processes_match_one_process_with_the_same_total_batch(dataset_dir, tmp_path):
    common = _overrides(dataset_dir, "solver.epochs=1", "solver.max_iters=3")
    one = _run(common + ["solver.images_per_gpu=2"], tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(common + ["solver.images_per_gpu=1"], tmp_path / "two",
               launcher=_torchrun("--standalone", "--nproc_per_node", "2"))
    assert two.returncode == 0, two.stderr[-3000:]
    digests = _digests(tmp_path / "two")
    assert len(digests) == 2 and digests[0] == digests[1]  # both ranks end with identical weights
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    # same images and weights; only the random RoI/anchor sampling and the per-batch loss
    # normalisers differ between one batch of 2 and two batches of 1
    for it in a:
        assert b[it] == pytest.approx(a[it], rel=0.03), (it, a[it], b[it])
    # one process accumulating 2 micro-batches of 1: the two processes' update (tests/test_accumulate.py),
    # with the large batch's learning rate at every iteration (scaling, warm-up)
    acc = _run(common + ["solver.images_per_gpu=1", "solver.accumulate_steps=2"], tmp_path / "acc")
    assert acc.returncode == 0, acc.stderr[-3000:]
    assert "1 process(es) x 1 images x 2 accumulated, " in acc.stdout
    lr = {r["iteration"]: r["lr"] for r in _log(tmp_path / "acc") if "lr" in r}
    assert lr == {r["iteration"]: r["lr"] for r in _log(tmp_path / "one") if "lr" in r}
    for it, loss in _losses(tmp_path / "acc").items():
        assert loss == pytest.approx(a[it], rel=0.03), (it, a[it], loss)


@pytest.mark.parametrize("sig, workers", [(signal.SIGTERM, 0), (signal.SIGUSR1, 1)])
def test_stop_signal_checkpoints_and_the_resumed_ddp_run_is_identical(dataset_dir, tmp_path, sig, workers):
    """Pre-emption: the signal reaches the processes of a 2-process gloo run at a random iteration; they
    finish the iteration, one checkpoint is written, the run exits, and the resumed run ends with the
    uninterrupted run's weights. A data-loader worker (the second case) survives the signal."""
    args = _overrides(dataset_dir, "solver.epochs=2", "solver.images_per_gpu=1", f"data.num_workers={workers}")
    launcher = _torchrun("--standalone", "--nproc_per_node", "2")
    full = _run(args, tmp_path / "full", launcher=launcher)
    assert full.returncode == 0, full.stderr[-3000:]
    expected = _final_weights(tmp_path / "full")

    out = tmp_path / "stopped"
    stop_after = random.Random(int(sig)).randint(1, expected["iteration"] - 2)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([*launcher, TRAIN, "--output-dir", str(out), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(out / "log.jsonl") and sum("loss" in r for r in _log(out)) >= stop_after:
            break
        time.sleep(0.02)
    # SIGTERM to torchrun and the workers (as a scheduler ends a job; torchrun forwards it too); SIGUSR1
    # to the workers only (torchrun itself does not handle it)
    for pid in _children(proc.pid) + ([proc.pid] if sig == signal.SIGTERM else []):
        os.kill(pid, sig)
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode != 0  # the job did not finish: a script's next step must not run
    stopped = [line for line in output.splitlines() if f"stopped by {sig.name} after iteration" in line]
    assert len(stopped) == 1 and "continue with --resume auto" in stopped[0], output[-3000:]
    iteration = int(re.search(r"after iteration (\d+)", stopped[0]).group(1))
    assert stop_after <= iteration < expected["iteration"]
    assert _final_weights(out)["iteration"] == iteration and not os.path.exists(out / "model_final.pth")

    resumed = _run(["--resume", "auto", *args], out, launcher=launcher)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = _final_weights(out)
    assert result["iteration"] == expected["iteration"]
    for key in expected["model"]:
        assert torch.equal(expected["model"][key], result["model"][key]), key


def _dataset_with_an_empty_image(root):
    """Two images, the second without annotations (kept with data.keep_empty_images=true)."""
    make_synthetic_coco(str(root), num_images=2, seed=4, split_name="train")
    path = os.path.join(root, "annotations", "instances_train.json")
    with open(path) as f:
        data = json.load(f)
    second = data["images"][1]["id"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != second]
    with open(path, "w") as f:
        json.dump(data, f)
    return str(root)


def test_ddp_across_two_nodes_with_an_empty_batch_on_one_rank(tmp_path):
    """Two "nodes" of one process each on loopback; every iteration one rank gets the empty image."""
    root = _dataset_with_an_empty_image(tmp_path / "data")
    args = _overrides(root, "solver.epochs=2", "solver.images_per_gpu=1", "data.keep_empty_images=true")
    port = _free_port()
    launcher = _torchrun("--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
                         "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "scnet-test")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    nodes = [
        subprocess.Popen([*launcher, TRAIN, "--output-dir", str(tmp_path / "out"), *args], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    digests = _digests(tmp_path / "out")
    assert len(digests) == 2 and digests[0] == digests[1]
    assert max(_losses(tmp_path / "out")) == 2  # 2 epochs x 1 global batch of the 2 images


def test_training_on_a_dataset_with_every_bad_input_completes_and_reports_the_skips(tmp_path):
    from bad_inputs import BAD_INPUTS, inject_bad_inputs

    root = tmp_path / "data"
    make_synthetic_coco(str(root), num_images=len(BAD_INPUTS) + 5, seed=2, split_name="train")
    files = inject_bad_inputs(str(root), "train")
    result = _run(_overrides(str(root), "solver.epochs=1", "solver.images_per_gpu=2"), tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    # dropped while reading the annotations, and replaced or fixed while loading, each named
    for kind in ("missing image file", "no annotations", "crowd-only", "missing stuff map"):
        assert f"{files[kind]}: {kind}" in out, kind
    for kind in ("corrupt image", "truncated image", "size differs from the JSON", "stuff map of the wrong size"):
        assert any(files[kind] in line and "replaced by" in line for line in out.splitlines()), kind
    summary = [line for line in out.splitlines() if line.startswith("done:")][0]
    assert "0 non-finite steps" in summary and "0 problems while loading" not in summary


def test_nan_guard_skips_non_finite_steps_then_stops_with_the_last_good_checkpoint(tmp_path, dataset_dir):
    """A learning rate of 1e6 makes the weights explode: the guard must stop the run cleanly."""
    args = _overrides(dataset_dir, "solver.epochs=5", "solver.images_per_gpu=2", "solver.warmup_iters=0",
                      "solver.base_lr=1e6", "train.checkpoint_period=1", "train.max_nonfinite_steps=2")
    result = _run(args, tmp_path / "out")
    assert result.returncode == 1
    assert "non-finite" in result.stdout or "NaN/Inf" in result.stdout
    assert "ERROR:" in result.stdout
    from scnet.engine.checkpoint import list_checkpoints, load_checkpoint

    kept = list_checkpoints(str(tmp_path / "out"))
    assert kept, "no checkpoint was written before the run went bad"
    newest = load_checkpoint(kept[0])  # readable and finite
    assert newest["train_state"]["nonfinite_steps"] == 0  # written before the first skipped step
    assert f"Newest good checkpoint: {kept[0]}" in result.stdout
    # warnings number iterations as the log and the checkpoint names do (from 1)
    warned = [int(n) for n in re.findall(r"non-finite loss at iteration (\d+)", result.stdout)]
    assert warned and warned[0] == newest["iteration"] + 1


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_and_gradient_clipping(dataset_dir, tmp_path, amp):
    args = _overrides(dataset_dir, "solver.max_iters=2", "solver.images_per_gpu=2", f"solver.amp={amp}",
                      "solver.clip_grad_norm=5.0")
    result = _run(args, tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    losses = _losses(tmp_path / "out")
    assert sorted(losses) == [1, 2] and all(v == v and abs(v) < 1e3 for v in losses.values())
    weights = _final_weights(tmp_path / "out")["model"]
    assert all(v.dtype in (torch.float32, torch.int64) for v in weights.values())  # fp32 master weights


def test_a_new_run_never_mixes_with_an_earlier_one_in_its_folder(dataset_dir, tmp_path):
    """Checkpoints of an earlier run: a new run (no --resume) stops with one line, --resume auto continues.
    An earlier run that wrote no checkpoint: its log and TensorBoard files go aside, the new run's log
    starts empty."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "log.jsonl").write_text('{"iteration": 7, "loss": 1.0}\n')
    (out / "tensorboard").mkdir()
    args = _overrides(dataset_dir, "solver.max_iters=1", "solver.images_per_gpu=2")
    first = _run(args, out)
    assert first.returncode == 0, first.stderr[-3000:]
    aside = [p for p in (out / "previous").iterdir()]
    assert len(aside) == 1 and (aside[0] / "log.jsonl").read_text().startswith('{"iteration": 7')
    assert (aside[0] / "tensorboard").is_dir() and [r["iteration"] for r in _log(out) if "loss" in r] == [1]
    again = _run(args, out)
    assert again.returncode == 1
    assert again.stderr.strip().splitlines()[-1] == (f"error: {out} holds an earlier run (checkpoint_00000001.pth, "
                                                     "model_final.pth): continue it with --resume auto, or give "
                                                     "another --output-dir")
    resumed = _run(["--resume", "auto", *_overrides(dataset_dir, "solver.max_iters=2", "solver.images_per_gpu=2")], out)
    assert resumed.returncode == 0 and [r["iteration"] for r in _log(out) if "loss" in r] == [1, 2]
