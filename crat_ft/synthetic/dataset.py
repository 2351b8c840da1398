"""The embedded synthetic long-tailed benchmark (docs/architecture.md#synthetic-benchmark).

Two variants, both in LVIS v1 format with the same Zipf-like long tail:

``families`` (the default, what ``crat-ft demo`` uses)
    Classes come in *families* (``alpha``, ``beta``, ...) that share geometry:
    a smooth silhouette, an aspect ratio and a thin, low-contrast appendage
    (like a cup's handle or an antenna) that the box and mask include but the
    salient pixels do not show. What identifies a class inside its family is a
    *marking* (``alpha_striped``, ``alpha_dotted``, ...), drawn separately from
    the geometry. Appearance varies per instance (base colour, shading, noise;
    some objects barely differ from the background), so a mask must follow the
    shape and cannot be looked up by colour. The sharing knob ``s`` in [0, 1]
    sets how much geometry a family shares: each class's geometry parameters
    are ``s * family + (1 - s) * own``, so at ``s = 1`` all members of a family
    have the same silhouette and extent statistics and at ``s = 0`` each
    class's geometry is independent. The geometry draws do not depend on
    ``s``: two datasets with the same seed differ only in how much is shared.

``colour-shapes``
    A class is a flat-coloured *shape* in a *colour* (``red_star``): all
    classes of one shape share their geometry, and a mask is the pixels of the
    object's colour.

Training image counts follow a geometric (Zipf-like) long tail over classes,
arranged so that every family (shape) *and* every marking (colour) has classes
in every frequency group: the k-th most frequent class is family
``f = k % n_families`` with marking ``(k // n_families + f) % n_markings``.
(Were the marking tied to frequency, the classes that look most alike to the
network would all be rare together and no head class could help a tail class.)
Frequency groups use LVIS's thresholds on training image counts (rare 1-10,
common 11-100, frequent > 100). The validation split is class-balanced so that
rare-class AP (APr) is measured on enough instances. Each category records its
``family``; the annotation files' ``info`` records the variant and ``s``.

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
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crat_ft.common.errors import UserError

VARIANTS = ("families", "colour-shapes")
DEFAULT_SHARING = 0.5
FAMILIES = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta")
MARKINGS = ("striped", "banded", "slashed", "checked", "dotted", "ringed", "spotted", "crossed")
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
    """What to generate.

    Attributes:
        seed: seed of every random choice.
        train_images: number of training images.
        val_images: number of validation images.
        classes: number of classes (at most 64).
        val_objects_per_image: mean number of objects in a validation image.
        variant: ``"families"`` or ``"colour-shapes"`` (see the module docstring).
        sharing: the families variant's sharing knob ``s`` in [0, 1].
    """

    seed: int = 0
    train_images: int = 800
    val_images: int = 200
    classes: int = 40
    val_objects_per_image: int = 3
    variant: str = "families"
    sharing: float = DEFAULT_SHARING

    @property
    def recorded_sharing(self) -> float | None:
        """``sharing`` as the annotation files' ``info`` records it: None for ``colour-shapes``, which has no knob."""
        return self.sharing if self.variant == "families" else None

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise UserError(f"--variant: expected one of {', '.join(VARIANTS)}, got {self.variant!r}")
        families, markings = _axes(self.variant)
        max_classes = len(families) * len(markings)
        if not 2 <= self.classes <= max_classes:
            raise UserError(f"--classes: expected 2..{max_classes}, got {self.classes}; pick a value in that range")
        if not 0.0 <= self.sharing <= 1.0:
            raise UserError(f"--sharing: expected a value in [0, 1], got {self.sharing}")
        if self.train_images < 2:
            raise UserError(f"--train-images: expected at least 2, got {self.train_images}")
        if self.val_images < 1:
            raise UserError(f"--val-images: expected at least 1, got {self.val_images}")


