"""lvis_metrics (faster-coco-eval) vs lvis-api's LVISEval on the same detections.

Prints the wall time of each (bbox + segm, end to end: loading results,
evaluating, summarising), the speed-up ratio, and the largest difference over
all summary metrics. Both run in this one process, one after the other, so
the ratio is measured under the same machine load.

    .venv/bin/python benchmarks/bench_lvis_eval.py [--images 300] [--classes 100]
        [--heavy-every 5 --heavy-dets 400]   # every fifth image over the 300 cap
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def synthetic_gt(n_images: int, n_classes: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    cats = []
    for c in range(n_classes):
        freq = "f" if c < n_classes * 0.3 else ("c" if c < n_classes * 0.7 else "r")
        cats.append({"id": c + 1, "name": f"class{c}", "frequency": freq, "image_count": 1, "instance_count": 1})
    images, anns = [], []
    for i in range(n_images):
        present = rng.choice(n_classes, size=rng.integers(1, 6), replace=False) + 1
        absent = np.setdiff1d(np.arange(1, n_classes + 1), present)
        neg = sorted(int(c) for c in rng.choice(absent, size=min(10, len(absent)), replace=False))
        images.append(
            {
                "id": i + 1,
                "height": 480,
                "width": 640,
                "coco_url": f"x/{i}.jpg",
                "neg_category_ids": neg,
                "not_exhaustive_category_ids": [int(present[0])] if rng.random() < 0.1 else [],
            }
        )
        for c in present:
            for _ in range(rng.integers(1, 4)):
                w, h = rng.uniform(10, 200, 2)
                x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": i + 1,
                        "category_id": int(c),
                        "bbox": [x, y, w, h],
                        "area": w * h,
                        "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
                    }
                )
    return {"images": images, "annotations": anns, "categories": cats}


def detections(gt: dict, per_image: int, seed: int, heavy_every: int = 0, heavy_dets: int = 0) -> list[dict]:
    import pycocotools.mask as mask_util

    rng = np.random.default_rng(seed)
    by_img = {}
    for a in gt["annotations"]:
        by_img.setdefault(a["image_id"], []).append(a)
    out = []
    n_cls = len(gt["categories"])
    for n, img in enumerate(gt["images"]):
        anns = by_img.get(img["id"], [])
        for k in range(heavy_dets if heavy_every and n % heavy_every == 0 else per_image):
            if anns and k < 3 * len(anns):
                a = anns[k % len(anns)]
                x, y, w, h = a["bbox"]
                box = [
                    x + rng.normal(0, 4),
                    y + rng.normal(0, 4),
                    w * rng.uniform(0.85, 1.15),
                    h * rng.uniform(0.85, 1.15),
                ]
                cat = a["category_id"] if rng.random() < 0.7 else int(rng.integers(1, n_cls + 1))
            else:
                w, h = rng.uniform(10, 200, 2)
                box = [rng.uniform(0, 640 - w), rng.uniform(0, 480 - h), w, h]
                cat = int(rng.integers(1, n_cls + 1))
            x, y, w, h = box
            rle = mask_util.merge(mask_util.frPyObjects([[x, y, x + w, y, x + w, y + h, x, y + h]], 480, 640))
            rle["counts"] = rle["counts"].decode()
            out.append(
                {
                    "image_id": img["id"],
                    "category_id": cat,
                    "bbox": [float(v) for v in box],
                    "score": float(rng.random()),
                    "segmentation": rle,
                }
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--dets-per-image", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heavy-every", type=int, default=0, help="every k-th image gets --heavy-dets detections")
    ap.add_argument("--heavy-dets", type=int, default=400)
    args = ap.parse_args()

    np.float = float  # lvis-api 0.5.3 uses np.float, removed in numpy 1.24
    from lvis import LVIS, LVISEval, LVISResults

    from crat_ft.evaluation.lvis import METRIC_KEYS, lvis_metrics

    gt = synthetic_gt(args.images, args.classes, args.seed)
    dets = detections(gt, args.dets_per_image, args.seed + 1, args.heavy_every, args.heavy_dets)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gt.json"
        path.write_text(json.dumps(gt))
        print(f"{args.images} images, {args.classes} classes, {len(gt['annotations'])} gts, {len(dets)} detections")

        t0 = time.perf_counter()
        ours = {iou: lvis_metrics(path, dets, iou) for iou in ("bbox", "segm")}
        t_ours = time.perf_counter() - t0

        t0 = time.perf_counter()
        ref = {}
        for iou in ("bbox", "segm"):
            lvis_gt = LVIS(str(path))
            ev = LVISEval(lvis_gt, LVISResults(lvis_gt, copy.deepcopy(dets), max_dets=300), iou)
            ev.run()
            ref[iou] = dict(ev.results)
        t_ref = time.perf_counter() - t0

    diff = max(abs(ours[i][k] - ref[i][k]) for i in ours for k in METRIC_KEYS)
    print(f"crat-ft lvis_metrics (bbox+segm): {t_ours:8.2f} s")
    print(f"lvis-api LVISEval    (bbox+segm): {t_ref:8.2f} s")
    print(f"speed-up ratio: {t_ref / t_ours:.1f}x (target >= 5x)")
    print(f"max |difference| over {len(METRIC_KEYS)} metrics x 2 iou types: {diff:.2e} (target <= 1e-4)")
    print(
        f"bbox AP ours {ours['bbox']['AP']:.4f} ref {ref['bbox']['AP']:.4f}; "
        f"segm AP ours {ours['segm']['AP']:.4f} ref {ref['segm']['AP']:.4f}"
    )


if __name__ == "__main__":
    main()
