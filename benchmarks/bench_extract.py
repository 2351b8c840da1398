"""extract-features vs plain mmdet inference on the same images (docs/architecture.md#performance-targets), and bytes per image.

Uses a finished demo run (``crat-ft demo``): its detector and training images.
Times, in this one run, (a) ``model.test_step`` over N training images with
the test pipeline, and (b) crat-ft's extraction of the same N images (RoI
selection, features, mask targets, HDF5 writes), both after a warm-up, and
prints the ratio (target <= 1.3x). Then prints cache bytes per image at each
feature level.

    .venv/bin/python benchmarks/bench_extract.py [--work-dir work_dirs/demo] [--images 96]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", default="work_dirs/demo")
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads for both variants (1: robust on a shared machine, where OpenMP spin-waits distort timings)",
    )
    args = ap.parse_args()
    work = Path(args.work_dir)
    detector, data = work / "stage1" / "detector.pth", work / "data"
    if not detector.is_file():
        raise SystemExit(f"{detector} not found: run `crat-ft demo --work-dir {work}` first")

    import torch
    from mmdet.registry import DATASETS
    from mmengine.dataset import pseudo_collate

    from crat_ft.common.paths import demo_config
    from crat_ft.detector.frozen import build_frozen_detector
    from crat_ft.engine.config import prepare_config
    from crat_ft.heads.registry import register_all
    from crat_ft.pipeline.extract import extract_features

    torch.set_num_threads(args.threads)
    register_all()
    config = demo_config()
    cfg = prepare_config(config, (), data, ("train_dataloader", "test_dataloader"))
    model, _ = build_frozen_detector(cfg, str(detector))
    ds_cfg = cfg.train_dataloader.dataset.copy()
    ds_cfg["pipeline"] = cfg.test_dataloader.dataset.pipeline
    ds = DATASETS.build(ds_cfg)
    n = min(args.images, len(ds))

    def inference():
        with torch.no_grad():
            for b in range(0, n, args.batch_size):
                model.test_step(pseudo_collate([ds[k] for k in range(b, min(n, b + args.batch_size))]))

    def extraction(out, **kw):
        extract_features(
            config, detector, out, data_root=data, max_images=n, batch_size=args.batch_size, progress=False, **kw
        )

    with tempfile.TemporaryDirectory() as tmp:
        inference()  # warm-up
        extraction(Path(tmp) / "warm")
        t0 = time.perf_counter()
        inference()
        t_inf = time.perf_counter() - t0
        t0 = time.perf_counter()
        extraction(Path(tmp) / "timed")
        t_ext = time.perf_counter() - t0
        print(f"{n} images, batch {args.batch_size}")
        print(f"plain mmdet inference (model.test_step): {t_inf:7.2f} s  ({n / t_inf:.1f} img/s)")
        print(f"crat-ft extract-features:                {t_ext:7.2f} s  ({n / t_ext:.1f} img/s)")
        print(f"ratio extraction / inference: {t_ext / t_inf:.2f}x (target <= 1.3x)")
        for box_level, mask_level in (("fc", "logits"), ("roi", "roi")):
            out = Path(tmp) / f"{box_level}-{mask_level}"
            extraction(out, box_level=box_level, mask_level=mask_level)
            size = sum(p.stat().st_size for p in out.glob("shard-*.h5"))
            print(f"bytes per image at box level {box_level!r}, mask level {mask_level!r}: {size / n / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
