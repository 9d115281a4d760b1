"""Error analysis (scnet/evaluation/analysis.py, scripts/analyze.py): the breakdown against COCOeval,
its order, the similar/other class stages and the confusion matrix on crafted cases, and the script."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from scnet.data.synthetic import make_synthetic_coco
from scnet.evaluation.analysis import STAGES, breakdown_table, confusion_matrix, error_breakdown
from scnet.evaluation.coco_eval import evaluate, instances_to_coco, load_ground_truth

from conftest import ROOT
from dist_eval_worker import noisy_detections
from test_coco_eval import gt_as_predictions


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """12 generated val images (category ids 2, 5, 8, some crowds) and noisy detections of them."""
    root = str(tmp_path_factory.mktemp("shapes"))
    ann = make_synthetic_coco(root, 12, seed=5, split_name="val")
    coco = load_ground_truth(ann)
    ids = sorted(coco.getCatIds())
    results = sum((instances_to_coco(noisy_detections(coco, ids, i), i, ids) for i in coco.getImgIds()), [])
    return root, ann, coco, results


def test_breakdown_matches_cocoeval_and_removes_errors_in_order(shapes):
    _, ann, coco, results = shapes
    for iou_type in ("bbox", "segm"):
        breakdown = error_breakdown(coco, results, iou_type)
        overall = breakdown_table(breakdown, coco)["overall"]
        metrics = evaluate(ann, results, [iou_type])[iou_type]
        assert overall["C75"] == pytest.approx(metrics["AP75"], abs=1e-9)
        assert overall["C50"] == pytest.approx(metrics["AP50"], abs=1e-9)
        assert overall["FN"] == 1.0
        values = [overall[s] for s in STAGES]
        assert values == sorted(values) and values[0] < values[-2]  # each stage can only add precision
        table = breakdown_table(breakdown, coco)["per_category"]
        assert set(table) == {"rectangle", "ellipse", "triangle"}
        for row in table.values():
            assert row["Loc"] <= row["Sim"] <= row["Oth"] <= row["BG"] <= row["FN"] == 1.0


def test_mask_scores_zero_detections_and_a_subset_of_images(shapes):
    """segm ranks by Mask Scoring R-CNN's mask_score, as evaluate() does; no detection at all is AP 0."""
    _, ann, coco, results = shapes
    rescored = [dict(r, mask_score=(i * 7919 % 1000) / 1000) for i, r in enumerate(results)]
    overall = breakdown_table(error_breakdown(coco, rescored, "segm"), coco)["overall"]
    metrics = evaluate(ann, rescored, ["segm"])["segm"]
    assert overall["C50"] == pytest.approx(metrics["AP50"], abs=1e-9)
    assert overall["C50"] != pytest.approx(breakdown_table(error_breakdown(coco, results, "segm"), coco)["overall"]["C50"])
    empty = breakdown_table(error_breakdown(coco, [], "segm"), coco)["overall"]
    assert empty["C75"] == empty["C50"] == empty["Oth"] == empty["BG"] == 0 and empty["FN"] == 1
    assert confusion_matrix(coco, [], "bbox")[:-1, -1].sum() == sum(1 for a in coco.dataset["annotations"]
                                                                     if not a["iscrowd"])
    first = sorted(coco.getImgIds())[:4]
    subset = [r for r in results if r["image_id"] in first]
    overall = breakdown_table(error_breakdown(coco, subset, "bbox", first), coco)["overall"]
    assert overall["C50"] == pytest.approx(evaluate(ann, subset, ["bbox"], image_ids=first)["bbox"]["AP50"])


def test_ground_truth_as_detections_loses_nothing(shapes):
    _, _, coco, _ = shapes
    perfect = gt_as_predictions(coco, sorted(coco.getCatIds()))
    overall = breakdown_table(error_breakdown(coco, perfect, "segm"), coco)["overall"]
    assert all(overall[s] == 1.0 for s in STAGES)
    matrix = confusion_matrix(coco, perfect, "segm")
    assert (matrix == np.diag(np.diag(matrix))).all() and matrix[:, -1].sum() == matrix[-1].sum() == 0
    non_crowd = sum(1 for a in coco.dataset["annotations"] if not a["iscrowd"])
    assert np.trace(matrix) == non_crowd


