"""Loading weights: this codebase's checkpoints, and official MMDetection checkpoints [impl 23].

The official files are dicts ``{"meta": ..., "state_dict": ...}`` with MMDetection's module names.
``convert_mmdet_state_dict`` renames every key with the table ``MMDET_RULES``; a key that no rule
matches, a key our model lacks, a key our model has that nothing produced, or a shape difference is an
error that names the key. Nothing is skipped silently.
"""
import re

import torch

from .utils.files import FileError, load_file

# (official name pattern, our name). Applied in order; the first full match wins.
MMDET_RULES = [
    (r"backbone\.(.+)", r"backbone.\1"),  # torchvision names on both sides [impl 23.2]
    (r"neck\.lateral_convs\.(\d+)\.conv\.(weight|bias)", r"neck.lateral_convs.\1.\2"),
    (r"neck\.fpn_convs\.(\d+)\.conv\.(weight|bias)", r"neck.output_convs.\1.\2"),
    (r"rpn_head\.rpn_conv\.(weight|bias)", r"rpn.head.conv.\1"),
    (r"rpn_head\.rpn_cls\.(weight|bias)", r"rpn.head.cls_logits.\1"),
    (r"rpn_head\.rpn_reg\.(weight|bias)", r"rpn.head.bbox_pred.\1"),
    # box heads: "bbox_head.{t}." in the cascades, "bbox_head." (one stage) in Mask R-CNN
    (r"roi_head\.bbox_head\.(?:(\d+)\.)?shared_fcs\.0\.(weight|bias)", r"roi_heads.box_heads.\1.fc1.\2"),
    (r"roi_head\.bbox_head\.(?:(\d+)\.)?shared_fcs\.1\.(weight|bias)", r"roi_heads.box_heads.\1.fc2.\2"),
    (r"roi_head\.bbox_head\.(?:(\d+)\.)?fc_cls\.(weight|bias)", r"roi_heads.box_heads.\1.cls_score.\2"),
    (r"roi_head\.bbox_head\.(?:(\d+)\.)?fc_reg\.(weight|bias)", r"roi_heads.box_heads.\1.bbox_pred.\2"),
    # mask heads: SCNet's residual blocks (convs.k.conv1/conv2) or FCN convs (convs.i.conv)
    (r"roi_head\.mask_head\.(?:(\d+)\.)?convs\.(\d+)\.(conv[12])\.(weight|bias)", r"roi_heads.mask_heads.\1.blocks.\2.\3.\4"),
    (r"roi_head\.mask_head\.(?:(\d+)\.)?convs\.(\d+)\.conv\.(weight|bias)", r"roi_heads.mask_heads.\1.convs.\2.\3"),
    (r"roi_head\.mask_head\.(?:(\d+)\.)?conv_res\.conv\.(weight|bias)", r"roi_heads.mask_heads.\1.info_flow.\2"),
    (r"roi_head\.mask_head\.(?:(\d+)\.)?upsample\.(weight|bias)", r"roi_heads.mask_heads.\1.deconv.\2"),
    (r"roi_head\.mask_head\.(?:(\d+)\.)?conv_logits\.(weight|bias)", r"roi_heads.mask_heads.\1.predictor.\2"),
    (r"roi_head\.mask_iou_head\.(convs\.\d+|fcs\.\d+)\.(weight|bias)", r"roi_heads.mask_iou_head.\1.\2"),
    (r"roi_head\.mask_iou_head\.fc_mask_iou\.(weight|bias)", r"roi_heads.mask_iou_head.predictor.\1"),
    # semantic head: SCNet's residual trunk (convs.k.conv1/conv2) or HTC's plain convs (convs.i.conv)
    (r"roi_head\.semantic_head\.lateral_convs\.(\d+)\.conv\.(weight|bias)", r"roi_heads.semantic_head.lateral_convs.\1.\2"),
    (r"roi_head\.semantic_head\.convs\.(\d+)\.(conv[12])\.(weight|bias)", r"roi_heads.semantic_head.blocks.\1.\2.\3"),
    (r"roi_head\.semantic_head\.convs\.(\d+)\.conv\.(weight|bias)", r"roi_heads.semantic_head.convs.\1.\2"),
    (r"roi_head\.semantic_head\.conv_embedding\.conv\.(weight|bias)", r"roi_heads.semantic_head.embedding.\1"),
    (r"roi_head\.semantic_head\.conv_logits\.(weight|bias)", r"roi_heads.semantic_head.logits.\1"),
    (r"roi_head\.glbctx_head\.convs\.(\d+)\.(conv[12])\.(weight|bias)", r"roi_heads.global_context.blocks.\1.\2.\3"),
    (r"roi_head\.glbctx_head\.fc\.(weight|bias)", r"roi_heads.global_context.classifier.\1"),
    (r"roi_head\.feat_relay_head\.fc\.(weight|bias)", r"roi_heads.feature_relays.0.fc.\1"),  # SCNet's one relay
]
_COMPILED = [(re.compile(p), r) for p, r in MMDET_RULES]


def mmdet_to_ours(name):
    """Our parameter name for an official one, or None when no rule covers it."""
    for pattern, replacement in _COMPILED:
        match = pattern.fullmatch(name)
        if match:
            # an absent optional stage index (single-stage and single-mask-head models) is index 0
            groups = [g if g is not None else "0" for g in match.groups()]
            return re.sub(r"\\(\d)", lambda m: groups[int(m.group(1)) - 1], replacement)
    return None


def is_mmdet_state_dict(state_dict):
    return any(k.startswith("roi_head.") or k.startswith("rpn_head.") for k in state_dict)


