"""LVIS evaluation (DESIGN §7) on faster-coco-eval, plus the mmdet metric.

The LVIS v1 protocol, as lvis-api's ``LVISEval`` implements it:

- at most ``max_dets`` (300) detections per image *across all categories*: the
  highest-scoring ones are kept before evaluation (lvis-api does this in
  ``LVISResults``; faster-coco-eval does not, so :func:`top_k_per_image` does);
- federated annotation: a detection of category c in image i is evaluated only
  if c is in i's positive set (annotated there) or its ``neg_category_ids``;
  unmatched detections of a category in i's ``not_exhaustive_category_ids``
  are ignored;
- AP over IoU 0.50:0.95 and 101 recall points, averaged over categories; APr,
  APc and APf average over the categories of one frequency group.

Every summary figure is a mean of per-category figures, so categories can be
evaluated in chunks with bounded memory and merged exactly
(``cat_chunk_size``).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from crat_ft.errors import UserError

METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
IOU_TYPES = ("bbox", "segm")
_AREA_KEYS = {"APs": "small", "APm": "medium", "APl": "large"}
_FREQ_KEYS = {"APr": "r", "APc": "c", "APf": "f"}


def load_lvis_json(path: str | os.PathLike) -> dict:
    """Read and check an LVIS-format annotation file.

    Raises:
        UserError: the file is missing, not JSON, or lacks LVIS fields; the
            message names the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"annotation file {path} does not exist; check the path (make one with `crat-ft make-demo-data`)")
    try:
        with open(path) as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"annotation file {path} is not valid JSON ({exc}); regenerate or re-download it") from None
    check_lvis_dict(doc, str(path))
    return doc


def check_lvis_dict(doc: object, name: str = "annotations") -> None:
    """Check the LVIS v1 fields that evaluation and mmdet's LVISV1Dataset rely on."""
    if not isinstance(doc, dict):
        raise UserError(f"{name}: expected an LVIS JSON object, got {type(doc).__name__}; pass an LVIS v1 annotation file")
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise UserError(f"{name}: expected a list under '{key}', got {type(doc.get(key)).__name__}; this is not an LVIS v1 annotation file")
    required = {
        "categories": ("id", "name", "frequency"),
        "images": ("id", "height", "width", "neg_category_ids", "not_exhaustive_category_ids"),
        "annotations": ("id", "image_id", "category_id", "bbox", "area"),
    }
    for key, fields in required.items():
        for i, item in enumerate(doc[key]):
            missing = [f for f in fields if f not in item]
            if missing:
                raise UserError(
                    f"{name}: {key}[{i}] lacks {', '.join(repr(m) for m in missing)}; "
                    "LVIS v1 needs them (see DESIGN §8 or `crat-ft make-demo-data`)"
                )
    for i, img in enumerate(doc["images"]):
        if "coco_url" not in img and "file_name" not in img:
            raise UserError(f"{name}: images[{i}] has neither 'coco_url' nor 'file_name'; LVIS v1 images need 'coco_url'")
    bad = [c["frequency"] for c in doc["categories"] if c["frequency"] not in ("r", "c", "f")]
    if bad:
        raise UserError(f"{name}: category frequency must be 'r', 'c' or 'f', got {bad[0]!r}")
    cat_ids = {c["id"] for c in doc["categories"]}
    for i, ann in enumerate(doc["annotations"]):
        if ann["category_id"] not in cat_ids:
            raise UserError(f"{name}: annotations[{i}] has category_id {ann['category_id']} not in 'categories'")


def top_k_per_image(results: Iterable[dict], max_dets: int) -> list[dict]:
    """Keep the ``max_dets`` highest-scoring detections of each image, across categories.

    Matches lvis-api's ``LVISResults``: a stable sort by descending score, so
    ties keep their input order.
    """
    by_image: dict[int, list[dict]] = defaultdict(list)
    for det in results:
        by_image[det["image_id"]].append(det)
    kept = []
    for dets in by_image.values():
        if len(dets) > max_dets:
            dets = sorted(dets, key=lambda d: d["score"], reverse=True)[:max_dets]
        kept.extend(dets)
    return kept


