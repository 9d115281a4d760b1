"""This machine's floating-point rate, as a reference for the times README.md gives.

    python scripts/machine_speed.py            # one line: matrix-product and convolution GFLOP/s

A time measured on one machine says little about another: the quick start printed 6.5 min on one
2-core machine and 10-12 min on another of the same type, with the same code. This script measures
the three kinds of work that make up a training iteration on a CPU, with nothing of this package in
them, so that a reader can compare their machine with the one that measured the README's figures:

- a fp32 3x3 convolution with its backward (oneDNN): the backbone, FPN and heads, about 30% of a
  quick-start iteration (profiled with torch.profiler, one iteration after warm-up);
- a fp32 1024x1024 matrix product (MKL): the fully connected layers, and RoIAlign, which runs as two
  small matrix products per RoI (scnet/ops/roi_align.py), about half of a quick-start iteration;
- the time of one small operation (a 7x14 by 14x64 product): the per-call cost of PyTorch's dispatch,
  which the thousands of small operations of an iteration pay; it follows the single-core speed.

Each figure is the best of repeated runs over about a second, which measures what the machine can do
when nothing else runs; a busy machine shows as worse figures, or as a slower iteration than the
figures predict.

The thread count is torch's (the quick start sets OMP_NUM_THREADS=2).
"""
import argparse
import json
import time

import torch


def best_time(fn, seconds):
    """Seconds of the fastest call of fn() within about `seconds` (after two warm-up calls)."""
    fn(), fn()
    best, spent = float("inf"), 0.0
    while spent < seconds:
        start = time.perf_counter()
        fn()
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
    return best


def measure(seconds=1.0):
    torch.manual_seed(0)
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    matmul = 2 * n ** 3 / best_time(lambda: torch.mm(a, b), seconds) / 1e9

    # a quick-start-sized 3x3 convolution, forward + backward (input and weight gradients = 3x)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False)
    x = torch.randn(2, 64, 56, 72, requires_grad=True)

    def conv_step():
        conv(x).sum().backward()

    flop = 3 * 2 * 64 * 64 * 9 * 2 * 56 * 72
    conv_rate = flop / best_time(conv_step, seconds) / 1e9

    small_a, small_b = torch.randn(7, 14), torch.randn(14, 64)
    calls = 20

    def small_ops():
        for _ in range(calls):
            torch.mm(small_a, small_b)

    small_us = best_time(small_ops, seconds) / calls * 1e6
    return {"matmul_gflops": round(matmul, 1), "conv_gflops": round(conv_rate, 1),
            "small_op_us": round(small_us, 2), "threads": torch.get_num_threads()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=1.0, help="time spent on each measurement")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args()
    r = measure(args.seconds)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"machine speed: convolution {r['conv_gflops']:.0f} GFLOP/s, matrix product "
              f"{r['matmul_gflops']:.0f} GFLOP/s, small op {r['small_op_us']:.1f} us "
              f"(fp32, {r['threads']} threads; README.md compares)")


if __name__ == "__main__":
    main()
