"""End-to-end {plain, CRAT} x decoupled {none, baseline, CRAT} on the synthetic benchmark, per seed.

For each seed: the demo data; the demo detector trained end to end by mmdet
twice with the same seed and schedule, once plain
(``configs/demo/mask-rcnn_r18_fpn_tiny_synthetic.py``) and once with CRAT's
plugin heads (``configs/demo/mask-rcnn_r18_fpn_tiny_crat-e2e_synthetic.py``);
then each detector through the decoupled stage (feature cache, the demo's
baseline and CRAT fine-tune configs). Every model is evaluated with the LVIS
protocol on the val split; the script prints AP, APr, APc, APf (bbox, segm)
for all six, per seed and as the mean over seeds. Finished stages are reused.
CRAT's settings are the paper's everywhere; nothing was tuned on these seeds.

    .venv/bin/python benchmarks/bench_e2e_crat.py [--root work_dirs/e2e] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

KEYS = ("AP", "APr", "APc", "APf")
DETECTORS = {"plain": "mask-rcnn_r18_fpn_tiny_synthetic.py", "crat-e2e": "mask-rcnn_r18_fpn_tiny_crat-e2e_synthetic.py"}
STAGES = ("end to end", "+ decoupled baseline", "+ decoupled CRAT")


def run_seed(root: Path, seed: int, log) -> dict:
    """``{(detector, stage): metrics}`` of one seed."""
    from crat_ft.cache import INDEX_FILE
    from crat_ft.common.paths import demo_config
    from crat_ft.detector.roi_policy import RoIPolicy
    from crat_ft.pipeline.evaluate import evaluate_detector
    from crat_ft.pipeline.extract import extract_features
    from crat_ft.pipeline.retrain import retrain_heads
    from crat_ft.pipeline.retrain_record import HEADS_FILE
    from crat_ft.pipeline.train_detector import DETECTOR_FILE, train_detector
    from crat_ft.synthetic.dataset import make_demo_data
    from crat_ft.synthetic.variants import DemoDataSpec

    data = root / "data"
    if not (data / "annotations" / "lvis_v1_val.json").exists():
        make_demo_data(data, DemoDataSpec(seed=seed), progress=False)
    results = {}
    for det, config_name in DETECTORS.items():
        config = demo_config(config_name)
        work = root / det
        detector = work / "stage1" / DETECTOR_FILE
        with contextlib.redirect_stdout(log):
            if not detector.exists():
                print(f"seed {seed}: training {det}", flush=True)
                train_detector(config, detector.parent, data_root=data, seed=seed)
            cache = work / "cache" / INDEX_FILE
            if not cache.exists():
                policy = RoIPolicy(seed=seed, mask_pos_per_class=200)
                extract_features(config, detector, cache.parent, data_root=data, policy=policy, resume=True)
            for stage, ft in zip(STAGES, (None, "baseline_synthetic.py", "crat_synthetic.py")):
                name = "e2e" if ft is None else Path(ft).stem
                heads = None
                if ft is not None:
                    heads = work / name / HEADS_FILE
                    if not heads.exists():
                        retrain_heads(
                            demo_config(ft), cache, heads.parent, cfg_options={"train.seed": seed}, resume=True
                        )
                metrics = work / name / "metrics.json"
                if not metrics.exists():
                    evaluate_detector(config, detector, metrics, data_root=data, heads=heads)
                results[(det, stage)] = json.loads(metrics.read_text())
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="work_dirs/e2e")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    per_seed = {}
    with open(root / "frameworks.log", "a") as log:
        for seed in args.seeds:
            per_seed[seed] = run_seed(root / f"seed-{seed}", seed, log)
    header = f"{'detector':<10}{'stage':<22}" + "".join(
        f"{iou + ' ' + k:>11}" for iou in ("bbox", "segm") for k in KEYS
    )
    for seed, results in [*per_seed.items(), ("mean", None)]:
        print(f"\nseed {seed}" if seed != "mean" else f"\nmean of seeds {args.seeds}")
        print(header)
        for det in DETECTORS:
            for stage in STAGES:
                rows = [per_seed[s][(det, stage)] for s in args.seeds] if results is None else [results[(det, stage)]]
                cells = "".join(
                    f"{100 * sum(r[iou][k] for r in rows) / len(rows):11.1f}" for iou in ("bbox", "segm") for k in KEYS
                )
                print(f"{det:<10}{stage:<22}{cells}")


if __name__ == "__main__":
    main()
