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


def test_demo_batches_of_a_folder_give_the_detections_of_one_at_a_time(data_root, checkpoint, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for seed, (h, w) in enumerate([(101, 133), (120, 90), (101, 133), (101, 133), (120, 90)]):
        Image.fromarray(synthetic_sample(h, w, 2, seed=seed)[0].permute(1, 2, 0).numpy()).save(images / f"{seed}.png")
    (images / "5.jpg").write_bytes(b"not a jpeg")
    args = ["--weights", checkpoint, "--score-thresh", "0", *TINY, *SEMANTIC, *_data_overrides(data_root)]
    one = _run("demo.py", str(images), "--out", str(tmp_path / "one"), "--workers", "0", *args)
    batched = _run("demo.py", str(images), "--out", str(tmp_path / "batched"), "--batch-size", "3", *args)
    assert "5.jpg: skipped (unreadable image" in batched and "(batch of 3)" in batched and "(batch of 2)" in batched
    assert "(batch of 1)" in one
    for seed in range(5):
        a = json.loads((tmp_path / "one" / f"{seed}.json").read_text())
        b = json.loads((tmp_path / "batched" / f"{seed}.json").read_text())
        assert len(a) == len(b) > 0
        for x, y in zip(sorted(a, key=lambda d: d["bbox"]), sorted(b, key=lambda d: d["bbox"])):
            assert x["category_id"] == y["category_id"] and abs(x["score"] - y["score"]) <= 1.1e-4
            assert max(abs(u - v) for u, v in zip(x["bbox"], y["bbox"])) <= 0.011  # rounded to 0.01 px


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


def test_browse_data_draws_the_training_view(data_root, tmp_path):
    from scnet.config import get_cfg
    from scnet.data.build import build_train_dataset

    overrides = [*TINY, *SEMANTIC, *_data_overrides(data_root)]
    out = tmp_path / "browse"
    stdout = _run("browse_data.py", "--num-images", "2", "--flip", "all", "--out", str(out), *overrides)
    assert sorted(os.listdir(out)) == ["00000_000001.png", "00001_000002.png"] and stdout.count(", flipped;") == 2
    dataset = build_train_dataset(get_cfg(None, overrides))
    image, target = dataset[(0, True)]  # what training sees: resized to 160x128, flipped
    h, w = image.shape[1:]
    picture = np.asarray(Image.open(out / "00000_000001.png"))
    assert picture.shape[1] == 2 * w + 8 and picture.shape[0] > h  # two panels; the legend under the second
    instances, semantic = picture[:h, :w], picture[:h, w + 8:]
    raw = image.permute(1, 2, 0).numpy()
    masks = target["masks"].numpy().astype(bool)
    near_boxes = np.zeros((h, w), bool)
    for x1, y1, x2, y2 in target["boxes"].round().int().tolist():
        near_boxes[max(y1 - 20, 0):y2 + 3, max(x1 - 3, 0):x2 + 3] = True  # the box, its outline and label
    assert (instances[~near_boxes] == raw[~near_boxes]).all()  # untouched away from the instances
    assert (instances[masks.any(0)] != raw[masks.any(0)]).any(axis=1).mean() > 0.9  # the masks are painted
    ignored = target["semantic_seg"].numpy() == 255
    assert ignored.any() and (semantic[ignored] == 0).all() and (semantic[~ignored] != 0).any(axis=1).all()

    stdout = _run("browse_data.py", "--split", "val", "--num-images", "1", "--out", str(tmp_path / "val"), *overrides)
    original = Image.open(os.path.join(data_root, "val", "000001.jpg"))
    assert np.asarray(Image.open(tmp_path / "val" / "00000_000001.png")).shape == (*original.size[::-1], 3)
    assert "flipped" not in stdout
