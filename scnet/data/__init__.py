"""Data layer: COCO-format datasets -> (image, target dict) in the detector's data contract [impl 16].

    coco.py        CocoDataset: COCO instances (+ COCO-stuff maps or instance-derived semantic maps)
    transforms.py  train-time geometry: keep-ratio resize (official rounding) and horizontal flip
    checks.py      every rule that drops, fixes or replaces an input; shared by CocoDataset and
                   scripts/check_data.py so that the checker reports exactly what training would do
    synthetic.py   a small generated COCO-format dataset with stuff maps (tests, quick-start demo)
    build.py       batch sampler (aspect groups, flips, exact resume) and the training loader
"""
