"""What the inference code needs to know while ``torch.export`` traces it (scripts/export.py).

Eager inference reads sizes from the data in a few places, to skip work (an empty batch, NMS over
the few best candidates first) or to loop in Python (RoIAlign per RoI on the CPU, RoIs grouped by
FPN level). A traced graph cannot: its sizes are symbols, and a branch on one would fix it to the value
of the example image. Those places ask ``exporting()`` and take a tensor-only path that gives the same
results; ``maybe_empty(n)`` is False while exporting (the graph must hold the work for every size).
"""
import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false


def exporting():
    """True while torch.export (and the ONNX exporter built on it) traces the model."""
    return torch.compiler.is_exporting()


def maybe_empty(size):
    """``size == 0`` in eager mode; False (no branch) for a traced, data-dependent size."""
    return guard_or_false(size == 0)