def _check_results(results: Sequence[dict], iou_type: str, image_ids: set, cat_ids: set) -> None:
    field = "bbox" if iou_type == "bbox" else "segmentation"
    for i, det in enumerate(results):
        for key in ("image_id", "category_id", "score", field):
            if key not in det:
                raise UserError(f"results[{i}] lacks {key!r}; LVIS {iou_type} results need image_id, category_id, score and {field}")
        if det["image_id"] not in image_ids:
            raise UserError(f"results[{i}] has image_id {det['image_id']} not in the ground truth; evaluate against the matching annotation file")
        if det["category_id"] not in cat_ids:
            raise UserError(f"results[{i}] has category_id {det['category_id']} not in the ground truth categories; the model and dataset classes disagree")


def _federated(results: list[dict], gt_doc: dict, iou_type: str) -> list[dict]:
    """Copies of the detections LVIS evaluates: category in the image's positive or negative set.

    faster-coco-eval applies the same rule internally, but then fails on a
    dropped detection whose image has no ground truth in the evaluated
    categories; dropping them first is identical and avoids that. A bbox evaluation
    leaves masks out. A segm evaluation keeps the boxes: like lvis-api, the
    area of a detection that has a box is the box area (``w * h``), which
    decides its small/medium/large range.
    """
    keep = defaultdict(set)
    for img in gt_doc["images"]:
        keep[img["id"]].update(img.get("neg_category_ids", []))
    for ann in gt_doc["annotations"]:
        keep[ann["image_id"]].add(ann["category_id"])
    out = []
    for d in results:
        if d["category_id"] in keep[d["image_id"]]:
            d = dict(d)  # evaluation adds fields; the caller's dicts stay as they were
            if iou_type == "bbox":
                d.pop("segmentation", None)
            out.append(d)
    return out


def _gt_api(gt_doc: dict):
    """faster-coco-eval's index of the ground truth.

    Evaluation adds fields to the annotation dicts (``ignore``, RLEs), so it
    gets shallow copies of them; nested values are only read.
    """
    from faster_coco_eval import COCO

    gt = COCO()
    gt.dataset = {
        **gt_doc,
        "images": [dict(i) for i in gt_doc["images"]],
        "annotations": [dict(a) for a in gt_doc["annotations"]],
        "categories": [dict(c) for c in gt_doc["categories"]],
    }
    gt.createIndex()
    return gt


def _evaluate_chunk(gt, results: list[dict], iou_type: str, max_dets: int, cat_ids: list[int]):
    """Run faster-coco-eval on some categories; returns (precision [T, R, K, A], area labels)."""
    from faster_coco_eval import COCO, COCOeval_faster

    wanted = set(cat_ids)
    dts = [d for d in results if d["category_id"] in wanted]
    if dts:
        dt = gt.loadRes(dts)
    else:
        dt = COCO()
        dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": []}
        dt.createIndex()
    ev = COCOeval_faster(gt, dt, iouType=iou_type, lvis_style=True, print_function=lambda *a, **k: None)
    ev.params.catIds = list(cat_ids)
    ev.params.maxDets = [max_dets]
    ev.evaluate()
    ev.accumulate()
    precision = np.asarray(ev.eval["precision"])[..., 0]  # [T, R, K, A] at the one maxDets
    return precision, list(ev.params.areaRngLbl)


def _mean_valid(x: np.ndarray) -> float:
    valid = x[x > -1]
    return float(valid.mean()) if valid.size else -1.0


