"""The synthetic benchmark written as an LVIS v1 dataset (docs/architecture.md#synthetic-benchmark).

Classes and counts come from :mod:`crat_ft.synthetic.variants`, images from :mod:`crat_ft.synthetic.render`.

The output is laid out as LVIS v1 is::

    OUT/annotations/lvis_v1_train.json
    OUT/annotations/lvis_v1_val.json
    OUT/train2017/000000000001.png ...
    OUT/val2017/000000100001.png ...

with ``coco_url`` paths, so mmdet's ``LVISV1Dataset`` loads it unmodified.
Generation is fully determined by the variant, ``s`` and the seed: same
inputs, same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from crat_ft.common.errors import UserError
from crat_ft.synthetic.render import renderer
from crat_ft.synthetic.variants import (
    IMAGE_SIZE,
    DemoDataSpec,
    class_layout,
    class_names,
    frequency_group,
    train_image_counts,
)

VAL_ID_OFFSET = 100_000
COCO_URL_PREFIX = "http://images.cocodataset.org/"


def _mask_to_annotation(mask: np.ndarray) -> dict | None:
    """LVIS annotation fields (polygon ``segmentation``, ``bbox``, ``area``) of a binary mask."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]
    if not polygons:
        return None
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    return {
        "segmentation": polygons,
        "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
        "area": float(mask.sum()),
    }


# --------------------------------------------------------------------------- splits


def _layout_train(spec: DemoDataSpec, rng: np.random.Generator, counts: list[int]) -> list[list[int]]:
    """Class indices per training image: class k appears in ``counts[k]`` distinct images."""
    per_image: list[list[int]] = [[] for _ in range(spec.train_images)]
    for k, n in enumerate(counts):
        for i in rng.choice(spec.train_images, size=min(n, spec.train_images), replace=False):
            per_image[int(i)].append(k)
    for objs in per_image:
        rng.shuffle(objs)
    return per_image


def _layout_val(spec: DemoDataSpec, rng: np.random.Generator) -> list[list[int]]:
    """Class indices per validation image: classes cycle uniformly (balanced)."""
    total = spec.val_images * spec.val_objects_per_image
    labels = np.arange(total) % spec.classes
    rng.shuffle(labels)
    per_image = [[] for _ in range(spec.val_images)]
    for j, k in enumerate(labels):
        per_image[j % spec.val_images].append(int(k))
    return per_image


