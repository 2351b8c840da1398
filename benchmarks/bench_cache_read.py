"""Cache reads: random-access training batches vs sequential reads (docs/architecture.md#performance-targets: >= 0.5x).

Uses a finished demo run's cache (``crat-ft demo``). Reads the same number of
RoIs (and masks) both ways from the HDF5 file (not from RAM): sequential
batches of consecutive rows, and the class-balanced sampler's random batches
(assembled per image block), and prints the throughput ratio.

    .venv/bin/python benchmarks/bench_cache_read.py [--work-dir work_dirs/demo] [--batches 100]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", default="work_dirs/demo")
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--rois-per-batch", type=int, default=512)
    ap.add_argument("--masks-per-batch", type=int, default=32)
    ap.add_argument("--mask-group", type=int, default=4, help="the sampler's mask_group (1: masks one by one)")
    args = ap.parse_args()
    cache = Path(args.work_dir) / "cache" / "index.h5"
    if not cache.is_file():
        raise SystemExit(f"{cache} not found: run `crat-ft demo --work-dir {args.work_dir}` first")
    from crat_ft.cache import RoIReader

    print(f"cache {cache}")
    for shard in cache.parent.glob("shard-*.h5"):  # warm the page cache: compare reads, not disk spin-up
        with open(shard, "rb") as fh:
            while fh.read(1 << 24):
                pass
    for label, budget in (("box features in RAM (default reader)", 8 << 30), ("everything read from HDF5", 0)):
        reader = RoIReader(cache, box_memory_bytes=budget)
        measure(reader, args, label)


def measure(reader, args, label: str) -> None:
    from crat_ft.heads.sampling import RoIBatchSampler

    sampler = RoIBatchSampler.from_reader(
        reader,
        strategy="class_balanced",
        rois_per_batch=args.rois_per_batch,
        masks_per_batch=args.masks_per_batch,
        pos_fraction=0.5,
        mask_group=args.mask_group,
    )
    n_rois, n_masks = len(reader.labels), len(reader.mask_roi)

    def sequential():
        for b in range(args.batches):
            s = (b * args.rois_per_batch) % max(1, n_rois - args.rois_per_batch)
            m = (b * args.masks_per_batch) % max(1, n_masks - args.masks_per_batch)
            reader.read_rois(np.arange(s, s + args.rois_per_batch))
            reader.read_masks(np.arange(m, m + args.masks_per_batch))

    items = [sampler.batch(b) for b in range(args.batches)]  # drawn before timing: this measures reads

    def random():
        for item in items:
            reader.read_rois(item["rois"])
            reader.read_masks(item["masks"])

    t_seq = t_rand = float("inf")
    for _ in range(3):  # alternate, keep the best of each: the machine is shared and noisy
        t0 = time.perf_counter()
        sequential()
        t_seq = min(t_seq, time.perf_counter() - t0)
        t0 = time.perf_counter()
        random()
        t_rand = min(t_rand, time.perf_counter() - t0)
    rois = args.batches * args.rois_per_batch
    print(
        f"{label}: {n_rois} RoIs, {n_masks} masks; {args.batches} batches of {args.rois_per_batch} RoIs + {args.masks_per_batch} masks"
    )
    print(f"  sequential reads: {rois / t_seq:10.0f} RoIs/s")
    print(f"  random batches:   {rois / t_rand:10.0f} RoIs/s")
    print(f"  random / sequential throughput: {t_seq / t_rand:.2f}x (target >= 0.5x)")


if __name__ == "__main__":
    main()
