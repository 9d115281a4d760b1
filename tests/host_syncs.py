"""Count the places where code would make the host wait for a GPU, on a machine without one.

On CUDA a host-device synchronisation happens when Python needs a value or a shape that only the device
knows: ``.item()``/``float()``/``bool()`` of a tensor, ``.tolist()``/``.numpy()``/``.cpu()``, and ops whose
output size depends on the data (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``,
``repeat_interleave`` without ``output_size``, NMS). Those are visible on the CPU too: this module records
them with a ``TorchDispatchMode`` (for the ops, also inside autograd's backward) and wrappers around the
Tensor methods that read values into Python, each attributed to the innermost frame in the ``scnet``
package. ``torch.cuda.set_sync_debug_mode`` gives the CUDA-side count when a GPU is there.
"""
import collections
import os
import traceback
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import scnet

PACKAGE = os.path.dirname(os.path.abspath(scnet.__file__))
aten = torch.ops.aten

# ops that read a value into the host or whose output shape depends on the data
_SYNC_OPS = {
    aten._local_scalar_dense.default: "item",  # .item(), float(t), int(t), bool(t), `if t:`
    aten.nonzero.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique",
    aten.repeat_interleave.Tensor: "repeat_interleave",
    aten.equal.default: "equal",
    aten.bincount.default: "bincount",  # its output size is the input's max
}
_READS = ("tolist", "numpy", "cpu")  # Tensor methods that copy to the host (no dispatched op on a CPU tensor)


def _site():
    """(path relative to the package, function) of the innermost frame in the scnet package."""
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path.startswith(PACKAGE + os.sep):
            return os.path.relpath(path, PACKAGE), frame.name
    return None


class _Recorder(TorchDispatchMode):
    def __init__(self, counts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _SYNC_OPS.get(func)
        if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is not None:
            kind = None
        if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            if any(i is not None and i.dtype == torch.bool for i in args[1]):
                kind = "boolean-mask index"  # a nonzero inside
        if func.namespace == "torchvision" and func._opname in ("nms",):
            kind = "nms"
        if kind is not None:
            self.counts[(kind,) + (_site() or ("(outside scnet)", ""))] += 1
        return func(*args, **kwargs)


@contextmanager
def record_host_syncs():
    """Yields a Counter {(kind, file, function): calls} filled while the block runs."""
    counts = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in _READS}

    def wrap(name, original):
        def read(self, *args, **kwargs):
            counts[(name,) + (_site() or ("(outside scnet)", ""))] += 1
            return original(self, *args, **kwargs)
        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        with _Recorder(counts):
            yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
