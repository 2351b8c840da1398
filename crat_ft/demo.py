"""``crat-ft demo``: the whole chain on the embedded synthetic benchmark, on a CPU.

Stages (each reused on a rerun when its output exists; outputs are written
atomically, so an interrupted stage is simply redone):

1. ``data/``: ``make-demo-data`` (DESIGN §8);
2. ``stage1/detector.pth``: a tiny Mask R-CNN trained with plain random sampling;
3. ``stage1/metrics.json``: its LVIS bbox/segm metrics on the val split.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from crat_ft.evaluation import format_table
from crat_ft.paths import demo_config
from crat_ft.synthetic import DemoDataSpec, make_demo_data
from crat_ft.train import DETECTOR_FILE, evaluate_detector, train_detector


def _say(msg: str) -> None:
    print(f"[crat-ft demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_demo(work_dir: str | os.PathLike = "work_dirs/demo", *, seed: int = 0, detector_iters: int | None = None) -> dict:
    """Run the demo pipeline; returns ``{"stage1": {"bbox": ..., "segm": ...}}``.

    Args:
        work_dir: where every stage writes.
        seed: seed of the data and of training.
        detector_iters: stage-1 training iterations (default: the config's).
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    data = work_dir / "data"
    if (data / "annotations" / "lvis_v1_val.json").is_file():
        _say(f"reusing demo data in {data}")
    else:
        _say(f"making the synthetic long-tailed dataset in {data}")
        make_demo_data(data, DemoDataSpec(seed=seed))

    config = demo_config()
    stage1 = work_dir / "stage1"
    detector = stage1 / DETECTOR_FILE
    if detector.is_file():
        _say(f"reusing stage-1 detector {detector}")
    else:
        _say(f"training the stage-1 detector ({config.name}) in {stage1}")
        options = {"train_cfg.max_iters": detector_iters} if detector_iters else {}
        t0 = time.time()
        train_detector(config, stage1, cfg_options=options, data_root=data, seed=seed)
        _say(f"stage-1 training took {time.time() - t0:.0f} s")

    metrics_file = stage1 / "metrics.json"
    if metrics_file.is_file():
        _say(f"reusing stage-1 metrics {metrics_file}")
        with open(metrics_file) as f:
            stage1_metrics = json.load(f)
    else:
        _say("evaluating the stage-1 detector (LVIS protocol, val split)")
        stage1_metrics = evaluate_detector(config, detector, metrics_file, data_root=data)

    summary = {"stage1": stage1_metrics}
    for iou in ("bbox", "segm"):
        print(format_table({"stage1": stage1_metrics[iou]}, title=f"\n{iou} (LVIS v1 protocol, %)"))
    tmp = work_dir / ".summary.json.tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, work_dir / "summary.json")
    _say(f"summary written to {work_dir / 'summary.json'}")
    return summary
