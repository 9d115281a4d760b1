"""``torch.compile`` of the detector's dense parts, an opt-in option (``--compile`` of the scripts).

Compiled: backbone, neck, RPN head and the semantic head, the parts that run on whole feature maps.
The RoI heads stay eager: their number of RoIs changes with every image, and their time is GEMMs and
our RoIAlign, which inductor does not make faster. Each part is compiled in place
(``nn.Module.compile``), so parameter names, checkpoints and DDP are unchanged.

Compiled kernels add in another order than eager PyTorch: outputs differ at float32 rounding (about
1e-5 relative on the FPN levels), so parity with the official implementation is defined on the eager
model (tests/test_parity_mmdet.py). The first call per input shape compiles (30-80 s on a 2-core CPU).
Measured on that CPU (SCNet R-50, scripts/benchmark.py --compile): inference 5.08 -> 4.77 s/img,
but a training step gets slower (7.1 -> 8.1 s), so it is off by default; measure it on your GPU.
(Inductor's ``freezing``, which folds the BatchNorms, was slower here still: 5.2 s.)
"""


def dense_parts(model):
    parts = [model.backbone, model.neck, model.rpn.head]
    if model.context.semantic_head is not None:
        parts.append(model.context.semantic_head)
    return parts


def compile_dense_parts(model):
    """Compile ``model``'s dense parts in place (``torch.compile`` defaults); returns the model."""
    for part in dense_parts(model):
        part.compile()
    return model
