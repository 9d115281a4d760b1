"""Train a detector on a COCO-format dataset.

    torchrun --nproc_per_node 8 scripts/train.py --cfg configs/r50_20e.yaml [key.sub=value ...]
    python scripts/train.py --cfg configs/r50_20e.yaml --output-dir out/r50 --resume auto

Plain torch.distributed: torchrun's environment variables, NCCL on GPU and gloo on CPU, one process
per GPU, SGD with the official schedule (lr 0.02 per 16 images, scaled linearly; warm-up; steps).
Checkpoints go to ``--output-dir`` every ``train.checkpoint_period`` iterations and at the end of every
epoch; ``--resume auto`` continues from the newest valid one, mid-epoch included. SIGTERM or SIGUSR1
(``train.stop_signals``) writes a checkpoint at the next iteration and exits with 128 + the signal's
number. The trained weights alone are written to ``model_final.pth`` at the end. Every
``train.eval_period`` epochs (or iterations) and at the end, the model is evaluated on the val split and
``model_best.pth`` keeps the best weights (scnet/engine/validation.py).

``main`` reads top to bottom: ``set_up``, then ``train`` (the loop), then the final weights.
"""
import argparse
import os
import random
import sys
import time
from collections import Counter
from typing import NamedTuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

import scnet
from scnet.config import Config, dump, flatten, get_cfg, to_dict
from scnet.data.build import build_train_dataset, build_train_loader, ignoring_signals
from scnet.engine import dist
from scnet.engine.checkpoint import all_finite, list_checkpoints, resolve_resume, save_checkpoint, start_new_run
from scnet.engine.compile import compile_dense_parts
from scnet.engine.logger import TrainLogger
from scnet.engine.preemption import StopRequested, StopSignals, parse_signals
from scnet.engine.train import (
    NonFiniteError,
    TrainState,
    checkpoint_state,
    count_nonfinite_step,
    restore_state,
    resume_point,
    scaled_base_lr,
    set_learning_rate,
    train_step,
    weights_digest,
)
from scnet.engine.validation import build_periodic_evaluation
from scnet.modeling.backbone.resnet import load_pretrained
from scnet.utils.files import FileError, FolderLock, report_file_errors, save_file, write_failure
from scnet.utils.malloc import keep_freed_memory
from scnet.weights import load_matching_weights


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", help="YAML config (default: SCNet R-50 20e)")
    parser.add_argument("--output-dir", default=None, help="default: output/<config name>")
    parser.add_argument("--resume", default="", help="a checkpoint path, or 'auto' (newest valid in --output-dir)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the dense parts (scnet/engine/compile.py; slower on a CPU, measure on GPU)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    return parser.parse_args()


class Run(NamedTuple):
    """What ``main`` sets up and the loop uses."""

    cfg: Config
    device: torch.device
    output_dir: str
    model: torch.nn.Module  # wrapped in DistributedDataParallel when there are several processes
    module: torch.nn.Module  # the model itself: checkpoints and weight digests
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: torch.utils.data.DataLoader
    logger: TrainLogger
    base_lr: float
    total_iters: int
    evaluation: object  # PeriodicEvaluation (scnet/engine/validation.py), or None: train.eval_period=0
    lock: object  # the output folder's FolderLock (main process), held until the process ends


def main():
    args = parse_args()
    run, state, dataset = set_up(args)
    try:
        load_issues = train(run, state)
    except FileError:  # a checkpoint that cannot be written: report_file_errors prints it after the bar
        run.logger.close()
        raise
    except (NonFiniteError, StopRequested) as e:
        newest = list_checkpoints(run.output_dir)
        newest = newest[0] if newest else "none"
        if isinstance(e, StopRequested):
            run.logger.info(f"{e}: checkpoint {newest}; continue with --resume auto")
        else:
            run.logger.info(f"ERROR: {e}. Newest good checkpoint: {newest}")
        run.logger.close()
        dist.cleanup()
        sys.exit(getattr(e, "exit_code", 1))
    save_final_weights(run, state)
    run.logger.close()
    if dist.is_main_process():
        print(f"done: {state.iteration} iterations; skipped: {len(dataset.skipped)} items while reading the "
              f"annotations, {load_issues} problems while loading images, {state.nonfinite_steps} non-finite steps")
    dist.cleanup()


def claim_output_dir(output_dir, cfg, resume, log):
    """The main process's output folder: locked for this run, emptied of an earlier run's checkpoints
    and log unless resuming, with this run's config.yaml. Returns the lock."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        lock = FolderLock(output_dir)  # one run per output folder, until this process ends
        if not resume:
            start_new_run(output_dir, log)  # never mixed with an earlier run's checkpoints and log
        dump(cfg, os.path.join(output_dir, "config.yaml"))
    except OSError as e:  # a full disk, no permission
        raise FileError(f"cannot write in {output_dir}: {write_failure(e, output_dir)}") from None
    return lock


def resume_from(checkpoint, path, cfg, model, optimizer, scaler, log):
    """The weights, optimizer, scaler and random streams of ``checkpoint``; its TrainState."""
    changes = config_changes(checkpoint["config"], to_dict(cfg))
    try:
        state = restore_state(checkpoint, model, optimizer, scaler, log)
    except (RuntimeError, ValueError) as e:  # another model: size mismatches, missing keys
        model_changes = [c for c in changes if c.startswith("model.")] or ["none found"]
        raise FileError(f"{path} does not fit this model ({str(e).splitlines()[0][:150]}); model settings that "
                        f"differ from the checkpoint's: {'; '.join(model_changes[:5])}; resume with its "
                        "config.yaml or use another --output-dir") from None
    if changes:
        log(f"WARNING: resuming with settings that differ from the checkpoint's: {'; '.join(changes[:8])}")
    log(f"resumed from {path}: epoch {state.epoch}, iteration {state.iteration}")
    return state


def start_fresh(cfg, model, rank, log):
    """A new run: this process's random streams (its own RoI sampling), the pretrained backbone, the
    fine-tuning weights (train.init_weights)."""
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)
    if cfg.model.backbone.pretrained:
        load_pretrained(model.backbone, cfg.model.backbone.pretrained)
        log(f"backbone initialised from {cfg.model.backbone.pretrained}")
    if cfg.train.init_weights:
        report = load_matching_weights(model, cfg.train.init_weights)
        log(f"initialised {report['loaded']} of the model's {len(model.state_dict())} tensors from "
            f"{cfg.train.init_weights}")
        for kind, words in (("shape", "kept (another shape in the checkpoint)"),
                            ("missing", "kept (not in the checkpoint)"), ("unused", "ignored (not in this model)")):
            if report[kind]:
                more = f" and {len(report[kind]) - 6} more" if len(report[kind]) > 6 else ""
                log(f"  {words}: {', '.join(report[kind][:6])}{more}")
    return TrainState()


def total_iterations(solver, state, iters_per_epoch):
    """The iteration the run ends at. The schedule is in epochs: a run resumed with another batch layout
    (world size, images_per_gpu, accumulate_steps) trains the rest of its epochs in batches of the new
    size and stops at the same epoch."""
    remaining = max(0, (solver.epochs - state.epoch) * iters_per_epoch - state.batch_in_epoch)
    total_iters = state.iteration + remaining
    return min(total_iters, solver.max_iters) if solver.max_iters else total_iters


def set_up(args):
    """Processes, config, model, data, optimizer, and the state to start from (fresh or resumed)."""
    device = dist.init_distributed()
    if device.type == "cpu":
        keep_freed_memory()  # large activations reused, not re-mapped each step (scnet/utils/malloc.py)
    cfg = get_cfg(args.cfg, args.overrides)
    log = print if dist.is_main_process() else (lambda *a: None)
    output_dir = args.output_dir or os.path.join("output", os.path.splitext(os.path.basename(args.cfg or "default"))[0])
    lock = claim_output_dir(output_dir, cfg, args.resume, log) if dist.is_main_process() else None
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False

    # the same initial weights on every process; then a different RoI-sampling stream per process
    torch.manual_seed(cfg.seed)
    model = scnet.build_model(cfg).to(device)
    dataset = build_train_dataset(cfg)
    report_skipped(dataset, log)
    # the validation split is read now: a missing one stops the run before it starts
    evaluation = build_periodic_evaluation(cfg, output_dir, dataset.category_ids,
                                           ignoring_signals(parse_signals(cfg.train.stop_signals)))
    world, rank = dist.get_world_size(), dist.get_rank()
    # one batch of the loader is one SGD step: accumulate_steps micro-batches (train_step splits it)
    per_step = cfg.solver.images_per_gpu * cfg.solver.accumulate_steps
    loader = build_train_loader(dataset, per_step, world, rank, cfg.seed, cfg.data.flip_prob,
                                cfg.data.num_workers, worker_ignored_signals=parse_signals(cfg.train.stop_signals))
    params = [p for p in model.parameters() if p.requires_grad]  # weight decay on all of them [impl 24.29]
    base_lr = scaled_base_lr(cfg.solver, world)
    optimizer = torch.optim.SGD(params, lr=base_lr, momentum=cfg.solver.momentum, weight_decay=cfg.solver.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.solver.amp == "fp16")

    checkpoint, path = resolve_resume(args.resume, output_dir, log)
    if checkpoint is not None:
        state = resume_from(checkpoint, path, cfg, model, optimizer, scaler, log)
        state = resume_point(checkpoint, state, loader.batch_sampler, log)
    else:
        state = start_fresh(cfg, model, rank, log)
    if args.compile:
        compile_dense_parts(model)  # in place: parameter names and checkpoints unchanged
    wrapped = model
    if world > 1:
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    iters_per_epoch = len(loader.batch_sampler)
    total_iters = total_iterations(cfg.solver, state, iters_per_epoch)
    accumulate = f" x {cfg.solver.accumulate_steps} accumulated" if cfg.solver.accumulate_steps > 1 else ""
    log(f"{len(dataset)} images, {world} process(es) x {cfg.solver.images_per_gpu} images{accumulate}, "
        f"{iters_per_epoch} iterations/epoch, {total_iters} in total, base lr {base_lr:g}")
    try:
        logger = TrainLogger(output_dir, total_iters, state.iteration, cfg.train.log_period, dist.is_main_process())
    except OSError as e:
        raise FileError(f"cannot write the logs in {output_dir}: {write_failure(e, output_dir)}") from None
    if evaluation and checkpoint is not None:  # a new run into an old folder replaces its model_best.pth
        evaluation.restore_best(state, log)
    run = Run(cfg, device, output_dir, wrapped, model, optimizer, scaler, loader, logger, base_lr, total_iters,
              evaluation, lock)
    return run, state, dataset


def train(run, state):
    """From ``state`` to ``run.total_iters``: for each batch, one SGD step at the scheduled learning rate
    and a log record; a checkpoint every ``train.checkpoint_period`` iterations, at the end of every epoch
    and at the end, and when a stop signal arrives (scnet/engine/preemption.py). Returns the number of
    problems met while loading images."""
    load_issues = 0
    run.model.train()
    with StopSignals(parse_signals(run.cfg.train.stop_signals)) as stop:
        while state.iteration < run.total_iters and state.epoch < run.cfg.solver.epochs:
            load_issues += train_epoch(run, state, stop)
    return load_issues


def train_epoch(run, state, stop):
    """The rest of the current epoch (or up to ``run.total_iters``). Returns the number of problems met
    while loading images; raises StopRequested, after the checkpoint, when a stop signal arrived."""
    solver, period = run.cfg.solver, run.cfg.train.checkpoint_period
    iters_per_epoch = len(run.loader.batch_sampler)
    run.loader.batch_sampler.set_epoch(state.epoch, state.batch_in_epoch)  # the rest of this epoch
    end = time.time()
    for images, targets in run.loader:
        data_time = time.time() - end
        lr = set_learning_rate(run.optimizer, state, solver, run.base_lr)
        state.load_issues += [issue for t in targets for issue in t.get("issues", [])]
        losses, state.last_step_finite = train_step(
            run.model, run.optimizer, run.scaler, images, targets, solver, run.device
        )
        if not state.last_step_finite:
            count_nonfinite_step(state, losses, targets, run.cfg.train.max_nonfinite_steps, run.logger)
        state.iteration += 1
        state.batch_in_epoch += 1
        losses = dist.reduce_dict(losses, run.device)
        run.logger.record(state.iteration, state.epoch, losses, lr, time.time() - end, data_time, run.device)
        if state.batch_in_epoch == iters_per_epoch:  # a checkpoint from here resumes with the next epoch
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        stop_signal = stop.agreed(run.device)  # collective: every process stops at this iteration
        # collective; before the checkpoint, which then holds the best so far; not when stopping (a
        # scheduler's grace period may be shorter than an evaluation)
        if run.evaluation and not stop_signal and run.evaluation.due(state, run.total_iters):
            run.evaluation(run.module, run.device, state, run.logger)
        if stop_signal or (period and state.iteration % period == 0) or state.batch_in_epoch == 0 or \
                state.iteration == run.total_iters:
            save_checkpoint_if_good(run, state)
        if stop_signal:
            raise StopRequested(stop_signal.name, state.iteration, 128 + stop_signal)
        if state.iteration == run.total_iters:
            break
        end = time.time()
    return report_load_issues(state, run.logger)


def save_final_weights(run, state):
    """model_final.pth (the weights alone, for eval.py, demo.py and build_model) and every process's
    weight digest in the log (they must be equal)."""
    if dist.is_main_process():
        final = os.path.join(run.output_dir, "model_final.pth")
        save_file({"model": run.module.state_dict(), "config": to_dict(run.cfg)}, final)
        print(f"final weights -> {final}")
    digests = dist.all_gather_object(weights_digest(run.module))
    run.logger.write_json({"iteration": state.iteration, "weights_sha1": digests})
    if len(set(digests)) > 1:
        run.logger.info(f"WARNING: the processes ended with different weights: {digests}")


def save_checkpoint_if_good(run, state):
    """Write a checkpoint (collective). Not right after a skipped step: the newest checkpoint stays the
    last good one. Weights that went NaN/Inf stop the run."""
    if not state.last_step_finite:
        return
    if not dist.all_true(all_finite(run.module.state_dict()), run.device):  # collective: no hang
        raise NonFiniteError(f"NaN/Inf weights at iteration {state.iteration}: not saved")
    checkpoint = checkpoint_state(run.module, run.optimizer, run.scaler, state, run.cfg)
    error = None
    if dist.is_main_process():
        try:
            path = save_checkpoint(checkpoint, run.output_dir, run.cfg.train.keep_checkpoints)
            run.logger.info(f"checkpoint -> {path}")
        except FileError as e:  # a full disk: every process stops (one waiting in a barrier would hang)
            error = e
    if not dist.all_true(error is None, run.device):
        raise error or FileError("the main process could not write the checkpoint (see its message)")


def config_changes(before, now):
    """["key=old there, new here", ...] for every setting that differs between two resolved configs."""
    before, now = flatten(before), flatten(now)
    keys = [k for k in sorted(set(before) | set(now)) if before.get(k, "absent") != now.get(k, "absent")]
    return [f"{k}={before.get(k, 'absent')} there, {now.get(k, 'absent')} here" for k in keys]


def report_skipped(dataset, log):
    """Say what the dataset dropped at construction, by reason, with a few file names."""
    if not dataset.skipped:
        return
    reasons = Counter(reason.split(":")[0] for _, reason in dataset.skipped)
    log(f"data: {len(dataset.skipped)} items skipped or dropped while reading the annotations: {dict(reasons)}")
    for name, reason in dataset.skipped[:10]:
        log(f"  {name}: {reason}")


def report_load_issues(state, logger):
    """Print the load-time problems every process met since the last report (collective); their count."""
    issues = sum(dist.all_gather_object(state.load_issues), [])
    state.load_issues.clear()
    if issues:
        logger.info(f"data: {len(issues)} problem(s) while loading images (handled):")
        for issue in sorted(set(issues))[:20]:
            logger.info(f"  {issue}")
    logger.write_json({"iteration": state.iteration, "load_issues": len(issues)})
    return len(issues)


if __name__ == "__main__":
    report_file_errors(main)
