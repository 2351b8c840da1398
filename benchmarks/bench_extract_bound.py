"""extract-features vs the bare forward it cannot avoid, for mmdet's LVIS Mask R-CNN and Cascade configs at 800 px.

The physical limit of extraction is the forward pass that produces the
class-wise layers' inputs for the cached RoIs: data preprocessing, backbone,
neck, RPN proposals, and for every stage RoI align and the box and mask head
trunks on exactly the RoIs the cache holds. Everything else extraction does
(assigning, selecting, a cascade's refinement of every candidate, mask targets,
HDF5 writes) is overhead on top of it. For each config this script, in one run
and after a warm-up, times (a) ``crat-ft extract-features`` on N images and (b)
that bare forward on the same images and RoIs (read back from the cache), and
prints the ratio (target <= 1.2x).

The detectors are mmdet's own configs (``lvis/mask-rcnn_r50_fpn_sample1e-3_ms-1x``
and ``seesaw_loss/cascade-mask-rcnn_r101_fpn_seesaw-loss-normed-mask_sample1e-3-ms-2x``)
with random weights and 40 classes, on synthetic images resized to the
configs' 1333 x 800 training scale; nothing is downloaded.

    .venv/bin/python benchmarks/bench_extract_bound.py [--images 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "Mask R-CNN R50 (lvis)": "lvis/mask-rcnn_r50_fpn_sample1e-3_ms-1x_lvis-v1.py",
    "Cascade R101 Seesaw normed-mask": (
        "seesaw_loss/cascade-mask-rcnn_r101_fpn_seesaw-loss-normed-mask_sample1e-3-ms-2x_lvis-v1.py"
    ),
}


def _config_with_classes(name: str, num_classes: int, out: Path) -> Path:
    import mmdet
    from mmengine.config import Config

    cfg = Config.fromfile(str(Path(mmdet.__file__).parent / ".mim" / "configs" / name))
    for key in ("bbox_head", "mask_head"):
        heads = cfg.model.roi_head.get(key)
        for head in heads if isinstance(heads, list) else [heads]:
            head.num_classes = num_classes
            if "num_classes" in head.get("loss_cls", {}):
                head.loss_cls.num_classes = num_classes
    cfg.dump(str(out))
    return out


def _random_checkpoint(config: Path, out: Path) -> Path:
    import torch
    from mmdet.registry import MODELS

    from crat_ft.engine.config import load_config

    torch.manual_seed(0)
    torch.save({"state_dict": MODELS.build(load_config(config).model).state_dict(), "meta": {}}, out)
    return out


def bare_forward(model, dataset, readers, n: int, batch_size: int) -> None:
    """Backbone, neck, RPN and every stage's RoI align + head trunks on the cached RoIs of ``n`` images."""
    import torch
    from mmdet.structures.bbox import bbox2roi
    from mmengine.dataset import pseudo_collate

    from crat_ft.detector.extractor import Extractor
    from crat_ft.detector.roi_policy import RoIPolicy

    ex = Extractor(model, RoIPolicy(), instance_count=None)
    try:
        tables = []
        for r in readers:
            box = r.read_rois(torch.arange(len(r.labels)).numpy())["box"]
            tables.append((r, torch.from_numpy(box)))
        with torch.no_grad():
            for b in range(0, n, batch_size):
                data = model.data_preprocessor(
                    pseudo_collate([dataset[k] for k in range(b, min(n, b + batch_size))]), True
                )
                x = model.extract_feat(data["inputs"])
                ex.propose(x, data["data_samples"])
                for i in range(b, min(n, b + batch_size)):
                    feats = tuple(f[i - b : i - b + 1] for f in x)
                    for s, (r, boxes) in enumerate(tables):
                        start, count = int(r.roi_start[i]), int(r.roi_count[i])
                        rois = boxes[start : start + count]
                        ex.bbox_forward(s, feats, bbox2roi([rois]))
                        if ex.with_mask:
                            mstart, mcount = int(r.mask_start[i]), int(r.mask_count[i])
                            mrows = torch.from_numpy(r.mask_roi[mstart : mstart + mcount]) - start
                            ex.mask_forward(s, feats, bbox2roi([rois[mrows]]))
    finally:
        ex.tap.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["plain", "cascade"], default=None, help="measure one of the two configs")
    args = ap.parse_args()

    import torch
    from mmdet.registry import DATASETS

    from crat_ft.cache import RoIReader, stage_indexes
    from crat_ft.detector.extractor import extraction_pipeline
    from crat_ft.detector.frozen import build_frozen_detector
    from crat_ft.engine.config import base_dataset_cfg, prepare_config
    from crat_ft.heads.registry import register_all
    from crat_ft.pipeline.extract import extract_features
    from crat_ft.synthetic.dataset import make_demo_data
    from crat_ft.synthetic.variants import DemoDataSpec

    torch.set_num_threads(args.threads)
    register_all()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_demo_data(
            tmp / "data", DemoDataSpec(seed=1, train_images=args.images + 2, val_images=2), progress=False
        )
        print(f"{args.images} images at 1333 x 800, batch {args.batch_size}, {args.threads} threads, CPU")
        for label, name in CONFIGS.items():
            if args.only and (args.only == "cascade") != ("cascade" in name):
                continue
            config = _config_with_classes(name, 40, tmp / f"{Path(name).stem}.py")
            ckpt = _random_checkpoint(config, tmp / f"{Path(name).stem}.pth")
            cfg = prepare_config(config, (), data, ("train_dataloader",))
            model, _ = build_frozen_detector(cfg, str(ckpt))
            ds_cfg = base_dataset_cfg(cfg).copy()
            ds_cfg["pipeline"] = extraction_pipeline(ds_cfg.get("pipeline", []), flip=False)
            dataset = DATASETS.build(ds_cfg)

            def extraction(out):
                return extract_features(
                    config, ckpt, out, data_root=data, max_images=args.images, batch_size=args.batch_size,
                    progress=False, space_check=False,
                )  # fmt: skip

            extraction(tmp / "warm")  # warm-up
            t0 = time.perf_counter()
            path = extraction(tmp / f"timed-{Path(name).stem}")
            t_ext = time.perf_counter() - t0
            readers = [RoIReader(index) for index in stage_indexes(path)]
            bare_forward(model, dataset, readers, 2, args.batch_size)  # warm-up
            t0 = time.perf_counter()
            bare_forward(model, dataset, readers, args.images, args.batch_size)
            t_bare = time.perf_counter() - t0
            n_rois = sum(len(r.labels) for r in readers)
            print(f"{label}: {len(readers)} stage(s), {n_rois} cached RoIs")
            print(f"  bare forward (backbone, neck, RPN, RoI align, head trunks): {t_bare:7.2f} s")
            print(f"  crat-ft extract-features:                                  {t_ext:7.2f} s")
            print(f"  ratio extraction / bare forward: {t_ext / t_bare:.2f}x (target <= 1.2x)")
            shutil.rmtree(tmp / "warm")


if __name__ == "__main__":
    main()
