"""Rare classes side by side: ground truth, then each model's detections of that class.

``rare_class_gallery`` picks the rarest classes of the training split (fewest
training images; ties by category id, so nothing is chosen by how a model did),
for each the validation image with its largest instance, runs every model on
it, and draws one row per class: the ground truth, then each model's boxes and
masks *of that class* above a score threshold, with the score and the best IoU
with a ground-truth box of the class in the panel's caption.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from crat_ft.common.files import atomic_path
from crat_ft.common.lvis_json import load_lvis_json

SCALE = 3
GT_COLOUR = (80, 220, 80)  # BGR
DET_COLOUR = (40, 160, 255)
CAPTION_H = 34


def pick_rare_examples(train_ann: str | os.PathLike, val_ann: str | os.PathLike, n: int) -> list[dict]:
    """Up to ``n`` ``{"category": ..., "image": ..., "gts": [annotation, ...]}``, rarest classes first."""
    train, val = load_lvis_json(train_ann), load_lvis_json(val_ann)
    counts = {c["id"]: c.get("image_count", 0) for c in train["categories"]}
    cats = sorted(
        (c for c in train["categories"] if c.get("frequency") == "r"), key=lambda c: (counts[c["id"]], c["id"])
    )
    images = {img["id"]: img for img in val["images"]}
    by_cat: dict[int, list[dict]] = {}
    for ann in val["annotations"]:
        by_cat.setdefault(ann["category_id"], []).append(ann)
    picked = []
    for cat in cats:
        anns = by_cat.get(cat["id"])
        if not anns:
            continue
        best = max(anns, key=lambda a: (a["area"], -a["id"]))
        gts = [a for a in anns if a["image_id"] == best["image_id"]]
        picked.append({"category": cat, "image": images[best["image_id"]], "gts": gts})
        if len(picked) == n:
            break
    return picked


def box_ious(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    """IoU of (N, 4) xyxy boxes with one xyxy box."""
    lt, rb = np.maximum(boxes[:, :2], box[:2]), np.minimum(boxes[:, 2:], box[2:])
    inter = np.clip(rb - lt, 0, None).prod(1)
    area = lambda b: np.prod(b[..., 2:] - b[..., :2], axis=-1)  # noqa: E731
    return inter / (area(boxes) + area(box) - inter + 1e-9)


def gt_mask(ann: dict, h: int, w: int) -> np.ndarray:
    """The (h, w) bool mask of an LVIS annotation's polygons, rasterised as the LVIS/COCO tools do."""
    from pycocotools import mask as mask_utils

    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], h, w))).astype(bool)


def _panel(image: np.ndarray, boxes, masks, labels: list[str], colour, caption: str) -> np.ndarray:
    import cv2

    big = cv2.resize(image, None, fx=SCALE, fy=SCALE, interpolation=cv2.INTER_NEAREST)
    for mask in masks:  # a light fill and the outline, so the object stays visible under it
        m = cv2.resize(mask.astype(np.uint8), None, fx=SCALE, fy=SCALE, interpolation=cv2.INTER_NEAREST)
        big[m.astype(bool)] = (0.75 * big[m.astype(bool)] + 0.25 * np.array(colour)).astype(np.uint8)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(big, contours, -1, colour, 1)
    for box, label in zip(boxes, labels):
        x0, y0, x1, y1 = (int(round(v * SCALE)) for v in box)
        cv2.rectangle(big, (x0, y0), (x1, y1), colour, 2)
        if label:
            cv2.putText(big, label, (x0 + 2, max(12, y0 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour, 1, cv2.LINE_AA)
    head = np.full((CAPTION_H, big.shape[1], 3), 255, np.uint8)
    for i, line in enumerate(caption.split("\n")[:2]):
        cv2.putText(head, line, (4, 14 + 15 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([head, big], 0)


def rare_class_gallery(
    config: str | os.PathLike,
    detector: str | os.PathLike,
    heads: dict[str, str | os.PathLike],
    data_root: str | os.PathLike,
    out_png: str | os.PathLike,
    *,
    classes: int = 4,
    score_thr: float = 0.3,
) -> list[str]:
    """Write the gallery for ``heads`` (``{panel title: heads file}``, merged into ``detector`` in turn).

    Returns:
        The names of the classes shown, top to bottom.
    """
    import cv2
    from mmdet.apis import inference_detector, init_detector

    from crat_ft.engine.checkpoint import allow_mmengine_pickles
    from crat_ft.engine.config import prepare_config
    from crat_ft.heads.export import export_checkpoint
    from crat_ft.heads.registry import register_all

    data_root = Path(data_root)
    train_ann = data_root / "annotations" / "lvis_v1_train.json"
    examples = pick_rare_examples(train_ann, data_root / "annotations" / "lvis_v1_val.json", classes)
    # mmdet's labels index the categories in id order
    label_of = {cid: i for i, cid in enumerate(sorted(c["id"] for c in load_lvis_json(train_ann)["categories"]))}
    if not examples:
        return []
    register_all()
    allow_mmengine_pickles()
    rows: list[list[np.ndarray]] = []
    for ex in examples:
        ex["path"] = str(data_root / ex["image"]["coco_url"].split("/", 3)[-1])
        image = ex["pixels"] = cv2.imread(ex["path"])
        h, w = image.shape[:2]
        gt_boxes = ex["gt_boxes"] = np.array(
            [[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in ex["gts"])], float
        )
        name, counts = ex["category"]["name"], ex["category"]["image_count"]
        caption = f"{name} ({counts} train images)\nground truth"
        masks = [gt_mask(a, h, w) for a in ex["gts"]]
        rows.append([_panel(image, gt_boxes, masks, [""] * len(gt_boxes), GT_COLOUR, caption)])
    with tempfile.TemporaryDirectory(prefix="crat-ft-gallery-") as tmp:
        for title, heads_file in heads.items():
            merged, merged_cfg = export_checkpoint(str(config), str(detector), str(heads_file), f"{tmp}/{title}.pth")
            cfg = prepare_config(merged_cfg or config, (), data_root, ("test_dataloader",))
            with warnings.catch_warnings():  # mmdet warns that the dataset has no palette: colours are ours
                warnings.simplefilter("ignore", UserWarning)
                model = init_detector(cfg, merged, device="cpu")
            for row, ex in zip(rows, examples):
                pred = inference_detector(model, ex["path"]).pred_instances
                keep = (pred.labels == label_of[ex["category"]["id"]]) & (pred.scores >= score_thr)
                boxes, scores = pred.bboxes[keep].numpy(), pred.scores[keep].numpy()
                masks = pred.masks[keep].numpy() if "masks" in pred else []
                best = max((float(box_ious(ex["gt_boxes"], b).max()) for b in boxes), default=0.0)
                caption = f"{title}: {len(boxes)} detection(s) >= {score_thr:g}\nbest box IoU {best:.2f}"
                labels = [f"{s:.2f}" for s in scores]
                row.append(_panel(ex["pixels"], boxes, masks, labels, DET_COLOUR, caption))
    grid = np.concatenate([np.concatenate(r, 1) for r in rows], 0)
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp_png:
        ok, buf = cv2.imencode(".png", grid)
        tmp_png.write_bytes(buf.tobytes())
    return [ex["category"]["name"] for ex in examples]
