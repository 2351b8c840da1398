"""CRAT vs the decoupled baseline on the demo benchmark over several seeds.

Runs (or reuses) ``crat-ft demo --seed S --work-dir ROOT/seed-S`` for each seed
and prints every seed's APr/APc/APf deltas (bbox, segm) and their means.

    .venv/bin/python benchmarks/crat_seeds.py [--root work_dirs/seeds] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

KEYS = ("AP", "APr", "APc", "APf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="work_dirs/seeds")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    from crat_ft.pipeline.demo import run_demo

    rows = []
    for seed in args.seeds:
        work = Path(args.root) / f"seed-{seed}"
        summary_file = work / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else run_demo(work, seed=seed)
        rows.append((seed, summary))
    print(f"\n{'seed':<6}{'iou':<6}" + "".join(f"{'base ' + k:>11}{'crat ' + k:>11}{'delta':>8}" for k in KEYS))
    means = {iou: {k: 0.0 for k in KEYS} for iou in ("bbox", "segm")}
    for seed, s in rows:
        for iou in ("bbox", "segm"):
            cells = ""
            for k in KEYS:
                b, c = 100 * s["baseline"][iou][k], 100 * s["crat"][iou][k]
                means[iou][k] += (c - b) / len(rows)
                cells += f"{b:11.1f}{c:11.1f}{c - b:+8.1f}"
            print(f"{seed:<6}{iou:<6}{cells}")
    for iou in ("bbox", "segm"):
        print(f"mean CRAT - baseline ({iou}): " + "  ".join(f"{k} {v:+.2f}" for k, v in means[iou].items()))


if __name__ == "__main__":
    main()
