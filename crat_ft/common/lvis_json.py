"""LVIS-format annotation files: reading, checking, category order.

mmdet's LVIS datasets give category ``k`` the label of its rank in sorted
category-id order; :func:`categories_by_id` is that order, used everywhere a
label is mapped to a category.
"""

from __future__ import annotations

import itertools
import json
import math
import numbers
import os
from pathlib import Path

import numpy as np

from crat_ft.common.errors import UserError


def load_lvis_json(path: str | os.PathLike) -> dict:
    """Read and check an LVIS-format annotation file.

    Raises:
        UserError: the file is missing, not JSON, or lacks LVIS fields; the
            message names the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"annotation file {path} does not exist; check the path (make one with `crat-ft make-demo-data`)"
        )
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
        raise UserError(
            f"{name}: expected an LVIS JSON object, got {type(doc).__name__}; pass an LVIS v1 annotation file"
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise UserError(
                f"{name}: expected a list under '{key}', got {type(doc.get(key)).__name__}; this is not an LVIS v1 annotation file"
            )
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
                    "LVIS v1 needs them (see `crat-ft make-demo-data` for an example)"
                )
    for i, img in enumerate(doc["images"]):
        if "coco_url" not in img and "file_name" not in img:
            raise UserError(
                f"{name}: images[{i}] has neither 'coco_url' nor 'file_name'; LVIS v1 images need 'coco_url'"
            )
    bad = [c["frequency"] for c in doc["categories"] if c["frequency"] not in ("r", "c", "f")]
    if bad:
        raise UserError(f"{name}: category frequency must be 'r', 'c' or 'f', got {bad[0]!r}")
    if not _columns_ok(doc):
        _first_bad_entry(doc, name)
    cat_ids = {c["id"] for c in doc["categories"]}
    for i, ann in enumerate(doc["annotations"]):
        if ann["category_id"] not in cat_ids:
            raise UserError(f"{name}: annotations[{i}] has category_id {ann['category_id']} not in 'categories'")


_ID_FIELDS = (("categories", ("id",)), ("images", ("id", "height", "width")),
              ("annotations", ("id", "image_id", "category_id")))  # fmt: skip


def _types(values) -> set:
    return set(map(type, values))


def _columns_ok(doc: dict) -> bool:
    """Whether the ids, image sizes, references and annotation geometry are sound, checked on whole
    columns of plain JSON values (an LVIS train file in a second); :func:`_first_bad_entry` names the
    first entry that is not."""
    for key, fields in _ID_FIELDS:
        for f in fields:
            if not _types(item[f] for item in doc[key]) <= {int}:
                return False
        ids = [item["id"] for item in doc[key]]
        if len(set(ids)) != len(ids):
            return False
    if any(img["height"] < 1 or img["width"] < 1 for img in doc["images"]):
        return False
    anns = doc["annotations"]
    if not {a["image_id"] for a in anns} <= {img["id"] for img in doc["images"]}:
        return False
    boxes = [a["bbox"] for a in anns]
    if not _types(boxes) <= {list} or not set(map(len, boxes)) <= {4}:
        return False
    areas = [a["area"] for a in anns]
    if not _types(itertools.chain(areas, itertools.chain.from_iterable(boxes))) <= {int, float}:
        return False
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    a = np.asarray(areas, np.float64)
    return bool(np.isfinite(b).all() and (b[:, 2:] >= 0).all() and np.isfinite(a).all() and (a >= 0).all())


def _first_bad_entry(doc: dict, name: str) -> None:
    """Walk the entries in order and raise for the first whose ids, size, image or geometry is wrong."""
    for key, fields in _ID_FIELDS:
        for i, item in enumerate(doc[key]):
            for f in fields:
                if not _is_int(item[f]):
                    raise UserError(
                        f"{name}: {key}[{i}] {f}: expected an integer, got {item[f]!r}; fix the annotation file"
                    )
        _refuse_duplicate_ids(doc[key], key, name)
    for i, img in enumerate(doc["images"]):
        if img["height"] < 1 or img["width"] < 1:
            raise UserError(
                f"{name}: images[{i}] is {img['height']}x{img['width']} pixels; expected a positive height and width"
            )
    image_ids = {img["id"] for img in doc["images"]}
    for i, ann in enumerate(doc["annotations"]):
        if ann["image_id"] not in image_ids:
            raise UserError(
                f"{name}: annotations[{i}] has image_id {ann['image_id']} not in 'images'; "
                "every annotation belongs to an image of the file: fix or regenerate it"
            )
        box, area = ann["bbox"], ann["area"]
        if (
            not (isinstance(box, (list, tuple)) and len(box) == 4 and all(_is_real(v) for v in box))
            or not all(math.isfinite(v) for v in box)
            or box[2] < 0
            or box[3] < 0
        ):
            raise UserError(
                f"{name}: annotations[{i}] bbox: expected [x, y, width, height], 4 finite numbers with "
                f"width, height >= 0, got {box!r}; fix the annotation file"
            )
        if not _is_real(area) or not math.isfinite(area) or area < 0:
            raise UserError(f"{name}: annotations[{i}] area: expected a finite number >= 0, got {area!r}")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _refuse_duplicate_ids(items: list[dict], key: str, name: str) -> None:
    """One line naming the first id that two entries of ``items`` share."""
    seen: dict[int, int] = {}
    for i, item in enumerate(items):
        first = seen.setdefault(item["id"], i)
        if first != i:
            raise UserError(
                f"{name}: {key}[{first}] and {key}[{i}] both have id {item['id']}; expected unique ids, "
                f"every one of the {key} once: fix the annotation file"
            )


def categories_by_id(doc: dict) -> list[dict]:
    """The categories of an LVIS document in label order (sorted by id)."""
    return sorted(doc["categories"], key=lambda c: c["id"])


def categories_with_counts(doc: dict) -> list[dict]:
    """:func:`categories_by_id`, each with ``instance_count`` (counted from the annotations when absent)."""
    cats = categories_by_id(doc)
    if any("instance_count" not in c for c in cats):
        counts: dict[int, int] = {}
        for a in doc["annotations"]:
            counts[a["category_id"]] = counts.get(a["category_id"], 0) + 1
        cats = [dict(c, instance_count=counts.get(c["id"], 0)) for c in cats]
    return cats
