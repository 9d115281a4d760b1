"""Evaluation during training (train.eval_period, scnet/engine/validation.py): AP in the console,
TensorBoard and log.jsonl at every period, model_best.pth, resume, two processes, no effect on training."""
import os
import re

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import scnet
from scnet.config import get_cfg
from scnet.data.coco import CocoDataset
from scnet.engine import validation
from scnet.engine.train import TrainState
from scnet.engine.validation import PeriodicEvaluation, build_periodic_evaluation
from scnet.utils.files import FileError, save_file

from conftest import TINY, shapes_dataset
from test_train import _log, _run, _torchrun


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return shapes_dataset(tmp_path_factory.mktemp("shapes"), num_train=6, num_val=4)


def _overrides(root, *extra):
    return TINY + [
        f"data.root={root}", "data.train_annotations=annotations/instances_train.json", "data.train_images=train",
        "data.train_stuff_maps=stuffthingmaps/train", "data.val_annotations=annotations/instances_val.json",
        "data.val_images=val", "data.num_workers=0", "model.semantic.num_classes=183",
        "model.input.train_scale=[160,128]", "model.input.test_scale=[160,128]", "solver.warmup_iters=2",
        "solver.base_lr=0.04", "train.log_period=1", "train.keep_checkpoints=10", *extra,
    ]


def _per_epoch(stdout):
    return int(re.search(r"(\d+) iterations/epoch", stdout).group(1))


