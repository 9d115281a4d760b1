"""The report of scripts/benchmark.py: machine header, Markdown tables, the side-by-side with the official
implementation."""
import contextlib
import os
import platform

import torch


def header(args, image_source):
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    device = torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda" else cpu
    return {"device": device, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "image": image_source,
            "image_size": args.image_size, "train_size": args.train_size, "batch": args.batch,
            "keep_freed_memory": getattr(args, "keep_freed_memory", False),
            "official_keep_freed_memory": args.official and args.official_keep_freed_memory}


def _s(x):
    return f"{x['median']:.3f} ({x['min']:.2f}-{x['max']:.2f})"


def markdown(report, official_names):
    h = report["header"]
    lines = [f"Device: {h['device']} ({h['cpu_count']} CPUs), {h['threads']} threads, torch {h['torch']}, "
             f"image {h['image_size'][0]}x{h['image_size'][1]} ({h['image']}); median (min-max) of the runs, seconds.",
             f"glibc malloc keeps freed memory (scnet/utils/malloc.py): ours {h.get('keep_freed_memory', False)}"
             + (f", official {h['official_keep_freed_memory']}" if report.get("official") else "") + ".", ""]
    if report["inference"]:
        lines += ["| config | dtype | end-to-end s/img | network | NMS | paste | RLE | img/s | peak MB | dets |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["inference"]:
            lines.append(f"| {r['config']} | {r['dtype']} | {_s(r['e2e'])} | {_s(r['network'])} | {r['nms']['median']:.3f} "
                         f"| {r['paste']['median']:.3f} | {r['rle']['median']:.3f} | {r['images_per_s']:.2f} "
                         f"| {r['peak_mb'] or 0:.0f} | {r['detections']} |")
    if report["training"]:
        lines += ["", f"Training, {h['batch']} images of {h['train_size'][0]}x{h['train_size'][1]}, forward + backward + SGD step:", "",
                  "| config | dtype | s/iter, data excluded | s/iter, data included | peak MB |", "|---|---|---|---|---|"]
        for r in report["training"]:
            lines.append(f"| {r['config']} | {r['dtype']} | {_s(r['data_excluded'])} | {_s(r['data_included'])} "
                         f"| {r['peak_mb'] or 0:.0f} |")
    if report.get("official"):
        lines += ["", *official_lines(report, official_names)]
    return "\n".join(lines)


def official_lines(report, official_names):
    """Side by side with the official implementation: its model + paste time (it does no RLE)."""
    off = report["official"]
    ours = {(r["config"], r["dtype"]): r for r in report["inference"]}
    lines = ["| side by side (fp32) | official s/img | ours s/img (network + NMS + paste) | ratio | ours incl. RLE |",
             "|---|---|---|---|---|"]
    for config, name in official_names.items():
        r, o = ours.get((config, "fp32")), off.get("inference", {}).get(name, {}).get("forced")
        if r and o:
            mine = r["model_and_paste"]["median"]
            lines.append(f"| {config} | {o['median_s']:.3f} | {mine:.3f} | {mine / o['median_s']:.2f}x "
                         f"| {r['e2e']['median']:.3f} |")
    for name, o in (off.get("train") or {}).items():
        mine = [r for r in report["training"] if official_names.get(r["config"]) == name and r["dtype"] == "fp32"]
        if mine:
            t = mine[0]["data_excluded"]["median"]
            lines.append(f"| training step {name} | {o['median_fwd_bwd_s']:.3f} (fwd+bwd) | {t:.3f} (fwd+bwd+SGD) "
                         f"| {t / o['median_fwd_bwd_s']:.2f}x | |")
    return lines
