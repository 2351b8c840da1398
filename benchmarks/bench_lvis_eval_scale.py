"""LVIS evaluation at LVIS v1 val scale: peak memory and time of crat-ft's evaluator, and lvis-api where it fits.

Builds a synthetic LVIS-format val set of that size (19,809 images of 640 x 480,
1,203 categories split 337 rare / 461 common / 405 frequent, ~12 annotations
per image with polygon masks, negative and not-exhaustive category lists) and
300 detections per image (boxes and RLE masks; 60% of them in categories the
image is annotated for, jittered around the ground truth, the rest in random
categories), written as crat-ft's spill files, i.e. what ``crat-ft evaluate``
has on disk when the test loop ends. The boxes and masks are random: the point
is memory and time. Then, each in a fresh process, it measures:

- crat-ft: reading the spill and ``lvis_metrics`` bbox + segm (the path of
  ``crat-ft evaluate`` after inference): wall time and peak RSS (target <= 8 GiB);
- on the first ``--subset`` images: lvis-api's ``LVISEval`` (numpy patched for
  ``np.float``) and crat-ft on the same detections: both times, the ratio
  (target >= 5x) and the largest difference of any metric.

    .venv/bin/python benchmarks/bench_lvis_eval_scale.py [--images 19809] [--subset 500] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GROUPS = {"r": 337, "c": 461, "f": 405}
W, H = 640, 480


def make_gt(n_images: int, rng) -> dict:
    freq = np.array(["r"] * GROUPS["r"] + ["c"] * GROUPS["c"] + ["f"] * GROUPS["f"])
    n_cats = len(freq)
    weight = np.where(freq == "f", 30.0, np.where(freq == "c", 3.0, 0.3))
    p = weight / weight.sum()
    cats = [{"id": i + 1, "name": f"c{i + 1}", "frequency": str(freq[i]), "synset": f"c{i + 1}.n.01",
             "image_count": 0, "instance_count": 0} for i in range(n_cats)]  # fmt: skip
    images, anns = [], []
    for i in range(1, n_images + 1):
        pos = rng.choice(n_cats, size=rng.integers(1, 6), replace=False, p=p) + 1
        neg = rng.choice(n_cats, size=5, replace=False) + 1
        neg = [int(c) for c in neg if c not in pos]
        not_exhaustive = [int(pos[0])] if rng.random() < 0.1 else []
        images.append({"id": i, "width": W, "height": H, "coco_url": f"val2017/{i:012d}.jpg",
                       "neg_category_ids": neg, "not_exhaustive_category_ids": not_exhaustive})  # fmt: skip
        for _ in range(int(rng.integers(4, 21))):
            x, y = rng.uniform(0, W - 40), rng.uniform(0, H - 40)
            w, h = rng.uniform(8, min(300, W - x)), rng.uniform(8, min(300, H - y))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(rng.choice(pos)),
                         "bbox": [x, y, w, h], "area": w * h,
                         "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})  # fmt: skip
    return {"images": images, "annotations": anns, "categories": cats}


def write_detections(gt: dict, spill_dir: Path, per_image: int, rng) -> int:
    import pycocotools.mask as mask_util

    from crat_ft.evaluation.detections import Detections, DetectionSpill

    by_image: dict[int, list] = {}
    for a in gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    n_cats = len(gt["categories"])
    spill = DetectionSpill(spill_dir, tag="rank0")
    total = 0
    for img in gt["images"]:
        anns = by_image.get(img["id"], [])
        annotated = sorted({a["category_id"] for a in anns} | set(img["neg_category_ids"]))
        n_near = int(per_image * 0.6)
        boxes = np.empty((per_image, 4))
        cats = np.empty(per_image, np.int64)
        src = rng.integers(0, len(anns), n_near)
        for k, j in enumerate(src):
            x, y, w, h = anns[j]["bbox"]
            boxes[k] = [x + rng.normal(0, 0.1 * w), y + rng.normal(0, 0.1 * h), w * rng.uniform(0.8, 1.2),
                        h * rng.uniform(0.8, 1.2)]  # fmt: skip
            cats[k] = anns[j]["category_id"] if rng.random() < 0.7 else rng.choice(annotated)
        rest = per_image - n_near
        boxes[n_near:, :2] = rng.uniform(0, [W - 20, H - 20], (rest, 2))
        boxes[n_near:, 2:] = rng.uniform(8, 200, (rest, 2))
        cats[n_near:] = rng.integers(1, n_cats + 1, rest)
        boxes[:, :2] = boxes[:, :2].clip(0, [W - 2, H - 2])
        boxes[:, 2:] = np.minimum(boxes[:, 2:].clip(1, None), [W, H] - boxes[:, :2])
        rles = mask_util.frPyObjects(np.ascontiguousarray(boxes), H, W)
        counts = [r["counts"] for r in rles]
        dets = Detections(
            image_id=np.full(per_image, img["id"], np.int64), category_id=cats, score=rng.random(per_image),
            bbox=boxes, rle=np.frombuffer(b"".join(counts), np.uint8),
            rle_offset=np.concatenate([[0], np.cumsum([len(c) for c in counts])]).astype(np.int64),
            rle_size=np.tile([H, W], (per_image, 1)).astype(np.int64),
        )  # fmt: skip
        spill.add(dets)
        total += per_image
    spill.flush()
    return total


CRAT_CHILD = """
import json, sys, time
t0 = time.perf_counter()
from crat_ft.evaluation.detections import load_spilled
from crat_ft.evaluation.lvis import lvis_metrics
from crat_ft.common.lvis_json import load_lvis_json
gt = load_lvis_json(sys.argv[1])
dets = load_spilled(sys.argv[2])
if len(sys.argv) > 3:  # the subset: images 1..N
    dets = dets.take(__import__("numpy").nonzero(dets.image_id <= int(sys.argv[3]))[0])
