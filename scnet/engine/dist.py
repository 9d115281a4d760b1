"""torch.distributed in a few functions: torchrun environment, rank queries, reductions for logging."""
import os
from datetime import timedelta

import torch
import torch.distributed as dist


def init_distributed():
    """Initialise from the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK); a plain run is rank 0 of 1.

    NCCL on GPU, gloo on CPU. Returns the device this process computes on.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method="env://", timeout=timedelta(minutes=30))
    return device


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_distributed() else 0


def get_world_size():
    return dist.get_world_size() if is_distributed() else 1


def is_main_process():
    return get_rank() == 0


def barrier():
    if is_distributed():
        dist.barrier()


def all_true(flag, device):
    """True on every process iff ``flag`` is True on every process (so that all take the same branch)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor(1 if flag else 0, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def all_gather_object(obj):
    """List of ``obj`` from every process (the one-element list when not distributed)."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def reduce_dict(values, device):
    """Average a dict of floats over processes, for logging only."""
    if not is_distributed():
        return dict(values)
    keys = sorted(values)
    stacked = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(stacked)
    stacked /= get_world_size()
    return dict(zip(keys, stacked.tolist()))


def cleanup():
    if is_distributed():
        dist.destroy_process_group()
