"""The GPU check: one command that, on a machine with a GPU, runs what only a GPU can show and writes one
report (docs/gpu.md says what it covers and how to read it).

    python scripts/gpu_check.py --out REPORT_DIR                    # on a GPU machine, about 6 minutes
    python scripts/gpu_check.py --device cpu --quick --out /tmp/gc  # its rehearsal on a CPU, ~3 minutes

Three parts, each in its own process, so that one failing does not hide the others:
  1. the tests that mean something on the device (``pytest tests --device DEV``: every zoo config's
     training step and inference, parity with the official values, autocast steps, NCCL, evaluation,
     TTA, weights moved between devices, the step's host-device synchronisations);
  2. ``scripts/benchmark.py``: SCNet R-50, Cascade Mask R-CNN + semantic, Mask R-CNN and HTC at
     800x1333, fp32 / tf32 / bf16: inference with the 100 detections through the mask branch, and
     training steps of 2 images with their peak memory;
  3. a short real training on the COCO sample (``--sample``, the quick start's narrow SCNet with the
     semantic branch learning from the instance masks): its loss curve.
The report: gpu_check.md (read it first) and gpu_check.json in ``--out``, with each part's log.
"""
import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ["configs/r50_20e.yaml", "configs/baselines/cascade_mask_rcnn_semantic_r50_1x.yaml",
           "configs/baselines/mask_rcnn_r50_1x.yaml", "configs/baselines/htc_r50_1x.yaml"]
QUICK_TESTS = ["tests/test_device.py", "tests/test_host_syncs.py", "tests/test_tta.py"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_report",
                   help="report folder (default: $OUT, else ./gpu_check_report)")
    p.add_argument("--quick", action="store_true",
                   help="a rehearsal: the device tests' files only, one config at a small size, a few iterations")
    p.add_argument("--sample", default=os.environ.get("SCNET_COCO_SAMPLE") or
                   os.path.join(ROOT, "..", "shared", "data", "coco_train2017_sample"),
                   help="a COCO-format folder (annotations/instances_train2017.json, train2017/)")
    p.add_argument("--iters", type=int, help="iterations of the short training (default 300, quick 10)")
    p.add_argument("--skip", nargs="*", default=[], choices=["tests", "benchmark", "training"])
    return p.parse_args(argv)


def run(name, cmd, out, timeout, env=None):
    """Run one part; its output goes to OUT/NAME.log. Returns (exit status, seconds, log tail)."""
    print(f"[gpu_check] {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    log = os.path.join(out, f"{name}.log")
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                env=dict(os.environ, **(env or {}))).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    with open(log) as f:
        tail = f.read()[-3000:]
    seconds = time.time() - t0
    print(f"[gpu_check] {name}: exit {rc} after {seconds:.0f} s", flush=True)
    return rc, seconds, tail


def environment(device):
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cpu_count": os.cpu_count(), "device": device}
    try:
        import torchvision
        info["torchvision"] = torchvision.__version__
    except ImportError as e:
        info["torchvision"] = f"missing ({e})"
    try:
        import pycocotools  # noqa: F401
        info["pycocotools"] = "present"
    except ImportError:
        info["pycocotools"] = "missing: evaluation and the COCO tests cannot run (carry its wheel)"
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", gpu_count=torch.cuda.device_count())
    elif device.startswith("cuda"):
        info["gpu"] = "none: CUDA is not available to this torch"
    return info


def part_tests(args):
    files = QUICK_TESTS if args.quick else ["tests"]
    cmd = [sys.executable, "-m", "pytest", *files, "-q", "-rs", "--device", args.device, "-p", "no:cacheprovider"]
    rc, seconds, tail = run("tests", cmd, args.out, timeout=240 if args.quick else 180)
    summary = next((line for line in reversed(tail.splitlines()) if " in " in line and ("passed" in line or
                    "failed" in line or "skipped" in line)), "no pytest summary (see tests.log)")
    return {"exit": rc, "seconds": round(seconds), "summary": summary.strip("= ")}


def part_benchmark(args):
    path = os.path.join(args.out, "benchmark.json")
    if args.quick:
        sizes = ["--image-size", "320", "480", "--train-size", "320", "480", "--runs", "1", "--warmup", "0"]
        cmd = ["--configs", CONFIGS[0], "--dtypes", "fp32", "tf32", "bf16", *sizes]
    else:
        sizes = ["--image-size", "800", "1333", "--train-size", "800", "1333", "--runs", "3", "--warmup", "1"]
        cmd = ["--configs", *CONFIGS, "--train-configs", *CONFIGS, "--dtypes", "fp32", "tf32", "bf16", *sizes]
    cmd = [sys.executable, "scripts/benchmark.py", "--device", args.device, "--train", "--batch", "2",
           "--workers", "0", "--json", path, *cmd]
    rc, seconds, tail = run("benchmark", cmd, args.out, timeout=240 if args.quick else 210)
    result = {"exit": rc, "seconds": round(seconds)}
    if rc == 0 and os.path.exists(path):
        with open(path) as f:
            report = json.load(f)
        result["inference"] = [{"config": r["config"], "dtype": r["dtype"], "images_per_s": r["images_per_s"],
                                "e2e_s": r["e2e"]["median"], "network_s": r["network"]["median"],
                                "peak_mb": r["peak_mb"], "detections": r["detections"]} for r in report["inference"]]
        result["training"] = [{"config": r["config"], "dtype": r["dtype"], "s_per_iter": r["data_excluded"]["median"],
                               "s_per_iter_with_data": r["data_included"]["median"], "peak_mb": r["peak_mb"],
                               "losses_finite": r["losses_finite"]} for r in report["training"]]
    return result


