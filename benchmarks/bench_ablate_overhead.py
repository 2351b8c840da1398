"""``crat-ft ablate``'s overhead over the same retrain-heads and evaluate commands typed by hand, and its time per arm.

Target: ablate <= 1.05x the commands by hand. On a finished demo (``crat-ft demo``: its cache and data),
for the ARMS file's arms and the given seeds, in one run of this script:

1. by hand: for each seed and arm, ``crat-ft retrain-heads FT --cache C --work-dir H/s<seed>/<arm>
   --cfg-options <the arm's options> train.seed=<seed>``, then ``crat-ft evaluate CONFIG CHECKPOINT --heads
   H/s<seed>/<arm>/heads.pth --out H/s<seed>/<arm>/metrics.json --outfile-prefix ...``, one process after
   another as a person runs them (a measured value, loss-mass's ``1 + r``, read from the by-hand crat run);
2. ``crat-ft ablate ARMS --cache C --work-dir W --seeds ...``: the same retrainings and evaluations (side
   by side on a CPU), plus the error analysis, the comparisons and the tables it adds;
3. ``crat-ft ablate`` again on the finished ``W``: its checks and tables alone.

It prints each time, the ratio ablate / by hand, the time per arm (ablate's total over arms x seeds) and the
largest difference between the metrics of the two ways (the retrainings are the same; an evaluation's thread
count can move a score in its last bits). Arms with ``export`` options or dict-valued options are not typed
by hand here (``configs/ablate/crat_controls.py`` has neither).

    .venv/bin/python benchmarks/bench_ablate_overhead.py [--demo work_dirs/demo] [--seeds 0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def crat_ft(*args) -> float:
    """Run ``crat-ft args``; its wall time in seconds."""
    exe = Path(sys.executable).parent / "crat-ft"
    t0 = time.time()
    r = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"bench_ablate_overhead: crat-ft {' '.join(map(str, args[:2]))} failed:\n{r.stderr[-2000:]}")
    return time.time() - t0


def by_hand(spec, det, cache: Path, data: Path, out: Path, seeds: list[int]) -> float:
    """The retrain-heads and evaluate commands of every arm x seed, one after another; their total time."""
    from crat_ft.pipeline.ablate import measured_mass

    total = 0.0
    for seed in seeds:
        measured: dict = {}
        for arm in spec.arms:
            if arm.export or any(isinstance(v, (dict, list)) for v in arm.cfg_options.values()):
                sys.exit(f"bench_ablate_overhead: arm {arm.name} has export or dict options; use another ARMS file")
            work = out / f"s{seed}" / arm.name
            options = [f"{k}={v}" for k, v in arm.options(measured, seed).items()]
            total += crat_ft("retrain-heads", arm.ft_config, "--cache", cache, "--work-dir", work, "--cfg-options",
                             *options)  # fmt: skip
            total += crat_ft("evaluate", det.config, det.checkpoint, "--heads", work / "heads.pth", "--data-root", data,
                             "--out", work / "metrics.json", "--outfile-prefix", work / "results")  # fmt: skip
            if any(k.endswith("log_mass") and v is True for k, v in arm.cfg_options.items()):
                measured[arm.name] = measured_mass(work)
            print(f"  by hand, seed {seed} {arm.name}: {total:.0f} s so far", flush=True)
    return total


def main() -> None:
    from crat_ft.common.paths import config_root
    from crat_ft.pipeline.ablate import open_detector
    from crat_ft.pipeline.ablate_arms import load_arms

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, default=Path("work_dirs/demo"), help="a finished `crat-ft demo` work dir")
    ap.add_argument("--arms", type=Path, default=config_root() / "ablate" / "crat_controls.py")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--out", type=Path, default=Path("work_dirs/bench_ablate_overhead"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    cache, data = args.demo / "cache", args.demo / "data"
    if not (cache / "index.h5").is_file():
        sys.exit(f"bench_ablate_overhead: no cache in {cache}; run `crat-ft demo` first")
    shutil.rmtree(args.out, ignore_errors=True)
    spec = load_arms(args.arms)
    det = open_detector(spec, cache, data)
    hand = by_hand(spec, det, cache, data, args.out / "by_hand", seeds)
    work = args.out / "ablate"
    command = ["ablate", args.arms, "--cache", cache, "--data-root", data, "--work-dir", work, "--seeds", args.seeds]
    ablate = crat_ft(*command)
    again = crat_ft(*command)
    runs = len(spec.arms) * len(seeds)
    diff = 0.0
    for seed in seeds:
        for arm in spec.arms:
            a, b = (json.loads((d / f"s{seed}" / arm.name / "metrics.json").read_text())
                    for d in (args.out / "by_hand", work))  # fmt: skip
            diff = max(diff, *(abs(a[iou][k] - b[iou][k]) for iou in ("bbox", "segm") for k in a[iou]))
    print(f"{len(spec.arms)} arms x {len(seeds)} seed(s) on {cache}:")
    print(f"  by hand (retrain-heads + evaluate per run): {hand:.0f} s")
    print(
        f"  crat-ft ablate: {ablate:.0f} s = {ablate / hand:.2f}x by hand (target <= 1.05x); {ablate / runs:.0f} s per arm"
    )
    print(f"  crat-ft ablate again on the finished work dir (checks and tables): {again:.0f} s")
    print(f"  largest metric difference, by hand vs ablate: {diff:.2e}")
    table = json.loads((work / "ablation.json").read_text())
    for arm in spec.arms:
        times = [table["runs"][arm.name][str(s)]["seconds"] for s in seeds]
        shown = ", ".join(
            f"{k} {sum(t.get(k, 0.0) for t in times) / len(times):.0f} s" for k in ("retrain", "evaluate")
        )
        print(f"  ablate, {arm.name}: {shown} (mean per seed; evaluate: its share of the side-by-side evaluations)")
    print(f"  the table equals `crat-ft compare` by hand: {table_equals_compare(table, work, det.gt, seeds, args.out)}")


def table_equals_compare(table: dict, work: Path, gt: Path, seeds: list[int], out: Path) -> str:
    """Every row's ΔAP entries against ``crat-ft compare`` (``--seeds`` with several) run on the same runs."""
    checked = []
    for i, row in enumerate(table["rows"]):
        where = "s{seed}" if len(seeds) > 1 else f"s{seeds[0]}"
        extra = ["--seeds", ",".join(map(str, seeds))] if len(seeds) > 1 else []
        crat_ft(
            "compare", gt, work / where / row["a"], work / where / row["b"], *extra, "--out", out / f"compare{i}.json"
        )
        by_hand = json.loads((out / f"compare{i}.json").read_text())
        for iou, delta in row["delta"].items():
            if delta != {k: by_hand[iou][k] for k in delta}:
                return f"NO, row {row['b']} - {row['a']} {iou}: {delta} vs {by_hand[iou]}"
        checked.append(f"{row['b']} - {row['a']} APr {100 * row['delta']['bbox']['APr']['delta']:+.2f}")
    return f"yes, all {len(checked)} rows ({'; '.join(checked)})"


if __name__ == "__main__":
    main()
