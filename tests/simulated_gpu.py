"""A GPU simulated on the CPU: the code's GPU paths and PyTorch's device rules, on a machine without one.

Tensors on the simulated device report a device other than the CPU, so the code takes the branches a GPU
takes (torchvision's RoIAlign and its backward instead of ours, features left channels-first, ...); they
hold their values in a CPU tensor, so results compare with the CPU path; and every op on them checks the
rule a GPU enforces: all tensor operands on one device, except CPU index tensors and, in pointwise ops,
0-dimensional CPU tensors (numbers). A tensor created without ``device=`` next to one on the GPU, an index built on the
wrong side, a tensor attribute that ``.to(device)`` does not move: each raises ``DeviceMismatch`` naming
the op and the devices, as the first GPU run would. Copies to the host (``.cpu()``, ``.item()``,
``.tolist()``) work as on a GPU; ``.numpy()`` of a device tensor is refused as there.

The device is named "meta": PyTorch's one non-CPU device that needs no driver (a simulated "cuda" device
runs into the CUDA runtime in device guards and the autograd engine). Inside ``simulated_gpu()`` "meta"
means the simulated GPU; real meta tensors (shapes without values) are not available there.
Limits: float32 only (autocast's casts are dispatch keys of the real device: mixed precision needs a
real GPU, tests/test_device.py); no streams, no NCCL, no torch.cuda calls.
"""
import collections
import contextlib

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, return_and_correct_aliasing

DEVICE = torch.device("meta")
CPU = torch.device("cpu")
aten = torch.ops.aten

# ops whose operands may sit on two devices: indexing (CPU indices into a GPU tensor) and copies
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default,
             aten._unsafe_index.Tensor, aten._unsafe_index_put.default}
_COPIES = {aten.copy_.default, aten._copy_from.default, aten._copy_from_and_resize.default}
# besides the pointwise ops (TensorIterator's CPU scalars), these read a 0-dim CPU operand as a number
_TAKE_SCALAR_TENSORS = {aten.fill_.Tensor, aten.fill.Tensor, aten.masked_fill_.Tensor, aten.masked_fill.Tensor,
                        aten.index_fill_.int_Tensor, aten.index_fill.int_Tensor}


class DeviceMismatch(RuntimeError):
    pass


class SimulatedGpuTensor(torch.Tensor):
    """A tensor on the simulated GPU; ``elem`` holds its values on the CPU."""

    @staticmethod
    def __new__(cls, elem):
        return torch.Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=DEVICE, requires_grad=elem.requires_grad)

    def __init__(self, elem):
        self.elem = elem

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self):
        return f"SimulatedGpuTensor({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func}: a tensor of the simulated GPU used outside simulated_gpu()")


def _device(t):
    return DEVICE if isinstance(t, SimulatedGpuTensor) else t.device


def _is_simulated(device):
    return device is not None and torch.device(device).type == DEVICE.type


def _unwrap(t):
    return t.elem if isinstance(t, SimulatedGpuTensor) else t


class SimulatedGpu(TorchDispatchMode):
    """The dispatch mode behind ``simulated_gpu()``; ``calls`` counts each op run (e.g. to check that
    a GPU kernel's path was taken)."""

    device = DEVICE

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        self.calls[str(func)] += 1
        for t in pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and not isinstance(t, SimulatedGpuTensor) and t.is_meta:
                raise RuntimeError(f"{func}: a meta tensor without values, made by a path simulated_gpu() misses")
        out_device = _output_device(func, args, kwargs)
        if _is_simulated(kwargs.get("device")):
            kwargs["device"] = CPU
        out = func(*pytree.tree_map(_unwrap, args), **pytree.tree_map(_unwrap, kwargs))
        for t in _written(func, args, kwargs):
            if isinstance(t, SimulatedGpuTensor) and t.shape != t.elem.shape:  # e.g. cat(..., out=empty)
                raise NotImplementedError(f"{func}: resizes a tensor in place, which simulated_gpu() does not follow")
        if out_device != DEVICE:
            return out
        wrapped = pytree.tree_map(lambda t: SimulatedGpuTensor(t) if isinstance(t, torch.Tensor) else t, out)
        return return_and_correct_aliasing(func, args, kwargs, wrapped)  # in-place ops return their input


def _written(func, args, kwargs):
    """The tensors an op writes in place (self of ``add_``, ``out=``)."""
    schema = func._schema.arguments
    values = list(args) + [kwargs.get(a.name) for a in schema[len(args):]]
    return [v for a, v in zip(schema, values)
            if isinstance(v, torch.Tensor) and a.alias_info is not None and a.alias_info.is_write]


