"""Inference over a dataset, split over processes, and gathering of the results [impl 13, 16.2].

One image at a time at its original size (batch 1 per GPU, as the official test pipeline); the
detector resizes it and returns boxes and masks in the original pixels. Process ``rank`` handles the
dataset indices rank, rank + world_size, ... and turns each image's detections into COCO result
dicts at once: 100 full-size masks per image would not fit in memory for 5000 images, their RLEs do.

    results, info = inference_on_dataset(lambda im: model([im])[0], dataset, dataset.category_ids,
                                         dist.get_rank(), dist.get_world_size())
    results = gather_results(results)    # rank 0: everything, in a fixed order; other ranks: []
"""
import time
import warnings

from torch.utils.data import DataLoader
from tqdm import tqdm

from ..evaluation.coco_eval import instances_to_coco
from . import dist

REPLACED = "replaced by"  # CocoDataset's action for an image it could not load (scnet/data/checks.py)


def inference_on_dataset(predict, dataset, category_ids, rank=0, world_size=1, progress=True, indices=None,
                         num_workers=0):
    """Run ``predict`` on this process's share of ``dataset``; COCO result dicts and timing.

    Args:
        predict: (3, H, W) uint8 image -> the detector's output dict for it (a model, TTA, ...).
        dataset: CocoDataset(training=False) or alike: ``dataset[i]`` -> (image, target with
            ``image_id``, ``issues``), and ``file_names``.
        category_ids: contiguous label -> COCO category id.
        indices: the dataset indices to run on (default all); this process takes every
            ``world_size``-th of them from position ``rank``.
        num_workers: DataLoader processes that decode images ahead (0: in this process).
    Returns ``(results, info)``: ``info`` holds ``image_ids`` (the images predicted), ``skipped``
    (files that could not be loaded: no prediction, rather than the replacement's twice),
    ``images``, ``seconds`` and ``images_per_s`` of this process.
    """
    indices = list(range(len(dataset)) if indices is None else indices)[rank::world_size]
    results, image_ids, skipped = [], [], []
    bar = tqdm(total=len(indices), unit="img", desc="inference", disable=not progress or rank != 0)
    start = time.perf_counter()
    for index, (image, target) in zip(indices, _load(dataset, indices, num_workers)):
        replaced = [issue for issue in target.get("issues", ()) if REPLACED in issue]
        if replaced:  # the dataset handed over the next image instead: it gets its own turn
            name = dataset.file_names[index] if hasattr(dataset, "file_names") else f"index {index}"
            warnings.warn(f"{name}: not evaluated, it could not be loaded ({'; '.join(replaced)})", stacklevel=2)
            skipped.append(name)
        else:
            results += instances_to_coco(predict(image), target["image_id"], category_ids)
            image_ids.append(int(target["image_id"]))
        bar.update(1)
    seconds = time.perf_counter() - start
    bar.close()
    info = {"image_ids": image_ids, "skipped": skipped, "images": len(image_ids), "seconds": seconds,
            "images_per_s": len(image_ids) / seconds if seconds > 0 else 0.0}
    return results, info


def _load(dataset, indices, num_workers):
    """(image, target) for each index, in order; decoded by DataLoader workers when asked."""
    if num_workers <= 0:
        return (dataset[i] for i in indices)
    # batch_size=None: one item at a time, passed through as it is (no collation into a batch)
    return DataLoader(_Indexed(dataset, indices), batch_size=None, num_workers=num_workers, collate_fn=_identity)


class _Indexed:
    """A view of ``dataset`` at ``indices`` (torch's Subset without its type checks)."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]]


def _identity(item):
    return item


def sort_key(result):
    """Image, then descending score, then category: the same order for any number of processes."""
    return result["image_id"], -result["score"], result["category_id"]


def gather_results(results):
    """All processes' results on rank 0 (collective: every process calls it); [] on the others.

    The sort is stable and each image is handled by one process, so detections with equal keys keep
    the model's order: 1 and N processes give the same list, and so the same COCOeval numbers.
    """
    gathered = dist.all_gather_object(results)
    if not dist.is_main_process():
        return []
    return sorted((r for part in gathered for r in part), key=sort_key)
