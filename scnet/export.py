"""The inference graph of any model of the zoo, for ``torch.export`` (.pt2) and ONNX (scripts/export.py).

The graph is ``model.inference`` for one image: from the normalised, zero-padded (1, 3, H, W) network
input and the (2,) int64 size [h, w] of the resized image inside it, through backbone, FPN, RPN (NMS per
level), the image context, every box stage, class-wise NMS and the mask branch, to

    boxes (D, 4) float32  xyxy in network-input pixels     scores (D,) float32
    labels (D,) int64     0-based                           mask_probs (D, 28, 28) float32, of each label
    mask_scores (D,)      only with a MaskIoU head (Mask Scoring R-CNN)

with D <= ``model.roi_heads.max_detections``; H and W are dynamic (multiples of the model's size
divisibility, 32, from MIN_SIDE = 96). What stays outside, in plain numpy (deploy/scnet_runtime.py):
the keep-ratio resize, the normalisation and padding before, and after it the boxes scaled back to the
image and the masks pasted into it. The settings they need travel in the file (``metadata``).

The model code is the eager code: where it reads a size from the data (an empty batch, NMS over the best
candidates first, RoIs grouped per level, RoIAlign per RoI in Python), it takes a tensor-only path while
exporting (scnet/ops/export.py) that gives the same results. RoIAlign and NMS are torchvision's ops, which
both exporters know: the ONNX file uses ONNX's RoiAlign and NonMaxSuppression, the .pt2 program calls
torchvision's (load it with torchvision imported).
"""
import json

import torch
import torch.nn as nn

OUTPUTS = ("boxes", "scores", "labels", "mask_probs")
# The smallest padded height/width of a dynamic graph. Below it P6 is one pixel, for which PyTorch picks
# the convolution's kernel differently while tracing: a choice torch.export fixes into the graph. The
# runtime pads a smaller input up to it (as a batch with a larger image would in eager).
MIN_SIDE = 96


class InferenceGraph(nn.Module):
    """A detector's inference on one normalised, padded image: ``(image, image_size) -> dict``."""

    def __init__(self, detector):
        super().__init__()
        self.detector = detector.eval()

    def forward(self, image, image_size):
        d = self.detector
        sizes = [image_size]  # (h, w) as 0-d tensors: the boxes are clipped to it inside the graph
        features = d.extract_features(image)
        proposals, _, _ = d.rpn(features, sizes)
        features = d.roi_features(features)
        context, _ = d.context(features)
        (detection,) = d.roi_heads.predict(features, proposals, sizes, context)
        return {name: detection[name] for name in self.output_names}

    @property
    def output_names(self):
        with_iou = self.detector.roi_heads.mask_iou_head is not None
        return OUTPUTS + ("mask_scores",) if with_iou else OUTPUTS


def example_inputs(detector, height=800, width=1216, seed=0):
    """A random normalised (1, 3, H, W) image and its size, H and W rounded up to the divisibility."""
    div = detector.size_divisibility
    height, width = (-(-v // div) * div for v in (height, width))
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 3, height, width, generator=generator)
    return image, torch.tensor([height, width], dtype=torch.int64)


def export_program(detector, inputs, dynamic=True, max_side=4096):
    """``torch.export`` of the InferenceGraph on ``inputs``; with ``dynamic`` any H, W that are multiples
    of the size divisibility, from MIN_SIDE up to ``max_side``."""
    shapes = None
    if dynamic:
        div = detector.size_divisibility
        rows = torch.export.Dim("rows", min=-(-MIN_SIDE // div), max=max_side // div)
        cols = torch.export.Dim("cols", min=-(-MIN_SIDE // div), max=max_side // div)
        shapes = {"image": {2: div * rows, 3: div * cols}, "image_size": None}
    return trace(InferenceGraph(detector), inputs, shapes)


def trace(module, inputs, dynamic_shapes=None):
    """``torch.export.export`` (non-strict, no autograd) of a module of this package.

    Sizes derived from H and W are 1 for small inputs (the SC-conv gate's pooled C5 under 256 px):
    without backed_size_oblivious torch.export fixes the example's "not 1" into the graph (its 0/1
    specialisation) and the program refuses such images. Nothing in the graph broadcasts over a
    dimension that may be 1 (what the option would get wrong); tests/test_export.py runs such sizes.
    """
    with torch.no_grad(), torch.fx.experimental._config.patch(backed_size_oblivious=True):
        return torch.export.export(module, inputs, dynamic_shapes=dynamic_shapes, strict=False)


def metadata(detector, class_names=None, category_ids=None, input_size=None):
    """What the numpy wrapper needs (deploy/scnet_runtime.py), as the JSON string stored in the file:
    ``class_names`` and COCO ``category_ids`` indexed by label; ``input_size``: the (H, W) of a static
    graph, to which the wrapper pads every image (a dynamic one: to at least MIN_SIDE)."""
    return json.dumps({
        "test_scale": list(detector.test_scale),
        "pixel_mean": detector.pixel_mean.flatten().tolist(),
        "pixel_std": detector.pixel_std.flatten().tolist(),
        "size_divisibility": detector.size_divisibility,
        "mask_threshold": detector.mask_threshold,
        "class_names": list(class_names) if class_names is not None else None,
        "category_ids": list(category_ids) if category_ids is not None else None,
        "outputs": list(InferenceGraph(detector).output_names),
        "input_size": list(input_size) if input_size else None,
        "min_input_side": None if input_size else MIN_SIDE,
    })


def save_program(program, path, meta):
    """The .pt2 file, with the settings as its extra file ``scnet.json``."""
    torch.export.save(program, path, extra_files={"scnet.json": meta})


def save_onnx(program, path, meta, opset=18):
    """ONNX through torch's exporter of the pinned version (the program is converted, not re-traced);
    the settings as the model's metadata entry ``scnet``."""
    names = list(json.loads(meta)["outputs"])
    onnx_program = torch.onnx.export(program, (), dynamo=True, opset_version=opset,
                                     input_names=["image", "image_size"], output_names=names)
    onnx_program.model.metadata_props["scnet"] = meta
    onnx_program.save(path)
    return onnx_program
