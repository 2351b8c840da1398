"""LVIS evaluation on faster-coco-eval (see docs/architecture.md#evaluation-protocol).

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

``protocol="fixed"`` is AP-fixed (Dave et al. 2021, "Evaluating
Large-Vocabulary Object Detectors: The Devil is in the Details"): no
per-image cap; each category keeps its ``dets_per_class`` (10,000)
highest-scoring detections over the whole dataset, then the same federated
evaluation runs. Where no image has more than ``max_dets`` detections and no
category more than ``dets_per_class``, both protocols give the same numbers.

``protocol="pool"`` is AP-pool (same paper): AP-fixed's budget, then one
precision-recall curve over the detections of all categories together
(matching stays within a category), which rewards scores that are comparable
across categories. APr/APc/APf pool the categories of one frequency group.
It is computed by the same engine: every (image, category) pair where the
category is annotated becomes an image of one pooled category.

Results files are read and checked by :mod:`crat_ft.evaluation.results` and
:mod:`crat_ft.evaluation.checks`.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np

from crat_ft.common.errors import UserError
from crat_ft.common.lvis_json import categories_by_id, check_lvis_dict, load_lvis_json
from crat_ft.evaluation.checks import check_columns, check_results
from crat_ft.evaluation.detections import Detections

METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
PROTOCOLS = ("standard", "fixed", "pool")
DETS_PER_CLASS = 10_000
IOU_TYPES = ("bbox", "segm")
_AREA_KEYS = {"APs": "small", "APm": "medium", "APl": "large"}
_FREQ_KEYS = {"APr": "r", "APc": "c", "APf": "f"}


def _top_k_by(results: Iterable[dict], key: str, k: int) -> list[dict]:
    """Keep the ``k`` highest-scoring detections of each group of equal ``key``; a stable sort by
    descending score (ties keep their input order), groups in order of first appearance."""
    groups: dict[int, list[dict]] = defaultdict(list)
    for det in results:
        groups[det[key]].append(det)
    kept = []
    for dets in groups.values():
        if len(dets) > k:
            dets = sorted(dets, key=lambda d: d["score"], reverse=True)[:k]
        kept.extend(dets)
    return kept


def top_k_per_image(results: Iterable[dict], max_dets: int) -> list[dict]:
    """Keep the ``max_dets`` highest-scoring detections of each image, across categories.

    Matches lvis-api's ``LVISResults``: a stable sort by descending score, so
    ties keep their input order.
    """
    return _top_k_by(results, "image_id", max_dets)


def top_k_per_class(results: Iterable[dict], k: int) -> list[dict]:
    """Keep the ``k`` highest-scoring detections of each category over the whole dataset (AP-fixed).

    A stable sort by descending score: ties keep their input order.
    """
    return _top_k_by(results, "category_id", k)


def top_k_rows(group: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    """Rows kept by :func:`top_k_per_image` (``group`` = image ids) or :func:`top_k_per_class`, in its order:
    groups by first appearance, a group within its cap in input order, a capped one by descending score."""
    n = len(score)
    if n == 0:
        return np.zeros(0, np.int64)
    idx = np.arange(n)
    by_score = np.lexsort((idx, -score, group))  # grouped, then descending score, ties in input order
    g_sorted = group[by_score]
    starts = np.r_[0, np.nonzero(g_sorted[1:] != g_sorted[:-1])[0] + 1]
    sizes = np.diff(np.r_[starts, n])
    rank = np.empty(n, np.int64)
    rank[by_score] = idx - np.repeat(starts, sizes)
    size = np.empty(n, np.int64)
    size[by_score] = np.repeat(sizes, sizes)
    _, first = np.unique(group, return_index=True)
    first_of = dict(zip(np.unique(group).tolist(), np.argsort(np.argsort(first)).tolist()))
    group_order = np.fromiter((first_of[g] for g in group.tolist()), np.int64, n)
    within = np.where(size > k, rank, idx)
    keep = rank < k
    rows = idx[keep]
    return rows[np.lexsort((within[keep], group_order[keep]))]


def federated_rows(dets: Detections, rows: np.ndarray, gt_doc: dict) -> np.ndarray:
    """The rows LVIS evaluates: category in the image's positive or negative set (order kept)."""
    width = max((c["id"] for c in gt_doc["categories"]), default=0) + 1
    allowed = {img["id"] * width + c for img in gt_doc["images"] for c in img.get("neg_category_ids", [])}
    allowed.update(a["image_id"] * width + a["category_id"] for a in gt_doc["annotations"])
    keys = dets.image_id[rows] * width + dets.category_id[rows]
    return rows[np.isin(keys, np.fromiter(allowed, np.int64, len(allowed)))]


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


