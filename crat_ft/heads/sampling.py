"""Samplers over cached RoIs for the decoupled stage (docs/architecture.md#rebalanced-classifier).

A sampler yields one item per training step: ``{"rois": (N,) int64, "masks":
(M,) int64}`` indices into the cache's RoI and mask tables. Of the N RoIs,
``pos_fraction`` are positives drawn by the chosen strategy and the rest are
background RoIs drawn uniformly (the classifier must see background). Masks
are drawn by the same strategy from the cached masks.

Strategies for positives (C foreground classes; background label = C):

- ``random``: uniform over positive RoIs (what end-to-end training sees);
- ``class_balanced``: a class uniformly, then one of its RoIs (cRT);
- ``bilevel``: a class uniformly, then an image containing it, then one of
  that image's RoIs of the class (SimCal);
- ``repeat_factor``: RoIs weighted by their image's LVIS repeat factor
  ``r_i = max_{c in i} max(1, sqrt(t / f_c))``, f_c the fraction of images
  containing c (t = 1e-3).

Masks are drawn in groups of up to ``mask_group`` rows that are adjacent in
the cache (same image, same class — usually the same object): the strategy
picks the group's first mask, and a group is one read. Mask features are
~100 KiB per row, so this block-level draw is what keeps random batches near
sequential read speed (docs/architecture.md#cache-schema); ``mask_group=1`` draws masks one by one.

Every step's draw is seeded by ``(seed, epoch, step)``, so the stream is the
same whatever the number of DataLoader workers and after a resume.
"""

from __future__ import annotations

import numpy as np
import torch

from crat_ft.common.errors import UserError

STRATEGIES = ("random", "class_balanced", "bilevel", "repeat_factor")


class _Skipped:
    """The item a sampler yields for a step a resumed run skips (see :meth:`RoIBatchSampler.skip_steps`)."""

    def __repr__(self) -> str:
        return "SKIPPED"

    def __reduce__(self):  # the same object in DataLoader workers
        return "SKIPPED"


SKIPPED = _Skipped()


