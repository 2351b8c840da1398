"""The synthetic benchmark's images: objects drawn with their masks, one renderer per variant
(:mod:`crat_ft.synthetic.variants`): flat-coloured shapes, or marked families sharing geometry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from crat_ft.synthetic.variants import COLOURS, FAMILIES, IMAGE_SIZE, DemoDataSpec, class_layout

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


def renderer(spec: DemoDataSpec, layout: list[tuple[str, str]]):
    """``render(rng, class_indices) -> (image, kept)`` for the spec's variant."""
    if spec.variant == "families":
        geometry = class_geometries(spec.classes, spec.seed, spec.sharing)
        return lambda rng, ks: _render_families(rng, [(k + 1, geometry[k], layout[k][1]) for k in ks])
    return lambda rng, ks: _render_colour_shapes(rng, [(k + 1, layout[k][0], layout[k][1]) for k in ks])