AREA_LABELS = ["all", "small", "medium", "large"]


def _evaluate_chunk(gt, dts: list[dict], iou_type: str, max_dets: int, cat_ids: list[int], img_ids: list[int]):
    """Run faster-coco-eval on some categories (``dts``: their detections) over the images where they are
    annotated (positive or negative: no other image can hold a match or an evaluated detection);
    returns (precision [T, R, K, A], area labels).

    The engine walks every (image, category) pair it is given, so handing it only these images,
    rather than the whole split, is what keeps a large-vocabulary evaluation fast.
    """
    from faster_coco_eval import COCO, COCOeval_faster

    if not img_ids:  # no ground truth anywhere and no evaluated detection: undefined for every category
        return np.full((10, 101, len(cat_ids), len(AREA_LABELS)), -1.0), AREA_LABELS
    # the detection index built directly (faster-coco-eval's loadRes copies the category list on every
    # call): the dicts are this chunk's own, made by Detections.to_dicts, and get the fields loadRes adds
    for k, d in enumerate(dts, 1):
        d["id"], d["iscrowd"] = k, 0
        d.setdefault("area", d["bbox"][2] * d["bbox"][3])  # lvis-api: the box area, or the mask's without a box
    dt = COCO()
    dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": dts}
    dt.createIndex()
    ev = COCOeval_faster(gt, dt, iouType=iou_type, lvis_style=True, print_function=lambda *a, **k: None)
    ev.params.catIds = list(cat_ids)
    ev.params.imgIds = list(img_ids)
    ev.params.maxDets = [max_dets]
    ev.evaluate()
    ev.accumulate()
    precision = np.asarray(ev.eval["precision"])[..., 0]  # [T, R, K, A] at the one maxDets
    return precision, list(ev.params.areaRngLbl)


CHUNK_ROWS = 400_000
CHUNK_CATEGORIES = 64


def _category_chunks(cat_ids: list[int], row_cats: np.ndarray, size: int | None) -> list[list[int]]:
    """Consecutive groups of categories: ``size`` at a time, or (``None``) up to :data:`CHUNK_CATEGORIES`
    while the chunk stays under :data:`CHUNK_ROWS` detections (at least one category): the rows bound
    the dicts built at once, the categories the (image, category) pairs the engine walks."""
    if size is not None:
        return [cat_ids[i : i + size] for i in range(0, len(cat_ids), size)]
    counts = dict(zip(*np.unique(row_cats, return_counts=True)))
    chunks, current, rows = [], [], 0
    for c in cat_ids:
        n = int(counts.get(c, 0))
        if current and (rows + n > CHUNK_ROWS or len(current) == CHUNK_CATEGORIES):
            chunks.append(current)
            current, rows = [], 0
        current.append(c)
        rows += n
    return chunks + [current]


def _mean_valid(x: np.ndarray) -> float:
    valid = x[x > -1]
    return float(valid.mean()) if valid.size else -1.0


