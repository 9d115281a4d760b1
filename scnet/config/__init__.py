"""Typed configuration: documented defaults, YAML files that list only what differs, CLI overrides.

``model.arch`` selects the model's schema: each architecture (``MODEL_CONFIGS``) has its own defaults,
the official model's ([impl N] cites docs/official_implementation*.md), and only the options it
supports. A YAML file is a nested mapping whose keys must exist in that schema; ``key.sub=value``
strings override single values. Any unknown key, including an option the chosen architecture does not
have, is an error that names the key, so a typo never silently trains another model. The defaults with
no ``model.arch`` are SCNet R-50-FPN 20e.

    cfg = get_cfg("configs/r50_1x.yaml", ["solver.base_lr=0.01", "model.backbone.depth=101"])
"""
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import List

import yaml

from .model import MODEL_CONFIGS, ModelConfig, SCNetConfig, semantic_branch

__all__ = ["Config", "ConfigError", "MODEL_CONFIGS", "apply_overrides", "dump", "flatten", "from_dict", "get_cfg",
           "new_config", "semantic_branch", "to_dict"]

@dataclass
class SolverConfig:
    epochs: int = 20  # [impl 17], 20e schedule
    max_iters: int = 0  # stop after this many iterations in total (0: run all epochs); for short runs
    lr_steps: List[int] = field(default_factory=lambda: [16, 19])  # epochs after which lr *= 0.1
    base_lr: float = 0.02  # for a total batch of base_batch_size, scaled linearly
    base_batch_size: int = 16
    images_per_gpu: int = 2
    # gradient accumulation: one SGD step per this many micro-batches of images_per_gpu; the schedule
    # (lr scaling, warm-up, steps, checkpoint periods) counts these steps (scnet/engine/train.py)
    accumulate_steps: int = 1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    clip_grad_norm: float = 0.0  # 0: no clipping (the official setting, [impl 17])
    amp: str = ""  # "", "bf16" or "fp16" (fp16 with a gradient scaler); the official runs use fp32


@dataclass
class DataConfig:
    root: str = "data/coco"  # the paths below are relative to it; see datasets/README.md
    train_annotations: str = "annotations/instances_train2017.json"
    train_images: str = "train2017"
    train_stuff_maps: str = "stuffthingmaps/train2017"
    val_annotations: str = "annotations/instances_val2017.json"
    val_images: str = "val2017"
    # Where the semantic branch's targets come from: "stuff_maps" (COCO-stuff PNGs, the official
    # setting), "instances" (instance labels on a background class: any COCO-format dataset; needs
    # model.semantic.num_classes >= model.num_classes + 1), or "none" (semantic branch off).
    semantic_source: str = "stuff_maps"
    min_size: int = 32  # images whose shorter side is smaller are dropped [impl 16.1]
    keep_empty_images: bool = False  # keep images without usable annotations (the official code drops them)
    flip_prob: float = 0.5
    num_workers: int = 2


@dataclass
class TrainConfig:
    log_period: int = 20  # iterations between console / TensorBoard lines
    checkpoint_period: int = 0  # iterations between checkpoints; 0: at the end of every epoch only
    keep_checkpoints: int = 3  # newest N kept (the newest finite one is never deleted)
    max_nonfinite_steps: int = 10  # skipped non-finite steps tolerated before the run stops
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower; for exact resume on GPU)
    # fine-tuning: a checkpoint (ours or an official MMDetection one) whose tensors initialise a new run
    # where name and shape match, after the backbone's pretrained weights (scnet/weights.py,
    # load_matching_weights); the rest, e.g. the class layers for another num_classes, keep their init
    init_weights: str = ""
    # evaluation on the val split every eval_period epochs or iterations (eval_period_unit) and of the
    # final model; model_best.pth keeps the best by best_metric (scnet/engine/validation.py); 0: off
    eval_period: int = 1  # the official schedule validates at the end of each epoch
    eval_period_unit: str = "epochs"  # or "iterations"
    best_metric: str = "segm.AP"  # <bbox|segm>.<AP|AP50|AP75|APs|APm|APl|AR1|AR10|AR100|ARs|ARm|ARl>
    eval_batch_size: int = 1  # images per forward pass and process, as eval.py --batch-size
    # signals that stop the run with a checkpoint at the next iteration boundary (scnet/engine/preemption.py)
    stop_signals: List[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])


