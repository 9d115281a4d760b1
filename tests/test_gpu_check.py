"""scripts/gpu_check.py rehearsed on the CPU (--quick): every part runs and the report says what it saw."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

SAMPLE = os.environ.get("SCNET_COCO_SAMPLE") or os.path.join(ROOT, "..", "shared", "data", "coco_train2017_sample")


def test_the_quick_rehearsal_writes_the_report(tmp_path):
    if not os.path.isdir(SAMPLE):
        pytest.skip(f"{SAMPLE} not found (SCNET_COCO_SAMPLE): the short real training is not rehearsed")
    out = tmp_path / "report"
    # the tests part is this suite itself: left out here
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py"), "--device", "cpu", "--quick",
           "--skip", "tests", "--iters", "4", "--sample", SAMPLE, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="2", CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "gpu_check.json") as f:
        report = json.load(f)
    assert report["environment"]["device"] == "cpu" and "tests" not in report
    bench = report["benchmark"]
    assert bench["exit"] == 0 and bench["inference"][0]["detections"] == 100
    assert bench["training"][0]["losses_finite"] and bench["training"][0]["s_per_iter"] > 0
    training = report["training"]
    assert training["exit"] == 0 and [c["iteration"] for c in training["loss_curve"]][-1] == 4
    text = (out / "gpu_check.md").read_text()
    assert "## Benchmark" in text and "## Short training on the COCO sample" in text
    assert {"benchmark.log", "benchmark.json", "training.log"} <= set(os.listdir(out))