def lvis_metrics(
    gt: str | os.PathLike | dict,
    results: Sequence[dict],
    iou_type: str = "bbox",
    max_dets: int = 300,
    *,
    cat_chunk_size: int | None = None,
    per_class: bool = False,
) -> dict:
    """LVIS v1 metrics of detections against LVIS-format ground truth.

    Args:
        gt: path of an LVIS annotation file, or its parsed dict.
        results: LVIS result dicts (``image_id``, ``category_id``, ``score``,
            and ``bbox`` [x, y, w, h] or ``segmentation`` RLE).
        iou_type: ``"bbox"`` or ``"segm"``.
        max_dets: detections kept per image across categories (LVIS: 300).
        cat_chunk_size: evaluate this many categories at a time to bound
            memory (the result is identical); ``None`` evaluates all at once.
        per_class: also return ``"per_class"``: ``{category_id: AP}``.

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"}`` as
        floats in [0, 1], -1 where undefined (no ground truth in that group).
    """
    if iou_type not in IOU_TYPES:
        raise UserError(f"iou_type: expected one of {IOU_TYPES}, got {iou_type!r}")
    if max_dets < 1:
        raise UserError(f"max_dets: expected a positive integer, got {max_dets}")
    gt_doc = load_lvis_json(gt) if not isinstance(gt, dict) else gt
    if isinstance(gt, dict):
        check_lvis_dict(gt_doc, "gt")
    cats = sorted(gt_doc["categories"], key=lambda c: c["id"])
    cat_ids = [c["id"] for c in cats]
    _check_results(results, iou_type, {img["id"] for img in gt_doc["images"]}, set(cat_ids))
    results = _federated(top_k_per_image(results, max_dets), gt_doc, iou_type)

    chunk = cat_chunk_size or len(cat_ids)
    parts = []
    area_labels = None
    gt_api = _gt_api(gt_doc)
    for start in range(0, len(cat_ids), chunk):
        precision, area_labels = _evaluate_chunk(gt_api, results, iou_type, max_dets, cat_ids[start : start + chunk])
        parts.append(precision)
    precision = np.concatenate(parts, axis=2)  # [T, R, K, A]
    a_all = area_labels.index("all")

    metrics = {
        "AP": _mean_valid(precision[:, :, :, a_all]),
        "AP50": _mean_valid(precision[0, :, :, a_all]),
        "AP75": _mean_valid(precision[5, :, :, a_all]),
    }
    for key, label in _AREA_KEYS.items():
        metrics[key] = _mean_valid(precision[:, :, :, area_labels.index(label)])
    freq = np.array([c["frequency"] for c in cats])
    for key, group in _FREQ_KEYS.items():
        metrics[key] = _mean_valid(precision[:, :, freq == group, a_all])
    if per_class:
        metrics["per_class"] = {cid: _mean_valid(precision[:, :, k, a_all]) for k, cid in enumerate(cat_ids)}
    return metrics


def format_table(rows: dict[str, dict], title: str = "") -> str:
    """A fixed-width table: one row per name, columns ``METRIC_KEYS`` in percent."""
    header = f"{'':<14}" + "".join(f"{k:>7}" for k in METRIC_KEYS)
    lines = [title] if title else []
    lines.append(header)
    for name, m in rows.items():
        lines.append(f"{name:<14}" + "".join(f"{100 * m[k]:7.1f}" if m[k] >= 0 else f"{'-':>7}" for k in METRIC_KEYS))
    return "\n".join(lines)


# --------------------------------------------------------------------------- mmdet metric


def _category_table(doc: dict) -> list[dict]:
    return sorted(doc["categories"], key=lambda c: c["id"])


def write_per_class_csv(path: str | os.PathLike, categories: list[dict], per_class: dict[str, dict]) -> None:
    """Per-class CSV: class, frequency group, training instances, bbox AP, segm AP (atomic write)."""
    import csv

    from crat_ft.files import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "frequency", "train_instances", "bbox_AP", "segm_AP"])
        for c in categories:
            row = [c["name"], c["frequency"], c.get("instance_count", "")]
            for iou in IOU_TYPES:
                ap = per_class.get(iou, {}).get(c["id"])
                row.append("" if ap is None else f"{ap:.6f}")
            w.writerow(row)


