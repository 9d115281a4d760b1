"""Batches for training: aspect-ratio groups, sharding over processes, flips, and an exact resume point.

All the randomness of the data order lives in ``GroupedBatchSampler`` and depends only on (seed,
epoch): which images form a batch, which process gets it and which images are flipped. A run resumed
in the middle of an epoch therefore sees exactly the batches the uninterrupted run would have seen.
"""
import functools
import os
import signal

import torch
from torch.utils.data import DataLoader, Sampler

from ..config import semantic_branch
from .coco import CocoDataset


class GroupedBatchSampler(Sampler):
    """Yields this process's batches of ``(index, flip)`` for one epoch ([impl 16.1] step 8).

    The sampler draws *global* batches of ``batch_size * num_replicas`` images of one aspect group
    (landscape vs portrait, as the official group sampler), and process r takes the r-th slice of each.
    So the images of an iteration do not depend on how the total batch is split over processes, and
    every process runs the same number of iterations (a DDP requirement). Each group is shuffled and
    padded by repetition to a whole number of global batches; the global batches are shuffled.

    Args:
        groups: aspect group of each dataset index.
        batch_size: images per process per iteration.
    """

    def __init__(self, groups, batch_size, num_replicas=1, rank=0, seed=0, flip_prob=0.5, shuffle=True):
        self.groups = list(groups)
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.flip_prob = flip_prob
        self.shuffle = shuffle
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch, start_batch=0):
        """Select the epoch and skip its first ``start_batch`` batches (to resume mid-epoch)."""
        self.epoch = epoch
        self.start_batch = start_batch

    def epoch_batches(self):
        """All of this process's batches of the current epoch, as lists of (index, flip)."""
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        size = self.batch_size * self.num_replicas
        batches = []
        for group in sorted(set(self.groups)):
            members = torch.tensor([i for i, gr in enumerate(self.groups) if gr == group])
            if self.shuffle:
                members = members[torch.randperm(len(members), generator=g)]
            members = _pad_by_repetition(members.tolist(), size)
            batches += [members[i : i + size] for i in range(0, len(members), size)]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        flips = (torch.rand(len(batches), size, generator=g) < self.flip_prob).tolist()
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return [list(zip(b[mine], f[mine])) for b, f in zip(batches, flips)]

    def __iter__(self):
        yield from self.epoch_batches()[self.start_batch :]

    def __len__(self):
        """Batches per epoch (the same for every epoch and every process)."""
        return self.batches_per_epoch(self.batch_size * self.num_replicas)

    def batches_per_epoch(self, total_batch):
        """Batches per epoch with ``total_batch`` images per iteration over all processes (each aspect
        group padded to whole batches)."""
        return sum(-(-self.groups.count(g) // total_batch) for g in set(self.groups))


def _pad_by_repetition(items, multiple):
    """Append items from the start (cycling) until the length is a multiple of ``multiple``."""
    missing = -len(items) % multiple
    return items + [items[i % len(items)] for i in range(missing)]


def collate(batch):
    """A list of (image, target) -> (list of images, list of targets): sizes differ, the model pads."""
    return [b[0] for b in batch], [b[1] for b in batch]


def build_train_loader(dataset, batch_size, num_replicas=1, rank=0, seed=0, flip_prob=0.5, num_workers=2,
                       worker_ignored_signals=()):
    """The training DataLoader. ``worker_ignored_signals``: signals its workers ignore (the main process
    handles them, scnet/engine/preemption.py, and ends the workers itself)."""
    sampler = GroupedBatchSampler(dataset.aspect_groups, batch_size, num_replicas, rank, seed, flip_prob)
    # A private generator: creating the loader's iterator must not consume the global RNG, which the
    # RoI sampling uses and a resumed run restores (otherwise a resumed run would diverge).
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        generator=generator,
        persistent_workers=False,
        worker_init_fn=ignoring_signals(worker_ignored_signals),
    )


def ignoring_signals(numbers):
    """A DataLoader ``worker_init_fn`` that makes the worker ignore these signals."""
    return functools.partial(_ignore_signals, tuple(numbers))


def _ignore_signals(numbers, worker_id):
    for number in numbers:
        signal.signal(number, signal.SIG_IGN)


def build_train_dataset(cfg):
    """The training CocoDataset described by ``cfg.data`` (paths relative to ``cfg.data.root``)."""
    d, m = cfg.data, cfg.model
    semantic = semantic_branch(m)  # None: the model has no semantic branch, or it is off
    source = d.semantic_source if semantic else "none"
    if semantic and source == "none":
        raise ValueError("model.semantic.enabled is true but data.semantic_source is 'none'")
    stuff_dir = os.path.join(d.root, d.train_stuff_maps) if source == "stuff_maps" else None
    return CocoDataset(
        os.path.join(d.root, d.train_annotations),
        os.path.join(d.root, d.train_images),
        stuff_dir=stuff_dir,
        semantic_source=source,
        num_semantic_classes=semantic.num_classes if semantic else 183,
        train_scale=tuple(m.input.train_scale),
        min_size=d.min_size,
        training=True,
        keep_empty=d.keep_empty_images,
    )
