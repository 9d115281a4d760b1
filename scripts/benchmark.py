"""Speed and memory of any configs: inference split into network and post-processing, and training.

    python scripts/benchmark.py                                   # SCNet R-50, CPU, 2 threads, fp32
    python scripts/benchmark.py --configs configs/r50_20e.yaml configs/baselines/cascade_mask_rcnn_semantic_r50_1x.yaml
    python scripts/benchmark.py --device cuda --dtypes fp32 tf32 bf16 --image-size 800 1333 --batch 2 --train-size 800 1333
    python scripts/benchmark.py --official                        # + the official implementation, same image/weights

Inference: one image (the reference tool's synthetic 800x1216 image when its dumps are found, else a
generated one), resized and padded as in evaluation; ``model.test.score_thresh=0`` so that the
realistic 100 detections reach the mask branch, as in the official timing. Reported per image: the
end-to-end time (network, NMS, mask paste and RLE encoding), the network alone, and each
post-processing step, images/s and peak memory. Training: forward + backward + SGD step on a fixed
batch (data excluded) and through the real data loader on a generated COCO dataset (data included).

Weights: seeded random init with every BatchNorm given non-trivial affine parameters and then
calibrated on the benchmark image (the reference tool's procedure), so activations and scores are
realistic. With ``--reference-dir`` (default ``~/.cache/scnet-mmdet-ref/data``) the official models'
seeded weights from the reference dumps are used instead, so ``--official`` times both
implementations on the same image and weights, in one run.

Warm-up runs, then the median (and min-max spread) of ``--runs``. A Markdown table goes to stdout, the
machine and versions in its header; all numbers go to ``--json``.
"""
import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import scnet
from scnet.config import get_cfg, semantic_branch
from scnet.engine.compile import compile_dense_parts
from scnet.evaluation.coco_eval import instances_to_coco
from scnet.modeling.backbone.resnet import FrozenBatchNorm2d
from scnet.utils.malloc import TRIM_THRESHOLD, keep_freed_memory

