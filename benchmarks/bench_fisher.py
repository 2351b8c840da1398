"""Closed-form per-sample box Fisher vs an autograd per-sample loop (docs/architecture.md#performance-targets).

At P = 128 positives, D = 1024, C = 1203 (LVIS Mask R-CNN): prints the wall
times, the speed-up ratios (target >= 50x) and the largest relative difference
(target <= 1e-5), all measured in this one run. The closed form starts from
the head's regression output, which training computes anyway for its loss;
the loops need a forward and a backward per sample. Two loops are timed: the
plain one (gradient w.r.t. the whole fc_reg weight, what per-sample autograd
gives you by default) and a tuned one that differentiates only the sample's
own 4 x D slice.

    .venv/bin/python benchmarks/bench_fisher.py [--positives 128] [--dim 1024] [--classes 1203]
"""

from __future__ import annotations

import argparse
import time

import torch

from crat_ft.heads.transfusion import box_sample_fisher


def autograd_loop(feats, weight, bias, labels, target):
    """Per-sample gradient of the own-class L1 loss w.r.t. fc_reg's weight, squared: one backward per sample."""
    d = feats.shape[1]
    out = []
    for n in range(feats.shape[0]):
        w = weight.detach().requires_grad_(True)
        pred = (feats[n] @ w.T + bias).view(-1, 4)[labels[n]]
        (g,) = torch.autograd.grad((pred - target[n]).abs().sum(), w)
        out.append(g.view(-1, 4, d)[labels[n]].square())
    return torch.stack(out)


def autograd_slice_loop(feats, weight, bias, labels, target):
    """As :func:`autograd_loop`, differentiating only the own-class 4 x D slice."""
    out = []
    for n in range(feats.shape[0]):
        y = int(labels[n])
        w = weight[4 * y : 4 * y + 4].detach().requires_grad_(True)
        pred = w @ feats[n] + bias[4 * y : 4 * y + 4]
        (g,) = torch.autograd.grad((pred - target[n]).abs().sum(), w)
        out.append(g.square())
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positives", type=int, default=128)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--classes", type=int, default=1203)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    p, d, c = args.positives, args.dim, args.classes
    feats = torch.randn(p, d, generator=g).relu()
    weight = torch.randn(4 * c, d, generator=g) * 0.01
    bias = torch.zeros(4 * c)
    labels = torch.randint(0, c, (p,), generator=g)
    target = torch.randn(p, 4, generator=g)

    pred = (feats @ weight.T + bias).view(p, c, 4)[
        torch.arange(p), labels
    ]  # the head's forward output (the loss needs it)

    def closed():
        return box_sample_fisher(feats, pred, target)

    closed()  # warm-up
    t_closed = min(_timed(closed) for _ in range(args.repeats))
    t_loop = min(_timed(lambda: autograd_loop(feats, weight, bias, labels, target)) for _ in range(args.repeats))
    t_slice = min(_timed(lambda: autograd_slice_loop(feats, weight, bias, labels, target)) for _ in range(args.repeats))
    a = closed()
    b = autograd_loop(feats, weight, bias, labels, target)
    b2 = autograd_slice_loop(feats, weight, bias, labels, target)
    rel = max(((a - b).abs().max() / b.abs().max()).item(), ((a - b2).abs().max() / b2.abs().max()).item())
    print(f"P={p} D={d} C={c}")
    print(f"closed form:                                 {1000 * t_closed:9.2f} ms")
    print(
        f"autograd per-sample loop (whole weight):     {1000 * t_loop:9.2f} ms  -> speed-up {t_loop / t_closed:.0f}x (target >= 50x)"
    )
    print(
        f"autograd per-sample loop (own slice only):   {1000 * t_slice:9.2f} ms  -> speed-up {t_slice / t_closed:.0f}x"
    )
    print(f"max relative difference: {rel:.2e} (target <= 1e-5)")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