def _evals(output_dir):
    return [r for r in _log(output_dir) if "eval" in r]


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_period_in_all_three_sinks_and_model_best_is_the_best_period(data_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()  # a folder with an earlier run's model_best.pth, which a new (not resumed) run replaces
    save_file({"model": {}, "metric": "segm.AP", "value": 2.0, "iteration": 1}, str(out / "model_best.pth"))
    result = _run(_overrides(data_dir, "solver.epochs=3", "solver.images_per_gpu=2"), out)
    assert result.returncode == 0, result.stderr[-3000:]
    evals, p = _evals(out), _per_epoch(result.stdout)
    assert [(r["iteration"], r["epochs_done"]) for r in evals] == [(p, 1), (2 * p, 2), (3 * p, 3)]
    for record in evals:
        assert record["eval_images"] == 4
        for iou_type in ("bbox", "segm"):
            assert 0 <= record["eval"][iou_type]["AP"] <= 1
            assert set(record["eval"][iou_type]["per_category"]) == {"rectangle", "ellipse", "triangle"}
        assert f"eval at iteration {record['iteration']} ({record['epochs_done']} epochs done, 4 images): bbox AP " \
            in result.stdout
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for tag in ("val/bbox/AP", "val/segm/AP", "val/segm/AP50"):
        assert [e.step for e in events.Scalars(tag)] == [p, 2 * p, 3 * p]
    segm = [r["eval"]["segm"]["AP"] for r in evals]
    assert [e.value for e in events.Scalars("val/segm/AP")] == pytest.approx(segm)
    best = torch.load(out / "model_best.pth", map_location="cpu", weights_only=False)
    first_best = evals[segm.index(max(segm))]["iteration"]  # a tie keeps the earlier
    assert (best["iteration"], best["metric"], best["value"]) == (first_best, "segm.AP", max(segm))
    assert _same(best["model"], _weights(out / f"checkpoint_{first_best:08d}.pth"))
    assert _same(_weights(out / "model_final.pth"), _weights(out / f"checkpoint_{3 * p:08d}.pth"))


def test_resumed_run_keeps_the_best_and_evaluation_does_not_change_training(data_dir, tmp_path):
    # one decoding worker: creating its DataLoader draws from the global random generator, which the RoI
    # sampling of training uses; the evaluation must restore it
    common = _overrides(data_dir, "solver.epochs=3", "solver.images_per_gpu=2", "train.best_metric=bbox.AP50",
                        "data.num_workers=1")
    first = _run(common + ["solver.max_iters=5"], tmp_path / "run")  # the first epoch's, and the final at 5
    assert first.returncode == 0, first.stderr[-3000:]
    p = _per_epoch(first.stdout)
    assert p < 5
    before = torch.load(tmp_path / "run" / "model_best.pth", map_location="cpu", weights_only=False)
    resumed = _run(["--resume", "auto", *common], tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"best bbox.AP50 so far: {before['value']:.4f} at iteration {before['iteration']}" in resumed.stdout
    evals = _evals(tmp_path / "run")
    iterations = [r["iteration"] for r in evals]
    assert iterations == [p, 5, 2 * p, 3 * p]
    values = [r["eval"]["bbox"]["AP50"] for r in evals]
    best = torch.load(tmp_path / "run" / "model_best.pth", map_location="cpu", weights_only=False)
    assert best["iteration"] == iterations[values.index(max(values))] and best["value"] == max(values)
    if best["iteration"] == before["iteration"]:  # not better after the resume: the file is untouched
        assert _same(best["model"], before["model"])

    # the same iterations without evaluation end with the same weights
    off = _run(common + ["train.eval_period=0"], tmp_path / "off")
    assert off.returncode == 0, off.stderr[-3000:]
    assert not _evals(tmp_path / "off") and not (tmp_path / "off" / "model_best.pth").exists()
    assert _same(_weights(tmp_path / "off" / "model_final.pth"), _weights(tmp_path / "run" / "model_final.pth"))


def test_two_processes_evaluate_every_image_once(data_dir, tmp_path):
    args = _overrides(data_dir, "solver.epochs=2", "solver.images_per_gpu=1", "train.eval_period=4",
                      "train.eval_period_unit=iterations", "train.eval_batch_size=2")
    result = _run(args, tmp_path / "out", launcher=_torchrun("--standalone", "--nproc_per_node", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    evals, total = _evals(tmp_path / "out"), 2 * _per_epoch(result.stdout)
    expected = sorted({*range(4, total + 1, 4), total})
    assert [r["iteration"] for r in evals] == expected and all(r["eval_images"] == 4 for r in evals)
    assert (tmp_path / "out" / "model_best.pth").exists()


def test_model_best_follows_the_metric_not_the_last_evaluation(data_dir, tmp_path, monkeypatch):
    """Scripted metrics 0.1, 0.3, 0.2, 0.3: model_best.pth holds the weights of the second evaluation."""
    scripted = iter([0.1, 0.3, 0.2, 0.3])
    monkeypatch.setattr(validation, "evaluate", lambda *a, **k: {t: {"AP": next(scripted) if t == "segm" else 0.5}
                                                                 for t in ("bbox", "segm")})

    class Logger:
        def record_eval(self, *args):
            pass

        def info(self, message):
            pass

    annotations = os.path.join(data_dir, "annotations", "instances_val.json")
    dataset = CocoDataset(annotations, os.path.join(data_dir, "val"), semantic_source="none", training=False)
    evaluation = PeriodicEvaluation(dataset, annotations, str(tmp_path), {}, period=1)
    model = scnet.build_model(None, overrides=TINY + ["model.input.test_scale=[96,64]"])
    state, saved = TrainState(), []
    for iteration in (1, 2, 3, 4):
        with torch.no_grad():
            model.rpn.head.conv.weight.fill_(iteration)
        state.iteration = iteration
        evaluation(model, torch.device("cpu"), state, Logger())
        saved.append(torch.load(tmp_path / "model_best.pth", weights_only=False)["iteration"])
    assert saved == [1, 2, 2, 2] and (state.best_value, state.best_iteration) == (0.3, 2)
    best = torch.load(tmp_path / "model_best.pth", weights_only=False)["model"]
    assert (best["rpn.head.conv.weight"] == 2).all()


def test_resume_takes_a_newer_model_best_and_a_new_metric_starts_anew(data_dir, tmp_path):
    cfg = get_cfg(None, _overrides(data_dir))
    evaluation = build_periodic_evaluation(cfg, str(tmp_path), [2, 5, 8])
    save_file({"model": {}, "metric": "segm.AP", "value": 0.4, "iteration": 12}, str(tmp_path / "model_best.pth"))
    state = TrainState(best_metric="segm.AP", best_value=0.3, best_iteration=8)  # the checkpoint's, older
    evaluation.restore_best(state, print)
    assert (state.best_value, state.best_iteration) == (0.4, 12)
    state = TrainState(best_metric="bbox.AP", best_value=0.9, best_iteration=8)  # measured by another metric
    evaluation.restore_best(state, print)
    assert (state.best_metric, state.best_value, state.best_iteration) == ("segm.AP", 0.4, 12)
    cfg.train.best_metric = "bbox.AP"
    state = TrainState(best_metric="segm.AP", best_value=0.4, best_iteration=12)
    build_periodic_evaluation(cfg, str(tmp_path), [2, 5, 8]).restore_best(state, print)
    assert (state.best_metric, state.best_value) == ("bbox.AP", None)


def test_a_val_split_that_does_not_fit_stops_at_start(data_dir, tmp_path):
    cfg = get_cfg(None, _overrides(data_dir))
    with pytest.raises(FileError, match="are not the training set's"):
        build_periodic_evaluation(cfg, str(tmp_path), [1, 2, 3])
    cfg.data.val_annotations = "annotations/missing.json"
    with pytest.raises(FileError, match="needs the validation split: annotation file not found.*train.eval_period=0"):
        build_periodic_evaluation(cfg, str(tmp_path), [2, 5, 8])