def _output_device(func, args, kwargs):
    """The device of the op's output; raises DeviceMismatch where a GPU would refuse the operands."""
    if kwargs.get("device") is not None:  # factories, .to(device)
        return DEVICE if _is_simulated(kwargs["device"]) else CPU
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if func in _COPIES:
        return _device(args[0])
    if func in _INDEXING:
        target = _device(args[0])
        for index in args[1]:
            if index is not None and _device(index) not in (CPU, target):
                raise DeviceMismatch(f"{func}: an index on {_device(index)} into a tensor on {target}")
        values = args[2] if len(args) > 2 else None
        if isinstance(values, torch.Tensor) and values.dim() > 0 and _device(values) != target:
            raise DeviceMismatch(f"{func}: values on {_device(values)} put into a tensor on {target}")
        return target
    # a 0-dim CPU operand is read as a number by pointwise ops, but never as the tensor written
    scalars = torch.Tag.pointwise in func.tags or func in _TAKE_SCALAR_TENSORS
    written = {id(t) for t in _written(func, args, kwargs)}
    devices = {_device(t) for t in tensors
               if not (scalars and t.dim() == 0 and _device(t) == CPU and id(t) not in written)}
    if len(devices) > 1:
        operands = ", ".join(f"{tuple(t.shape)} on {_device(t)}" for t in tensors)
        raise DeviceMismatch(f"{func}: operands on different devices: {operands}")
    return devices.pop() if devices else CPU


def _patches(original):
    """Replacements of functions that cannot see the simulated GPU, each calling ``original[name]``
    (what was in place when the block began: an outer instrument's wrapper keeps counting)."""
    def tolist(self):
        return original["tolist"](_unwrap(self))  # a subclass's tolist is refused; a GPU's copies to the host

    def numpy(self, *args, **kwargs):
        if isinstance(self, SimulatedGpuTensor):  # a GPU's own words (a subclass's would be about subclasses)
            raise TypeError(f"can't convert {DEVICE} device type tensor to numpy. Use Tensor.cpu() to copy the "
                            "tensor to host memory first.")
        return original["numpy"](self, *args, **kwargs)

    # torch.tensor and torch.as_tensor fill in Python data outside the dispatcher and leave a tensor created
    # on "meta" without values: create it on the CPU, then move it (a tensor's .to() is dispatched)
    def tensor(data, *args, device=None, requires_grad=False, **kwargs):
        if not _is_simulated(device):
            return original["tensor"](data, *args, device=device, requires_grad=requires_grad, **kwargs)
        return original["tensor"](data, *args, **kwargs).to(device).requires_grad_(requires_grad)

    def as_tensor(data, dtype=None, device=None):
        if isinstance(data, torch.Tensor) or not _is_simulated(device):
            return original["as_tensor"](data, dtype=dtype, device=device)
        return original["as_tensor"](data, dtype=dtype).to(device)

    def new_tensor(self, data, dtype=None, device=None, requires_grad=False):
        dtype = self.dtype if dtype is None else dtype
        return tensor(data, dtype=dtype, device=self.device if device is None else device, requires_grad=requires_grad)

    def autocast(device_type, *args, enabled=True, **kwargs):
        if device_type != DEVICE.type:
            return original["autocast"](device_type, *args, enabled=enabled, **kwargs)
        if enabled:  # autocast's casts are dispatch keys of the real device, which these tensors lack
            raise NotImplementedError("simulated_gpu(): mixed precision needs a real GPU (tests/test_device.py)")
        return contextlib.nullcontext()

    return {"tolist": tolist, "numpy": numpy, "tensor": tensor, "as_tensor": as_tensor, "new_tensor": new_tensor,
            "autocast": autocast}


@contextlib.contextmanager
def simulated_gpu():
    """While the block runs, ``.to(gpu.device)`` and ``device=gpu.device`` give tensors on the simulated
    GPU. Yields the SimulatedGpu mode (``gpu.device``, ``gpu.calls``)."""
    owners = {"tolist": torch.Tensor, "numpy": torch.Tensor, "new_tensor": torch.Tensor, "tensor": torch,
              "as_tensor": torch, "autocast": torch}
    originals = {name: getattr(owner, name) for name, owner in owners.items()}
    try:
        for name, replacement in _patches(originals).items():
            setattr(owners[name], name, replacement)
        with SimulatedGpu() as mode:
            yield mode
    finally:
        for name, original in originals.items():
            setattr(owners[name], name, original)
