"""Evaluation during training and the best checkpoint.

Every ``train.eval_period`` epochs (the default, 1: the official schedule validates at the end of each
epoch) or iterations (``train.eval_period_unit``), and always on the final model, every process runs
inference on its share of the config's validation split and rank 0 computes COCO bbox and segm AP
(scnet/engine/evaluate.py, scnet/evaluation/coco_eval.py). The numbers go to the console, TensorBoard
(``val/bbox/AP``, ...) and ``log.jsonl`` (with per-category AP). ``model_best.pth`` holds the weights
of the best evaluation by ``train.best_metric`` (e.g. ``segm.AP``) with the iteration and the metrics;
the best value is part of the training state, so a resumed run keeps it.

The evaluation leaves training untouched: the random number generators are restored after it, so a
run with evaluation ends with the weights of the same run without it. ``train.eval_period=0`` switches
it off (nothing is built).
"""
import os

import torch

from ..config import ConfigError, to_dict
from ..data.checks import DataError
from ..data.coco import CocoDataset
from ..evaluation.coco_eval import IOU_TYPES, STAT_NAMES, evaluate, load_ground_truth
from ..utils.files import FileError, load_file, save_file
from . import dist
from .evaluate import gather_results, inference_on_dataset, input_shape_key
from .train import rng_state, set_rng_state

BEST = "model_best.pth"
UNITS = ("epochs", "iterations")


def parse_metric(name):
    """"segm.AP" -> ("segm", "AP"); a ConfigError naming ``train.best_metric`` otherwise."""
    iou_type, _, stat = name.partition(".")
    if iou_type not in IOU_TYPES or stat not in STAT_NAMES:
        raise ConfigError(f"config key 'train.best_metric' must be <{'|'.join(IOU_TYPES)}>.<{'|'.join(STAT_NAMES)}>, "
                          f"e.g. segm.AP; got {name!r}")
    return iou_type, stat


class PeriodicEvaluation:
    """Decides when to evaluate, runs the evaluation (collective) and keeps ``model_best.pth``.

    Args:
        dataset: the validation CocoDataset (``training=False``).
        annotation_file: its ground truth, read by rank 0 for COCOeval.
        config: the run's config dict, stored in ``model_best.pth`` as in ``model_final.pth``.
        period, unit: every ``period`` epochs or iterations.
        metric: "bbox.AP", "segm.AP", ... the one ``model_best.pth`` maximises.
        batch_size, num_workers: inference batches (scnet/engine/evaluate.py) and decoding workers;
        worker_init_fn: run in each worker (the training loop's: ignore the stop signals).
    """

    def __init__(self, dataset, annotation_file, output_dir, config, period=1, unit="epochs", metric="segm.AP",
                 batch_size=1, num_workers=0, worker_init_fn=None):
        if unit not in UNITS:
            raise ConfigError(f"config key 'train.eval_period_unit' must be one of {UNITS}, got {unit!r}")
        self.metric = parse_metric(metric)
        self.metric_name = metric
        self.dataset, self.annotation_file, self.output_dir, self.config = dataset, annotation_file, output_dir, config
        self.period, self.unit = period, unit
        self.batch_size, self.num_workers, self.worker_init_fn = batch_size, num_workers, worker_init_fn
        self._ground_truth = None

    def due(self, state, total_iters):
        """After the iteration ``state`` describes (``state.batch_in_epoch`` is 0 at an epoch's end)."""
        if state.iteration == total_iters:
            return True  # the final model, whatever the period
        if self.unit == "iterations":
            return state.iteration % self.period == 0
        return state.batch_in_epoch == 0 and state.epoch % self.period == 0

    def restore_best(self, state, log):
        """On resume: the best so far is the checkpoint's, or ``model_best.pth``'s when that is better (it
        may be newer than the checkpoint); none when it was measured by another metric."""
        if state.best_metric != self.metric_name:
            if state.best_value is not None:
                log(f"train.best_metric is now {self.metric_name} (was {state.best_metric}): the best starts anew")
            state.best_metric, state.best_value, state.best_iteration = self.metric_name, None, 0
        path = os.path.join(self.output_dir, BEST)
        if os.path.isfile(path):
            best = load_file(path, mmap=True)
            if best.get("metric") == self.metric_name and (state.best_value is None or best["value"] > state.best_value):
                state.best_value, state.best_iteration = float(best["value"]), int(best["iteration"])
        if state.best_value is not None:
            log(f"best {self.metric_name} so far: {state.best_value:.4f} at iteration {state.best_iteration}")

    def __call__(self, model, device, state, logger):
        """Evaluate ``model`` (the unwrapped module) on every process; log; update the best. Returns the
        metrics (on every process). A failure of rank 0 (its ground truth, a full disk) stops every
        process with one FileError, none left waiting in a collective."""
        logger.info(f"evaluating on {len(self.dataset)} val images, {dist.get_world_size()} process(es)")
        rng = rng_state()
        was_training = model.training
        model.eval()
        key = input_shape_key(model.test_scale, model.size_divisibility, self.dataset.image_sizes)
        with torch.no_grad():
            results, info = inference_on_dataset(model, self.dataset, self.dataset.category_ids, dist.get_rank(),
                                                 dist.get_world_size(), progress=False, num_workers=self.num_workers,
                                                 batch_size=self.batch_size, batch_key=key,
                                                 worker_init_fn=self.worker_init_fn)
        model.train(was_training)
        set_rng_state(rng)  # e.g. the DataLoader draws its workers' seeds from the global generator
        results = gather_results(results)
        image_ids = sorted(i for part in dist.all_gather_object(info["image_ids"]) for i in part)
        metrics = _on_main_process(lambda: evaluate(self.ground_truth(), results, IOU_TYPES, image_ids=image_ids))
        logger.record_eval(state.iteration, state.epoch, metrics, len(image_ids))
        self.update_best(model, state, metrics, logger)
        return metrics

    def ground_truth(self):
        if self._ground_truth is None:
            self._ground_truth = load_ground_truth(self.annotation_file)
        return self._ground_truth

    def update_best(self, model, state, metrics, logger):
        """A better value than the best so far: ``model_best.pth`` (rank 0) and the state (every rank)."""
        iou_type, stat = self.metric
        value = metrics[iou_type][stat]
        if value < 0:  # COCOeval's -1: no ground truth for it (e.g. APl without large objects)
            logger.info(f"WARNING: {self.metric_name} is -1 (no ground truth for it in the val split): "
                        "model_best.pth not updated; choose another train.best_metric")
            return
        if state.best_value is not None and value <= state.best_value:
            logger.info(f"best {self.metric_name} stays {state.best_value:.4f} (iteration {state.best_iteration})")
            return
        state.best_metric, state.best_value, state.best_iteration = self.metric_name, float(value), state.iteration
        path = os.path.join(self.output_dir, BEST)
        best = {"model": model.state_dict(), "iteration": state.iteration, "epoch": state.epoch,
                "metric": self.metric_name, "value": float(value), "metrics": metrics, "config": self.config}
        _on_main_process(lambda: save_file(best, path))
        logger.info(f"best {self.metric_name} {value:.4f} at iteration {state.iteration} -> {path}")


