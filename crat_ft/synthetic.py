"""The embedded synthetic long-tailed benchmark (docs/architecture.md#synthetic-benchmark).

A class is a *shape* drawn in a *colour*: ``red_star``, ``blue_star``, ... All
classes of one shape share their geometry (box and mask statistics) and differ
only in colour, so a box regressor or mask predictor trained on a frequent
``blue_star`` is directly useful to a rare ``red_star``: this is the situation
in which cross-class transfer (CRAT) can help and be measured.

Training image counts follow a geometric (Zipf-like) long tail over classes,
arranged so that every shape *and* every colour has classes in every
frequency group: the k-th most frequent class is shape ``s = k % n_shapes``
in colour ``(k // n_shapes + s) % n_colours``. (Were colour tied to frequency,
the classes that look most alike to the network — same colour — would all be
rare together and no head class could help a tail class.)
Frequency groups use LVIS's thresholds on training image counts (rare 1-10,
common 11-100, frequent > 100). The validation split is class-balanced so that
rare-class AP (APr) is measured on enough instances.

The output is laid out as LVIS v1 is::

    OUT/annotations/lvis_v1_train.json
    OUT/annotations/lvis_v1_val.json
    OUT/train2017/000000000001.png ...
    OUT/val2017/000000100001.png ...

with ``coco_url`` paths, so mmdet's ``LVISV1Dataset`` loads it unmodified.
Generation is fully determined by the seed: same seed, same bytes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crat_ft.errors import UserError

SHAPES = ("circle", "square", "triangle", "diamond", "hexagon", "star", "cross", "halfdisc")
COLOURS = {
    # name: BGR (OpenCV order)
    "red": (40, 40, 220),
    "green": (60, 190, 60),
    "blue": (220, 90, 40),
    "yellow": (40, 220, 230),
    "magenta": (200, 60, 200),
    "cyan": (210, 210, 50),
    "orange": (30, 140, 250),
    "white": (235, 235, 235),
}
IMAGE_SIZE = 128
VAL_ID_OFFSET = 100_000
COCO_URL_PREFIX = "http://images.cocodataset.org/"
# LVIS frequency groups by number of training images: rare <= 10 < common <= 100 < frequent.
RARE_MAX_IMAGES = 10
COMMON_MAX_IMAGES = 100


def frequency_group(image_count: int) -> str:
    """LVIS frequency group ('r', 'c' or 'f') of a class seen in ``image_count`` training images."""
    if image_count <= RARE_MAX_IMAGES:
        return "r"
    if image_count <= COMMON_MAX_IMAGES:
        return "c"
    return "f"


@dataclass(frozen=True)
class DemoDataSpec:
    """Size and seed of a synthetic dataset.

    Attributes:
        seed: seed of every random choice.
        train_images: number of training images.
        val_images: number of validation images.
        classes: number of classes (at most ``len(SHAPES) * len(COLOURS)``).
        val_objects_per_image: mean number of objects in a validation image.
    """

    seed: int = 0
    train_images: int = 800
    val_images: int = 200
    classes: int = 40
    val_objects_per_image: int = 3

    def validate(self) -> None:
        max_classes = len(SHAPES) * len(COLOURS)
        if not 2 <= self.classes <= max_classes:
            raise UserError(f"--classes: expected 2..{max_classes}, got {self.classes}; pick a value in that range")
        if self.train_images < 2:
            raise UserError(f"--train-images: expected at least 2, got {self.train_images}")
        if self.val_images < 1:
            raise UserError(f"--val-images: expected at least 1, got {self.val_images}")


def class_names(num_classes: int) -> list[str]:
    """Class names in frequency order (index 0 = most frequent): ``colour_shape``."""
    colours = list(COLOURS)
    n_col = math.ceil(num_classes / len(SHAPES))
    names = []
    for k in range(num_classes):
        shape = k % len(SHAPES)
        names.append(f"{colours[(k // len(SHAPES) + shape) % n_col]}_{SHAPES[shape]}")
    return names


def train_image_counts(num_classes: int, train_images: int) -> list[int]:
    """Number of training images of each class (index 0 = most frequent).

    Geometric decay from ``train_images / 2`` images down to 1 (2 when the
    dataset is large enough to have a frequent group), which at the default
    size (800 images, 40 classes) gives 11 frequent, 16 common and 13 rare
    classes.
    """
    top = max(1.0, train_images / 2)
    bottom = 2.0 if top > 2 * COMMON_MAX_IMAGES else 1.0
    bottom = min(bottom, top)
    if num_classes == 1:
        return [int(round(top))]
    ratio = (bottom / top) ** (1.0 / (num_classes - 1))
    return [max(1, int(round(top * ratio**k))) for k in range(num_classes)]


# --------------------------------------------------------------------------- shapes


def _shape_polygon(shape: str, cx: float, cy: float, size: float, angle: float) -> np.ndarray:
    """Outline of a shape as an (N, 2) float array of (x, y) image coordinates."""
    r = size / 2
    if shape == "circle":
        t = np.linspace(0, 2 * math.pi, 32, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    elif shape == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * r * 0.8
    elif shape == "triangle":
        t = np.array([-90, 30, 150]) * math.pi / 180
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    elif shape == "diamond":
        pts = np.array([[0, -1], [0.65, 0], [0, 1], [-0.65, 0]], float) * r
    elif shape == "hexagon":
        t = np.arange(6) * math.pi / 3
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    elif shape == "star":
        t = np.arange(10) * math.pi / 5 - math.pi / 2
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        pts = np.stack([np.cos(t) * rad, np.sin(t) * rad], 1) * r
    elif shape == "cross":
        a, b = 1.0, 0.33
        pts = (
            np.array(
                [
                    [-b, -a],
                    [b, -a],
                    [b, -b],
                    [a, -b],
                    [a, b],
                    [b, b],
                    [b, a],
                    [-b, a],
                    [-b, b],
                    [-a, b],
                    [-a, -b],
                    [-b, -b],
                ]
            )
            * r
        )
    elif shape == "halfdisc":
        t = np.linspace(0, math.pi, 17)
        pts = np.stack([np.cos(t), np.sin(t) * 1.0 - 0.4], 1) * r
    else:  # pragma: no cover - SHAPES is closed
        raise AssertionError(shape)
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return pts @ rot.T + np.array([cx, cy])


def _render_image(rng: np.random.Generator, objects: list[tuple[int, str, str]]):
    """Draw one image.

    Args:
        rng: the generator (consumed in a fixed order).
        objects: ``(category_id, shape, colour)`` per object, drawn in order
            (later objects occlude earlier ones).

    Returns:
        image (H, W, 3) uint8 BGR, and per kept object ``(category_id, visible
        mask (H, W) bool)``. Objects whose visible part is too small are dropped.
    """
    import cv2

    h = w = IMAGE_SIZE
    base = rng.integers(70, 150)
    image = np.clip(base + rng.normal(0, 12, (h, w, 1)) + rng.normal(0, 4, (h, w, 3)), 0, 255).astype(np.uint8)
    masks: list[np.ndarray] = []
    kept: list[tuple[int, np.ndarray]] = []
    for category_id, shape, colour in objects:
        for _attempt in range(20):
            size = float(rng.uniform(14, 46))
            cx = float(rng.uniform(size / 2, w - size / 2))
            cy = float(rng.uniform(size / 2, h - size / 2))
            angle = float(rng.uniform(-0.35, 0.35))
            poly = _shape_polygon(shape, cx, cy, size, angle)
            mask = np.zeros((h, w), np.uint8)
            cv2.fillPoly(mask, [np.round(poly * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
            mask = mask.astype(bool)
            # limit occlusion: the new object may cover at most 30% of any earlier one
            if all((m & mask).sum() <= 0.3 * max(m.sum(), 1) for m in masks):
                break
        else:
            continue
        jitter = rng.integers(-25, 26, 3)
        col = np.clip(np.array(COLOURS[colour]) + jitter, 0, 255).astype(np.uint8)
        shade = rng.normal(0, 6, (h, w, 1))
        image[mask] = np.clip(col[None, :] + shade[mask], 0, 255).astype(np.uint8)
        masks = [m & ~mask for m in masks]
        kept = [(cid, m & ~mask) for cid, m in kept]
        masks.append(mask)
        kept.append((category_id, mask))
    kept = [(cid, m) for cid, m in kept if m.sum() >= 30]
    return image, kept


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
    out: Path, split: str, layout: list[list[int]], names: list[str], id_offset: int, rng: np.random.Generator
) -> tuple[list[dict], list[dict]]:
    import cv2

    folder = {"train": "train2017", "val": "val2017"}[split]
    (out / folder).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    num_classes = len(names)
    for idx, class_indices in enumerate(layout):
        image_id = id_offset + idx + 1
        objects = [(k + 1, names[k].split("_", 1)[1], names[k].split("_", 1)[0]) for k in class_indices]
        image, kept = _render_image(rng, objects)
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
        names = class_names(spec.classes)
        counts = train_image_counts(spec.classes, spec.train_images)
        splits = {}
        for split, layout, offset in (
            ("train", _layout_train(spec, rng, counts), 0),
            ("val", _layout_val(spec, rng), VAL_ID_OFFSET),
        ):
            if progress:
                print(f"make-demo-data: rendering {len(layout)} {split} images", flush=True)
            splits[split] = _write_split(tmp, split, layout, names, offset, rng)

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
                    "def": f"a {name.replace('_', ' ')} drawn on a noisy background",
                    "frequency": frequency_group(len(image_sets[cid])),
                    "image_count": len(image_sets[cid]),
                    "instance_count": instance_counts[cid],
                }
            )
        (tmp / "annotations").mkdir()
        for split, (images, anns) in splits.items():
            for i, ann in enumerate(anns):
                ann["id"] = i + 1
            doc = {
                "info": {"description": f"crat-ft synthetic long-tailed shapes ({split})", "version": "1.0"},
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
            f"{spec.classes} classes: {groups['r']} rare, {groups['c']} common, {groups['f']} frequent)",
            flush=True,
        )
    return out
