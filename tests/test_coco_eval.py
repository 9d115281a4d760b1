"""COCO evaluation ([impl 13] step 8, [impl 16.2]): result conversion, ground truth as predictions = AP 1 (generated
data and real COCO), summaries as pycocotools prints them, zero detections, wrong ids, skipped
images, and 1 vs 2 processes (gloo) giving the same results and metrics."""
import contextlib
import copy
import io
import json
import os
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.cocoeval import COCOeval

from scnet.data.coco import CocoDataset
from scnet.data.synthetic import make_synthetic_coco
from scnet.engine.evaluate import gather_results, inference_on_dataset
from scnet.evaluation.coco_eval import (
    STAT_NAMES,
    evaluate,
    format_per_category_table,
    format_summary,
    instances_to_coco,
    load_ground_truth,
    summary_line,
)

from scnet.evaluation.submission import write_submission

from conftest import ROOT
from dist_eval_worker import make_predict, noisy_detections

SAMPLE = os.environ.get("SCNET_COCO_SAMPLE", os.path.join(ROOT, "..", "shared", "data", "coco_train2017_sample"))
SAMPLE_ANN = os.path.join(SAMPLE, "annotations", "instances_train2017.json")
WORKER = os.path.join(ROOT, "tests", "dist_eval_worker.py")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A generated validation set: 12 images, category ids 2, 5, 8, some crowd and occluded instances."""
    root = str(tmp_path_factory.mktemp("shapes"))
    return root, make_synthetic_coco(root, 12, seed=5, split_name="val")


def gt_as_predictions(coco, category_ids, image_ids=None):
    """Every non-crowd ground-truth instance as a detection of score 1, through instances_to_coco from
    the tensors the model would return (boxes xyxy, contiguous labels, masks (D, H, W) bool)."""
    label_of = {c: i for i, c in enumerate(category_ids)}
    results = []
    for image_id in image_ids or coco.getImgIds():
        anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
        info = coco.imgs[image_id]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        masks = np.zeros((len(anns), info["height"], info["width"]), dtype=bool)
        for i, ann in enumerate(anns):
            masks[i] = coco.annToMask(ann) > 0
        result = {"boxes": boxes.float(), "scores": torch.ones(len(anns)), "masks": torch.from_numpy(masks),
                  "labels": torch.tensor([label_of[a["category_id"]] for a in anns], dtype=torch.int64)}
        results += instances_to_coco(result, image_id, category_ids)
    return results


def _assert_perfect(metrics):
    for iou_type in ("bbox", "segm"):
        stats = metrics[iou_type]
        for name in ("AP", "AP50", "AP75", "AR100"):  # AR1 and AR10 < 1 with more objects in an image
            assert stats[name] == pytest.approx(1.0, abs=5e-4), (iou_type, name, stats[name])
        assert all(v is None or v == pytest.approx(1.0, abs=5e-4) for v in stats["per_category"].values())


# --- conversion -----------------------------------------------------------------------------------
def test_instances_to_coco_boxes_ids_and_rle():
    masks = torch.zeros(2, 7, 9, dtype=torch.bool)
    masks[0, 1:4, 2:6] = True
    masks[1, 5:, :3] = True
    result = {"boxes": torch.tensor([[2.0, 1.0, 6.0, 4.0], [0.5, 5.0, 3.0, 7.0]]), "scores": torch.tensor([0.9, 0.25]),
              "labels": torch.tensor([1, 0]), "masks": masks}
    coco = instances_to_coco(result, np.int64(17), category_ids=[3, 11])
    assert [r["category_id"] for r in coco] == [11, 3]  # original COCO ids, not labels
    assert coco[0]["bbox"] == [2.0, 1.0, 4.0, 3.0] and coco[1]["bbox"] == [0.5, 5.0, 2.5, 2.0]  # w = x2 - x1
    assert coco[1]["score"] == pytest.approx(0.25) and coco[0]["image_id"] == 17
    coco = json.loads(json.dumps(coco))  # JSON-serialisable: counts is a str
    for r, mask in zip(coco, masks):
        assert isinstance(r["segmentation"]["counts"], str) and r["segmentation"]["size"] == [7, 9]
        assert np.array_equal(mask_util.decode(r["segmentation"]), mask.numpy().astype(np.uint8))
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 7, 9, dtype=torch.bool)}
    assert instances_to_coco(empty, 17, [3, 11]) == []
    with pytest.raises(ValueError, match="labels"):
        instances_to_coco(dict(result, labels=torch.tensor([2, 0])), 17, [3, 11])


# --- ground truth as predictions ------------------------------------------------------------------
def test_ground_truth_scores_one_on_generated_data(shapes):
    _, ann = shapes
    coco = load_ground_truth(ann)
    category_ids = sorted(coco.getCatIds())
    assert category_ids == [2, 5, 8] and any(a["iscrowd"] for a in coco.dataset["annotations"])
    results = gt_as_predictions(coco, category_ids)
    assert {r["category_id"] for r in results} == {2, 5, 8}
    metrics = evaluate(ann, results)
    _assert_perfect(metrics)
    assert set(metrics["bbox"]) == set(STAT_NAMES) | {"per_category"}
    assert set(metrics["segm"]["per_category"]) == {"rectangle", "ellipse", "triangle"}


@pytest.mark.skipif(not os.path.isfile(SAMPLE_ANN), reason=f"real COCO sample not found at {SAMPLE} "
                    "(set SCNET_COCO_SAMPLE to a folder with annotations/instances_train2017.json)")
def test_ground_truth_scores_one_on_real_coco():
    coco = load_ground_truth(SAMPLE_ANN)
    assert any(a["iscrowd"] for a in coco.dataset["annotations"])  # crowd regions: ignored, not missed
    results = gt_as_predictions(coco, sorted(coco.getCatIds()))
    metrics = evaluate(coco, results)
    _assert_perfect(metrics)
    assert len(metrics["bbox"]["per_category"]) == 80
    for iou_type in ("bbox", "segm"):  # the sample holds objects of every size
        assert min(metrics[iou_type][k] for k in ("APs", "APm", "APl")) == pytest.approx(1.0, abs=5e-4)


def test_results_with_polygons_evaluate_and_upload_as_compressed_rle(shapes, tmp_path):
    """Results whose masks are polygons or RLEs as annotations hold them (the ground truth itself):
    perfect segm AP, and upload files whose masks are compressed RLEs that pycocotools reads without a
    box, giving the same 12 numbers."""
    _, ann = shapes
    coco = load_ground_truth(ann)
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
                "segmentation": a["segmentation"]} for a in coco.dataset["annotations"] if not a["iscrowd"]]
    assert {type(r["segmentation"]) for r in results} == {list, dict}
    metrics = evaluate(coco, results)
    _assert_perfect(metrics)

    paths = write_submission(results, coco, str(tmp_path), "val", "gt")
    with zipfile.ZipFile(paths["segm"]) as archive:
        masks = json.loads(archive.read("detections_val_gt_results.json"))
    assert all(set(m["segmentation"]) == {"size", "counts"} and isinstance(m["segmentation"]["counts"], str)
               for m in masks)
    with contextlib.redirect_stdout(io.StringIO()):
        server = COCOeval(coco, coco.loadRes(copy.deepcopy(masks)), "segm")  # loadRes adds boxes
        server.evaluate(), server.accumulate(), server.summarize()
    assert [float(v) for v in server.stats] == [metrics["segm"][name] for name in STAT_NAMES]

    # masks only, into the same folder: no box file, and the earlier one is gone; nothing at all: an error
    assert set(write_submission(masks, coco, str(tmp_path), "val", "gt")) == {"segm"}
    assert not os.path.exists(paths["bbox"])
    with pytest.raises(ValueError, match="no detections at all"):
        write_submission([], coco, str(tmp_path), "val", "gt")


def test_one_category_missed(shapes):
    _, ann = shapes
    coco = load_ground_truth(ann)
    results = [r for r in gt_as_predictions(coco, [2, 5, 8]) if r["category_id"] != 5]
    metrics = evaluate(coco, results)
    for iou_type in ("bbox", "segm"):
        per_category = metrics[iou_type]["per_category"]
        assert per_category["ellipse"] == 0.0 and per_category["rectangle"] == pytest.approx(1.0, abs=5e-4)
        assert metrics[iou_type]["AP"] == pytest.approx(np.mean(list(per_category.values())), abs=1e-9)
    table = format_per_category_table(metrics, columns=2)
    assert "ellipse" in table and "0.000" in table and "1.000" in table and len(table.splitlines()) == 3


# --- printing -------------------------------------------------------------------------------------
def test_summary_is_what_pycocotools_prints(shapes):
    _, ann = shapes
    coco = load_ground_truth(ann)
    results = [dict(r, score=0.5 + 0.4 * ((i * 7) % 5) / 5) for i, r in enumerate(gt_as_predictions(coco, [2, 5, 8]))]
    results = [r for i, r in enumerate(results) if i % 4]  # some misses: numbers other than 1
    metrics = evaluate(coco, results, iou_types=("bbox",))
    coco_eval = COCOeval(coco, coco.loadRes([dict(r) for r in results]), "bbox")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    summary = printed.getvalue().strip().splitlines()[-12:]
    assert format_summary(metrics["bbox"]).splitlines() == summary
    assert 0.3 < metrics["bbox"]["AP"] < 0.95
    line = json.loads(summary_line(metrics, images=12, images_per_s=3.5))
    assert line == {"bbox_AP": metrics["bbox"]["AP"], "bbox_AP50": metrics["bbox"]["AP50"],
                    "bbox_AP75": metrics["bbox"]["AP75"], "images": 12, "images_per_s": 3.5}


# --- bad input ------------------------------------------------------------------------------------
def test_zero_detections_warn_and_score_zero(shapes):
    _, ann = shapes
    with pytest.warns(UserWarning, match="no detections"):
        metrics = evaluate(ann, [])
    for iou_type in ("bbox", "segm"):
        assert all(metrics[iou_type][k] == 0.0 for k in ("AP", "AP50", "AP75", "AR1", "AR10", "AR100"))
        assert all(v == 0.0 for v in metrics[iou_type]["per_category"].values())


def test_unknown_image_or_category_ids_are_errors(shapes):
    _, ann = shapes
    coco = load_ground_truth(ann)
    results = gt_as_predictions(coco, [2, 5, 8], image_ids=[1, 2])
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluate(coco, results + [dict(results[0], image_id=999)])
    with pytest.raises(ValueError, match="original COCO ids"):  # contiguous labels written as category ids
        evaluate(coco, [dict(r, category_id=1) for r in results])
    with pytest.raises(ValueError, match="image ids to evaluate"):
        evaluate(coco, results, image_ids=[1, 1000])


def test_evaluating_a_subset_of_images(shapes):
    _, ann = shapes
    coco = load_ground_truth(ann)
    results = gt_as_predictions(coco, [2, 5, 8], image_ids=[1, 2, 3])
    _assert_perfect(evaluate(coco, results, image_ids=[1, 2, 3]))
    assert evaluate(coco, results)["bbox"]["AR100"] < 0.5  # the other 9 images: all missed


# --- inference over a dataset, 1 and 2 processes ---------------------------------------------------
@pytest.fixture(scope="module")
def val_with_bad_image(tmp_path_factory):
    """7 generated images; the 4th (id 4) cannot be decoded, so CocoDataset replaces it by the 5th."""
    root = str(tmp_path_factory.mktemp("val"))
    ann = make_synthetic_coco(root, 7, seed=11, split_name="val")
    with open(os.path.join(root, "val", "000004.jpg"), "wb") as f:
        f.write(b"not a jpeg" * 50)
    return root, ann


def test_replaced_image_is_skipped_not_duplicated(val_with_bad_image):
    root, ann = val_with_bad_image
    dataset = CocoDataset(ann, os.path.join(root, "val"), semantic_source="none", training=False)
    predict = make_predict(dataset, ann)
    with pytest.warns(UserWarning, match="000004.jpg: not evaluated"):
        results, info = inference_on_dataset(predict, dataset, dataset.category_ids, progress=False)
    assert info["image_ids"] == [1, 2, 3, 5, 6, 7] and info["skipped"] == ["000004.jpg"]
    assert info["images"] == 6 and info["seconds"] > 0 and info["images_per_s"] > 0
    coco = load_ground_truth(ann)
    expected = instances_to_coco(noisy_detections(coco, dataset.category_ids, 5), 5, dataset.category_ids)
    assert [r for r in results if r["image_id"] == 5] == expected  # once, not twice
    assert not [r for r in results if r["image_id"] == 4]


def test_one_and_two_processes_agree(val_with_bad_image, tmp_path):
    root, ann = val_with_bad_image
    dataset = CocoDataset(ann, os.path.join(root, "val"), semantic_source="none", training=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results, info = inference_on_dataset(make_predict(dataset, ann), dataset, dataset.category_ids, progress=False)
    results = gather_results(results)
    metrics = evaluate(ann, results, image_ids=info["image_ids"])
    assert 0.2 < metrics["bbox"]["AP"] < 0.95 and 0.2 < metrics["segm"]["AP"] < 0.95  # not trivially 0 or 1

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER, root,
           str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    gathered = json.loads((tmp_path / "gathered.json").read_text())
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["image_ids"] for r in ranks] == [[1, 3, 5, 7], [2, 6]]  # indices 0,2,4,6 and 1,(3 skipped),5
    assert ranks[1]["skipped"] == ["000004.jpg"]
    assert gathered["image_ids"] == info["image_ids"]
    assert gathered["results"] == json.loads(json.dumps(results))
    assert gathered["metrics"] == json.loads(json.dumps(metrics))


def test_encode_masks_equals_pycocotools_encode():
    """Runs counted on the span of used columns give pycocotools' own RLE, edge cases included."""
    import pycocotools.mask as mask_util

    from scnet.evaluation.coco_eval import encode_masks

    rng = np.random.RandomState(0)
    h, w = 37, 53
    masks = np.zeros((9, h, w), dtype=bool)
    masks[1] = True  # full
    masks[2, 0, 0] = True  # first pixel
    masks[3, -1, -1] = True  # last pixel
    masks[4, :, 0] = True  # first column only
    masks[5, 5:9, w - 1] = True  # last column only
    masks[6, 3:20, 10:30] = rng.rand(17, 20) > 0.5  # noisy blob inside
    masks[7, :, 12:40] = True  # full-height band
    masks[8] = rng.rand(h, w) > 0.7  # everywhere
    expected = mask_util.encode(np.asfortranarray(masks.astype(np.uint8).transpose(1, 2, 0)))
    ours = encode_masks(masks)
    for i, (a, b) in enumerate(zip(ours, expected)):
        assert a["counts"] == b["counts"].decode("ascii") and list(a["size"]) == list(b["size"]), i
    assert encode_masks(np.zeros((0, h, w), dtype=bool)) == []