@dataclass
class Config:
    model: ModelConfig = field(default_factory=SCNetConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0


class ConfigError(ValueError):
    pass


def _coerce(value, annotation, key):
    """Return ``value`` converted to ``annotation`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], key)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        (item,) = typing.get_args(annotation)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key '{key}' expects {getattr(annotation, '__name__', annotation)}, got {value!r}")


def _merge(node, updates, prefix="", arch=None):
    if not isinstance(updates, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}' expects a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(node))
    arch = node.arch if isinstance(node, ModelConfig) else arch
    for k, v in updates.items():
        key = prefix + str(k)
        if k not in hints:
            unsupported = f" (model.arch '{arch}' has no such option)" if arch else ""
            close = difflib.get_close_matches(str(k), list(hints), n=1, cutoff=0.6)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{key}'{unsupported}{hint}")
        current = getattr(node, k)
        if dataclasses.is_dataclass(current):
            _merge(current, v, key + ".", arch)
        elif isinstance(node, ModelConfig) and k == "arch" and v != node.arch:
            raise ConfigError(f"config key '{key}' selects the schema of the model: give it to get_cfg or in "
                              f"the YAML file, not to an existing {node.arch!r} config")
        else:
            setattr(node, k, _coerce(v, hints[k], key))


def _parse_overrides(overrides):
    """["a.b=value", ...] -> [(["a", "b"], parsed value), ...]; the value is parsed as YAML."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        parsed.append((key.strip().split("."), yaml.safe_load(raw) if raw != "" else ""))
    return parsed


def apply_overrides(cfg, overrides):
    """Apply ``["a.b=value", ...]``; the value is parsed as YAML (numbers, lists, booleans)."""
    for parts, update in _parse_overrides(overrides):
        for part in reversed(parts):
            update = {part: update}
        _merge(cfg, update)
    return cfg


# integer settings and their smallest valid value
MINIMUM = {"solver.images_per_gpu": 1, "solver.accumulate_steps": 1, "solver.epochs": 1, "train.eval_period": 0,
           "train.eval_batch_size": 1, "train.log_period": 1, "train.checkpoint_period": 0}


def _check_ranges(cfg):
    for key, minimum in MINIMUM.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value < minimum:
            raise ConfigError(f"config key '{key}' must be at least {minimum}, got {value}")
    return cfg


def new_config(arch="scnet"):
    """The defaults of architecture ``arch``."""
    if not isinstance(arch, str) or arch not in MODEL_CONFIGS:
        raise ConfigError(f"config key 'model.arch' must be one of {sorted(MODEL_CONFIGS)}, got {arch!r}")
    return Config(model=MODEL_CONFIGS[arch]())


def get_cfg(path=None, overrides=()):
    """The defaults of the chosen ``model.arch``, then the YAML file at ``path`` (if any), then
    ``overrides``. The architecture is the overrides' ``model.arch``, else the file's, else SCNet."""
    data = {}
    if path is not None:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"config file {path}: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    model = data.get("model") if isinstance(data, dict) else None
    arch = model.get("arch", "scnet") if isinstance(model, dict) else "scnet"
    for parts, value in _parse_overrides(overrides):
        if parts == ["model", "arch"]:
            arch = value
    cfg = new_config(arch)
    if isinstance(model, dict):  # the architecture is already chosen
        data = dict(data, model={k: v for k, v in model.items() if k != "arch"})
    try:
        _merge(cfg, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return _check_ranges(apply_overrides(cfg, overrides))


def to_dict(cfg):
    return dataclasses.asdict(cfg)


def from_dict(data):
    """Rebuild a Config from ``to_dict`` output (e.g. the one stored in a checkpoint)."""
    model = data.get("model")
    cfg = new_config(model.get("arch", "scnet") if isinstance(model, dict) else "scnet")
    _merge(cfg, data)
    return cfg


def dump(cfg, path):
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def flatten(data, prefix=""):
    """{"a": {"b": 1}} -> {"a.b": 1}; used to show and compare resolved configs."""
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out
