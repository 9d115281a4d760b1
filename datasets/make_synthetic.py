"""Generate the built-in synthetic dataset of the quick start (COCO format, with COCO-stuff maps).

    python datasets/make_synthetic.py datasets/shapes [--train 400] [--val 60] [--size 128 192] [--classes 3]

Writes ``<out>/{train,val}/*.jpg``, ``<out>/stuffthingmaps/{train,val}/*.png`` and
``<out>/annotations/instances_{train,val}.json`` (see scnet/data/synthetic.py for what the images hold).
"""
import argparse

from scnet.data.synthetic import make_synthetic_coco


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="output folder")
    parser.add_argument("--train", type=int, default=400, help="number of training images")
    parser.add_argument("--val", type=int, default=60, help="number of validation images")
    parser.add_argument("--size", type=int, nargs=2, default=(128, 192), help="min and max side in pixels")
    parser.add_argument("--classes", type=int, default=3, help="number of object classes (shapes)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for split, count, seed in (("train", args.train, args.seed), ("val", args.val, args.seed + 1)):
        path = make_synthetic_coco(args.out, count, seed=seed, size=tuple(args.size), num_classes=args.classes,
                                   split_name=split)
        print(f"{split}: {count} images -> {path}")


if __name__ == "__main__":
    main()