def _register_metric():
    from mmdet.registry import METRICS
    from mmengine.evaluator import BaseMetric
    from mmengine.logging import MMLogger

    @METRICS.register_module(name="CratLVISMetric", force=True)
    class CratLVISMetric(BaseMetric):
        """LVIS v1 bbox/segm metric for mmdet's test loop, on :func:`lvis_metrics`.

        Args:
            ann_file: the LVIS annotation file of the evaluated split.
            metric: ``"bbox"``, ``"segm"`` or both.
            max_dets: detections per image across categories (LVIS: 300).
            cat_chunk_size: categories per evaluation chunk (bounded memory).
            per_class_csv: if set, write the per-class AP table there.
        """

        default_prefix = "lvis"

        def __init__(
            self,
            *,
            ann_file: str,
            metric: str | Sequence[str] = ("bbox", "segm"),
            max_dets: int = 300,
            cat_chunk_size: int | None = None,
            per_class_csv: str | None = None,
            collect_device: str = "cpu",
            prefix: str | None = None,
        ) -> None:
            super().__init__(collect_device=collect_device, prefix=prefix)
            metrics = [metric] if isinstance(metric, str) else list(metric)
            for m in metrics:
                if m not in IOU_TYPES:
                    raise UserError(f"CratLVISMetric.metric: expected items of {IOU_TYPES}, got {m!r}")
            self.iou_types = metrics
            self.ann_file = ann_file
            self.max_dets = max_dets
            self.cat_chunk_size = cat_chunk_size
            self.per_class_csv = per_class_csv
            self._doc = None
            self.last_results: dict = {}

        @property
        def doc(self) -> dict:
            if self._doc is None:
                self._doc = load_lvis_json(self.ann_file)
            return self._doc

        def process(self, data_batch, data_samples: Sequence[dict]) -> None:
            import pycocotools.mask as mask_util

            # one entry per image: mmengine truncates ``results`` to the dataset size
            cat_ids = [c["id"] for c in _category_table(self.doc)]
            for sample in data_samples:
                dets = []
                pred = sample["pred_instances"]
                img_id = sample["img_id"]
                bboxes = pred["bboxes"].cpu().numpy()
                scores = pred["scores"].cpu().numpy()
                labels = pred["labels"].cpu().numpy()
                masks = pred["masks"].cpu().numpy() if "masks" in pred and "segm" in self.iou_types else None
                for i in range(len(scores)):
                    x0, y0, x1, y1 = (float(v) for v in bboxes[i])
                    det = {
                        "image_id": img_id,
                        "category_id": cat_ids[int(labels[i])],
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "score": float(scores[i]),
                    }
                    if masks is not None:
                        rle = mask_util.encode(np.asfortranarray(masks[i].astype(np.uint8)))
                        rle["counts"] = rle["counts"].decode()
                        det["segmentation"] = rle
                    dets.append(det)
                self.results.append(dets)

        def compute_metrics(self, results: list) -> dict:
            logger = MMLogger.get_current_instance()
            results = [d for per_image in results for d in per_image]
            out, per_class = {}, {}
            for iou in self.iou_types:
                if iou == "segm" and results and "segmentation" not in results[0]:
                    raise UserError("segm metric requested but the model predicts no masks; use metric=['bbox']")
                m = lvis_metrics(self.doc, results, iou, self.max_dets, cat_chunk_size=self.cat_chunk_size, per_class=True)
                per_class[iou] = m.pop("per_class")
                out[iou] = m
            self.last_results = {"metrics": out, "per_class": per_class}
            logger.info("\n" + format_table(out, title=f"LVIS metrics ({len(results)} detections)"))
            if self.per_class_csv:
                write_per_class_csv(self.per_class_csv, _category_table(self.doc), per_class)
            return {f"{iou}_{k}": v for iou, m in out.items() for k, v in m.items()}

    return CratLVISMetric


CratLVISMetric = _register_metric()
