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

Results files are read by one reader, :func:`read_results` (``evaluate-results``,
``compare`` and ``analyze-errors`` all use it): the file's shape first
(:func:`load_results_file`), then every detection against the ground truth
(:func:`check_results`; RLE masks are decoded by :func:`rle_problem` before the
COCO mask API, which trusts them, ever sees them). A bad file stops with one line
naming the first bad detection.
"""

from __future__ import annotations

import itertools
import numbers
import operator
import os
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np

from crat_ft.common.errors import UserError
from crat_ft.common.lvis_json import categories_by_id, check_lvis_dict, load_lvis_json
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


def check_columns(dets: Detections, iou_type: str, image_ids: set, cat_ids: set) -> None:
    bad = ~np.isin(dets.image_id, np.fromiter(image_ids, np.int64, len(image_ids)))
    if bad.any():
        i = int(np.argmax(bad))
        raise UserError(
            f"results[{i}] has image_id {int(dets.image_id[i])} not in the ground truth; evaluate against the matching annotation file"
        )
    bad = ~np.isin(dets.category_id, np.fromiter(cat_ids, np.int64, len(cat_ids)))
    if bad.any():
        i = int(np.argmax(bad))
        raise UserError(
            f"results[{i}] has category_id {int(dets.category_id[i])} not in the ground truth categories; "
            "the model and dataset classes disagree"
        )
    if iou_type == "segm" and len(dets) and not dets.has_masks:
        raise UserError(
            "results[0] lacks 'segmentation'; LVIS segm results need image_id, category_id, score and segmentation"
        )


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _shown(v, limit: int = 40) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_RLE_CHUNK = 1 << 24  # RLE characters decoded at once


def rle_problem(rle: np.ndarray, offsets: np.ndarray, sizes: np.ndarray) -> tuple[int, str] | None:
    """The first compressed RLE of a column that pycocotools' decoder would misread, and why; None if all are sound.

    ``rle``: the ``counts`` strings of ``n`` masks concatenated (uint8), ``offsets`` (n + 1,), ``sizes``
    (n, 2) height, width. The decoder (``rleFrString`` of the COCO mask API) reads each run length as
    5-bit groups (character - 48, bit 0x20: another group follows, bit 0x10 of the last: negative),
    each run after the second as a difference to the run two before; it checks nothing, so a string
    that ends inside a number, a character outside '0'..'o', a negative run, or runs that do not add
    up to height x width make it read or write out of bounds. Decoded here with numpy, in chunks.
    """
    n = len(offsets) - 1
    start = 0
    while start < n:
        stop = start + 1
        while stop < n and offsets[stop + 1] - offsets[start] <= _RLE_CHUNK:
            stop += 1
        found = _rle_chunk_problem(rle, offsets[start : stop + 1], sizes[start:stop])
        if found is not None:
            return start + found[0], found[1]
        start = stop
    return None


def _rle_chunk_problem(rle: np.ndarray, offsets: np.ndarray, sizes: np.ndarray) -> tuple[int, str] | None:
    n = len(offsets) - 1
    c = np.asarray(rle[offsets[0] : offsets[-1]], np.int64) - 48
    string = np.repeat(np.arange(n), np.diff(offsets))
    outside = (c < 0) | (c > 63)
    if outside.any():
        return int(string[np.argmax(outside)]), "a character outside the RLE alphabet '0'..'o'"
    ends = (c & 0x20) == 0  # the last character of a run length
    last = offsets[1:] - offsets[0] - 1
    nonempty = np.diff(offsets) > 0
    open_end = nonempty & ~ends[np.maximum(last, 0)]
    if open_end.any():
        return int(np.argmax(open_end)), "it ends inside a run length"
    group = np.cumsum(ends) - ends  # run number of each character, over all strings
    first = np.r_[0, np.flatnonzero(ends)[:-1] + 1]  # first character of each run
    k = np.arange(len(c)) - first[group]  # its place in the run
    if len(k) and k.max() >= 7:
        i = int(string[np.argmax(k >= 7)])
        return i, "a run length longer than 7 characters"
    x = np.zeros(len(first), np.int64)
    np.add.at(x, group, (c & 0x1F) << (5 * k))
    width = np.bincount(group, minlength=len(first))
    negative = (c[ends] & 0x10) != 0
    x = np.where(negative, x - (np.int64(1) << (5 * width)), x)
    run_string = string[first]
    runs_per = np.bincount(run_string, minlength=n)
    run_start = np.r_[0, np.cumsum(runs_per)[:-1]]
    m = np.arange(len(x)) - run_start[run_string]  # index of the run in its string
    counts = x.copy()
    for parity in (0, 1):  # run m > 2 adds run m - 2: sums over the runs of one parity (run 0 alone)
        sel = (m % 2 == parity) & (m >= (2 if parity == 0 else 1))
        total = np.cumsum(np.where(sel, x, 0))
        before = np.where(run_start > 0, total[np.maximum(run_start - 1, 0)], 0)
        counts = np.where(sel, total - before[run_string], counts)
    bad = (counts < 0) | (counts >= 1 << 32)
    if bad.any():
        return int(run_string[np.argmax(bad)]), "a negative or too large run length"
    pixels = np.bincount(run_string, weights=counts, minlength=n)
    area = sizes[:, 0].astype(np.float64) * sizes[:, 1]
    wrong = pixels != area
    if wrong.any():
        i = int(np.argmax(wrong))
        return i, f"its runs cover {int(pixels[i])} pixels, not height x width = {int(area[i])}"
    return None


def check_results(results: Sequence[dict], gt_doc: dict, name: str = "results") -> Detections:
    """LVIS result dicts checked against the ground truth they are evaluated on, as columns.

    The one reader of results that ``evaluate-results``, ``compare`` and ``analyze-errors`` share.
    Every detection needs ``image_id`` and ``category_id`` (integers of the GT's images and
    categories), a finite ``score``, and ``bbox`` (4 finite numbers, w and h >= 0) and/or
    ``segmentation`` (a compressed RLE of its image's height and width), each field in every
    detection or in none.

    Well-formed files are checked column by column (millions of detections in seconds); only a file
    that fails is walked detection by detection, to name the first one that breaks a rule.

    Args:
        results: the detections (a results file's list).
        gt_doc: the checked LVIS ground truth.
        name: what the messages call the list (e.g. ``"results file r.json: results"``).

    Raises:
        UserError: the first detection that breaks a rule, and how.
    """
    images = {img["id"]: img for img in gt_doc["images"]}
    cat_ids = {c["id"] for c in gt_doc["categories"]}
    first = results[0] if len(results) and isinstance(results[0], dict) else {}
    fields = ["image_id", "category_id", "score"] + [key for key in ("bbox", "segmentation") if key in first]
    if not _columns_ok(results, fields, images, cat_ids):
        _first_bad_detection(results, fields, images, cat_ids, name)  # raises, unless only the types were unusual
    if "segmentation" in fields:
        _check_masks(results, images, name)
    return Detections.from_dicts(results, masks="segmentation" in fields)


def _types(values) -> set:
    return set(map(type, values))


def _columns_ok(results: Sequence[dict], fields: list[str], images: dict, cat_ids: set) -> bool:
    """Whether every rule but the masks' holds, checked on whole columns of plain JSON values."""
    if len(fields) == 3 or _types(results) != {dict}:
        return not len(results)
    for key in fields:
        if not all(map(operator.contains, results, itertools.repeat(key))):
            return False
    for key, known in (("image_id", set(images)), ("category_id", cat_ids)):
        column = [d[key] for d in results]
        if not _types(column) <= {int} or not set(column) <= known:
            return False
    scores = [d["score"] for d in results]
    if not _types(scores) <= {int, float} or not np.isfinite(np.asarray(scores, np.float64)).all():
        return False
    if "bbox" in fields:
        boxes = [d["bbox"] for d in results]
        if _types(boxes) != {list} or set(map(len, boxes)) != {4}:
            return False
        if not _types(itertools.chain.from_iterable(boxes)) <= {int, float}:
            return False
        b = np.asarray(boxes, np.float64)
        if not np.isfinite(b).all() or (b[:, 2:] < 0).any():
            return False
    return True


def _first_bad_detection(results: Sequence[dict], fields: list[str], images: dict, cat_ids: set, name: str) -> None:
    """Walk the detections in order and raise for the first that breaks a rule of :func:`check_results`."""
    for i, det in enumerate(results):
        if not isinstance(det, dict):
            raise UserError(f"{name}[{i}]: expected a detection object, got {_shown(det)}; pass a list of detections")
    if len(results) and len(fields) == 3:
        raise UserError(f"{name}[0] lacks 'bbox' and 'segmentation'; LVIS results need a box or an RLE mask")
    for i, det in enumerate(results):
        for key in fields:
            if key not in det:
                also = f" but {name}[0] has one; every detection needs one, or none" if key in results[0] else ""
                raise UserError(
                    f"{name}[{i}] lacks {key!r}{also}; LVIS results need image_id, category_id, score and bbox "
                    "and/or segmentation"
                )
    for key, known, fix in (
        ("image_id", images, "; evaluate against the matching annotation file"),
        ("category_id", cat_ids, " categories; the model and dataset classes disagree"),
    ):
        for i, det in enumerate(results):
            v = det[key]
            if not _is_int(v):
                if isinstance(v, str):
                    raise UserError(
                        f"{name}[{i}] has {key} {v!r}, a string; the GT's ids are integers: write it as a JSON number"
                    )
                raise UserError(f"{name}[{i}] {key}: expected an integer id, got {_shown(v)}; fix the results file")
            if v not in known:
                raise UserError(f"{name}[{i}] has {key} {v} not in the ground truth{fix}")
    for i, det in enumerate(results):
        v = det["score"]
        if not _is_real(v) or not np.isfinite(v):
            raise UserError(f"{name}[{i}] score: expected a finite number, got {_shown(v)}; fix the results file")
    if "bbox" in fields:
        for i, det in enumerate(results):
            b = det["bbox"]
            ok = isinstance(b, (list, tuple, np.ndarray)) and len(b) == 4 and all(_is_real(v) for v in b)
            if not ok or not all(np.isfinite(b)) or b[2] < 0 or b[3] < 0:
                raise UserError(
                    f"{name}[{i}] bbox: expected [x, y, width, height], 4 finite numbers with width, height >= 0, "
                    f"got {_shown(b)}; fix the results file"
                )


def _check_masks(results: Sequence[dict], images: dict, name: str) -> None:
    """Each ``segmentation`` a compressed RLE of its image's size that decodes (:func:`rle_problem`)."""
    segs = [d["segmentation"] for d in results]
    ids = np.fromiter((d["image_id"] for d in results), np.int64, len(results))
    known = np.array(sorted(images), np.int64)
    table = np.array([(images[k]["height"], images[k]["width"]) for k in known.tolist()], np.int64).reshape(-1, 2)
    hw = table[np.searchsorted(known, ids)]
    sizes = None
    if _types(segs) == {dict} and all(map(operator.contains, segs, itertools.repeat("counts"))):
        size_column = [s.get("size") for s in segs]
        if _types(size_column) == {list} and set(map(len, size_column)) == {2}:
            if _types(itertools.chain.from_iterable(size_column)) == {int}:
                sizes = np.asarray(size_column, np.int64).reshape(-1, 2)
    counts = [s["counts"] for s in segs] if sizes is not None else []
    if sizes is None or (sizes != hw).any() or _types(counts) - {str, bytes}:
        _first_bad_mask(results, images, name)
        sizes = np.asarray([s["size"] for s in segs], np.int64).reshape(-1, 2)
        counts = [s["counts"] for s in segs]
    encoded = [c.encode("ascii", "replace") if isinstance(c, str) else c for c in counts]
    offsets = np.r_[0, np.cumsum([len(c) for c in encoded])].astype(np.int64)
    found = rle_problem(np.frombuffer(b"".join(encoded), np.uint8), offsets, sizes)
    if found is not None:
        i, why = found
        raise UserError(
            f"{name}[{i}] segmentation counts: expected a compressed RLE of {sizes[i].tolist()}, got "
            f"{_shown(counts[i], 24)} ({why}); {_MASK_FIX}"
        )


_MASK_FIX = "encode each mask with pycocotools.mask.encode at its image's size"


def _first_bad_mask(results: Sequence[dict], images: dict, name: str) -> None:
    """Raise for the first ``segmentation`` that is not an RLE dict of its image's size with string counts."""
    for i, det in enumerate(results):
        seg = det["segmentation"]
        if isinstance(seg, list):
            raise UserError(
                f"{name}[{i}] segmentation is a polygon; LVIS results need RLE masks "
                f"({{'size': [height, width], 'counts': str}}): {_MASK_FIX}"
            )
        if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
            got = f"keys {sorted(seg)}" if isinstance(seg, dict) else _shown(seg)
            raise UserError(
                f"{name}[{i}] segmentation: expected an RLE {{'size': [height, width], 'counts': str}}, got {got}; "
                f"{_MASK_FIX}"
            )
        img = images[det["image_id"]]
        hw = [img["height"], img["width"]]
        size = seg["size"]
        if (
            not isinstance(size, (list, tuple))
            or len(size) != 2
            or not all(_is_int(v) for v in size)
            or list(size) != hw
        ):
            raise UserError(
                f"{name}[{i}] segmentation size: expected {hw} (height, width of image {det['image_id']}), "
                f"got {_shown(size)}; {_MASK_FIX}"
            )
        if not isinstance(seg["counts"], (str, bytes)):
            raise UserError(
                f"{name}[{i}] segmentation counts: expected a compressed RLE string, got {_shown(seg['counts'])}; "
                f"{_MASK_FIX}"
            )


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


def is_metrics(doc) -> bool:
    """Whether a parsed JSON is a metrics file (``evaluate``'s or ``evaluate-results``' ``--out``)."""
    return isinstance(doc, dict) and any(isinstance(doc.get(iou), dict) and "AP" in doc[iou] for iou in IOU_TYPES)


def read_json(path: str | os.PathLike, what: str):
    """A JSON file's content; one-line errors for a missing path, a directory, or text that is not JSON."""
    import json
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory; pass the JSON file itself")
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; check the path")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{what} {path} is not JSON ({first}); pass a JSON results file") from None


def load_results_file(path: str | os.PathLike, doc=None) -> list[dict]:
    """Detections from a JSON results file (mmdet's ``outfile_prefix`` ``.bbox.json``/``.segm.json``,
    detectron2's ``lvis_instances_results.json``, lvis-api's format: a list of detection dicts).

    Only the file's shape is checked here; :func:`read_results` checks the detections too.

    Args:
        doc: the file's parsed JSON, where the caller has read it already.

    Raises:
        UserError: missing, a directory, not JSON, a pickle, an annotation or metrics file, or not a list
            of detections.
    """
    from pathlib import Path

    path = Path(path)
    if path.suffix in (".pkl", ".pickle") and path.is_file():
        raise UserError(
            f"{path} is a pickle (mmdet's --out); crat-ft reads JSON results: rerun mmdet's test with "
            "--cfg-options test_evaluator.outfile_prefix=PREFIX and pass PREFIX.bbox.json or PREFIX.segm.json"
        )
    if path.is_dir():
        raise UserError(
            f"results file {path} is a directory; pass a JSON results file (e.g. PREFIX.segm.json, which "
            "`crat-ft evaluate --outfile-prefix PREFIX` writes)"
        )
    if doc is None:
        doc = read_json(path, "results file")
    if isinstance(doc, dict) and "annotations" in doc and "images" in doc:
        raise UserError(
            f"{path} is an annotation file (it has images and annotations), not results; pass the detections file"
        )
    if is_metrics(doc):
        raise UserError(
            f"{path} is a metrics file (it holds AP values), not detections; pass the results file the metrics "
            "were computed from (e.g. PREFIX.segm.json of `crat-ft evaluate --outfile-prefix PREFIX`)"
        )
    if not isinstance(doc, list):
        raise UserError(
            f"results file {path} should be a JSON list of detections (image_id, category_id, score, bbox "
            f"[and segmentation]), got a {type(doc).__name__}"
        )
    for i, det in enumerate(doc):
        if not isinstance(det, dict):
            raise UserError(
                f"results file {path}: results[{i}]: expected a detection object, got {_shown(det)}; "
                "pass a list of detections"
            )
    return doc


def read_results(path: str | os.PathLike, gt_doc: dict, doc=None) -> Detections:
    """The detections of a results file as checked columns (:func:`load_results_file`, then
    :func:`check_results` against ``gt_doc``): the reader ``evaluate-results``, ``compare`` and
    ``analyze-errors`` share.

    Args:
        doc: the file's parsed JSON, where the caller has read it already.

    Raises:
        UserError: a bad file or detection (the message names it), or a file without detections.
    """
    dets = load_results_file(path, doc)
    if not dets:
        raise UserError(f"results file {path} holds no detections; pass the file of a model that detected something")
    return check_results(dets, gt_doc, f"results file {path}: results")


def results_iou_types(dets: Detections, iou_types: Sequence[str] | None, path: str | os.PathLike) -> list[str]:
    """The IoU types asked for (default: bbox, plus segm when the detections have masks), checked against them."""
    wanted = list(iou_types) if iou_types else ["bbox"] + (["segm"] if dets.has_masks else [])
    if "segm" in wanted and not dets.has_masks:
        raise UserError(
            f"results file {path}: results[0] lacks 'segmentation'; LVIS segm results need image_id, category_id, "
            "score and segmentation: pass the segm results (PREFIX.segm.json) or --iou-type bbox"
        )
    return wanted


def evaluate_results(
    gt: str | os.PathLike,
    results: str | os.PathLike,
    *,
    iou_types: Sequence[str] | None = None,
    protocol: str = "standard",
    max_dets: int = 300,
) -> dict:
    """``crat-ft evaluate-results``: LVIS metrics of a results file another tool wrote.

    Args:
        iou_types: default ``bbox``, plus ``segm`` when the detections carry masks.

    Returns:
        ``{iou_type: metrics}`` (see :func:`lvis_metrics`).
    """
    gt_doc = load_lvis_json(gt)
    dets = read_results(results, gt_doc)
    wanted = results_iou_types(dets, iou_types, results)
    return {iou: lvis_metrics(gt_doc, dets, iou, max_dets, protocol=protocol) for iou in wanted}
