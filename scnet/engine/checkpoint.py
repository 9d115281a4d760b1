"""Training checkpoints: written atomically, the newest N kept, the newest valid one found on resume.

A checkpoint is a plain dict: model, optimizer, scaler, epoch, iteration, sampler position, RNG states
of every process, the resolved config and the code version.
"""
import glob
import os
import re
import subprocess
import time

import torch

import scnet
from ..utils.files import FileError, load_file, save_file
from ..weights import check_finite

NAME = "checkpoint_{:08d}.pth"
PATTERN = re.compile(r"checkpoint_(\d{8})\.pth$")
REQUIRED_KEYS = ("model", "optimizer", "epoch", "iteration", "batch_in_epoch", "config")


def code_version():
    """Package version plus the git commit of the source tree, when it is a git checkout."""
    here = os.path.dirname(os.path.abspath(scnet.__file__))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{scnet.__version__}+{commit}" if commit else scnet.__version__


def all_finite(state_dict):
    return all(torch.isfinite(v).all() for v in state_dict.values() if torch.is_tensor(v) and v.is_floating_point())


def save_checkpoint(state, output_dir, keep=3):
    """Write ``state`` as checkpoint_<iteration>.pth through a temporary file and a rename, then delete
    all but the newest ``keep``. Refuses non-finite weights, so the newest file is always a good one."""
    if not all_finite(state["model"]):
        raise FloatingPointError("refusing to save a checkpoint with NaN/Inf weights")
    path = os.path.join(output_dir, NAME.format(state["iteration"]))
    save_file(state, path)  # FileError naming the file on a full disk; no partial file left
    for old in list_checkpoints(output_dir)[max(keep, 1) :]:
        os.remove(old)
    return path


def list_checkpoints(output_dir):
    """Checkpoint files of ``output_dir``, newest (highest iteration) first."""
    found = [p for p in glob.glob(os.path.join(output_dir, "checkpoint_*.pth")) if PATTERN.search(p)]
    return sorted(found, key=lambda p: int(PATTERN.search(p).group(1)), reverse=True)


def load_checkpoint(path):
    """Read and validate a checkpoint; raises FileError saying what is wrong with it."""
    state = load_file(path)  # ValueError naming the file: unreadable, truncated, or content that could run code
    missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise FileError(f"{path} is not a training checkpoint (missing {missing})")
    check_finite(state["model"], path)
    return state


def resolve_resume(resume, output_dir, log=print):
    """``resume`` is "", a path, or "auto" (the newest valid checkpoint of ``output_dir``, falling back
    to older ones with a message). Returns (state, path) or (None, None)."""
    if not resume:
        return None, None
    if resume != "auto":
        return load_checkpoint(resume), resume
    for path in list_checkpoints(output_dir):
        try:
            return load_checkpoint(path), path
        except FileError as e:
            log(f"WARNING: {e}; trying the previous checkpoint")
    log(f"no valid checkpoint in {output_dir}: starting from scratch")
    return None, None


def start_new_run(output_dir, log=print):
    """For a run that does not resume: refuse a folder that holds an earlier run's checkpoints or final
    weights (their iterations would mix with this run's: ``keep_checkpoints`` would delete the new ones,
    ``--resume auto`` pick the old), and set the log and TensorBoard files of an earlier run that wrote
    no checkpoint aside into ``previous/<time>/``, so that this run starts its own."""
    held = list_checkpoints(output_dir)[:1] + [p for p in [os.path.join(output_dir, "model_final.pth")]
                                                if os.path.isfile(p)]
    if held:
        names = ", ".join(os.path.basename(p) for p in held)
        raise FileError(f"{output_dir} holds an earlier run ({names}): continue it with --resume auto, or give "
                        "another --output-dir")
    old = [name for name in ("log.jsonl", "tensorboard") if os.path.exists(os.path.join(output_dir, name))]
    if old:
        aside = os.path.join(output_dir, "previous", time.strftime("%Y%m%d-%H%M%S"))
        os.makedirs(aside, exist_ok=True)
        for name in old:
            os.rename(os.path.join(output_dir, name), os.path.join(aside, name))
        log(f"the earlier run's {' and '.join(old)} moved to {aside}")
