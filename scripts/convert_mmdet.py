"""Convert an official MMDetection checkpoint (SCNet, Mask R-CNN, Cascade Mask R-CNN, HTC, MS R-CNN) to
this codebase's format.

    python scripts/convert_mmdet.py scnet_r50_fpn_20e_coco-a569f645.pth scnet_r50_20e.pth [--cfg configs/r50_20e.yaml]

Every official key is mapped (scnet/weights.py, MMDET_RULES) and checked against a model built from
``--cfg`` (by default, a config inferred from the backbone's shapes); anything that cannot be accounted
for stops the conversion with the names of the keys. ``build_model(..., weights=IN.pth)`` also reads
the official file directly; converting once saves the renaming at every load.
"""
import argparse
import os
import sys

import scnet
from scnet.config import to_dict
from scnet.utils.files import report_file_errors, save_file
from scnet.weights import (
    convert_mmdet_state_dict,
    extract_state_dict,
    is_mmdet_state_dict,
    mmdet_backbone_overrides,
    mmdet_config_name,
    read_checkpoint,
)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="official checkpoint (path or URL)")
    parser.add_argument("output", help="converted checkpoint to write")
    parser.add_argument("--cfg", default=None, help="our config of the same model (default: inferred)")
    args = parser.parse_args()

    raw = read_checkpoint(args.input)
    official = extract_state_dict(raw)
    if not is_mmdet_state_dict(official):
        sys.exit(f"{args.input}: not an MMDetection detector checkpoint (no roi_head./rpn_head. keys)")
    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    path = args.cfg or os.path.join(configs, mmdet_config_name(official))
    overrides = [] if args.cfg else mmdet_backbone_overrides(official)
    cfg = scnet.get_cfg(path, overrides)
    print(f"{args.input}: checked against {path} {' '.join(overrides)}")
    model = scnet.build_model(cfg)
    try:
        state = convert_mmdet_state_dict(official, model.state_dict())
    except KeyError as e:
        sys.exit(f"{args.input}: {e.args[0]}")
    model.load_state_dict(state, strict=True)
    meta = raw.get("meta", {}) if isinstance(raw, dict) else {}
    checkpoint = {"model": state, "config": to_dict(cfg), "source": args.input, "mmdet_meta": meta}
    save_file(checkpoint, args.output)  # never a half-written file under the final name
    values = sum(v.numel() for v in state.values() if v.is_floating_point())
    print(f"{args.input}: {len(official)} keys converted -> {args.output} ({values:,} values)")


if __name__ == "__main__":
    report_file_errors(main)
