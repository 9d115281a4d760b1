"""scripts/check_data.py: the same rules as CocoDataset, reported per file, non-zero exit on errors."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from scnet.data.synthetic import make_synthetic_coco

from bad_inputs import BAD_INPUTS, inject_bad_inputs
from conftest import ROOT

SAMPLE = os.environ.get("SCNET_COCO_SAMPLE", os.path.join(ROOT, "..", "shared", "data", "coco_train2017_sample"))
needs_sample = pytest.mark.skipif(
    not os.path.isdir(SAMPLE), reason=f"real COCO sample not found at {SAMPLE} (set SCNET_COCO_SAMPLE)"
)

SCRIPT = os.path.join(ROOT, "scripts", "check_data.py")
_spec = importlib.util.spec_from_file_location("check_data", SCRIPT)
check_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_data)

# what the report says about each bad input: (text in the problem column, action)
EXPECTED = {
    "corrupt image": ("unreadable image", "skipped"),
    "truncated image": ("image file is truncated", "skipped"),
    "missing image file": ("missing image file", "skipped"),
    "size differs from the JSON": ("image size differs from the JSON", "skipped"),
    "no annotations": ("no annotations", "skipped"),
    "crowd-only": ("crowd-only", "skipped"),
    "degenerate box": ("degenerate box", "skipped"),
    "box outside the image": ("box outside the image", "skipped"),
    "box partly outside the image": ("box partly outside the image", "used after fix"),
    "polygon with fewer than 3 points": ("polygon with fewer than 3 points", "skipped"),
    "empty segmentation": ("empty segmentation", "skipped"),
    "unknown category": ("unknown category", "skipped"),
    "missing stuff map": ("missing stuff map", "skipped"),
    "stuff map of the wrong size": ("stuff map size differs from the image", "skipped"),
    "RGB stuff map, equal channels": ("RGB stuff map: mode RGB with equal channels", "used after fix"),
    "RGB stuff map, different channels": ("RGB stuff map with different channels", "skipped"),
    "stuff labels out of range": ("stuff labels out of range", "used after fix"),
}


def _rows(output):
    """{file: [(action, problem)]} from the report's table."""
    rows = {}
    for line in output.split("\n== summary ==")[0].splitlines()[1:]:
        match = re.match(r"(\S+)\s+(skipped|used after fix|error)\s+(.*)", line)
        if match:
            rows.setdefault(match[1], []).append((match[2], match[3]))
    return rows


@needs_sample
def test_real_coco_sample_report():
    annotations = os.path.join(SAMPLE, "annotations", "instances_train2017.json")
    command = [sys.executable, SCRIPT, annotations, os.path.join(SAMPLE, "train2017"), "--workers", "2",
               "--semantic-source", "instances", "--num-semantic-classes", "81"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"crowd annotations\s+25\s", out) and re.search(r"grayscale images\s+1\s", out)
    assert re.search(r"images: 294 in the JSON, 292 usable", out)
    assert _rows(out) == {f: [("skipped", "no annotations")] for f in ("000000000250.jpg", "000000000508.jpg")}
    assert "result: OK" in out and "decoding" in result.stderr  # the tqdm bar


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bad"))
    make_synthetic_coco(root, len(BAD_INPUTS) + 3, seed=1)
    return root, inject_bad_inputs(root)


def _run(capsys, *argv):
    code = check_data.main([str(a) for a in argv])
    return code, capsys.readouterr().out


def test_every_bad_input_is_named_with_its_reason(bad, capsys):
    root, files = bad
    code, out = _run(capsys, f"{root}/annotations/instances_train.json", f"{root}/train",
                     "--stuff-dir", f"{root}/stuffthingmaps/train")
    assert code == 0, out  # nothing here stops training
    rows = _rows(out)
    assert set(rows) == set(files.values())  # the clean images are not reported
    for kind, (text, action) in EXPECTED.items():
        assert [r for r in rows[files[kind]] if text in r[1] and r[0] == action], (kind, rows[files[kind]])
    crowd = sum(a["iscrowd"] for a in json.load(open(f"{root}/annotations/instances_train.json"))["annotations"])
    assert re.search(r"unreadable image\s+2\s+skipped", out) and re.search(rf"crowd annotations\s+{crowd}\s", out)
    assert "result: OK" in out


def test_errors_that_stop_training(bad, tmp_path, capsys):
    root, _ = bad
    annotations, images = f"{root}/annotations/instances_train.json", f"{root}/train"
    code, out = _run(capsys, annotations, images, "--stuff-dir", tmp_path / "missing")
    assert code == 1 and "semantic_source=instances" in out and re.search(r"error\s+semantic targets", out)
    (tmp_path / "broken.json").write_text('{"images": []')
    code, out = _run(capsys, tmp_path / "broken.json", images)
    assert code == 1 and "malformed JSON" in out
    data = json.load(open(annotations))
    del data["categories"]
    (tmp_path / "no_categories.json").write_text(json.dumps(data))
    code, out = _run(capsys, tmp_path / "no_categories.json", images)
    assert code == 1 and "no 'categories' list" in out
    code, out = _run(capsys, annotations, tmp_path)  # an image folder without the images
    assert code == 1 and "no usable image" in out
    assert re.search(rf"missing image file\s+{len(data['images'])}\s+skipped", out)
