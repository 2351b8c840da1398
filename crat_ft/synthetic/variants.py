"""The synthetic benchmark's classes (docs/architecture.md#synthetic-benchmark): its two variants, the long tail.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