def lvis_metrics(
    gt: str | os.PathLike | dict,
    results: Sequence[dict] | Detections,
    iou_type: str = "bbox",
    max_dets: int = 300,
    *,
    protocol: str = "standard",
    dets_per_class: int = DETS_PER_CLASS,
    cat_chunk_size: int | None = None,
    per_class: bool = False,
) -> dict:
    """LVIS v1 metrics of detections against LVIS-format ground truth.

    Args:
        gt: path of an LVIS annotation file, or its parsed dict.
        results: LVIS result dicts (``image_id``, ``category_id``, ``score``,
            and ``bbox`` [x, y, w, h] or ``segmentation`` RLE), or the same as
            :class:`crat_ft.evaluation.detections.Detections` columns (only the category
            chunk being evaluated is ever turned into dicts).
        iou_type: ``"bbox"`` or ``"segm"``.
        max_dets: detections kept per image across categories (LVIS: 300; protocol ``standard``).
        protocol: ``"standard"`` (LVIS v1: top ``max_dets`` per image),
            ``"fixed"`` (AP-fixed: top ``dets_per_class`` per category over the dataset, no per-image cap)
            or ``"pool"`` (AP-pool: AP-fixed's budget, one curve over all categories; no ``per_class``).
        dets_per_class: AP-fixed's budget per category (10,000).
        cat_chunk_size: evaluate this many categories at a time to bound
            memory (the result is identical); ``None``: as many as keep a chunk
            under :data:`CHUNK_ROWS` detections.
        per_class: also return ``"per_class"``: ``{category_id: AP}``.

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"}`` as
        floats in [0, 1], -1 where undefined (no ground truth in that group).
    """
    if iou_type not in IOU_TYPES:
        raise UserError(f"iou_type: expected one of {IOU_TYPES}, got {iou_type!r}")
    if max_dets < 1:
        raise UserError(f"max_dets: expected a positive integer, got {max_dets}")
    if protocol == "pool" and per_class:
        raise UserError("AP-pool is one curve over all categories: it has no per-class AP; use protocol 'fixed'")
    if protocol not in PROTOCOLS:
        raise UserError(f"protocol: expected one of {PROTOCOLS}, got {protocol!r}")
    if dets_per_class < 1:
        raise UserError(f"dets_per_class: expected a positive integer, got {dets_per_class}")
    gt_doc = load_lvis_json(gt) if not isinstance(gt, dict) else gt
    if isinstance(gt, dict):
        check_lvis_dict(gt_doc, "gt")
    cats = categories_by_id(gt_doc)
    cat_ids = [c["id"] for c in cats]
    image_ids = {img["id"] for img in gt_doc["images"]}
    if isinstance(results, Detections):
        dets = results
        check_columns(dets, iou_type, image_ids, set(cat_ids))
    else:
        dets = check_results(results, gt_doc)
        check_columns(dets, iou_type, image_ids, set(cat_ids))
    if protocol == "standard":
        rows = federated_rows(dets, top_k_rows(dets.image_id, dets.score, max_dets), gt_doc)
        engine_cap = max_dets
    else:
        rows = federated_rows(dets, top_k_rows(dets.category_id, dets.score, dets_per_class), gt_doc)
        # no per-image cap: the engine's per (image, category) cap is set above the largest count
        pairs = dets.image_id[rows] * (max(cat_ids) + 1) + dets.category_id[rows]
        engine_cap = int(np.unique(pairs, return_counts=True)[1].max()) if len(rows) else 1

    if protocol == "pool":
        return _pooled_metrics(gt_doc, dets, rows, iou_type, engine_cap)
    parts = []
    area_labels = None
    gt_api = _gt_api(gt_doc)
    row_cats = dets.category_id[rows]
    annotated = defaultdict(set)  # category -> images where it is positive or negative
    for img in gt_doc["images"]:
        for c in img.get("neg_category_ids", []):
            annotated[c].add(img["id"])
    for a in gt_doc["annotations"]:
        annotated[a["category_id"]].add(a["image_id"])
    for wanted in _category_chunks(cat_ids, row_cats, cat_chunk_size):
        dts = dets.to_dicts(rows[np.isin(row_cats, wanted)], with_masks=iou_type == "segm")
        images = sorted(set().union(*(annotated[c] for c in wanted)))
        precision, area_labels = _evaluate_chunk(gt_api, dts, iou_type, engine_cap, wanted, images)
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