def part_training(args):
    """The quick start's narrow SCNet on the real COCO sample; returns its loss curve."""
    iters = args.iters or (10 if args.quick else 300)
    ann = os.path.join(args.sample, "annotations", "instances_train2017.json")
    if not os.path.exists(ann):
        return {"exit": "skipped", "why": f"{ann} not found (--sample)"}
    out = os.path.join(args.out, "training")
    overrides = [f"data.root={os.path.abspath(args.sample)}", "data.train_annotations=annotations/instances_train2017.json",
                 "data.train_images=train2017", "data.semantic_source=instances", "data.num_workers=4",
                 "model.num_classes=80", "model.semantic.num_classes=81", "model.input.train_scale=[512,384]",
                 f"solver.max_iters={iters}", "solver.epochs=1000", "solver.lr_steps=[1000]", "solver.base_lr=0.04",
                 f"train.log_period={max(1, iters // 30)}", "train.checkpoint_period=0",
                 "train.eval_period=0"]
    cmd = [sys.executable, "scripts/train.py", "--cfg", "configs/quickstart.yaml", "--output-dir", out, *overrides]
    env = {} if args.device.startswith("cuda") else {"CUDA_VISIBLE_DEVICES": ""}
    rc, seconds, tail = run("training", cmd, args.out, timeout=120 if args.quick else 75, env=env)
    result = {"exit": rc, "seconds": round(seconds), "iterations": iters, "command": " ".join(cmd)}
    log = os.path.join(out, "log.jsonl")
    if os.path.exists(log):
        with open(log) as f:
            records = [json.loads(line) for line in f]
        curve = [(r["iteration"], r["loss"], r.get("time")) for r in records if "loss" in r]
        result["loss_curve"] = [{"iteration": i, "loss": loss, "s_per_iter": t} for i, loss, t in curve]
        if len(curve) >= 4:
            fifth = max(1, len(curve) // 5)
            first, last = [c[1] for c in curve[:fifth]], [c[1] for c in curve[-fifth:]]
            result["loss_first_fifth"], result["loss_last_fifth"] = sum(first) / fifth, sum(last) / fifth
            result["loss_falls"] = result["loss_last_fifth"] < result["loss_first_fifth"] and all(
                math.isfinite(c[1]) for c in curve)
    return result


def _table(columns, rows):
    """Markdown lines of a table and a blank line; none without rows."""
    if not rows:
        return []
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows] + [""]


def markdown(report):
    env, lines = report["environment"], ["# GPU check", ""]
    lines.append("Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    lines += ["", f"Mode: {'quick rehearsal' if report['quick'] else 'full'}; total {report['seconds']} s", ""]
    tests = report.get("tests")
    if tests:
        lines += ["## Tests", "", f"exit {tests['exit']} in {tests['seconds']} s: {tests['summary']} (tests.log)", ""]
    bench = report.get("benchmark")
    if bench:
        lines += ["## Benchmark", "", f"exit {bench['exit']} in {bench['seconds']} s (benchmark.log, benchmark.json)", ""]
        lines += _table(["config", "dtype", "img/s", "s/img", "network s", "peak MB", "dets"], [
            [r["config"], r["dtype"], f"{r['images_per_s']:.2f}", f"{r['e2e_s']:.4f}", f"{r['network_s']:.4f}",
             f"{r['peak_mb'] or 0:.0f}", r["detections"]] for r in bench.get("inference", [])])
        lines += _table(["config", "dtype", "s/iter (2 images)", "with data", "peak MB", "finite"], [
            [r["config"], r["dtype"], f"{r['s_per_iter']:.4f}", f"{r['s_per_iter_with_data']:.4f}",
             f"{r['peak_mb'] or 0:.0f}", r["losses_finite"]] for r in bench.get("training", [])])
    train = report.get("training")
    if train:
        lines += ["## Short training on the COCO sample", ""]
        if train["exit"] == "skipped":
            lines += [f"skipped: {train['why']}", ""]
        else:
            lines.append(f"exit {train['exit']} in {train['seconds']} s, {train['iterations']} iterations (training.log)")
            if "loss_falls" in train:
                lines.append(f"loss: first fifth {train['loss_first_fifth']:.3f}, last fifth {train['loss_last_fifth']:.3f}"
                             f" -> falls: {train['loss_falls']}")
            lines.append("")
            lines += _table(["iteration", "loss", "s/iter"], [
                [c["iteration"], f"{c['loss']:.4f}", f"{c['s_per_iter'] or 0:.3f}"] for c in train.get("loss_curve", [])])
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    report = {"quick": args.quick, "environment": environment(args.device)}
    print("[gpu_check]", json.dumps(report["environment"]), flush=True)
    for name, part in (("tests", part_tests), ("benchmark", part_benchmark), ("training", part_training)):
        if name not in args.skip:
            report[name] = part(args)
            report["seconds"] = round(time.time() - t0)
            with open(os.path.join(args.out, "gpu_check.json"), "w") as f:  # what is done so far, kept
                json.dump(report, f, indent=1)
    report["seconds"] = round(time.time() - t0)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    text = markdown(report)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    failed = [n for n in ("tests", "benchmark", "training") if report.get(n, {}).get("exit") not in (0, "skipped", None)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