def convert_mmdet_state_dict(official, reference):
    """Rename an official state dict to ours, checking it against ``reference`` (our model's state dict).

    Raises KeyError / ValueError naming every key that cannot be accounted for.
    """
    converted, unmapped, unexpected, wrong_shape = {}, [], [], []
    for name, tensor in official.items():
        ours = mmdet_to_ours(name)
        if ours is None:
            unmapped.append(name)
        elif ours not in reference:
            unexpected.append(f"{name} -> {ours}")
        elif tuple(tensor.shape) != tuple(reference[ours].shape):
            wrong_shape.append(f"{name} {tuple(tensor.shape)} vs {ours} {tuple(reference[ours].shape)}")
        else:
            converted[ours] = tensor
    missing = [k for k in reference if k not in converted]
    problems = []
    if unmapped:
        problems.append(f"no rule for official keys {unmapped}")
    if unexpected:
        problems.append(f"official keys with no counterpart in this model {unexpected}")
    if wrong_shape:
        problems.append(f"shape mismatches {wrong_shape}")
    if missing:
        problems.append(f"model keys not provided by the checkpoint {missing}")
    if problems:
        raise KeyError("; ".join(problems))
    return converted


def read_checkpoint(path_or_url):
    """The raw object of a checkpoint file (a URL goes through torch.hub's cache), read without running
    code from it (scnet/utils/files.py)."""
    return load_file(path_or_url)


def check_finite(state_dict, source):
    """FileError naming the tensors of ``state_dict`` that hold NaN or Inf."""
    bad = [k for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise FileError(f"{source}: NaN/Inf values in {', '.join(bad[:3])}{more}")


def extract_state_dict(obj):
    """Our checkpoints keep the weights under ``model``, MMDetection's under ``state_dict``."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return obj["model"]
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"]
    return obj


def load_weights(model, path_or_url):
    """Load our checkpoint or an official MMDetection one into ``model`` (strict); NaN/Inf values are
    an error naming the tensors."""
    state = extract_state_dict(read_checkpoint(path_or_url))
    check_finite(state, path_or_url)
    if is_mmdet_state_dict(state):
        try:
            state = convert_mmdet_state_dict(state, model.state_dict())
        except KeyError as e:
            raise KeyError(f"{path_or_url}: {e.args[0]}") from None
    model.load_state_dict(state, strict=True)
    return model


def load_matching_weights(model, path_or_url):
    """Initialise ``model`` from a checkpoint of a related model, for fine-tuning (MMDetection's
    ``load_from``, Detectron2's ``MODEL.WEIGHTS``): every tensor whose name (an official name that is not
    ours renamed by ``MMDET_RULES``) and shape match is loaded; the others keep the model's initialisation. Returns
    ``{"loaded": n, "shape": [...], "missing": [...], "unused": [...]}``, the last three as key names
    (with both shapes for "shape"). A checkpoint of which nothing fits is a FileError."""
    state = extract_state_dict(read_checkpoint(path_or_url))
    check_finite(state, path_or_url)
    reference = model.state_dict()
    # key by key: an official file of another architecture (a single-stage detector) still shares the
    # backbone and FPN under names that only the rules map
    state = {k if k in reference else (mmdet_to_ours(k) or k): v for k, v in state.items()}
    fits = {k: v for k, v in state.items() if k in reference and tuple(v.shape) == tuple(reference[k].shape)}
    if not fits:
        raise FileError(f"{path_or_url}: none of its {len(state)} tensors fits this model (names and shapes differ)")
    model.load_state_dict(fits, strict=False)
    return {
        "loaded": len(fits),
        "shape": [f"{k} {tuple(v.shape)} -> {tuple(reference[k].shape)}" for k, v in state.items()
                  if k in reference and k not in fits],
        "missing": [k for k in reference if k not in state],
        "unused": [k for k in state if k not in reference],
    }


def mmdet_config_name(state_dict):
    """Our config (relative to configs/) of the official model a state dict comes from."""
    keys = set(state_dict)
    if any(k.startswith("roi_head.glbctx_head.") for k in keys):
        return "r50_20e.yaml"  # SCNet; the backbone overrides below give
    if any(k.startswith("roi_head.mask_iou_head.") for k in keys):
        return "baselines/ms_rcnn_r50_1x.yaml"
    if any(".conv_res." in k for k in keys):
        return "baselines/htc_r50_1x.yaml"
    if "roi_head.bbox_head.0.fc_cls.weight" in keys:
        if any(k.startswith("roi_head.semantic_head.") for k in keys):
            return "baselines/cascade_mask_rcnn_semantic_r50_1x.yaml"
        return "baselines/cascade_mask_rcnn_r50_1x.yaml"
    return "baselines/mask_rcnn_r50_1x.yaml"


def mmdet_backbone_overrides(state_dict):
    """Config overrides that describe the backbone of an official state dict (depth, ResNeXt groups)."""
    blocks = {int(m.group(1)) for k in state_dict for m in [re.match(r"backbone\.layer3\.(\d+)\.", k)] if m}
    depth = {6: 50, 23: 101}.get(len(blocks))
    if depth is None:
        raise ValueError(f"cannot infer the ResNet depth from {len(blocks)} blocks in layer3")
    overrides = [f"model.backbone.depth={depth}"]
    conv1 = state_dict["backbone.layer1.0.conv1.weight"]
    conv2 = state_dict["backbone.layer1.0.conv2.weight"]
    groups = conv1.shape[0] // conv2.shape[1]
    if groups > 1:  # ResNeXt: width = groups * width_per_group at layer1
        overrides += [f"model.backbone.groups={groups}", f"model.backbone.width_per_group={conv1.shape[0] // groups}"]
    return overrides
