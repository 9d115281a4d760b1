"""SCNet: Training-Inference Sample Consistency for Instance Segmentation (Vu, Kang, Yoo, AAAI 2021).

Notebook API:
    import scnet
    model = scnet.build_model("configs/r50_20e.yaml", weights="scnet_r50_fpn_20e_coco-a569f645.pth").eval()
    result = model([rgb_uint8_array])[0]   # boxes, scores, labels, masks in the image's pixels
"""
from .config import Config, get_cfg
from .weights import load_weights

__version__ = "0.1.0"


def build_model(cfg_or_path=None, weights=None, overrides=()):
    """Build a detector from a Config, a YAML path or None (the defaults: SCNet R-50 20e).

    Args:
        weights: optional path or URL of our checkpoint or of an official MMDetection checkpoint.
        overrides: ``["key.sub=value", ...]`` applied to the configuration.
    The backbone's ImageNet weights (``model.backbone.pretrained``) are not loaded here: a freshly
    built model is randomly initialised and building never downloads anything.
    """
    from .config import apply_overrides
    from .modeling.build import build_detector

    if isinstance(cfg_or_path, Config):
        cfg = apply_overrides(cfg_or_path, overrides)
    else:
        cfg = get_cfg(cfg_or_path, overrides)
    model = build_detector(cfg)
    model.cfg = cfg
    if weights is not None:
        load_weights(model, weights)
    return model


__all__ = ["Config", "build_model", "get_cfg", "load_weights"]
