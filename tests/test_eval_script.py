"""scripts/eval.py end to end on generated data with a tiny random-weight checkpoint: results.json in
COCO's format with the original category ids, --results/--ann reproducing the metrics, torchrun with
two processes giving the same results, zero detections, --tta."""
import contextlib
import io
import json
import re
import os
import subprocess
import sys
import zipfile

import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from scnet.data.synthetic import make_synthetic_coco
from scnet.evaluation.coco_eval import STAT_NAMES
from scnet.engine.evaluate import input_shape_key, make_batches

from conftest import ROOT, TINY, tiny_model

EVAL = os.path.join(ROOT, "scripts", "eval.py")
SUMMARY_LINE = " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = "


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(data root, annotation file, checkpoint of a tiny SCNet with 3 classes, its overrides)."""
    root = tmp_path_factory.mktemp("eval")
    ann = make_synthetic_coco(str(root / "data"), 6, seed=2, split_name="val")  # category ids 2, 5, 8
    checkpoint = str(root / "tiny.pth")
    torch.save({"model": tiny_model(seed=0).state_dict()}, checkpoint)
    overrides = TINY + [f"data.root={root / 'data'}", "data.val_annotations=annotations/instances_val.json",
                        "data.val_images=val", "data.num_workers=0"]
    return root, ann, checkpoint, overrides


def _run(args, launcher=(sys.executable,), timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([*launcher, EVAL, *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _summary(proc):
    """The last stdout line: the one-line JSON summary."""
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _load(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def model_run(setup):
    root, _, checkpoint, overrides = setup
    out = root / "out"
    return out, _run(["--weights", checkpoint, "--output-dir", str(out), *overrides])


def test_model_run_writes_coco_results_and_metrics(setup, model_run):
    _, ann, _, _ = setup
    out, proc = model_run
    assert proc.stdout.count(SUMMARY_LINE) == 2  # bbox and segm, as pycocotools prints them
    assert "IoU type: bbox" in proc.stdout and "IoU type: segm" in proc.stdout and "rectangle" in proc.stdout
    summary = _summary(proc)
    metrics = _load(out / "metrics.json")
    assert summary["images"] == 6 and summary["detections"] > 0 and summary["images_per_s"] > 0
    assert summary["bbox_AP"] == metrics["bbox"]["AP"] and summary["segm_AP"] == metrics["segm"]["AP"]
    assert set(metrics["segm"]["per_category"]) == {"rectangle", "ellipse", "triangle"}

    gt = COCO(ann)
    with contextlib.redirect_stdout(io.StringIO()):
        detections = gt.loadRes(str(out / "results.json"))
    category_ids = {d["category_id"] for d in detections.dataset["annotations"]}
    assert category_ids <= {2, 5, 8} and category_ids & {5, 8}, category_ids  # original ids, not labels 0..2
    assert len(detections.dataset["annotations"]) == summary["detections"]
    assert {d["image_id"] for d in detections.dataset["annotations"]} <= set(gt.getImgIds())


def test_results_mode_reproduces_the_metrics(setup, model_run):
    root, ann, _, _ = setup
    out, _ = model_run
    proc = _run(["--results", str(out / "results.json"), "--ann", ann, "--output-dir", str(root / "again")])
    metrics, again = _load(out / "metrics.json"), _load(root / "again" / "metrics.json")
    assert again["bbox"] == metrics["bbox"] and again["segm"] == metrics["segm"]
    assert _summary(proc)["bbox_AP"] == metrics["bbox"]["AP"]


BAD_RESULTS = [  # (how entry 1 of the model's results is spoiled, the message's end)
    (lambda r: r.update(score=float("nan")), r"entry 1 \(.*\): 'score' must be a finite number, got nan"),
    (lambda r: r.update(bbox=r["bbox"][:2]), r"entry 1 \(.*\): 'bbox' must be \[x, y, width, height\]"),
    (lambda r: r.update(image_id="7"), r"entry 1 \(.*\): 'image_id' must be an integer, got '7'"),
    (lambda r: r.update(segmentation={"counts": "x"}), r"entry 1 \(.*\): 'segmentation' must be an RLE"),
    (lambda r: r.update(category_id=1000), r"results with category ids \[1000\]"),
]


@pytest.mark.parametrize("spoil, expected", BAD_RESULTS, ids=["nan_score", "two_number_box", "string_id", "rle",
                                                             "unknown_category"])
def test_results_mode_names_the_first_bad_entry_and_the_file(setup, model_run, spoil, expected):
    root, ann, _, _ = setup
    results = _load(model_run[0] / "results.json")
    spoil(results[1])
    path = root / "bad_results.json"
    path.write_text(json.dumps(results))
    proc = subprocess.run([sys.executable, EVAL, "--results", str(path), "--ann", ann], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert re.fullmatch(rf"error: {path}: {expected}.*", proc.stderr.strip().splitlines()[-1]), proc.stderr[-500:]


def test_results_mode_names_a_file_that_is_not_json(setup, tmp_path):
    _, ann, _, _ = setup
    path = tmp_path / "results.json"
    path.write_text('[{"image_id": 1,')  # cut short
    proc = subprocess.run([sys.executable, EVAL, "--results", str(path), "--ann", ann], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().startswith(f"error: {path}: not a readable JSON file")


def _submission(path):
    """The one JSON file of an upload zip: (its name, its entries)."""
    with zipfile.ZipFile(path) as archive:
        (name,) = archive.namelist()
        return name, json.loads(archive.read(name))


def _coco_stats(gt, entries, iou_type):
    """The 12 COCO numbers as pycocotools computes them from an upload file's entries (the server's way)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(gt, gt.loadRes(entries), iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return [float(v) for v in coco_eval.stats]


def test_a_split_without_ground_truth_gives_the_upload_files(setup, model_run):
    root, ann, checkpoint, overrides = setup
    out, _ = model_run
    test_dev = _load(ann)
    del test_dev["annotations"]  # as image_info_test-dev2017.json: images and categories only
    (root / "data" / "annotations" / "image_info_test-dev2017.json").write_text(json.dumps(test_dev))
    proc = _run(["--weights", checkpoint, "--output-dir", str(root / "test_dev"), *overrides,
                 "data.val_annotations=annotations/image_info_test-dev2017.json"])
    assert "has no annotations" in proc.stderr and "Average Precision" not in proc.stdout
    summary = _summary(proc)
    assert summary["images"] == 6 and set(summary["submission"]) == {"bbox", "segm"}
    for iou_type, path in summary["submission"].items():
        assert path == str(root / "test_dev" / "submission" / iou_type / "detections_test-dev2017_scnet_results.zip")

    # what the server computes from each file on a split with ground truth equals our evaluation
    gt, metrics, results = COCO(ann), _load(out / "metrics.json"), _load(out / "results.json")
    name, boxes = _submission(summary["submission"]["bbox"])
    assert name == "detections_test-dev2017_scnet_results.json"
    assert boxes == [{k: r[k] for k in ("image_id", "category_id", "bbox", "score")} for r in results]
    _, masks = _submission(summary["submission"]["segm"])
    assert len(masks) == len(results) and all("bbox" not in m and "segmentation" in m for m in masks)
    for iou_type, entries in (("bbox", boxes), ("segm", masks)):  # small/medium/large by the mask's area
        assert _coco_stats(gt, entries, iou_type) == [metrics[iou_type][name] for name in STAT_NAMES]


def test_results_mode_formats_a_results_file_for_upload(setup, model_run, tmp_path):
    _, ann, _, _ = setup
    out, _ = model_run
    proc = _run(["--results", str(out / "results.json"), "--ann", ann, "--format-only", "--alg", "tiny_scnet",
                 "--output-dir", str(tmp_path), "--max-images", "4"])
    assert "Average Precision" not in proc.stdout and not (tmp_path / "metrics.json").exists()
    assert f"WARNING: results for 4 of the 6 images of {ann}" in proc.stderr
    paths = _summary(proc)["submission"]
    assert paths["segm"] == str(tmp_path / "submission" / "segm" / "detections_val_tiny-scnet_results.zip")
    first = {image["id"] for image in _load(ann)["images"][:4]}
    assert len(_submission(paths["bbox"])[1]) == sum(r["image_id"] in first for r in _load(out / "results.json"))


def test_results_mode_refuses_to_upload_nothing(setup, tmp_path):
    _, ann, _, _ = setup
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    proc = subprocess.run([sys.executable, EVAL, "--results", str(empty), "--ann", ann, "--format-only"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: {empty}: no detections at all: nothing to upload"
    assert not (tmp_path / "submission").exists()


def test_two_processes_give_the_same_results(setup, model_run):
    root, _, checkpoint, overrides = setup
    out, _ = model_run
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    proc2 = _run(["--weights", checkpoint, "--output-dir", str(root / "two"), *overrides], launcher=launcher)
    assert _load(root / "two" / "results.json") == _load(out / "results.json")
    metrics, metrics2 = _load(out / "metrics.json"), _load(root / "two" / "metrics.json")
    assert metrics2["bbox"] == metrics["bbox"] and metrics2["segm"] == metrics["segm"]
    assert _summary(proc2)["images"] == 6 and proc2.stdout.count(SUMMARY_LINE) == 2  # rank 0 prints, once


def assert_same_detections(a, b, box_px=1e-3, score=1e-5):
    """Two COCO result lists with the same detections up to float rounding: per image and category the
    same number, each matched to the nearest box, boxes within ``box_px``, scores within ``score``,
    masks of IoU >= 0.99."""
    def group(results):
        groups = {}
        for r in results:
            groups.setdefault((r["image_id"], r["category_id"]), []).append(r)
        return groups

    ga, gb = group(a), group(b)
    assert ga.keys() == gb.keys()
    for key in ga:
        assert len(ga[key]) == len(gb[key]), key
        rest = list(gb[key])
        for r in ga[key]:
            match = min(rest, key=lambda o: max(abs(x - y) for x, y in zip(r["bbox"], o["bbox"])))
            rest.remove(match)
            assert max(abs(x - y) for x, y in zip(r["bbox"], match["bbox"])) <= box_px, (r, match)
            assert abs(r["score"] - match["score"]) <= score, (r, match)
            iou = mask_util.iou([r["segmentation"]], [match["segmentation"]], [0])[0, 0]
            assert iou >= 0.99 or not mask_util.area(r["segmentation"]), (r, match)


def test_batches_give_the_results_of_batch_1(setup, model_run):
    """--batch-size 4 with 2 decoding workers: batches of one network-input shape, so no image is padded
    further than alone; the same detections (oneDNN's convolutions round differently for another batch
    size: about 1e-7 relative, so not every number is bit-identical)."""
    root, ann, checkpoint, overrides = setup
    out, _ = model_run
    sizes = [(image["height"], image["width"]) for image in _load(ann)["images"]]
    batches = make_batches(list(range(6)), 4, input_shape_key((256, 192), 32, sizes))  # TINY's test scale
    assert batches == [[0, 1, 4], [2], [3], [5]]  # three images share a shape: one real batch
    proc = _run(["--weights", checkpoint, "--output-dir", str(root / "batched"), "--batch-size", "4", *overrides,
                 "data.num_workers=2"])
    results = _load(out / "results.json")
    assert len(results) > 50  # detections to compare
    assert_same_detections(_load(root / "batched" / "results.json"), results)
    assert "x batch 4" in proc.stdout


def test_zero_detections_report_zero_with_a_warning(setup):
    root, _, checkpoint, overrides = setup
    out = root / "zero"
    proc = _run(["--weights", checkpoint, "--output-dir", str(out), "--max-images", "2", *overrides,
                 "model.test.score_thresh=1.0"])  # strict >: no score passes
    assert "no detections" in proc.stderr
    summary = _summary(proc)
    assert summary["images"] == 2 and summary["detections"] == 0
    assert summary["bbox_AP"] == 0.0 and summary["segm_AP"] == 0.0
    assert _load(out / "results.json") == []


def test_tta_end_to_end_keeps_detections_inside_each_image(setup):
    """--tta with two small scales (x flip = 4 views) through the whole script."""
    root, ann, checkpoint, overrides = setup
    out = root / "tta"
    proc = _run(["--weights", checkpoint, "--tta", "--output-dir", str(out), "--max-images", "3", *overrides,
                 "model.test.tta_scales=[[96,128],[160,224]]"])
    assert "TTA" in proc.stdout
    sizes = {img["id"]: (img["width"], img["height"]) for img in _load(ann)["images"]}
    results = _load(out / "results.json")
    assert results and _summary(proc)["images"] == 3
    for r in results:
        x, y, w, h = r["bbox"]
        width, height = sizes[r["image_id"]]
        assert x >= 0 and y >= 0 and x + w <= width + 1e-3 and y + h <= height + 1e-3
        assert r["segmentation"]["size"] == [height, width]
