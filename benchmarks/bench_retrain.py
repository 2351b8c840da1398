"""One epoch of retrain-heads from the cache vs the same epoch forwarding the frozen detector.

Target (docs/architecture.md#performance-targets): >= 20x.

An epoch over the cache is ``steps = cached RoIs / rois_per_batch`` training
steps of the CRAT heads (forward, losses, backward, SGD step) on batches read
from the HDF5 cache. The same epoch without a cache must also forward every
training image through the frozen backbone, RPN and RoI heads to produce those
RoI features (crat-ft's extractor, i.e. the detector's own forward). Measured
in this one run: the time of a cached step and the time to forward one image;
then

    epoch from cache      = steps * t_step
    epoch by forwarding   = images * t_image + steps * t_step
    speed-up              = epoch by forwarding / epoch from cache

Two set-ups:
- default: a finished demo run (``crat-ft demo``): the tiny demo Mask R-CNN on
  128x128 images;
- ``--lvis-r50``: mmdet's own LVIS v1 Mask R-CNN R50-FPN config (random
  weights, 1203 classes, images resized as its pipeline does, 800 px) on the
  demo images re-labelled to 1203 categories, with the LVIS fine-tune config.

    .venv/bin/python benchmarks/bench_retrain.py [--work-dir work_dirs/demo] [--lvis-r50]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def lvis_r50_fixture(work: Path, images: int) -> tuple[Path, Path, Path, Path]:
    """(mmdet config, random-weight checkpoint, data root, cache) for mmdet's LVIS R50 Mask R-CNN."""
    import mmdet
    import torch
    from mmdet.registry import MODELS

    from crat_ft.cache import INDEX_FILE
    from crat_ft.engine.config import load_config
    from crat_ft.pipeline.extract import extract_features

    config = Path(mmdet.__file__).parent / ".mim" / "configs" / "lvis" / "mask-rcnn_r50_fpn_sample1e-3_ms-1x_lvis-v1.py"
    fix = work / "lvis_r50_fixture"
    data, ckpt, cache = fix / "data", fix / "r50_random.pth", fix / "cache"
    if not (data / "annotations" / "lvis_v1_train.json").is_file():
        (data / "annotations").mkdir(parents=True, exist_ok=True)
        if not (data / "train2017").exists():
            (data / "train2017").symlink_to((work / "data" / "train2017").resolve())
        doc = json.loads((work / "data" / "annotations" / "lvis_v1_train.json").read_text())
        n = len(doc["categories"])
        doc["categories"] += [
            {
                "id": i,
                "name": f"pad_{i}",
                "frequency": "r",
                "image_count": 0,
                "instance_count": 0,
                "synset": f"pad_{i}.n.01",
                "synonyms": [],
                "def": "",
            }
            for i in range(n + 1, 1204)
        ]
        (data / "annotations" / "lvis_v1_train.json").write_text(json.dumps(doc))
    if not ckpt.is_file():
        torch.manual_seed(0)
        model = MODELS.build(load_config(config).model)  # random weights; nothing is downloaded
        torch.save({"state_dict": model.state_dict(), "meta": {}}, ckpt)
    if not (cache / INDEX_FILE).is_file():
        extract_features(config, ckpt, cache, data_root=data, max_images=images, batch_size=1, resume=True)
    return config, ckpt, data, cache / INDEX_FILE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", default="work_dirs/demo")
    ap.add_argument(
        "--lvis-r50",
        action="store_true",
        help="use mmdet's LVIS R50-FPN Mask R-CNN (random weights) instead of the demo detector",
    )
    ap.add_argument("--steps", type=int, default=20, help="timed cached steps")
    ap.add_argument("--images", type=int, default=8, help="timed image forwards")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads for both sides (1: robust on a shared machine, where OpenMP spin-waits distort timings)",
    )
    args = ap.parse_args()
    work = Path(args.work_dir)
    if not (work / "stage1" / "detector.pth").is_file():
        raise SystemExit(f"{work} has no finished demo: run `crat-ft demo --work-dir {work}` first")

    import torch
    from mmdet.registry import DATASETS
    from mmengine.dataset import pseudo_collate

    from crat_ft.cache import RoIReader
    from crat_ft.common.paths import config_root, demo_config
    from crat_ft.detector.extractor import Extractor, extraction_pipeline
    from crat_ft.detector.frozen import build_frozen_detector
    from crat_ft.detector.roi_policy import RoIPolicy
    from crat_ft.engine.checkpoint import load_checkpoint_file, state_dict_of
    from crat_ft.engine.config import base_dataset_cfg, prepare_config
    from crat_ft.heads.ft_config import load_ft_config
    from crat_ft.heads.registry import register_all
    from crat_ft.pipeline.retrain_builders import build_cache_loader, build_heads

    torch.set_num_threads(args.threads)
    register_all()
    if args.lvis_r50:
        det_config, detector, data, cache = lvis_r50_fixture(work, images=24)
        ft = load_ft_config(config_root() / "lvis" / "crat_mask-rcnn_r50_fpn_lvis-v1.py")
    else:
        det_config, detector, data, cache = (
            demo_config(),
            work / "stage1" / "detector.pth",
            work / "data",
            work / "cache" / "index.h5",
        )
        ft = load_ft_config(demo_config("crat_synthetic.py"))
    reader = RoIReader(cache)
    det_cfg = prepare_config(det_config, (), data, ("train_dataloader",))
    heads = build_heads(ft, reader, det_cfg, state_dict_of(load_checkpoint_file(detector)))
    opt = torch.optim.SGD(heads.parameters(), lr=0.01, momentum=0.9)
    dataloader = build_cache_loader(reader, ft["sampler"], seed=0, num_workers=0)

    def endless():
        epoch = 0
        while True:  # as mmengine's iteration-based loop does: new epoch, new sampler stream
            dataloader.sampler.set_epoch(epoch)
            yield from dataloader
            epoch += 1

    loader = endless()

    def step():
        losses = heads(**next(loader), mode="loss")
        loss = sum(v for v in losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    t_step = (time.perf_counter() - t0) / args.steps

    model, _ = build_frozen_detector(det_cfg, str(detector))
    ds_cfg = base_dataset_cfg(det_cfg).copy()
    ds_cfg["pipeline"] = extraction_pipeline(ds_cfg["pipeline"], flip=False)
    ds = DATASETS.build(ds_cfg)
    extractor = Extractor(model, RoIPolicy(**reader.meta["policy"]), np.array(reader.meta["class_instance_count"]))
    extractor(pseudo_collate([ds[0]]))  # warm-up
    t0 = time.perf_counter()
    for k in range(1, args.images + 1):
        extractor(pseudo_collate([ds[k % len(ds)]]))
    t_image = (time.perf_counter() - t0) / args.images

    n_images = len(reader.image_ids)  # the images the cache was made from
    steps = max(1, len(reader.labels) // ft["sampler"]["rois_per_batch"])
    epoch_cache = steps * t_step
    epoch_fwd = n_images * t_image + steps * t_step
    name = "mmdet LVIS R50-FPN Mask R-CNN (random weights)" if args.lvis_r50 else "demo Mask R-CNN"
    print(
        f"{name}: {n_images} training images, {len(reader.labels)} cached RoIs per epoch of {steps} steps "
        f"({ft['sampler']['rois_per_batch']} RoIs + {ft['sampler']['masks_per_batch']} masks per step)"
    )
    print(f"cached step: {1000 * t_step:.1f} ms   frozen-detector forward: {1000 * t_image:.1f} ms per image")
    print(f"epoch from the cache:              {epoch_cache:10.1f} s")
    print(f"epoch forwarding the detector:     {epoch_fwd:10.1f} s")
    print(f"speed-up of the cache: {epoch_fwd / epoch_cache:.1f}x (target >= 20x)")
    # the ratio grows as fewer RoIs per image are cached; at the policy's maximum
    # (every image filling its positive cap plus its negatives) it is smallest
    policy = reader.meta["policy"]
    rois_max = policy["max_pos_per_image"] + policy["neg_per_image"]
    per_step = ft["sampler"]["rois_per_batch"] / rois_max
    print(
        f"at the policy's maximum of {rois_max} RoIs per image ({per_step:.1f} images per step): "
        f"{(per_step * t_image + t_step) / t_step:.1f}x"
    )


if __name__ == "__main__":
    main()
