"""Where do the demo's rare classes lose AP: localisation, mask quality, or classification?

CRAT only changes the class-wise box regressor and mask predictor, so it can
only help a class whose boxes or masks are worse than the others'. For each
val ground truth this script finds the detections overlapping it (box IoU >=
0.5) and reports, per LVIS frequency group:

- ``top1``: the highest-scoring overlapping detection has the right class;
- ``recall``: some detection of the right class overlaps it;
- ``box IoU`` / ``mask IoU``: of the best right-class detection (mean over the
  recalled ground truths): the quality CRAT's box/mask transfusion can improve.

    python benchmarks/where_rare_ap_goes.py work_dirs/demo [--heads baseline crat]

Needs a finished ``crat-ft demo`` work dir.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch


def analyse(model, ann_path: Path, image_root: Path, score_thr: float = 0.05) -> dict:
    from mmdet.apis import inference_detector

    from crat_ft.analysis.gallery import box_ious, gt_mask

    data = json.loads(ann_path.read_text())
    cats = sorted(c["id"] for c in data["categories"])
    label_of = {cid: i for i, cid in enumerate(cats)}
    freq = {c["id"]: c["frequency"] for c in data["categories"]}
    anns = defaultdict(list)
    for a in data["annotations"]:
        anns[a["image_id"]].append(a)
    stats = defaultdict(lambda: defaultdict(list))
    for img in data["images"]:
        file = image_root / Path(img["coco_url"]).parent.name / Path(img["coco_url"]).name
        pred = inference_detector(model, str(file)).pred_instances
        keep = pred.scores >= score_thr
        boxes = pred.bboxes[keep].numpy()
        labels, scores = pred.labels[keep].numpy(), pred.scores[keep].numpy()
        masks = pred.masks[keep].numpy()
        for a in anns[img["id"]]:
            x, y, w, h = a["bbox"]
            g = np.array([x, y, x + w, y + h])
            group = stats[freq[a["category_id"]]]
            iou = box_ious(boxes, g)
            over = iou >= 0.5
            c = label_of[a["category_id"]]
            group["top1"].append(bool(over.any() and labels[over][np.argmax(scores[over])] == c))
            right = over & (labels == c)
            group["recall"].append(bool(right.any()))
            if right.any():
                best = np.flatnonzero(right)[np.argmax(iou[right])]
                m = gt_mask(a, img["height"], img["width"])
                inter = np.logical_and(masks[best], m).sum()
                group["box_iou"].append(float(iou[best]))
                group["mask_iou"].append(float(inter / max(np.logical_or(masks[best], m).sum(), 1)))
    return {
        # a group with no recalled ground truth has no IoUs: nan, not a missing column
        f: {k: float(np.mean(s[k])) if s[k] else float("nan") for k in ("top1", "recall", "box_iou", "mask_iou")}
        | {"n": len(s["top1"])}
        for f, s in stats.items()
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work_dir", type=Path)
    ap.add_argument(
        "--heads", nargs="*", default=["baseline", "crat"], help="heads under WORK_DIR to analyse besides stage 1"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)

    from mmdet.apis import init_detector

    from crat_ft.common.paths import demo_config
    from crat_ft.engine.checkpoint import allow_mmengine_pickles
    from crat_ft.heads.export import export_checkpoint
    from crat_ft.heads.registry import register_all

    register_all()
    allow_mmengine_pickles()
    work = args.work_dir
    detector = work / "stage1" / "detector.pth"
    print(f"{'model':9s} {'group':5s} {'n':>5s} {'top1':>6s} {'recall':>6s} {'box IoU':>8s} {'mask IoU':>8s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ["stage1", *args.heads]:
            ckpt, cfg = str(detector), None
            if name != "stage1":
                ckpt, cfg = export_checkpoint(
                    str(demo_config()), str(detector), str(work / name / "heads.pth"), f"{tmp}/{name}.pth"
                )
            model = init_detector(cfg or str(demo_config()), ckpt, device="cpu")
            res = analyse(model, work / "data" / "annotations" / "lvis_v1_val.json", work / "data")
            for f in ("r", "c", "f"):
                s = res[f]
                print(
                    f"{name:9s} {f:5s} {s['n']:5d} {s['top1']:6.3f} {s['recall']:6.3f} {s['box_iou']:8.3f} {s['mask_iou']:8.3f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