from benchmark_measure import PartTimer, PeakMemory  # scripts/, next to this file
from benchmark_report import header, markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFICIAL_NAMES = {  # our config -> the official config whose seeded reference weights we can load
    "configs/r50_20e.yaml": "scnet_r50_fpn_20e_coco",
    "configs/x101_64x4d_20e.yaml": "scnet_x101-64x4d_fpn_20e_coco",
    "configs/baselines/mask_rcnn_r50_1x.yaml": "mask-rcnn_r50_fpn_1x_coco",
    "configs/baselines/cascade_mask_rcnn_r50_1x.yaml": "cascade-mask-rcnn_r50_fpn_1x_coco",
    "configs/baselines/htc_r50_1x.yaml": "htc_r50_fpn_1x_coco",
    "configs/baselines/ms_rcnn_r50_1x.yaml": "ms-rcnn_r50_fpn_1x_coco",
}
DTYPES = {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["configs/r50_20e.yaml"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (the official timing used 2)")
    p.add_argument("--dtypes", nargs="+", default=["fp32"], choices=sorted(DTYPES),
                   help="fp32, tf32 (CUDA: float32 on the TF32 matrix units), bf16/fp16 (autocast)")
    p.add_argument("--image-size", type=int, nargs=2, default=[800, 1216], metavar=("H", "W"))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-inference", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="also time each row with torch.compile on the dense parts (scnet/engine/compile.py)")
    p.add_argument("--train", action="store_true", help="also time training steps")
    p.add_argument("--train-configs", nargs="*", help="configs to train (default: the first of --configs)")
    p.add_argument("--train-size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=2, help="training images per step")
    p.add_argument("--workers", type=int, default=2, help="data-loader workers for the data-included time")
    p.add_argument("--reference-dir", default=os.path.expanduser("~/.cache/scnet-mmdet-ref/data"))
    p.add_argument("--official", action="store_true", help="also run the reference tool's time_ref.py")
    p.add_argument("--reference-tool", default=os.path.join(ROOT, "..", "shared", "tools", "mmdet_reference"))
    p.add_argument("--reference-env", default=os.path.expanduser("~/.cache/scnet-mmdet-ref/venv"))
    p.add_argument("--official-keep-freed-memory", action="store_true",
                   help="run the official implementation with the same glibc malloc settings as ours")
    p.add_argument("--json", default="benchmark.json")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Weights and inputs
# --------------------------------------------------------------------------------------------------
def benchmark_image(args):
    """(3, H, W) uint8 RGB: the reference tool's synthetic image when its dump is at hand, else ours."""
    h, w = args.image_size
    path = os.path.join(args.reference_dir, "scnet_r50_fpn_20e_coco_seed0_bncalib_synth0.npz")
    if os.path.exists(path):
        image = np.load(path)["image_bgr"][:, :, ::-1]
        if image.shape[:2] == (h, w):
            return torch.from_numpy(image.copy()).permute(2, 0, 1), "reference synthetic_image(0)"
    rng = np.random.RandomState(0)
    low = torch.from_numpy(rng.rand(1, 3, h // 32, w // 32).astype(np.float32))
    image = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)[0] * 200 + 20
    for _ in range(12):  # coloured rectangles, as the reference tool's image
        y, x = rng.randint(0, max(h - 64, 1)), rng.randint(0, max(w - 64, 1))
        bh, bw = rng.randint(1, max(h // 3, 2)), rng.randint(1, max(w // 3, 2))
        image[:, y : y + bh, x : x + bw] = torch.tensor(rng.randint(0, 256, 3), dtype=torch.float32)[:, None, None]
    image = image + torch.from_numpy(rng.randn(3, h, w).astype(np.float32)) * 8
    return image.clamp(0, 255).to(torch.uint8), "generated"


def perturb_and_calibrate(model, image, seed=0):
    """Non-trivial BatchNorm affine parameters, then running statistics set to the statistics of
    ``image``'s own activations, layer by layer (the reference tool's ``calibrate_bn``)."""
    g = torch.Generator().manual_seed(seed + 1)
    norms = [m for m in model.modules() if isinstance(m, (FrozenBatchNorm2d, torch.nn.modules.batchnorm._BatchNorm))]
    with torch.no_grad():
        for m in norms:
            c = m.weight.numel()
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(torch.randn(c, generator=g) * 0.1)

    def calibrate(module, inputs):
        x = inputs[0].detach().float()
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)))

    handles = [m.register_forward_pre_hook(calibrate) for m in norms]
    try:
        model.predict([image])
    finally:
        for h in handles:
            h.remove()


def build(config, args, image):
    """The model of ``config`` on the device, seeded weights; returns (model, weights description)."""
    overrides = ["model.test.score_thresh=0.0"]  # the realistic 100 detections reach the mask branch
    official = OFFICIAL_NAMES.get(os.path.relpath(os.path.abspath(config), ROOT))
    pth = official and os.path.join(args.reference_dir, f"{official}_seed0_bncalib_synth0.pth")
    torch.manual_seed(0)
    if pth and os.path.exists(pth):
        model = scnet.build_model(config, weights=pth, overrides=overrides).eval()
        weights = f"reference {official} seed 0, calibrated BN"
    else:
        model = scnet.build_model(config, overrides=overrides).eval()
        perturb_and_calibrate(model, image)
        weights = "seed 0, calibrated BN"
    return model.to(args.device), weights


# --------------------------------------------------------------------------------------------------
# Measurement helpers
# --------------------------------------------------------------------------------------------------
def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


@contextlib.contextmanager
def autocast(device, dtype):
    """Autocast for bf16/fp16. On CUDA, the TF32 matrix units only for "tf32": "fp32" is strict float32
    there, which cuDNN's convolutions are not by default (torch.backends.cudnn.allow_tf32)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = dtype == "tf32"
    try:
        if DTYPES[dtype] is None:
            yield
        else:
            with torch.autocast(torch.device(device).type, dtype=DTYPES[dtype]):
                yield
    finally:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def dtype_supported(device, dtype):
    if dtype == "fp32":
        return True
    if torch.device(device).type == "cuda":
        if dtype == "tf32":
            return torch.cuda.get_device_capability(torch.device(device))[0] >= 8  # Ampere and later
        return dtype != "bf16" or torch.cuda.is_bf16_supported()
    return dtype == "bf16" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


# --------------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------------
def time_inference(model, image, args, dtype, compiled=False):
    timer = PartTimer(model, args.device)
    rows = []
    warmup = args.warmup + (2 if compiled else 0)  # compiling takes the first call (and one more shape)
    try:
        for i in range(warmup + args.runs):
            timer.seconds = {}
            with PeakMemory(args.device) as memory, torch.no_grad(), autocast(args.device, dtype):
                timer._sync()
                t0 = time.perf_counter()
                result = model.predict([image.to(args.device)])[0]
                timer._sync()
                t1 = time.perf_counter()
                instances_to_coco(result, 0, list(range(1, 200)))  # RLE-encode the masks, as evaluation does
                t2 = time.perf_counter()
            if i >= warmup:
                paste, nms = timer.seconds.get("paste", 0.0), timer.seconds.get("nms", 0.0)
                rows.append({"e2e": t2 - t0, "network": t1 - t0 - paste - nms, "nms": nms, "paste": paste,
                             "rle": t2 - t1, "model_and_paste": t1 - t0, "peak_mb": memory.peak_mb,
                             "detections": int(result["scores"].numel())})
    finally:
        timer.close()
    out = {k: summary([r[k] for r in rows]) for k in rows[0] if k not in ("peak_mb", "detections")}
    out["images_per_s"] = 1.0 / out["e2e"]["median"]
    out["peak_mb"] = max(r["peak_mb"] or 0 for r in rows) or None
    out["detections"] = rows[-1]["detections"]
    return out


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
def training_data(args, cfg, workdir):
    """A DataLoader over a generated COCO dataset of ``--train-size`` images with stuff maps."""
    from scnet.data.build import build_train_loader
    from scnet.data.coco import CocoDataset
    from scnet.data.synthetic import make_synthetic_coco

    h, w = args.train_size
    n = args.batch * (args.warmup + args.runs + 1)
    ann = make_synthetic_coco(workdir, n, seed=0, size=(min(h, w), max(h, w)), num_classes=3)
    semantic = semantic_branch(cfg.model)
    dataset = CocoDataset(
        ann, os.path.join(workdir, "train"), stuff_dir=os.path.join(workdir, "stuffthingmaps", "train"),
        semantic_source="stuff_maps" if semantic else "none",
        num_semantic_classes=semantic.num_classes if semantic else 183, train_scale=(max(h, w), min(h, w)),
    )
    return build_train_loader(dataset, args.batch, seed=0, num_workers=args.workers)


def _to_device(batch, device):
    images, targets = batch
    images = [im.to(device) for im in images]
    targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    return images, targets


def time_training(model, args, dtype, cfg, compiled=False):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4)
    sync = (lambda: torch.cuda.synchronize(args.device)) if torch.device(args.device).type == "cuda" else (lambda: None)

    def step(images, targets):
        with autocast(args.device, dtype):
            losses = model(images, targets)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
        sync()
        return losses

    with tempfile.TemporaryDirectory() as workdir:
        loader = training_data(args, cfg, workdir)
        batches = list(loader)
        fixed = _to_device(batches[0], args.device)
        excluded, included = [], []
        warmup = args.warmup + (2 if compiled else 0)
        with PeakMemory(args.device) as memory:
            for i in range(warmup + args.runs):
                t = time.perf_counter()
                losses = step(*fixed)
                if i >= warmup:
                    excluded.append(time.perf_counter() - t)
        iterator = iter(loader)
        for i in range(args.warmup + args.runs):
            t = time.perf_counter()
            step(*_to_device(next(iterator), args.device))
            if i >= args.warmup:
                included.append(time.perf_counter() - t)
    model.eval()
    return {"data_excluded": summary(excluded), "data_included": summary(included), "peak_mb": memory.peak_mb,
            "losses_finite": all(bool(torch.isfinite(v)) for v in losses.values())}


# --------------------------------------------------------------------------------------------------
# The official implementation, through the reference tool
# --------------------------------------------------------------------------------------------------
def run_official(args, configs):
    tool, python = os.path.abspath(args.reference_tool), os.path.join(args.reference_env, "bin", "python")
    names = [OFFICIAL_NAMES[c] for c in configs if c in OFFICIAL_NAMES]
    if not (os.path.exists(os.path.join(tool, "time_ref.py")) and os.path.exists(python) and names):
        print("official: reference tool, its environment or a matching config not found; skipped", file=sys.stderr)
        return None
    out = os.path.join(tempfile.mkdtemp(), "official.json")
    argv = ["time_ref.py", "--models", *names, "--runs", str(args.runs), "--warmup", str(args.warmup),
            "--modes", "forced", "--json", out]
    argv += ["--train-runs", str(args.runs)] if args.train else ["--no-train"]
    # time_ref.py uses ``os`` without importing it: run it with ``os`` in its globals
    launcher = (f"import os, runpy, sys; sys.argv = {argv!r}; "
                "runpy.run_path('time_ref.py', init_globals={'os': os}, run_name='__main__')")
    print("running the official implementation:", " ".join(argv), file=sys.stderr)
    try:
        env = dict(os.environ)
        if args.official_keep_freed_memory:  # scnet/utils/malloc.py's settings, through glibc's variables
            env.update(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(TRIM_THRESHOLD))
        subprocess.run([python, "-c", launcher], cwd=tool, check=True, stdout=sys.stderr, env=env)
        with open(out) as f:
            return json.load(f)
    except (subprocess.CalledProcessError, OSError, ValueError) as e:
        print(f"official: the reference tool failed ({e}); its column is left out", file=sys.stderr)
        return None


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cpu":
        args.keep_freed_memory = keep_freed_memory()  # as train.py / eval.py do on the CPU
    image, image_source = benchmark_image(args)
    configs = [os.path.relpath(os.path.abspath(c), ROOT) for c in args.configs]
    if args.train_configs:
        args.train_configs = [os.path.relpath(os.path.abspath(c), ROOT) for c in args.train_configs]
    report = {"header": header(args, image_source), "inference": [], "training": []}
    for config in configs:
        cfg = get_cfg(config)
        model, weights = build(config, args, image)
        dtypes = [d for d in args.dtypes if dtype_supported(args.device, d)]
        for dtype in sorted(set(args.dtypes) - set(dtypes)):
            print(f"{dtype} autocast not supported on {args.device}; skipped", file=sys.stderr)
        variants = [False, True] if args.compile else [False]
        for compiled in variants if not args.no_inference else []:
            if compiled:
                compile_dense_parts(model)
            for dtype in dtypes:
                r = time_inference(model, image, args, dtype, compiled)
                label = dtype + (" compiled" if compiled else "")
                report["inference"].append({"config": config, "dtype": label, "weights": weights, **r})
                print(f"{config} {label}: {r['e2e']['median']:.3f} s/img", file=sys.stderr, flush=True)
        train = args.train and config in (args.train_configs or configs[:1])
        for compiled in variants if train else []:
            for dtype in dtypes:  # each from the same weights: the SGD steps change them
                model, _ = build(config, args, image)
                if compiled:
                    compile_dense_parts(model)
                r = time_training(model, args, dtype, cfg, compiled)
                label = dtype + (" compiled" if compiled else "")
                report["training"].append({"config": config, "dtype": label, "weights": weights, **r})
                print(f"{config} {label}: train {r['data_excluded']['median']:.3f} s/iter", file=sys.stderr, flush=True)
        del model
    if args.official:
        report["official"] = run_official(args, configs)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(markdown(report, OFFICIAL_NAMES))
    return report


if __name__ == "__main__":
    main()