def _write_split(
    out: Path, split: str, layout: list[list[int]], num_classes: int, id_offset: int, rng: np.random.Generator, render
) -> tuple[list[dict], list[dict]]:
    import cv2

    folder = {"train": "train2017", "val": "val2017"}[split]
    (out / folder).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for idx, class_indices in enumerate(layout):
        image_id = id_offset + idx + 1
        image, kept = render(rng, class_indices)
        file_name = f"{folder}/{image_id:012d}.png"
        cv2.imwrite(str(out / file_name), image)
        present = set()
        for category_id, mask in kept:
            ann = _mask_to_annotation(mask)
            if ann is None:
                continue
            present.add(category_id)
            annotations.append({"id": 0, "image_id": image_id, "category_id": category_id, **ann})
        absent = [c for c in range(1, num_classes + 1) if c not in present]
        n_neg = min(len(absent), max(1, num_classes // 2))
        neg = sorted(int(c) for c in rng.choice(absent, size=n_neg, replace=False)) if absent else []
        # a few images mark a present class as not exhaustively annotated, as LVIS does
        not_exhaustive = []
        if present and rng.random() < 0.05:
            not_exhaustive = [int(rng.choice(sorted(present)))]
        images.append(
            {
                "id": image_id,
                "width": IMAGE_SIZE,
                "height": IMAGE_SIZE,
                "coco_url": COCO_URL_PREFIX + file_name,
                "flickr_url": "",
                "license": 1,
                "date_captured": "2026-01-01 00:00:00",
                "neg_category_ids": neg,
                "not_exhaustive_category_ids": not_exhaustive,
            }
        )
    return images, annotations


def _variant_label(spec: DemoDataSpec) -> str:
    if spec.variant == "families":
        return f"marked families sharing geometry (s={spec.sharing:g})"
    return "colour x shape"


def _definition(spec: DemoDataSpec, family_marking: tuple[str, str]) -> str:
    family, marking = family_marking
    if spec.variant == "families":
        return f"a {marking} member of the {family} family of silhouettes, on a noisy background"
    return f"a {marking} {family} drawn on a noisy background"


def make_demo_data(out: str | os.PathLike, spec: DemoDataSpec = DemoDataSpec(), *, progress: bool = True) -> Path:
    """Write the synthetic long-tailed LVIS-format dataset to ``out``.

    The dataset is written to a temporary directory beside ``out`` and renamed
    when complete, so an interrupted run never leaves a dataset that looks
    finished.

    Args:
        out: output directory; must not exist or be empty.
        spec: sizes and seed.
        progress: print one line per split.

    Returns:
        The output directory.

    Raises:
        UserError: bad sizes, or ``out`` is a non-empty directory.
    """
    spec.validate()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"make-demo-data: {out} already exists and is not empty; choose a new OUT or delete it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        rng = np.random.default_rng(spec.seed)
        names = class_names(spec.classes, spec.variant)
        layout = class_layout(spec.classes, spec.variant)
        render = renderer(spec, layout)
        counts = train_image_counts(spec.classes, spec.train_images)
        splits = {}
        for split, images_layout, offset in (
            ("train", _layout_train(spec, rng, counts), 0),
            ("val", _layout_val(spec, rng), VAL_ID_OFFSET),
        ):
            if progress:
                print(f"make-demo-data: rendering {len(images_layout)} {split} images", flush=True)
            splits[split] = _write_split(tmp, split, images_layout, spec.classes, offset, rng, render)

        # category statistics come from what was actually written to train
        train_images, train_anns = splits["train"]
        image_sets: dict[int, set] = {k + 1: set() for k in range(spec.classes)}
        instance_counts = {k + 1: 0 for k in range(spec.classes)}
        for ann in train_anns:
            image_sets[ann["category_id"]].add(ann["image_id"])
            instance_counts[ann["category_id"]] += 1
        categories = []
        for k, name in enumerate(names):
            cid = k + 1
            categories.append(
                {
                    "id": cid,
                    "name": name,
                    "synset": f"{name}.n.01",
                    "synonyms": [name],
                    "def": _definition(spec, layout[k]),
                    "frequency": frequency_group(len(image_sets[cid])),
                    "image_count": len(image_sets[cid]),
                    "instance_count": instance_counts[cid],
                    "family": layout[k][0],
                }
            )
        (tmp / "annotations").mkdir()
        for split, (images, anns) in splits.items():
            for i, ann in enumerate(anns):
                ann["id"] = i + 1
            doc = {
                "info": {
                    "description": f"crat-ft synthetic long-tailed benchmark, {_variant_label(spec)} ({split})",
                    "version": "1.0",
                    "variant": spec.variant,
                    "sharing": spec.recorded_sharing,
                },
                "licenses": [{"id": 1, "name": "CC0", "url": ""}],
                "categories": categories,
                "images": images,
                "annotations": anns,
            }
            with open(tmp / "annotations" / f"lvis_v1_{split}.json", "w") as f:
                json.dump(doc, f, separators=(",", ":"))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        groups = {g: sum(c["frequency"] == g for c in categories) for g in "rcf"}
        print(
            f"make-demo-data: wrote {out} ({spec.train_images} train / {spec.val_images} val images, "
            f"{spec.classes} classes of {_variant_label(spec)}: {groups['r']} rare, {groups['c']} common, {groups['f']} frequent)",
            flush=True,
        )
    return out
