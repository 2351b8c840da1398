"""retrain-heads from the cache vs forwarding the frozen detector at every step (DESIGN §9, target >= 20x).

Uses a finished demo run (``crat-ft demo``). Both variants run the same
training steps of the CRAT heads (forward, losses, backward, SGD step) on
batches of the same size; they differ in where the RoI features come from:

- cache: the class-balanced sampler's batches read from the HDF5 cache;
- frozen detector: every step forwards enough training images through the
  frozen backbone, RPN and RoI heads (crat-ft's extractor) to produce a batch
  of the same number of RoIs and masks.

One epoch is the same number of steps for both, so the ratio of per-step
times is the ratio of epoch times.

    .venv/bin/python benchmarks/bench_retrain.py [--work-dir work_dirs/demo] [--steps 40]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", default="work_dirs/demo")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads for both variants (1: robust on a shared machine, where OpenMP spin-waits distort timings)")
    args = ap.parse_args()
    work = Path(args.work_dir)
    cache, detector, data = work / "cache" / "index.h5", work / "stage1" / "detector.pth", work / "data"
    if not cache.is_file():
        raise SystemExit(f"{cache} not found: run `crat-ft demo --work-dir {work}` first")

    import torch
    from mmdet.registry import DATASETS
    from mmengine.dataset import pseudo_collate

    from crat_ft.cache import RoIReader
    from crat_ft.checkpoint import load_checkpoint_file, state_dict_of
    from crat_ft.detector import build_frozen_detector
    from crat_ft.extract import Extractor, RoIPolicy, _base_dataset_cfg, extraction_pipeline
    from crat_ft.paths import demo_config
    from crat_ft.train import _CacheLoader, _prepare_cfg, _register_all, build_heads, load_ft_config

    torch.set_num_threads(args.threads)
    _register_all()
    ft = load_ft_config(demo_config("crat_synthetic.py"))
    reader = RoIReader(cache)
    det_cfg = _prepare_cfg(demo_config(), (), data, ("train_dataloader",))
    state = state_dict_of(load_checkpoint_file(detector))

    def new_heads():
        heads = build_heads(ft, reader, det_cfg, state)
        return heads, torch.optim.SGD(heads.parameters(), lr=0.01, momentum=0.9)

    def step(heads, opt, batch):
        losses = heads(**batch, mode="loss")
        loss = sum(v for v in losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()

    # cache: the real retraining DataLoader
    heads, opt = new_heads()
    loader = iter(_CacheLoader.build(reader, ft["sampler"], seed=0, num_workers=0))
    step(heads, opt, next(loader))
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(heads, opt, next(loader))
    t_cache = (time.perf_counter() - t0) / args.steps

    # frozen detector: produce each batch by forwarding images
    model, _ = build_frozen_detector(det_cfg, str(detector))
    ds_cfg = _base_dataset_cfg(det_cfg).copy()
    ds_cfg["pipeline"] = extraction_pipeline(ds_cfg["pipeline"], flip=False)
    ds = DATASETS.build(ds_cfg)
    counts = np.array(reader.meta["class_instance_count"])
    extractor = Extractor(model, RoIPolicy(**reader.meta["policy"]), counts)
    rois_per_image = len(reader.labels) / len(reader.image_ids)
    images_per_step = max(1, int(round(ft["sampler"]["rois_per_batch"] / rois_per_image)))
    rng = np.random.default_rng(0)

    def forwarded_batch():
        idx = rng.choice(len(ds), size=images_per_step, replace=False)
        blocks = extractor(pseudo_collate([ds[int(k)] for k in idx]))
        masks = [b for b in blocks if len(b.mask_rows)]
        cat = lambda key: np.concatenate([getattr(b, key) for b in blocks])
        mcat = lambda key: np.concatenate([getattr(b, key) for b in masks]) if masks else None
        mask_labels = np.concatenate([b.label[b.mask_rows] for b in masks]) if masks else np.zeros(0, np.int64)
        return {
            "box_feat": torch.from_numpy(cat("box_feat")).float(), "box": torch.from_numpy(cat("box")),
            "gt_box": torch.from_numpy(cat("gt_box")), "label": torch.from_numpy(cat("label").astype(np.int64)),
            "mask_feat": torch.from_numpy(mcat("mask_feat")).float(),
            "mask_target": torch.from_numpy(mcat("mask_target")).float(),
            "mask_label": torch.from_numpy(mask_labels.astype(np.int64)),
        }

    heads, opt = new_heads()
    step(heads, opt, forwarded_batch())
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(heads, opt, forwarded_batch())
    t_fwd = (time.perf_counter() - t0) / args.steps
    steps_per_epoch = max(1, len(reader.labels) // ft["sampler"]["rois_per_batch"])
    print(f"{args.steps} timed steps of {ft['sampler']['rois_per_batch']} RoIs ({images_per_step} images per step when forwarding)")
    print(f"from the cache:           {1000 * t_cache:8.1f} ms/step  (epoch of {steps_per_epoch} steps: {t_cache * steps_per_epoch:.1f} s)")
    print(f"forwarding the detector:  {1000 * t_fwd:8.1f} ms/step  (epoch: {t_fwd * steps_per_epoch:.1f} s)")
    print(f"speed-up of the cache: {t_fwd / t_cache:.1f}x (target >= 20x)")


if __name__ == "__main__":
    main()
