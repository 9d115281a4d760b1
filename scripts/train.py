"""Train a detector on a COCO-format dataset.

    torchrun --nproc_per_node 8 scripts/train.py --cfg configs/r50_20e.yaml [key.sub=value ...]
    python scripts/train.py --cfg configs/r50_20e.yaml --output-dir out/r50 --resume auto

Plain torch.distributed: torchrun's environment variables, NCCL on GPU and gloo on CPU, one process
per GPU, SGD with the official schedule (lr 0.02 per 16 images, scaled linearly; warm-up; steps).
Checkpoints go to ``--output-dir`` every ``train.checkpoint_period`` iterations and at the end of every
epoch; ``--resume auto`` continues from the newest valid one, mid-epoch included. The trained weights
alone are written to ``model_final.pth`` at the end.
"""
import argparse
import os
import random
import sys
from collections import Counter

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import scnet  # noqa: E402
from scnet.config import dump, get_cfg, to_dict  # noqa: E402
from scnet.data.build import build_train_dataset, build_train_loader  # noqa: E402
from scnet.engine import dist  # noqa: E402
from scnet.engine.checkpoint import all_finite, list_checkpoints, resolve_resume, save_checkpoint  # noqa: E402
from scnet.engine.compile import compile_dense_parts  # noqa: E402
from scnet.engine.logger import TrainLogger  # noqa: E402
from scnet.engine.train import (  # noqa: E402
    NonFiniteError,
    TrainState,
    checkpoint_state,
    restore_state,
    scaled_base_lr,
    train_one_epoch,
    weights_digest,
)
from scnet.modeling.backbone.resnet import load_pretrained  # noqa: E402
from scnet.utils.malloc import keep_freed_memory  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", help="YAML config (default: SCNet R-50 20e)")
    parser.add_argument("--output-dir", default=None, help="default: output/<config name>")
    parser.add_argument("--resume", default="", help="a checkpoint path, or 'auto' (newest valid in --output-dir)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the dense parts (scnet/engine/compile.py; slower on a CPU, measure on GPU)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    return parser.parse_args()


def report_skipped(dataset, log):
    """Say what the dataset dropped at construction, by reason, with a few file names."""
    if not dataset.skipped:
        return
    reasons = Counter(reason.split(":")[0] for _, reason in dataset.skipped)
    log(f"data: {len(dataset.skipped)} items skipped or dropped while reading the annotations: {dict(reasons)}")
    for name, reason in dataset.skipped[:10]:
        log(f"  {name}: {reason}")


def main():
    args = parse_args()
    device = dist.init_distributed()
    if device.type == "cpu":
        keep_freed_memory()  # large activations reused, not re-mapped each step (scnet/utils/malloc.py)
    cfg = get_cfg(args.cfg, args.overrides)
    log = print if dist.is_main_process() else (lambda *a: None)
    output_dir = args.output_dir or os.path.join("output", os.path.splitext(os.path.basename(args.cfg or "default"))[0])
    if dist.is_main_process():
        os.makedirs(output_dir, exist_ok=True)
        dump(cfg, os.path.join(output_dir, "config.yaml"))
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False

    # the same initial weights on every process; then a different RoI-sampling stream per process
    torch.manual_seed(cfg.seed)
    model = scnet.build_model(cfg).to(device)
    dataset = build_train_dataset(cfg)
    report_skipped(dataset, log)
    world, rank = dist.get_world_size(), dist.get_rank()
    loader = build_train_loader(
        dataset, cfg.solver.images_per_gpu, world, rank, cfg.seed, cfg.data.flip_prob, cfg.data.num_workers
    )
    params = [p for p in model.parameters() if p.requires_grad]  # weight decay on all of them (§24.29)
    base_lr = scaled_base_lr(cfg.solver, world)
    optimizer = torch.optim.SGD(params, lr=base_lr, momentum=cfg.solver.momentum, weight_decay=cfg.solver.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.solver.amp == "fp16")

    checkpoint, path = resolve_resume(args.resume, output_dir, log)
    if checkpoint is not None:
        state = restore_state(checkpoint, model, optimizer, scaler, log)
        log(f"resumed from {path}: epoch {state.epoch}, iteration {state.iteration}")
    else:
        random.seed(cfg.seed + rank)
        np.random.seed(cfg.seed + rank)
        torch.manual_seed(cfg.seed + rank)
        state = TrainState()
        if cfg.model.backbone.pretrained:
            load_pretrained(model.backbone, cfg.model.backbone.pretrained)
            log(f"backbone initialised from {cfg.model.backbone.pretrained}")
    model_without_ddp = model
    if args.compile:
        compile_dense_parts(model)  # in place: parameter names and checkpoints unchanged
    if world > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    iters_per_epoch = len(loader.batch_sampler)
    total_iters = cfg.solver.epochs * iters_per_epoch
    if cfg.solver.max_iters:
        total_iters = min(total_iters, cfg.solver.max_iters)
    log(f"{len(dataset)} images, {world} process(es) x {cfg.solver.images_per_gpu} images, "
        f"{iters_per_epoch} iterations/epoch, {total_iters} in total, base lr {base_lr:g}")
    logger = TrainLogger(output_dir, total_iters, state.iteration, cfg.train.log_period, dist.is_main_process())

    saved_at = [None]

    def save():
        if saved_at[0] == state.iteration or not state.last_step_finite:
            return  # after a skipped step the newest checkpoint stays the one before it
        if not dist.all_true(all_finite(model_without_ddp.state_dict()), device):  # collective: no hang
            raise NonFiniteError(f"NaN/Inf weights at iteration {state.iteration}: not saved")
        ckpt = checkpoint_state(model_without_ddp, optimizer, scaler, state, cfg)
        if dist.is_main_process():
            logger.info(f"checkpoint -> {save_checkpoint(ckpt, output_dir, cfg.train.keep_checkpoints)}")
        saved_at[0] = state.iteration
        dist.barrier()

    model.train()
    load_issues = 0
    try:
        while state.epoch < cfg.solver.epochs and state.iteration < total_iters:
            loader.batch_sampler.set_epoch(state.epoch, state.batch_in_epoch)
            train_one_epoch(model, optimizer, scaler, loader, state, cfg, logger, device, base_lr, total_iters, save)
            if state.batch_in_epoch >= iters_per_epoch:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            save()
            load_issues += report_load_issues(state, logger)
    except NonFiniteError as e:
        newest = list_checkpoints(output_dir)
        logger.info(f"ERROR: {e}. Newest good checkpoint: {newest[0] if newest else 'none'}")
        logger.close()
        dist.cleanup()
        sys.exit(1)
    if dist.is_main_process():  # the trained weights alone, for eval.py / demo.py / build_model
        final = os.path.join(output_dir, "model_final.pth")
        torch.save({"model": model_without_ddp.state_dict(), "config": to_dict(cfg)}, final + ".tmp")
        os.replace(final + ".tmp", final)
        log(f"final weights -> {final}")
    digests = dist.all_gather_object(weights_digest(model_without_ddp))
    logger.write_json({"iteration": state.iteration, "weights_sha1": digests})
    if len(set(digests)) > 1:
        logger.info(f"WARNING: the processes ended with different weights: {digests}")
    logger.close()
    log(f"done: {state.iteration} iterations; skipped: {len(dataset.skipped)} items while reading the "
        f"annotations, {load_issues} problems while loading images, {state.nonfinite_steps} non-finite steps")
    dist.cleanup()


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
    main()
