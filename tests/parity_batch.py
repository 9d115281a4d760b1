"""The batch of the training parity test (tests/test_parity_train.py): two real COCO images with their
annotations, read and resized by our own data pipeline, written in the format of the reference tool's
``train_ref.py --batch`` (RGB uint8 images already resized, xyxy boxes, 0-based labels, bitmap masks,
semantic maps with 255 = unlabeled).

    python tests/parity_batch.py OUT.npz [--sample DIR]

The sample (../shared/data/coco_train2017_sample, or SCNET_COCO_SAMPLE) has no COCO-stuff maps, so the
semantic maps are built from the instances (``data.semantic_source=instances``: instance labels on a
background class 80, crowd pixels 255), which the 183-way semantic head accepts as labels.
"""
import argparse
import os

import numpy as np

from scnet.data.coco import CocoDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.environ.get("SCNET_COCO_SAMPLE", os.path.join(ROOT, "..", "shared", "data", "coco_train2017_sample"))
# Two landscape photos with 8 instances each (640x480 and 640x426): resized to (800, 512) they become
# 512x683 and 512x769, so the batch is padded and neither image fills it; the second one is flipped.
IMAGES = ((9, False), (74, True))
SCALE = (800, 512)


def make_batch(sample_dir=SAMPLE):
    dataset = CocoDataset(
        os.path.join(sample_dir, "annotations", "instances_train2017.json"),
        os.path.join(sample_dir, "train2017"),
        semantic_source="instances",
        train_scale=SCALE,
    )
    batch = {"num_images": np.array(len(IMAGES)), "image_ids": np.array([i for i, _ in IMAGES])}
    for k, (image_id, flip) in enumerate(IMAGES):
        image, target = dataset[(dataset.image_ids.index(image_id), flip)]
        assert target["image_id"] == image_id and not target["issues"], target["issues"]
        batch[f"img{k}"] = image.permute(1, 2, 0).contiguous().numpy()
        batch[f"boxes{k}"] = target["boxes"].numpy().astype(np.float32)
        batch[f"labels{k}"] = target["labels"].numpy().astype(np.int64)
        batch[f"masks{k}"] = target["masks"].numpy().astype(np.uint8)
        batch[f"sem{k}"] = target["semantic_seg"].numpy().astype(np.uint8)
    return batch


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the .npz file to write")
    parser.add_argument("--sample", default=SAMPLE, help="the COCO sample folder")
    args = parser.parse_args()
    batch = make_batch(args.sample)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez(args.out, **batch)
    sizes = [batch[f"img{k}"].shape[:2] for k in range(len(IMAGES))]
    print(f"{args.out}: images {sizes}, instances {[len(batch[f'labels{k}']) for k in range(len(IMAGES))]}")


if __name__ == "__main__":
    main()
