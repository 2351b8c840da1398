"""Which RoIs of a training image the feature cache keeps (docs/architecture.md#cache-schema).

Shape legend: ``G`` ground-truth boxes of an image, ``R`` candidate RoIs
(``G`` gt boxes first, then the RPN proposals, as mmdet's sampler with
``add_gt_as_proposals`` sees them). Labels: foreground ``0..C-1``, background ``C``.

The policy keeps:

- per gt box of class c, an expected ``box_pos_per_class / instance_count(c)``
  of its positives (all of them for rare classes; frequent classes are
  capped); at most ``max_pos_per_image`` positives per image;
- per gt box, an expected ``mask_pos_per_class / instance_count(c)`` of those
  with mask features (mask features are ~200x larger than box features);
- ``neg_per_image`` random background RoIs (the classifier needs them).

Every random choice comes from the image's own generator, seeded by
``(seed, image_id, view)``, so an image's block does not depend on sharding,
batching or resumption. :func:`project_size` turns the policy into bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from crat_ft.cache import ROI_META_BYTES
from crat_ft.common.errors import UserError


@dataclass(frozen=True)
class RoIPolicy:
    """Which RoIs of an image are cached (see the module docstring)."""

    max_pos_per_image: int = 64
    neg_per_image: int = 16
    box_pos_per_class: int = 2000
    mask_pos_per_class: int = 64
    seed: int = 0
    flip: bool = False

    def validate(self) -> None:
        for name in ("max_pos_per_image", "neg_per_image", "box_pos_per_class", "mask_pos_per_class"):
            if getattr(self, name) < 0:
                raise UserError(f"RoI policy {name}: expected >= 0, got {getattr(self, name)}")


def _quota_pick(rng: np.random.Generator, candidates: np.ndarray, quota: float) -> np.ndarray:
    """Pick an expected ``quota`` of ``candidates``: ceil(quota) of them if quota >= 1, else one with probability quota."""
    if len(candidates) == 0:
        return candidates
    if quota >= 1:
        k = min(len(candidates), math.ceil(quota))
        return np.sort(rng.choice(candidates, size=k, replace=False))
    if rng.random() < quota:
        return candidates[[int(rng.integers(len(candidates)))]]
    return candidates[:0]


def select_rois(
    gt_inds: np.ndarray, gt_labels: np.ndarray, instance_count: np.ndarray, policy: RoIPolicy, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Choose cached RoIs of one image.

    Args:
        gt_inds: (R,) assigner output: 0 background, -1 ignored, g > 0 matched to gt g-1.
        gt_labels: (G,) class of each gt.
        instance_count: (C,) training instances per class (sets the per-class caps).
        policy: the RoI policy.
        rng: the image's generator.

    Returns:
        ``(rows, mask_rows)``: sorted indices into R of the selected RoIs
        (positives then negatives), and the subset of ``rows`` positions that
        get a cached mask.
    """
    pos_by_gt = []
    mask_by_gt = []
    for g in range(len(gt_labels)):
        cand = np.nonzero(gt_inds == g + 1)[0]
        c = int(gt_labels[g])
        box_q = policy.box_pos_per_class / max(1, int(instance_count[c]))
        picked = _quota_pick(rng, cand, box_q)
        mask_q = policy.mask_pos_per_class / max(1, int(instance_count[c]))
        pos_by_gt.append(picked)
        mask_by_gt.append(_quota_pick(rng, picked, mask_q))
    pos = np.concatenate(pos_by_gt) if pos_by_gt else np.zeros(0, np.int64)
    masked = np.concatenate(mask_by_gt) if mask_by_gt else np.zeros(0, np.int64)
    if len(pos) > policy.max_pos_per_image:
        pos = np.sort(rng.choice(pos, size=policy.max_pos_per_image, replace=False))
        masked = np.intersect1d(masked, pos)
    neg_cand = np.nonzero(gt_inds == 0)[0]
    neg = (
        np.sort(rng.choice(neg_cand, size=min(policy.neg_per_image, len(neg_cand)), replace=False))
        if len(neg_cand)
        else neg_cand
    )
    rows = np.concatenate([np.sort(pos), neg]).astype(np.int64)
    mask_rows = np.nonzero(np.isin(rows, masked))[0].astype(np.int64)
    return rows, mask_rows


def project_size(
    *,
    n_images: int,
    instance_count: np.ndarray,
    policy: RoIPolicy,
    pos_per_gt: float,
    neg_per_image: float,
    box_bytes: int,
    mask_bytes: int,
    mask_size: int,
) -> dict:
    """Projected cache size in bytes, by part, for a whole dataset.

    Expected cached positives of class c: ``min(box_pos_per_class, n_c * pos_per_gt)``
    (n_c its instances, ``pos_per_gt`` positives per gt measured on sample
    images); masks: ``min(mask_pos_per_class, that)``; negatives:
    ``n_images * neg_per_image``. The per-class caps also give an upper bound
    that does not depend on the measurement (``bound``).
    """
    views = 2 if policy.flip else 1
    pos = np.minimum(policy.box_pos_per_class, instance_count * pos_per_gt) * views
    masks = np.minimum(policy.mask_pos_per_class, pos)
    neg = n_images * neg_per_image * views
    target_bytes = (mask_size * mask_size + 7) // 8
    parts = {
        "box features (positives)": pos.sum() * (box_bytes + ROI_META_BYTES),
        "box features (negatives)": neg * (box_bytes + ROI_META_BYTES),
        "mask features": masks.sum() * (mask_bytes + 8),
        "mask targets": masks.sum() * target_bytes,
    }
    c = len(instance_count)
    bound = (
        c * policy.box_pos_per_class * views * (box_bytes + ROI_META_BYTES)
        + n_images * policy.neg_per_image * views * (box_bytes + ROI_META_BYTES)
        + c * policy.mask_pos_per_class * views * (mask_bytes + 8 + target_bytes)
    )
    return {
        "parts": {k: float(v) for k, v in parts.items()},
        "total": float(sum(parts.values())),
        "bound": float(bound),
    }