out = {iou: lvis_metrics(gt, dets, iou) for iou in ("bbox", "segm")}
status = open("/proc/self/status").read()
rss = int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1]) * 1024
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss": rss, "metrics": out}))
"""

LVIS_CHILD = """
import json, resource, sys, time
import numpy as np
limit = int(float(sys.argv[4]) * 2**30)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
np.float = float  # lvis-api 0.5.3 still uses np.float
t0 = time.perf_counter()
from lvis import LVIS, LVISEval, LVISResults
from crat_ft.evaluation.detections import load_spilled
dets = load_spilled(sys.argv[2])
rows = np.nonzero(dets.image_id <= int(sys.argv[3]))[0]
results = dets.to_dicts(rows, with_masks=True)
gt = LVIS(sys.argv[1])
out = {}
for iou in ("bbox", "segm"):
    try:
        ev = LVISEval(gt, LVISResults(gt, [dict(d) for d in results], max_dets=300), iou)
        ev.run()
    except MemoryError:
        print(json.dumps({"seconds": time.perf_counter() - t0, "error": "MemoryError"}))
        sys.exit(0)
    keys = {"AP": "AP", "AP50": "AP50", "AP75": "AP75", "APs": "APs", "APm": "APm", "APl": "APl", "APr": "APr", "APc": "APc", "APf": "APf"}
    out[iou] = {k: float(ev.results[v]) for k, v in keys.items()}
status = open("/proc/self/status").read()
rss = int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1]) * 1024
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss": rss, "metrics": out}))
"""


def child(code: str, *args) -> dict:
    p = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=19_809)
    ap.add_argument("--per-image", type=int, default=300)
    ap.add_argument("--subset", type=int, default=500, help="images for the lvis-api comparison")
    ap.add_argument("--work", default=None, help="keep the data here (default: a temporary directory)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lvis-api-gib", type=float, default=12.0, help="address-space limit for lvis-api")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(args.seed)
        t0 = time.perf_counter()
        gt = make_gt(args.images, rng)
        (work / "gt.json").write_text(json.dumps(gt))
        n = write_detections(gt, work / "spill", args.per_image, rng)
        print(f"{args.images} images, {len(gt['categories'])} categories, {len(gt['annotations'])} annotations, "
              f"{n} detections with masks ({time.perf_counter() - t0:.0f} s to make)")  # fmt: skip
        full = child(CRAT_CHILD, work / "gt.json", work / "spill")
        gib = 2**30
        print(f"crat-ft, all images, bbox + segm: {full['seconds']:.0f} s, peak RSS {full['peak_rss'] / gib:.2f} GiB "
              f"(target <= 8 GiB); segm AP {100 * full['metrics']['segm']['AP']:.2f}")  # fmt: skip
        ours = child(CRAT_CHILD, work / "gt.json", work / "spill", args.subset)
        print(f"first {args.subset} images ({args.subset * args.per_image} detections), bbox + segm:")
        print(f"  crat-ft:  {ours['seconds']:.1f} s, peak RSS {ours['peak_rss'] / gib:.2f} GiB", flush=True)
        ref = child(LVIS_CHILD, work / "gt.json", work / "spill", args.subset, args.lvis_api_gib)
        if "error" in ref:
            print(f"  lvis-api: did not fit in {args.lvis_api_gib:g} GiB of address space ({ref['seconds']:.0f} s in)")
            return
        diff = max(
            abs(ours["metrics"][i][k] - ref["metrics"][i][k]) for i in ours["metrics"] for k in ours["metrics"][i]
        )
        print(f"  lvis-api: {ref['seconds']:.1f} s, peak RSS {ref['peak_rss'] / gib:.2f} GiB")
        print(
            f"  speed-up {ref['seconds'] / ours['seconds']:.1f}x (target >= 5x), largest metric difference {diff:.2e}"
        )


if __name__ == "__main__":
    main()
