"""scripts/benchmark.py end to end on the tiny quick-start model: the table and the JSON it promises."""
import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_script(name):
    """Import scripts/<name>.py as a module (the scripts are not a package; it imports its neighbours)."""
    scripts = os.path.join(ROOT, "scripts")
    sys.path.append(scripts)  # for benchmark_report, next to it
    spec = importlib.util.spec_from_file_location(name, os.path.join(scripts, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


benchmark = _load_script("benchmark")


def test_benchmark_inference_and_training(tmp_path, capsys):
    out = tmp_path / "bench.json"
    report = benchmark.main([
        "--configs", os.path.join(ROOT, "configs", "quickstart.yaml"), "--runs", "2", "--warmup", "1",
        "--image-size", "96", "128", "--dtypes", "fp32", "bf16", "--train", "--train-size", "64", "96", "--workers", "0",
        "--reference-dir", str(tmp_path / "none"), "--json", str(out),
    ])
    table = capsys.readouterr().out
    assert "| configs/quickstart.yaml | fp32 |" in table and "data excluded" in table
    saved = json.loads(out.read_text())
    assert saved["header"]["threads"] == 2 and saved["header"]["image"] == "generated"
    if benchmark.dtype_supported("cpu", "bf16"):  # autocast runs through (results are float32)
        assert [r["dtype"] for r in saved["inference"]] == ["fp32", "bf16"]
        assert saved["inference"][1]["detections"] == 100 and saved["training"][1]["losses_finite"]
    inference, training = saved["inference"][0], saved["training"][0]
    assert inference["detections"] == 100  # score threshold 0: the mask branch gets the full 100
    assert len(inference["e2e"]["runs"]) == 2
    for i, e2e in enumerate(inference["e2e"]["runs"]):  # the parts add up to the end-to-end time
        parts = [inference[k]["runs"][i] for k in ("network", "nms", "paste", "rle")]
        assert min(parts) >= 0 and abs(sum(parts) - e2e) < 1e-6
    assert training["losses_finite"] and training["data_included"]["median"] > 0
    assert report["training"][0]["peak_mb"] > 0
