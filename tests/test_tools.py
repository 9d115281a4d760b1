"""scripts/demo.py and scripts/iou_distribution.py end to end on generated data with a tiny random model."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

from scnet.data.synthetic import category_ids

from conftest import ROOT, TINY, shapes_dataset, synthetic_sample, tiny_model

SEMANTIC = ["model.semantic.num_classes=183"]  # the synthetic stuff maps hold raw COCO-stuff ids


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(script, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # 2 threads on a busy 2-core machine are 50x slower
    cmd = [sys.executable, os.path.join(ROOT, "scripts", script), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return shapes_dataset(tmp_path_factory.mktemp("shapes"), num_train=4, num_val=3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny.pth"
    torch.save({"model": tiny_model(*SEMANTIC).state_dict()}, path)
    return str(path)


def _data_overrides(root):
    return [
        f"data.root={root}",
        "data.train_annotations=annotations/instances_train.json",
        "data.train_images=train",
        "data.train_stuff_maps=stuffthingmaps/train",
        "data.val_annotations=annotations/instances_val.json",
        "data.val_images=val",
        "model.input.train_scale=[160,128]",
    ]


def test_demo_writes_a_drawing_and_coco_detections_per_image(data_root, checkpoint, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(os.path.join(data_root, "train", "000001.jpg"), images / "b_photo.jpg")
    Image.fromarray(synthetic_sample(101, 133, 2, seed=4)[0].permute(1, 2, 0).numpy()).save(images / "a_shapes.png")
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    stdout = _run("demo.py", str(images), "--weights", checkpoint, "--out", str(out), "--score-thresh", "0",
                  *TINY, *SEMANTIC, *_data_overrides(data_root))
    assert sorted(os.listdir(out)) == ["a_shapes.json", "a_shapes.png", "b_photo.json", "b_photo.png"]
    assert "instances_train.json" in stdout and "drawing" in stdout
    for stem, size in (("a_shapes", (101, 133)), ("b_photo", Image.open(images / "b_photo.jpg").size[::-1])):
        assert np.asarray(Image.open(out / f"{stem}.png")).shape == (*size, 3)
        detections = json.loads((out / f"{stem}.json").read_text())
        assert detections, "a random model still scores every class above 0.001"
        for d in detections:
            assert d["category_id"] in category_ids(3) and d["category_name"] in ("rectangle", "ellipse", "triangle")
            x, y, w, h = d["bbox"]
            assert w >= 0 and h >= 0 and 0 <= d["score"] <= 1
            rle = dict(d["segmentation"], counts=d["segmentation"]["counts"].encode())
            assert mask_util.decode(rle).shape == size


def test_iou_distribution_end_to_end(data_root, checkpoint, tmp_path):
    out = tmp_path / "charts" / "iou.png"
    stdout = _run("iou_distribution.py", "--weights", checkpoint, "--num-images", "3", "--out", str(out),
                  *TINY, *SEMANTIC, *_data_overrides(data_root))
    assert "Training w/ sample consistency" in stdout
    chart = np.asarray(Image.open(out))
    assert chart.ndim == 3 and chart.shape[1] > chart.shape[0]
    report = json.loads((tmp_path / "charts" / "iou.json").read_text())
    assert report["num_images"] == {"train": 3, "val": 3}
    distributions = report["distributions"]
    for name, d in distributions.items():
        below = [d["percent_below"][f"{t:g}"] for t in report["thresholds"]]
        assert d["num_samples"] > 0, name
        assert all(0 <= p <= 100 for p in below) and below == sorted(below), (name, below)
        assert sum(d["histogram_percent"]) == pytest.approx(100 - below[0], abs=1e-6)
    with_consistency = distributions["training_with_sample_consistency"]
    without = distributions["training_without_sample_consistency"]
    # the last stage's positives have IoU >= 0.7 with their GT by construction (assignment at 0.7)
    assert with_consistency["percent_below"]["0.7"] == 0
    assert sum(without["num_samples_per_stage"]) == without["num_samples"]
    assert without["num_samples_per_stage"][-1] == with_consistency["num_samples"]


def test_recorded_ious_respect_the_stage_thresholds_and_the_wrapper_is_removed():
    tool = _load_script("iou_distribution")
    model = tiny_model().train()
    images, targets = zip(*(synthetic_sample(120, 150, 3, seed=s) for s in (5, 6)))
    torch.manual_seed(0)
    with tool.recording_positive_ious(model.roi_heads) as ious, torch.no_grad():
        model(list(images), list(targets))
    assert "_match_and_sample" not in vars(model.roi_heads)
    for stage, threshold in enumerate(model.roi_heads.stage_ious):
        values = torch.cat(ious[stage])
        assert len(ious[stage]) == 2 and values.numel() >= 6  # the GT boxes are always positives
        assert values.min() >= threshold and values.max() <= 1 + 1e-6
    with pytest.raises(RuntimeError, match="boom"):
        with tool.recording_positive_ious(model.roi_heads):
            raise RuntimeError("boom")
    assert "_match_and_sample" not in vars(model.roi_heads)


def test_best_same_class_iou():
    tool = _load_script("iou_distribution")
    result = {
        "boxes": torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 5], [50, 50, 60, 60], [0, 0, 10, 10]]),
        "scores": torch.tensor([0.9, 0.8, 0.7, 0.01]),
        "labels": torch.tensor([0, 0, 0, 1]),
    }
    target = {"boxes": torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 5]]), "labels": torch.tensor([0, 1])}
    ious = tool.best_same_class_ious(result, target, score_thresh=0.05)
    np.testing.assert_allclose(ious, [1.0, 0.5, 0.0])  # the class-1 GT does not count for class-0 boxes
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    np.testing.assert_allclose(tool.best_same_class_ious(result, empty, 0.05), [0.0, 0.0, 0.0])
