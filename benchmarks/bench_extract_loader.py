"""Does extract-features' detector wait for image decoding? Loader throughput vs the forward, and workers vs none.

Self-contained (random weights; nothing downloaded), in one run:

(a) mmdet's LVIS v1 Mask R-CNN R50 config at its own 800 px pipeline, on the synthetic images
    relabelled into LVIS's 1203 categories: images/s of the extraction pipeline alone (decode,
    resize, rasterise polygons: what a DataLoader worker does) against images/s of the
    detector's extraction forward (:class:`crat_ft.detector.extractor.Extractor`) on this device. A loader
    slower than the forward starves the device unless workers decode in parallel.
(b) ``crat-ft extract-features`` of the demo detector with ``--workers 0`` and ``--workers N``:
    images/s of each and their ratio (the caches are the same, which tests/test_extract.py checks).

    .venv/bin/python benchmarks/bench_extract_loader.py [--images 8] [--demo-images 64] [--workers 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def _loader_vs_forward(data: Path, n: int, batch: int, device: str) -> tuple[float, float]:
    import mmdet
    import torch
    from mmdet.registry import DATASETS, MODELS
    from mmengine.dataset import pseudo_collate

    from crat_ft.detector.extractor import Extractor, extraction_pipeline
    from crat_ft.detector.roi_policy import RoIPolicy
    from crat_ft.engine.config import base_dataset_cfg, prepare_config

    config = Path(mmdet.__file__).parent / ".mim" / "configs" / "lvis" / "mask-rcnn_r50_fpn_sample1e-3_ms-1x_lvis-v1.py"
    cfg = prepare_config(config, (), data, ("train_dataloader",))
    ds_cfg = base_dataset_cfg(cfg).copy()
    ds_cfg["pipeline"] = extraction_pipeline(ds_cfg.get("pipeline", []), flip=False)
    dataset = DATASETS.build(ds_cfg)
    n = min(n, len(dataset))
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).to(device).eval()  # random weights: init_weights() would download
    counts = torch.ones(1203).numpy()
    extractor = Extractor(model, RoIPolicy(), counts, "fc", "logits")
    extractor(pseudo_collate([dataset[0]]))  # warm-up
    t0 = time.perf_counter()
    items = [dataset[k] for k in range(n)]
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in range(0, n, batch):
        extractor(pseudo_collate(items[b : b + batch]))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t_fwd = time.perf_counter() - t0
    extractor.tap.close()
    return n / t_load, n / t_fwd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8, help="images for (a), at 800 px")
    ap.add_argument("--demo-images", type=int, default=64, help="images for (b)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for (b)")
    ap.add_argument("--batch-size", type=int, default=2)
    args = ap.parse_args()

    import torch
    from gpu_check import lvis_1203  # benchmarks/: the synthetic data relabelled into 1203 categories
    from mmdet.registry import MODELS

    from crat_ft.common.paths import demo_config
    from crat_ft.engine.config import load_config
    from crat_ft.heads.registry import register_all
    from crat_ft.pipeline.extract import extract_features
    from crat_ft.synthetic.dataset import make_demo_data
    from crat_ft.synthetic.variants import DemoDataSpec

    register_all()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_demo_data(
            tmp / "data", DemoDataSpec(train_images=max(args.demo_images, args.images)), progress=False
        )
        load, fwd = _loader_vs_forward(lvis_1203(data, tmp / "lvis1203"), args.images, args.batch_size, device)
        print(f"(a) mmdet LVIS R50 at 800 px on {device}, {args.images} images, batch {args.batch_size}:")
        print(f"    extraction pipeline alone (one process): {load:6.2f} img/s")
        print(f"    extraction forward of the detector:      {fwd:6.2f} img/s")
        print(f"    loader / forward: {load / fwd:.2f}x (below 1: the detector would wait without workers)")

        torch.manual_seed(0)
        detector = tmp / "demo_random.pth"
        torch.save({"state_dict": MODELS.build(load_config(demo_config()).model).state_dict(), "meta": {}}, detector)
        rates = {}
        for workers in (0, args.workers):
            extract_features(demo_config(), detector, tmp / f"warm{workers}", data_root=data, max_images=8,
                             progress=False, workers=workers)  # fmt: skip
            t0 = time.perf_counter()
            extract_features(demo_config(), detector, tmp / f"w{workers}", data_root=data, max_images=args.demo_images,
                             progress=False, workers=workers)  # fmt: skip
            rates[workers] = args.demo_images / (time.perf_counter() - t0)
        print(f"(b) crat-ft extract-features, demo detector (128 px) on {device}, {args.demo_images} images:")
        for workers, rate in rates.items():
            print(f"    --workers {workers}: {rate:6.2f} img/s")
        print(f"    workers {args.workers} / none: {rates[args.workers] / rates[0]:.2f}x")


if __name__ == "__main__":
    main()