def _on_main_process(function):
    """``function()`` on rank 0, its result on every rank (collective). An exception there is raised on
    every rank as a FileError with its message, so that no process waits for rank 0 forever."""
    result, error = None, None
    if dist.is_main_process():
        try:
            result = function()
        except Exception as e:  # noqa: BLE001 - whatever it is, every rank must learn of it
            error = f"{type(e).__name__}: {e}" if not isinstance(e, FileError) else str(e)
    result, error = dist.all_gather_object((result, error))[0]
    if error:
        raise FileError(f"evaluation during training: {error}")
    return result


def build_periodic_evaluation(cfg, output_dir, category_ids, worker_init_fn=None):
    """The PeriodicEvaluation of ``cfg.train``, or None when ``train.eval_period`` is 0. A validation split
    that cannot be read, or whose categories are not the training set's (``category_ids``), is a FileError
    that says how to train without it."""
    t, d = cfg.train, cfg.data
    if t.eval_period <= 0:
        return None
    annotations = os.path.join(d.root, d.val_annotations)
    try:
        dataset = CocoDataset(annotations, os.path.join(d.root, d.val_images), semantic_source="none", training=False)
    except (OSError, DataError, ValueError) as e:
        raise FileError(f"evaluation during training (train.eval_period={t.eval_period}) needs the validation "
                        f"split: {str(e).splitlines()[0]}; set data.val_annotations / data.val_images, or "
                        "train.eval_period=0 to train without it") from None
    if list(dataset.category_ids) != list(category_ids):
        raise FileError(f"{annotations}: category ids {list(dataset.category_ids)[:10]}... are not the training "
                        f"set's {list(category_ids)[:10]}...: a label would mean another class; use matching "
                        "annotation files or train.eval_period=0")
    return PeriodicEvaluation(dataset, annotations, output_dir, to_dict(cfg), t.eval_period, t.eval_period_unit,
                              t.best_metric, t.eval_batch_size, d.num_workers, worker_init_fn)