def _axes(variant: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(geometry families, identity markings) of a variant."""
    return (FAMILIES, MARKINGS) if variant == "families" else (SHAPES, tuple(COLOURS))


def class_layout(num_classes: int, variant: str = "families") -> list[tuple[str, str]]:
    """``(family, marking)`` of each class in frequency order (index 0 = most frequent).

    For ``colour-shapes`` the family is the shape and the marking the colour.
    """
    families, markings = _axes(variant)
    n_mark = math.ceil(num_classes / len(families))
    return [
        (families[k % len(families)], markings[(k // len(families) + k % len(families)) % n_mark])
        for k in range(num_classes)
    ]


def class_names(num_classes: int, variant: str = "families") -> list[str]:
    """Class names in frequency order: ``family_marking`` (``colour_shape`` for ``colour-shapes``)."""
    if variant == "families":
        return [f"{f}_{m}" for f, m in class_layout(num_classes, variant)]
    return [f"{c}_{s}" for s, c in class_layout(num_classes, variant)]


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


def _place(rng: np.random.Generator, min_size: float, max_size: float) -> tuple[float, float, float]:
    """An object's size and a centre that keeps it inside the image (three draws, in this order)."""
    size = float(rng.uniform(min_size, max_size))
    cx = float(rng.uniform(size / 2, IMAGE_SIZE - size / 2))
    cy = float(rng.uniform(size / 2, IMAGE_SIZE - size / 2))
    return size, cx, cy


def _fill_polygon(poly: np.ndarray) -> np.ndarray:
    """The (H, W) bool mask of a polygon (N, 2) in pixel coordinates, at 1/16 pixel precision."""
    import cv2

    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    cv2.fillPoly(mask, [np.round(poly * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def _occludes_at_most(kept: list[tuple[int, np.ndarray]], mask: np.ndarray, limit: float) -> bool:
    """Whether ``mask`` would cover at most ``limit`` of every object drawn so far."""
    return all((m & mask).sum() <= limit * max(m.sum(), 1) for _, m in kept)


def _paste(kept: list[tuple[int, np.ndarray]], category_id: int, mask: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """The visible masks after drawing ``mask`` on top of the objects drawn so far."""
    return [(cid, m & ~mask) for cid, m in kept] + [(category_id, mask)]


def _visible(kept: list[tuple[int, np.ndarray]], min_pixels: int = 30) -> list[tuple[int, np.ndarray]]:
    """The objects with at least ``min_pixels`` visible pixels."""
    return [(cid, m) for cid, m in kept if m.sum() >= min_pixels]


def _render_colour_shapes(rng: np.random.Generator, objects: list[tuple[int, str, str]]):
    """Draw one image.

    Args:
        rng: the generator (consumed in a fixed order).
        objects: ``(category_id, shape, colour)`` per object, drawn in order
            (later objects occlude earlier ones).

    Returns:
        image (H, W, 3) uint8 BGR, and per kept object ``(category_id, visible
        mask (H, W) bool)``. Objects whose visible part is too small are dropped.
    """

    h = w = IMAGE_SIZE
    base = rng.integers(70, 150)
    image = np.clip(base + rng.normal(0, 12, (h, w, 1)) + rng.normal(0, 4, (h, w, 3)), 0, 255).astype(np.uint8)
    kept: list[tuple[int, np.ndarray]] = []
    for category_id, shape, colour in objects:
        for _attempt in range(20):
            size, cx, cy = _place(rng, 14, 46)
            angle = float(rng.uniform(-0.35, 0.35))
            mask = _fill_polygon(_shape_polygon(shape, cx, cy, size, angle))
            # limit occlusion: the new object may cover at most 30% of any earlier one
            if _occludes_at_most(kept, mask, 0.3):
                break
        else:
            continue
        jitter = rng.integers(-25, 26, 3)
        col = np.clip(np.array(COLOURS[colour]) + jitter, 0, 255).astype(np.uint8)
        shade = rng.normal(0, 6, (h, w, 1))
        image[mask] = np.clip(col[None, :] + shade[mask], 0, 255).astype(np.uint8)
        kept = _paste(kept, category_id, mask)
    kept = _visible(kept)
    return image, kept


# --------------------------------------------------------------------------- families

N_HARMONICS = 4  # silhouette harmonics 2..5 of the radius


@dataclass(frozen=True)
class Geometry:
    """What a class's objects share: silhouette, extent and thin part.

    Attributes:
        harmonics: complex amplitudes of the radius's harmonics 2..5
            (``r(t) = 1 + Re(sum_k a_k exp(i k t))``).
        log_aspect: log of width / height before rotation.
        appendage: (dx, dy) of the thin part, in units of the object size,
            from the silhouette's centre outwards.
    """

    harmonics: np.ndarray
    log_aspect: float
    appendage: np.ndarray

    @staticmethod
    def draw(rng: np.random.Generator) -> "Geometry":
        decay = 0.2 / np.arange(1, N_HARMONICS + 1) ** 0.5
        harmonics = (rng.normal(0, 1, N_HARMONICS) + 1j * rng.normal(0, 1, N_HARMONICS)) * decay
        angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(0.7, 1.05)
        return Geometry(
            harmonics=harmonics,
            log_aspect=float(rng.uniform(math.log(0.55), math.log(1.8))),
            appendage=np.array([math.cos(angle), math.sin(angle)]) * length,
        )

    def blend(self, own: "Geometry", s: float) -> "Geometry":
        """``s * self + (1 - s) * own``, parameter by parameter."""
        return Geometry(
            harmonics=s * self.harmonics + (1 - s) * own.harmonics,
            log_aspect=s * self.log_aspect + (1 - s) * own.log_aspect,
            appendage=s * self.appendage + (1 - s) * own.appendage,
        )


def class_geometries(num_classes: int, seed: int, sharing: float) -> list[Geometry]:
    """Geometry of each class of the families variant.

    Drawn from their own generator (seeded by ``seed`` alone), family first and
    then each class's own, so datasets of any ``sharing`` have the same draws.
    """
    rng = np.random.default_rng([seed, 0x5EED])
    family_geometry = {f: Geometry.draw(rng) for f in FAMILIES}
    own = [Geometry.draw(rng) for _ in range(num_classes)]
    layout = class_layout(num_classes, "families")
    return [family_geometry[f].blend(own[k], sharing) for k, (f, _) in enumerate(layout)]


def _marking(marking: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pixels of a marking, in object coordinates (u, v in units of the object size)."""
    period = 0.45
    if marking == "striped":
        return np.sin(2 * math.pi * v / period) > 0.3
    if marking == "banded":
        return np.sin(2 * math.pi * u / period) > 0.3
    if marking == "slashed":
        return np.sin(2 * math.pi * (u + v) / period / math.sqrt(2)) > 0.3
    if marking == "checked":
        return np.sin(2 * math.pi * u / period) * np.sin(2 * math.pi * v / period) > 0
    if marking == "dotted":
        return np.hypot((u / period + 10.5) % 1 - 0.5, (v / period + 10.5) % 1 - 0.5) < 0.28
    if marking == "ringed":
        return np.sin(2 * math.pi * np.hypot(u, v) / period) > 0.2
    if marking == "spotted":
        return np.hypot(u, v) < 0.17
    if marking == "crossed":
        return (np.abs(u) < 0.07) | (np.abs(v) < 0.07)
    raise AssertionError(marking)  # pragma: no cover - MARKINGS is closed


def _family_object(rng: np.random.Generator, geometry: Geometry, size: float, cx: float, cy: float):
    """Body polygon (N, 2) and appendage segment ((x0, y0), (x1, y1)) of one instance."""
    t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    jitter = rng.normal(0, 0.03, N_HARMONICS) + 1j * rng.normal(0, 0.03, N_HARMONICS)
    k = np.arange(2, 2 + N_HARMONICS)
    radius = 1 + np.real(np.exp(1j * np.outer(t, k)) @ (geometry.harmonics + jitter))
    radius = np.clip(radius, 0.35, None) * size / 2
    aspect = math.exp(geometry.log_aspect + rng.normal(0, 0.05))
    pts = np.stack([np.cos(t) * math.sqrt(aspect), np.sin(t) / math.sqrt(aspect)], 1) * radius[:, None]
    angle = float(rng.uniform(-0.3, 0.3))
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    centre = np.array([cx, cy])
    tip = rot @ (geometry.appendage * size * (1 + rng.normal(0, 0.05)))
    return pts @ rot.T + centre, (centre, centre + tip), angle


def _render_families(
    rng: np.random.Generator, objects: list[tuple[int, Geometry, str]]
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Draw one image of the families variant.

    Args:
        rng: the generator (consumed in a fixed order).
        objects: ``(category_id, geometry, marking)`` per object, drawn in
            order (later objects occlude earlier ones).

    Returns:
        image (H, W, 3) uint8 BGR, and per kept object ``(category_id, visible
        mask (H, W) bool)``. Objects whose visible part is too small are dropped.
    """
    import cv2

    h = w = IMAGE_SIZE
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(60, 170, 3)
    tilt = rng.normal(0, 0.25, (2, 3))
    image = base + (xx[..., None] - w / 2) * tilt[0] + (yy[..., None] - h / 2) * tilt[1]
    image = image + rng.normal(0, 10, (h, w, 1)) + rng.normal(0, 4, (h, w, 3))
    kept: list[tuple[int, np.ndarray]] = []
    for category_id, geometry, marking in objects:
        for _attempt in range(20):
            size, cx, cy = _place(rng, 22, 48)
            poly, (p0, p1), angle = _family_object(rng, geometry, size, cx, cy)
            body = _fill_polygon(poly)
            thin = np.zeros((h, w), np.uint8)
            width = max(2, int(round(size / 14)))
            cv2.line(
                thin, tuple(np.round(p0 * 16).astype(int)), tuple(np.round(p1 * 16).astype(int)), 1, width, shift=4
            )
            thin = thin.astype(bool) & ~body
            mask = body | thin
            # limit occlusion: the new object may cover at most 35% of any earlier one
            if _occludes_at_most(kept, mask, 0.35):
                break
        else:
            continue
        local = image[mask].mean(0)
        if rng.random() < 0.2:  # low contrast: the object is close to what surrounds it
            colour = local + rng.uniform(-28, 28, 3)
        else:
            colour = rng.uniform(20, 235, 3)
        c, s = math.cos(angle), math.sin(angle)
        u = ((xx - cx) * c + (yy - cy) * s) / size
        v = (-(xx - cx) * s + (yy - cy) * c) / size
        phi = rng.uniform(0, 2 * math.pi)
        shade = (u * math.cos(phi) + v * math.sin(phi))[..., None] * rng.uniform(20, 60)
        contrast = rng.uniform(55, 90) * (-1 if colour.mean() > 128 else 1)
        paint = colour + shade + rng.normal(0, 6, (h, w, 1))
        paint = paint + _marking(marking, u, v)[..., None] * contrast
        image[body] = paint[body]
        # the thin part: most of the way to the background, thin and faint
        if thin.any():
            image[thin] = 0.35 * (colour + shade[thin].mean()) + 0.65 * image[thin]
        kept = _paste(kept, category_id, mask)
    kept = _visible(kept)
    return np.clip(image, 0, 255).astype(np.uint8), kept


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


def _renderer(spec: DemoDataSpec, layout: list[tuple[str, str]]):
    """``render(rng, class_indices) -> (image, kept)`` for the spec's variant."""
    if spec.variant == "families":
        geometry = class_geometries(spec.classes, spec.seed, spec.sharing)
        return lambda rng, ks: _render_families(rng, [(k + 1, geometry[k], layout[k][1]) for k in ks])
    return lambda rng, ks: _render_colour_shapes(rng, [(k + 1, layout[k][0], layout[k][1]) for k in ks])


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
        render = _renderer(spec, layout)
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