def _pooled_metrics(gt_doc: dict, dets: Detections, rows: np.ndarray, iou_type: str, engine_cap: int) -> dict:
    """AP-pool: each group of categories (all; each frequency group) as one pooled category whose
    images are the (image, category) pairs where a category of the group is positive or negative."""
    images = {img["id"]: img for img in gt_doc["images"]}
    freq = {c["id"]: c["frequency"] for c in gt_doc["categories"]}
    pairs = {}  # (image, category) -> pooled image id
    for img in gt_doc["images"]:
        for c in img.get("neg_category_ids", []):
            pairs.setdefault((img["id"], c), len(pairs) + 1)
    for a in gt_doc["annotations"]:
        pairs.setdefault((a["image_id"], a["category_id"]), len(pairs) + 1)

    def pooled(group: str | None):
        keep = [(ic, k) for ic, k in pairs.items() if group is None or freq[ic[1]] == group]
        pooled_images = []
        for (i, c), k in keep:
            img = images[i]
            pooled_images.append({
                "id": k, "height": img["height"], "width": img["width"],
                "neg_category_ids": [1] if c in img.get("neg_category_ids", []) else [],
                "not_exhaustive_category_ids": [1] if c in img.get("not_exhaustive_category_ids", []) else [],
            })  # fmt: skip
        anns = [
            dict(a, image_id=pairs[a["image_id"], a["category_id"]], category_id=1)
            for a in gt_doc["annotations"]
            if group is None or freq[a["category_id"]] == group
        ]
        doc = {"images": pooled_images, "annotations": anns,
               "categories": [{"id": 1, "name": "pooled", "frequency": group or "f"}]}  # fmt: skip
        mine = rows[
            np.fromiter((group is None or freq[c] == group for c in dets.category_id[rows].tolist()), bool, len(rows))
        ]
        dts = dets.to_dicts(mine, with_masks=iou_type == "segm")
        for d in dts:
            d["image_id"], d["category_id"] = pairs[d["image_id"], d["category_id"]], 1
        if not anns:
            return None, AREA_LABELS
        return _evaluate_chunk(_gt_api(doc), dts, iou_type, engine_cap, [1], [k for _, k in keep])

    precision, labels = pooled(None)
    a_all = labels.index("all")
    metrics = {
        "AP": _mean_valid(precision[:, :, :, a_all]),
        "AP50": _mean_valid(precision[0, :, :, a_all]),
        "AP75": _mean_valid(precision[5, :, :, a_all]),
    }
    for key, label in _AREA_KEYS.items():
        metrics[key] = _mean_valid(precision[:, :, :, labels.index(label)])
    for key, group in _FREQ_KEYS.items():
        group_precision, _ = pooled(group)
        metrics[key] = -1.0 if group_precision is None else _mean_valid(group_precision[:, :, :, a_all])
    return metrics


def format_table(rows: dict[str, dict], title: str = "") -> str:
    """A fixed-width table: one row per name, columns ``METRIC_KEYS`` in percent."""
    header = f"{'':<14}" + "".join(f"{k:>7}" for k in METRIC_KEYS)
    lines = [title] if title else []
    lines.append(header)
    for name, m in rows.items():
        lines.append(f"{name:<14}" + "".join(f"{100 * m[k]:7.1f}" if m[k] >= 0 else f"{'-':>7}" for k in METRIC_KEYS))
    return "\n".join(lines)


def write_per_class_csv(path: str | os.PathLike, categories: list[dict], per_class: dict[str, dict]) -> None:
    """Per-class CSV: class, frequency group, training instances, bbox AP, segm AP (atomic write)."""
    import csv

    from crat_ft.common.files import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "frequency", "train_instances", "bbox_AP", "segm_AP"])
        for c in categories:
            row = [c["name"], c["frequency"], c.get("instance_count", "")]
            for iou in IOU_TYPES:
                ap = per_class.get(iou, {}).get(c["id"])
                row.append("" if ap is None else f"{ap:.6f}")
            w.writerow(row)