class _Draw:
    """Draws items (RoIs or masks) of positive classes by one strategy."""

    def __init__(self, labels: np.ndarray, images: np.ndarray, num_classes: int, strategy: str, rfs_t: float) -> None:
        if strategy not in STRATEGIES:
            raise UserError(f"sampler strategy: expected one of {STRATEGIES}, got {strategy!r}")
        self.strategy = strategy
        self.labels, self.images = labels, images
        pos = np.nonzero(labels < num_classes)[0]
        self.pos = pos
        if len(pos) == 0:
            return
        pl = labels[pos]
        order = np.argsort(pl, kind="stable")
        self.by_class = {}
        for c in np.unique(pl):
            self.by_class[int(c)] = pos[order][pl[order] == c]
        self.classes = np.array(sorted(self.by_class))
        # flat per-class tables for a vectorised class-balanced draw
        self._flat = np.concatenate([self.by_class[int(c)] for c in self.classes])
        sizes = np.array([len(self.by_class[int(c)]) for c in self.classes])
        self._start = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self._size = sizes
        if strategy == "bilevel":
            self.by_class_image = {}
            for c, idx in self.by_class.items():
                imgs = images[idx]
                uniq = np.unique(imgs)
                self.by_class_image[c] = [idx[imgs == u] for u in uniq]
        if strategy == "repeat_factor":
            img_of_pos = images[pos]
            n_images = len(np.unique(images))
            pairs = np.unique(np.stack([img_of_pos, pl], 1), axis=0)
            freq = np.bincount(pairs[:, 1], minlength=num_classes) / max(1, n_images)
            cls_r = np.maximum(1.0, np.sqrt(rfs_t / np.maximum(freq, 1e-12)))
            img_r: dict[int, float] = {}
            for img, c in pairs:
                img_r[int(img)] = max(img_r.get(int(img), 1.0), float(cls_r[c]))
            w = np.array([img_r[int(i)] for i in img_of_pos])
            self.p = w / w.sum()

    def __call__(self, rng: np.random.Generator, k: int) -> np.ndarray:
        if k == 0 or len(self.pos) == 0:
            return np.zeros(0, np.int64)
        if self.strategy == "random":
            return rng.choice(self.pos, size=k, replace=len(self.pos) < k)
        if self.strategy == "repeat_factor":
            return rng.choice(self.pos, size=k, replace=True, p=self.p)
        if self.strategy == "class_balanced":
            ci = rng.integers(len(self.classes), size=k)
            return self._flat[self._start[ci] + (rng.random(k) * self._size[ci]).astype(np.int64)]
        classes = rng.choice(self.classes, size=k, replace=True)
        out = np.empty(k, np.int64)
        for j, c in enumerate(classes):  # bilevel: class, then image, then RoI
            groups = self.by_class_image[int(c)]
            members = groups[int(rng.integers(len(groups)))]
            out[j] = members[int(rng.integers(len(members)))]
        return out

    def grouped(self, rng: np.random.Generator, k: int, group: int) -> np.ndarray:
        """``k`` items as runs of up to ``group`` adjacent items sharing image and label."""
        if group <= 1 or k == 0 or len(self.pos) == 0:
            return self(rng, k)
        out: list[int] = []
        n = len(self.labels)
        while len(out) < k:
            for a in self(rng, -(-(k - len(out)) // group)):
                a = int(a)
                run = [a]
                while len(run) < group and a + len(run) < n:
                    b = a + len(run)
                    if self.labels[b] != self.labels[a] or self.images[b] != self.images[a]:
                        break
                    run.append(b)
                out.extend(run)
        return np.asarray(out[:k], np.int64)


class RoIBatchSampler(torch.utils.data.Sampler):
    """Yields ``{"rois": indices, "masks": indices}`` per step; see the module docstring.

    Args:
        labels: (N,) RoI labels, background = ``num_classes``.
        roi_images: (N,) image id of each RoI.
        mask_labels: (M,) labels of the cached masks.
        mask_images: (M,) image id of each mask.
        num_classes: C.
        strategy: positive sampling strategy for the classifier and box branch.
        mask_strategy: strategy for masks (default: ``strategy``).
        rois_per_batch: N per step.
        pos_fraction: share of positives among the N.
        masks_per_batch: M per step.
        mask_group: masks drawn as runs of up to this many adjacent cache rows.
        steps_per_epoch: steps in one pass (default: N_rois / rois_per_batch).
        seed: the stream's seed.
        rfs_t: repeat-factor threshold.
    """

    def __init__(
        self,
        *,
        labels: np.ndarray,
        roi_images: np.ndarray,
        mask_labels: np.ndarray,
        mask_images: np.ndarray,
        num_classes: int,
        strategy: str = "class_balanced",
        mask_strategy: str | None = None,
        rois_per_batch: int = 512,
        pos_fraction: float = 0.25,
        masks_per_batch: int = 32,
        mask_group: int = 4,
        steps_per_epoch: int | None = None,
        seed: int = 0,
        rfs_t: float = 1e-3,
    ) -> None:
        if not 0.0 <= pos_fraction <= 1.0:
            raise UserError(f"sampler pos_fraction: expected a value in [0, 1], got {pos_fraction}")
        if rois_per_batch < 1:
            raise UserError(f"sampler rois_per_batch: expected >= 1, got {rois_per_batch}")
        self.num_pos = int(round(rois_per_batch * pos_fraction))
        self.num_neg = rois_per_batch - self.num_pos
        self.masks_per_batch = masks_per_batch if len(mask_labels) else 0
        self.mask_group = mask_group
        self.draw_pos = _Draw(labels, roi_images, num_classes, strategy, rfs_t)
        self.draw_mask = _Draw(mask_labels, mask_images, num_classes, mask_strategy or strategy, rfs_t)
        self.neg = np.nonzero(labels == num_classes)[0]
        if len(self.draw_pos.pos) == 0:
            raise UserError("the feature cache has no positive RoIs; check the RoI policy of extract-features")
        self.steps = steps_per_epoch or max(1, len(labels) // rois_per_batch)
        self.seed = seed
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_steps(self, n: int) -> None:
        """Yield :data:`SKIPPED` for the next ``n`` steps, over epochs (a resumed run's past steps).

        mmengine's loop advances a resumed run's loader by the iterations done; the
        dataset returns the marker without reading, and since :meth:`batch` depends
        only on ``(seed, epoch, step)`` the steps after them are the uninterrupted
        run's.
        """
        self._skip = int(n)

    def __len__(self) -> int:
        return self.steps

    def batch(self, step: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, step])
        pos = self.draw_pos(rng, self.num_pos)
        neg = (
            rng.choice(self.neg, size=self.num_neg, replace=len(self.neg) < self.num_neg)
            if len(self.neg) and self.num_neg
            else np.zeros(0, np.int64)
        )
        masks = self.draw_mask.grouped(rng, self.masks_per_batch, self.mask_group)
        return {"rois": np.concatenate([pos, neg]).astype(np.int64), "masks": masks.astype(np.int64)}

    @classmethod
    def from_reader(cls, reader, **kwargs) -> "RoIBatchSampler":
        """A sampler over a :class:`crat_ft.cache.RoIReader`'s RoIs and masks; ``kwargs`` as the constructor's."""
        return cls(
            labels=reader.labels,
            roi_images=reader.roi_image,
            mask_labels=reader.mask_labels,
            mask_images=reader.mask_image,
            num_classes=reader.num_classes,
            **kwargs,
        )

    def __iter__(self):
        for step in range(self.steps):
            if self._skip > 0:
                self._skip -= 1
                yield SKIPPED
            else:
                yield self.batch(step)


class CachedBatchDataset(torch.utils.data.Dataset):
    """Turns a sampler item into a batch of tensors read from the cache.

    Used with ``DataLoader(dataset, sampler=RoIBatchSampler(...), batch_size=None)``:
    each sampler item (a whole step's indices) becomes one batch dict. Features stay
    float16 and mask targets uint8 as cached (half the bytes to the device; pinned
    when the DataLoader pins); :class:`crat_ft.heads.classwise.ClasswiseHeads` casts them there.
    A :data:`SKIPPED` item is returned as it is, without reading.
    """

    def __init__(self, reader) -> None:
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader.labels)

    def __getitem__(self, item: dict) -> dict:
        if item is SKIPPED:
            return SKIPPED
        rois = self.reader.read_rois(item["rois"])
        masks = self.reader.read_masks(item["masks"])
        mask_rois = self.reader.read_rois(self.reader.mask_roi[item["masks"]])
        return {
            "mask_box_feat": torch.from_numpy(mask_rois["box_feat"]),
            "mask_box": torch.from_numpy(mask_rois["box"]),
            "mask_gt_box": torch.from_numpy(mask_rois["gt_box"]),
            "box_feat": torch.from_numpy(rois["box_feat"]),
            "box": torch.from_numpy(rois["box"]),
            "gt_box": torch.from_numpy(rois["gt_box"]),
            "label": torch.from_numpy(rois["label"].astype(np.int64)),
            "mask_feat": torch.from_numpy(masks["mask_feat"]),
            "mask_target": torch.from_numpy(np.ascontiguousarray(masks["mask_target"], np.uint8)),
            "mask_label": torch.from_numpy(masks["mask_label"].astype(np.int64)),
        }


class StageBatchSampler(torch.utils.data.Sampler):
    """A Cascade R-CNN's steps: one item of each stage's :class:`RoIBatchSampler` per step.

    Each stage draws from its own cache with its own seed; an epoch is as
    long as the shortest stage's.
    """

    def __init__(self, samplers: list[RoIBatchSampler]) -> None:
        self.samplers = samplers
        self.steps = min(len(s) for s in samplers)
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        for s in self.samplers:
            s.set_epoch(epoch)

    def skip_steps(self, n: int) -> None:
        """As :meth:`RoIBatchSampler.skip_steps`."""
        self._skip = int(n)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for step in range(self.steps):
            if self._skip > 0:
                self._skip -= 1
                yield SKIPPED
            else:
                yield tuple(s.batch(step) for s in self.samplers)


class StageBatchDataset(torch.utils.data.Dataset):
    """Turns a :class:`StageBatchSampler` item into one batch dict per stage."""

    def __init__(self, readers: list) -> None:
        self.datasets = [CachedBatchDataset(r) for r in readers]

    def __len__(self) -> int:
        return len(self.datasets[0])

    def __getitem__(self, items: tuple) -> tuple:
        if items is SKIPPED:
            return SKIPPED
        return tuple(d[item] for d, item in zip(self.datasets, items))
