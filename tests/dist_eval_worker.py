"""Worker of tests/test_coco_eval.py: distributed inference + gather + COCO evaluation on CPU (gloo).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_eval_worker.py DATA_DIR OUT_DIR

``predict`` is derived from the ground truth (``make_predict``), deterministic and independent of the
process, so 1 and 2 processes must give identical result lists and metrics. Rank 0 writes
``OUT_DIR/gathered.json`` (results, metrics); every rank writes ``OUT_DIR/rank<r>.json`` (its info).
"""
import hashlib
import json
import os
import sys

import numpy as np
import torch
from pycocotools.coco import COCO


def image_key(image):
    return hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()


def noisy_detections(coco, category_ids, image_id):
    """Ground truth of one image, perturbed by a seeded RNG: box jitter, random scores, about one in
    five instances dropped, one false positive. In the detector's output format."""
    rng = np.random.RandomState(image_id)
    info = coco.imgs[image_id]
    anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
    anns = [a for a in anns if rng.rand() > 0.2]
    label_of = {c: i for i, c in enumerate(category_ids)}
    boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes += rng.uniform(-3, 3, size=boxes.shape)
    masks = np.zeros((len(anns) + 1, info["height"], info["width"]), dtype=bool)
    for i, ann in enumerate(anns):
        masks[i] = coco.annToMask(ann) > 0
    false_positive = [5.0, 5.0, info["width"] / 2, info["height"] / 2]
    masks[-1, 5 : info["height"] // 2, 5 : info["width"] // 2] = True
    labels = [label_of[a["category_id"]] for a in anns] + [int(rng.randint(len(category_ids)))]
    return {
        "boxes": torch.tensor(np.concatenate([boxes, [false_positive]]), dtype=torch.float32),
        "scores": torch.tensor(rng.uniform(0.05, 1.0, size=len(labels)), dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": torch.from_numpy(masks),
    }


def make_predict(dataset, annotation_file):
    """images -> noisy_detections of the dataset images with exactly these pixels."""
    coco = COCO(annotation_file)
    image_ids = {image_key(image): target["image_id"] for image, target in (dataset[i] for i in range(len(dataset)))}
    return lambda images: [noisy_detections(coco, dataset.category_ids, image_ids[image_key(im)]) for im in images]


def main(data_dir, out_dir):
    from scnet.data.coco import CocoDataset
    from scnet.engine import dist
    from scnet.engine.evaluate import gather_results, inference_on_dataset
    from scnet.evaluation.coco_eval import evaluate

    dist.init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    annotation_file = os.path.join(data_dir, "annotations", "instances_val.json")
    dataset = CocoDataset(annotation_file, os.path.join(data_dir, "val"), semantic_source="none", training=False)
    predict = make_predict(dataset, annotation_file)
    results, info = inference_on_dataset(predict, dataset, dataset.category_ids, rank, world_size, progress=False)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(dict(info, world_size=world_size), f)
    results = gather_results(results)
    image_ids = [i for part in dist.all_gather_object(info["image_ids"]) for i in part]
    if rank == 0:
        metrics = evaluate(annotation_file, results, image_ids=image_ids)
        with open(os.path.join(out_dir, "gathered.json"), "w") as f:
            json.dump({"results": results, "metrics": metrics, "image_ids": sorted(image_ids)}, f)
    else:
        assert results == [], "gather_results must return [] on ranks other than 0"
    dist.cleanup()


if __name__ == "__main__":
    main(*sys.argv[1:3])
