"""LVIS-format annotation files: reading, checking, category order.

mmdet's LVIS datasets give category ``k`` the label of its rank in sorted
category-id order; :func:`categories_by_id` is that order, used everywhere a
label is mapped to a category.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from crat_ft.errors import UserError


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
    cat_ids = {c["id"] for c in doc["categories"]}
    for i, ann in enumerate(doc["annotations"]):
        if ann["category_id"] not in cat_ids:
            raise UserError(f"{name}: annotations[{i}] has category_id {ann['category_id']} not in 'categories'")


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
