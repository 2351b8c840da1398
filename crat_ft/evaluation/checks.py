"""Detections checked against the ground truth they are evaluated on, before any engine sees them.

Ids of the ground truth's images and categories, finite scores, boxes, and compressed RLE masks that
:func:`rle_problem` decodes before the COCO mask API, which trusts them, ever sees them. Whole columns
are checked at once; only a list that fails is walked detection by detection, to name the first bad one.
"""

from __future__ import annotations

import itertools
import numbers
import operator
from typing import Sequence

import numpy as np

from crat_ft.common.errors import UserError
from crat_ft.evaluation.detections import Detections


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


def shown(v, limit: int = 40) -> str:
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
            raise UserError(f"{name}[{i}]: expected a detection object, got {shown(det)}; pass a list of detections")
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
                raise UserError(f"{name}[{i}] {key}: expected an integer id, got {shown(v)}; fix the results file")
            if v not in known:
                raise UserError(f"{name}[{i}] has {key} {v} not in the ground truth{fix}")
    for i, det in enumerate(results):
        v = det["score"]
        if not _is_real(v) or not np.isfinite(v):
            raise UserError(f"{name}[{i}] score: expected a finite number, got {shown(v)}; fix the results file")
    if "bbox" in fields:
        for i, det in enumerate(results):
            b = det["bbox"]
            ok = isinstance(b, (list, tuple, np.ndarray)) and len(b) == 4 and all(_is_real(v) for v in b)
            if not ok or not all(np.isfinite(b)) or b[2] < 0 or b[3] < 0:
                raise UserError(
                    f"{name}[{i}] bbox: expected [x, y, width, height], 4 finite numbers with width, height >= 0, "
                    f"got {shown(b)}; fix the results file"
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
            f"{shown(counts[i], 24)} ({why}); {_MASK_FIX}"
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
            got = f"keys {sorted(seg)}" if isinstance(seg, dict) else shown(seg)
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
                f"got {shown(size)}; {_MASK_FIX}"
            )
        if not isinstance(seg["counts"], (str, bytes)):
            raise UserError(
                f"{name}[{i}] segmentation counts: expected a compressed RLE string, got {shown(seg['counts'])}; "
                f"{_MASK_FIX}"
            )
