"""The inference graph of any model of the zoo, for ``torch.export`` (.pt2) and ONNX (scripts/export.py).

The graph is ``model.inference`` for one image: from the normalised, zero-padded (1, 3, H, W) network
input and the (2,) int64 size [h, w] of the resized image inside it, through backbone, FPN, RPN (NMS per
level), the image context, every box stage, class-wise NMS and the mask branch, to

    boxes (D, 4) float32  xyxy in network-input pixels     scores (D,) float32
    labels (D,) int64     0-based                           mask_probs (D, 28, 28) float32, of each label
    mask_scores (D,)      only with a MaskIoU head (Mask Scoring R-CNN)

with D <= ``model.roi_heads.max_detections``; H and W are dynamic (multiples of the model's size
divisibility, 32). What stays outside, in plain numpy (deploy/scnet_runtime.py): the keep-ratio resize,
the normalisation and padding before, and after it the boxes scaled back to the image and the masks
pasted into it. The settings they need travel in the file (``metadata``).

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
    of the size divisibility, up to ``max_side``."""
    graph = InferenceGraph(detector)
    shapes = None
    if dynamic:
        div = detector.size_divisibility
        rows = torch.export.Dim("rows", min=1, max=max_side // div)
        cols = torch.export.Dim("cols", min=1, max=max_side // div)
        shapes = {"image": {2: div * rows, 3: div * cols}, "image_size": None}
    with torch.no_grad():
        return torch.export.export(graph, inputs, dynamic_shapes=shapes, strict=False)


def metadata(detector, class_names=None, input_size=None):
    """What the numpy wrapper needs (deploy/scnet_runtime.py), as the JSON string stored in the file.
    ``input_size``: the (H, W) of a static graph, to which the wrapper pads every image."""
    return json.dumps({
        "test_scale": list(detector.test_scale),
        "pixel_mean": detector.pixel_mean.flatten().tolist(),
        "pixel_std": detector.pixel_std.flatten().tolist(),
        "size_divisibility": detector.size_divisibility,
        "mask_threshold": detector.mask_threshold,
        "class_names": class_names,
        "outputs": list(InferenceGraph(detector).output_names),
        "input_size": list(input_size) if input_size else None,
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
