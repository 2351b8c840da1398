"""``crat-ft compare``'s speed: at demo scale and at LVIS v1 val scale.

- Demo scale (``--demo-dir``, a finished ``crat-ft demo`` work dir): ``compare`` of baseline vs CRAT
  from the matches ``evaluate`` kept, and from the results files (matched here first), bbox + segm,
  1,000 resamples.
- LVIS v1 val scale: the synthetic val set of ``bench_lvis_eval_scale.py`` (19,809 images, 1,203
  classes, ~236k instances) and two models of 300 detections per image (B: A's detections with
  their scores perturbed), bbox. Times matching each model once, then 1,000 paired resamples; peak
  RSS of the process. Segm matching costs what the metric's segm evaluation costs (the same mask IoUs).

Prints the times and, as ratios, resampling time per resample over the time of one full evaluation.

    .venv/bin/python benchmarks/bench_compare.py --demo-dir work_dirs/demo [--images 19809] [--resamples 1000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _peak_rss_gib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(ln for ln in status.splitlines() if ln.startswith("VmHWM")).split()[1]) / 2**20


def demo_scale(demo_dir: Path, resamples: int) -> None:
    from crat_ft.analysis.compare import compare

    gt = demo_dir / "data" / "annotations" / "lvis_v1_val.json"
    t0 = time.perf_counter()
    kept = compare(gt, str(demo_dir / "baseline"), str(demo_dir / "crat"), n_resamples=resamples)
    t1 = time.perf_counter()
    files = compare(gt, str(demo_dir / "baseline" / "results.segm.json"), str(demo_dir / "crat" / "results.segm.json"),
                    n_resamples=resamples)  # fmt: skip
    t2 = time.perf_counter()
    same = all(kept[i][k] == files[i][k] for i in ("bbox", "segm") for k in kept[i])
    print(f"demo scale ({kept['images']} images): compare from evaluate's matches {t1 - t0:.1f} s, "
          f"from results files (matching included) {t2 - t1:.1f} s, bbox + segm, {resamples} resamples; "
          f"identical results: {same}")  # fmt: skip


def lvis_scale(n_images: int, resamples: int) -> None:
    from bench_lvis_eval_scale import make_gt, write_detections

    from crat_ft.analysis.bootstrap import category_ap, paired_resamples, summarize
    from crat_ft.evaluation.detections import Detections, load_spilled
    from crat_ft.evaluation.lvis import lvis_metrics
    from crat_ft.evaluation.matching import index_ground_truth, match_table

    rng = np.random.default_rng(0)
    gt = make_gt(n_images, rng)
    with tempfile.TemporaryDirectory() as tmp:
        write_detections(gt, Path(tmp), 300, rng)
        a = load_spilled(tmp)
    b = Detections(image_id=a.image_id, category_id=a.category_id, bbox=a.bbox,
                   score=np.clip(a.score + rng.normal(0, 0.05, len(a)), 0, 1))  # fmt: skip
    a.rle = a.rle_offset = a.rle_size = None
    print(f"LVIS scale: {len(gt['images'])} images, {len(gt['categories'])} classes, {len(gt['annotations'])} "
          f"instances, {len(a)} detections per model")  # fmt: skip
    t0 = time.perf_counter()
    ref = lvis_metrics(gt, a, "bbox")
    t_eval = time.perf_counter() - t0
    index = index_ground_truth(gt)
    t0 = time.perf_counter()
    ta = match_table(gt, a, "bbox", gt=index)
    t_match = time.perf_counter() - t0
    tb = match_table(gt, b, "bbox", gt=index)
    full = summarize(category_ap(ta, np.ones((1, len(ta.image_ids)), np.int32)), ta.frequency)
    diff = max(abs(float(full[k][0]) - ref[k]) for k in ("AP", "APr", "APc", "APf"))
    t0 = time.perf_counter()
    paired_resamples([(ta, tb)], resamples, 0)
    t_boot = time.perf_counter() - t0
    print(f"lvis_metrics bbox {t_eval:.0f} s; matching one model once {t_match:.0f} s "
          f"({len(ta.score)} evaluated detections); {resamples} paired resamples {t_boot:.0f} s "
          f"= {t_boot / resamples:.2f} s per resample = {t_boot / resamples / t_eval:.3f}x one lvis_metrics; "
          f"full-sample AP vs lvis_metrics max difference {diff:.1e}; peak RSS {_peak_rss_gib():.2f} GiB")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-dir", type=Path, default=None)
    ap.add_argument("--images", type=int, default=19809)
    ap.add_argument("--resamples", type=int, default=1000)
    args = ap.parse_args()
    if args.demo_dir:
        demo_scale(args.demo_dir, args.resamples)
    lvis_scale(args.images, args.resamples)


if __name__ == "__main__":
    main()
