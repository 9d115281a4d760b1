"""Inference over a dataset, split over processes, and gathering of the results [impl 13, 16.2].

Each image at its original size (the detector resizes it and returns boxes and masks in the original
pixels), one at a time as the official test pipeline (batch 1 per GPU) or in batches. Process ``rank``
handles the dataset indices rank, rank + world_size, ... and turns each image's detections into COCO
result dicts at once: 100 full-size masks per image would not fit in memory for 5000 images, their
RLEs do.

    key = input_shape_key(model.test_scale, model.size_divisibility, dataset.image_sizes)
    results, info = inference_on_dataset(model, dataset, dataset.category_ids, dist.get_rank(),
                                         dist.get_world_size(), batch_size=4, batch_key=key)
    results = gather_results(results)    # rank 0: everything, in a fixed order; other ranks: []

Batches hold images of one padded network-input shape (``batch_key``): padding an image to a larger
batch would change the features near its bottom and right borders (a convolution there reads the
padding's features, not zeros). So batch N gives the detections of batch 1, up to the float rounding
of convolution kernels that depend on the batch size (oneDNN: about 1e-7 relative in the features).
"""
import time
import warnings
from collections import defaultdict

from torch.utils.data import DataLoader
from tqdm import tqdm

from ..evaluation.coco_eval import instances_to_coco
from ..ops.image import rescale_size
from . import dist

REPLACED = "replaced by"  # CocoDataset's action for an image it could not load (scnet/data/checks.py)


def inference_on_dataset(predict, dataset, category_ids, rank=0, world_size=1, progress=True, indices=None,
                         num_workers=0, batch_size=1, batch_key=None, worker_init_fn=None):
    """Run ``predict`` on this process's share of ``dataset``; COCO result dicts and timing.

    Args:
        predict: a list of (3, H, W) uint8 images -> the list of the detector's output dicts (a model,
            TTA, ...).
        dataset: CocoDataset(training=False) or alike: ``dataset[i]`` -> (image, target with
            ``image_id``, ``issues``), and ``file_names``.
        category_ids: contiguous label -> COCO category id.
        indices: the dataset indices to run on (default all); this process takes every
            ``world_size``-th of them from position ``rank``.
        num_workers: DataLoader processes that decode the images ahead (0: in this process), each
            starting with ``worker_init_fn``.
        batch_size: images per call of ``predict``; batch_key: dataset index -> a key, batches hold
            images of one key only (``input_shape_key``).
    Returns ``(results, info)``: ``info`` holds ``image_ids`` (the images predicted), ``skipped``
    (files that could not be loaded: no prediction, rather than the replacement's twice),
    ``images``, ``seconds`` and ``images_per_s`` of this process.
    """
    indices = list(range(len(dataset)) if indices is None else indices)[rank::world_size]
    batches = make_batches(indices, batch_size, batch_key)
    results, image_ids, skipped = [], [], []
    bar = tqdm(total=len(indices), unit="img", desc="inference", disable=not progress or rank != 0)
    start = time.perf_counter()
    for batch, items in zip(batches, _load(dataset, batches, num_workers, worker_init_fn)):
        keep = []
        for index, (image, target) in zip(batch, items):
            replaced = [issue for issue in target.get("issues", ()) if REPLACED in issue]
            if replaced:  # the dataset handed over the next image instead: it gets its own turn
                name = dataset.file_names[index] if hasattr(dataset, "file_names") else f"index {index}"
                warnings.warn(f"{name}: not evaluated, it could not be loaded ({'; '.join(replaced)})", stacklevel=2)
                skipped.append(name)
            else:
                keep.append((image, target))
        outputs = predict([image for image, _ in keep]) if keep else []
        for (_, target), output in zip(keep, outputs):
            results += instances_to_coco(output, target["image_id"], category_ids)
            image_ids.append(int(target["image_id"]))
        bar.update(len(batch))
    seconds = time.perf_counter() - start
    bar.close()
    info = {"image_ids": image_ids, "skipped": skipped, "images": len(image_ids), "seconds": seconds,
            "images_per_s": len(image_ids) / seconds if seconds > 0 else 0.0}
    return results, info


def make_batches(indices, batch_size, key=None):
    """``indices`` in batches of up to ``batch_size``, each of one ``key(index)``, in the order of their
    first image; a key's last batch may be smaller. Batch 1 keeps the order of ``indices``."""
    if batch_size <= 1:
        return [[i] for i in indices]
    if key is None:  # images of several shapes in a batch would not give the detections of batch 1
        raise ValueError("batches need a key: the network-input shape of each image (input_shape_key)")
    groups = defaultdict(list)
    for i in indices:
        groups[key(i)].append(i)
    batches = [members[j : j + batch_size] for members in groups.values() for j in range(0, len(members), batch_size)]
    position = {index: p for p, index in enumerate(indices)}
    return sorted(batches, key=lambda b: position[b[0]])


def input_shape_key(test_scale, size_divisibility, image_sizes):
    """dataset index -> the padded network-input shape of its image (from its (h, w), e.g. the
    annotation file's), for ``make_batches``."""
    def key(index):
        h, w = rescale_size(*image_sizes[index], test_scale)
        return -(-h // size_divisibility), -(-w // size_divisibility)
    return key


def _load(dataset, batches, num_workers, worker_init_fn=None):
    """The list of (image, target) of each batch, in order; decoded by DataLoader workers when asked."""
    if num_workers <= 0:
        return ([dataset[i] for i in batch] for batch in batches)
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=_identity,
                      worker_init_fn=worker_init_fn)


def _identity(items):
    return items


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
