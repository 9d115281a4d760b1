"""Measurement helpers of scripts/benchmark.py: peak memory of a block, and the time of the
post-processing steps inside the model."""
import contextlib
import functools
import time

import torch

import scnet.modeling.roi_heads.base as roi_heads_base


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or the process's peak resident set on Linux
    (VmHWM, reset through /proc/self/clear_refs; the whole process, weights included)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak_mb = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with contextlib.suppress(OSError):
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            with contextlib.suppress(OSError), open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        self.peak_mb = int(line.split()[1]) / 1024
        return False


class PartTimer:
    """Wall time of the post-processing steps inside the model: NMS and mask pasting."""

    def __init__(self, model, device):
        self.device = torch.device(device)
        self.seconds = {}
        self._undo = []
        self._wrap(roi_heads_base, "multiclass_nms", "nms")  # every architecture's predict
        self._wrap(model, "postprocess", "paste")

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _wrap(self, owner, name, label):
        original, own = getattr(owner, name), name in vars(owner)

        @functools.wraps(original)
        def timed(*a, **k):
            self._sync()
            t = time.perf_counter()
            out = original(*a, **k)
            self._sync()
            self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t
            return out

        setattr(owner, name, timed)
        self._undo.append((owner, name, original, own))

    def close(self):
        for owner, name, original, own in reversed(self._undo):
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)
