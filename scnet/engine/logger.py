"""What a person sees during training: a progress bar with ETA, a console line every N iterations,
TensorBoard scalars and a JSON-lines log (only the main process writes)."""
import datetime
import json
import os
import resource
import time
from collections import defaultdict, deque

import torch
from tqdm import tqdm


class SmoothedValue:
    """The values of the last ``window`` iterations; their mean is what every sink shows."""

    def __init__(self, window=20):
        self.window = deque(maxlen=window)

    def update(self, value):
        self.window.append(value)

    @property
    def mean(self):
        return sum(self.window) / len(self.window)


def max_memory_mb(device):
    """Peak memory of this process: CUDA allocations on GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class TrainLogger:
    """Console + TensorBoard + ``log.jsonl`` in ``output_dir``; silent on processes other than rank 0."""

    def __init__(self, output_dir, total_iters, start_iter, log_period, enabled=True):
        self.enabled = enabled
        self.log_period = log_period
        self.total_iters = total_iters
        self.meters = defaultdict(lambda: SmoothedValue(log_period))
        self.bar = tqdm(total=total_iters, initial=start_iter, dynamic_ncols=True, disable=not enabled)
        self.writer = None
        self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            self.jsonl = open(os.path.join(output_dir, "log.jsonl"), "a")
        self.start_time = time.time()
        self.start_iter = start_iter

    def info(self, message):
        if self.enabled:
            tqdm.write(message)

    def record(self, iteration, epoch, losses, lr, iter_time, data_time, device):
        """Update meters after one iteration; every ``log_period`` iterations, write a line everywhere."""
        for k, v in losses.items():
            self.meters[k].update(float(v))
        self.meters["loss"].update(float(sum(losses.values())))
        self.meters["time"].update(iter_time)
        self.meters["data_time"].update(data_time)
        self.bar.update(1)
        if iteration % self.log_period and iteration != self.total_iters:
            return
        done = iteration - self.start_iter
        eta = (time.time() - self.start_time) / max(done, 1) * (self.total_iters - iteration)
        memory = max_memory_mb(device)
        scalars = {k: m.mean for k, m in self.meters.items()}
        scalars.update(lr=lr, max_mem_mb=memory)
        self.bar.set_postfix(loss=f"{self.meters['loss'].mean:.3f}", lr=f"{lr:.2e}")
        if not self.enabled:
            return
        # one definition everywhere: the mean over the last log_period iterations (console, TensorBoard, log.jsonl)
        terms = "  ".join(f"{k}: {m.mean:.4f}" for k, m in self.meters.items() if k not in ("time", "data_time"))
        self.info(
            f"epoch {epoch} iter {iteration}/{self.total_iters}  eta {datetime.timedelta(seconds=int(eta))}  {terms}  "
            f"lr: {lr:.6f}  time: {self.meters['time'].mean:.3f}s  data: {self.meters['data_time'].mean:.3f}s  "
            f"max_mem: {memory:.0f}MB"
        )
        for k, v in scalars.items():
            self.writer.add_scalar(f"train/{k}", v, iteration)
        self.write_json({"iteration": iteration, "epoch": epoch, **scalars})

    def record_eval(self, iteration, epoch, metrics, num_images):
        """One evaluation (scnet/engine/validation.py) after ``iteration`` iterations and ``epoch`` whole
        epochs: a console line, TensorBoard ``val/<type>/<stat>`` and a ``log.jsonl`` record with
        everything, per-category AP included."""
        if not self.enabled:
            return
        summary = "  ".join(f"{iou_type} AP {m['AP']:.4f} AP50 {m['AP50']:.4f} AP75 {m['AP75']:.4f}"
                            for iou_type, m in metrics.items())
        self.info(f"eval at iteration {iteration} ({epoch} epochs done, {num_images} images): {summary}")
        for iou_type, m in metrics.items():
            for stat, value in m.items():
                if stat != "per_category":
                    self.writer.add_scalar(f"val/{iou_type}/{stat}", value, iteration)
        self.writer.flush()
        self.write_json({"iteration": iteration, "epochs_done": epoch, "eval": metrics, "eval_images": num_images})

    def write_json(self, record):
        if self.enabled:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    def close(self):
        self.bar.close()
        if self.enabled:
            self.writer.close()
            self.jsonl.close()