def _crafted(tmp_path):
    """Two images of 100x100; categories 1 "cat" and 2 "dog" (supercategory animal), 3 "car"."""
    categories = [{"id": 1, "name": "cat", "supercategory": "animal"}, {"id": 2, "name": "dog", "supercategory": "animal"},
                  {"id": 3, "name": "car", "supercategory": "vehicle"}]
    images = [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.jpg"} for i in (1, 2)]

    def box(i, image, cat, x, y, crowd=0):
        return {"id": i, "image_id": image, "category_id": cat, "bbox": [x, y, 20, 20], "area": 400, "iscrowd": crowd,
                "segmentation": [[x, y, x + 20, y, x + 20, y + 20, x, y + 20]]}

    annotations = [box(1, 1, 1, 0, 0), box(2, 1, 2, 50, 0), box(3, 1, 3, 0, 50), box(4, 2, 1, 0, 0),
                   box(5, 2, 3, 50, 50, crowd=1)]
    path = tmp_path / "crafted.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return load_ground_truth(str(path))


def _det(image, cat, x, y, score):
    return {"image_id": image, "category_id": cat, "bbox": [x, y, 20, 20], "score": score}


def test_confusion_matrix_rows_columns_on_a_crafted_case(tmp_path):
    coco = _crafted(tmp_path)
    results = [
        _det(1, 1, 0, 0, 0.9),  # cat on the cat: correct
        _det(1, 1, 50, 0, 0.8),  # cat on the dog: confusion dog -> cat
        _det(1, 2, 80, 80, 0.7),  # dog on nothing: background
        _det(2, 3, 50, 50, 0.9),  # car on the crowd of cars: counts nowhere
        _det(2, 2, 0, 0, 0.2),  # below the score threshold
    ]  # the car of image 1 and the cat of image 2 are missed
    matrix = confusion_matrix(coco, results, "bbox", 0.5, 0.3)
    expected = np.zeros((4, 4), int)
    expected[0, 0] = 1  # cat -> cat
    expected[1, 0] = 1  # dog -> cat
    expected[3, 1] = 1  # background -> dog
    expected[2, 3] = expected[0, 3] = 1  # car missed, cat missed
    assert (matrix == expected).all(), matrix


def test_similar_and_other_class_stages(tmp_path):
    """A cat detection on the dog is forgiven from Sim on; one on the car only from Oth on."""
    coco = _crafted(tmp_path)
    on_dog = [_det(1, 1, 0, 0, 0.5), _det(2, 1, 0, 0, 0.5), _det(1, 1, 50, 0, 0.9)]
    table = breakdown_table(error_breakdown(coco, on_dog, "bbox"), coco)["per_category"]["cat"]
    assert table["Loc"] < 1 and table["Sim"] == table["Oth"] == 1
    on_car = [_det(1, 1, 0, 0, 0.5), _det(2, 1, 0, 0, 0.5), _det(1, 1, 0, 50, 0.9)]
    table = breakdown_table(error_breakdown(coco, on_car, "bbox"), coco)["per_category"]["cat"]
    assert table["Loc"] == table["Sim"] < 1 and table["Oth"] == 1


def test_analyze_script_writes_plots_and_tables(shapes, tmp_path):
    root, ann, _, results = shapes
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(results))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "analyze.py"), str(results_file), ann],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "analysis"
    for iou_type in ("bbox", "segm"):
        for name in ("breakdown", "breakdown_per_category", "pr_curves", "confusion"):
            assert (out / f"{iou_type}_{name}.png").stat().st_size > 10000
    report = json.loads((out / "analysis.json").read_text())
    metrics = evaluate(ann, results)
    assert report["segm"]["breakdown"]["all"]["C50"] == pytest.approx(metrics["segm"]["AP50"])
    assert "| rectangle |" in (out / "analysis.md").read_text() and "| all |" in proc.stdout
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "analyze.py"), str(bad), ann],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and f"error: {bad}: not a readable JSON file" in proc.stderr
    subset = tmp_path / "subset.json"
    subset.write_text(json.dumps([r for r in results if r["image_id"] == results[0]["image_id"]]))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "analyze.py"), str(subset), ann,
                           "--iou-types", "bbox"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "warning: 11 of the 12 images have no detection" in proc.stdout
