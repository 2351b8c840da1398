"""Writing caches: :class:`CacheWriter` (one file, atomically) and :func:`build_index` (shards as one table).

See docs/architecture.md#cache-schema for the layout both write.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from crat_ft.cache.schema import IMAGE_FIELDS, MASK_FIELDS, ROI_CHUNK, ROI_FIELDS, ImageBlock, open_cache, pack_masks
from crat_ft.common.errors import UserError
from crat_ft.common.files import QuietFinalizerFaults, atomic_path, storage_error, storage_errors, temp_name


class CacheWriter:
    """Append image blocks to one HDF5 cache file, written under a temporary name.

    Usage::

        with CacheWriter(path, attrs, box_shape, mask_shape) as w:
            for block in blocks:
                w.append(block)
        # <path> exists only now, with complete=True

    If the context exits with an exception the temporary file is deleted.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        attrs: dict,
        box_shape: Sequence[int],
        mask_shape: Sequence[int],
        *,
        compression: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.tmp = temp_name(self.path)
        self.attrs = attrs
        self.box_shape = tuple(box_shape)
        self.mask_shape = tuple(mask_shape)
        self.compression = compression
        self.f = None
        self.n_rois = self.n_masks = self.n_images = 0

    def __enter__(self) -> "CacheWriter":
        self._quiet = QuietFinalizerFaults().__enter__()
        try:
            with storage_errors(self.path):
                self._create()
        except BaseException as err:
            self._discard()
            self._quiet.__exit__(type(err), err, None)
            raise
        return self

    def _create(self) -> None:
        import h5py

        self.f = h5py.File(self.tmp, "w")
        self._ds = {}  # one handle per dataset: fewer h5py objects to finalise
        s = int(self.attrs["mask_size"])
        specs = {
            "rois/image_id": ((), np.int64),
            "rois/box": ((4,), np.float32),
            "rois/gt_index": ((), np.int32),
            "rois/label": ((), np.int32),
            "rois/iou": ((), np.float32),
            "rois/gt_box": ((4,), np.float32),
            "rois/mask_index": ((), np.int32),
            "rois/box_feat": (self.box_shape, np.float16),
            "masks/roi_index": ((), np.int64),
            "masks/feat": (self.mask_shape, np.float16),
            # a box-only detector (S = 0) caches no masks; HDF5 chunks need a positive width
            "masks/target": ((max(1, (s * s + 7) // 8),), np.uint8),
            "images/image_id": ((), np.int64),
            "images/roi_start": ((), np.int64),
            "images/roi_count": ((), np.int64),
            "images/mask_start": ((), np.int64),
            "images/mask_count": ((), np.int64),
            "images/scale_factor": ((2,), np.float32),
        }
        for name, (shape, dtype) in specs.items():
            # features are chunked along the RoI axis; small chunks for big rows
            big = name.endswith("feat")
            row_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            # one mask feature (~100-400 KiB) per chunk: a random mask is then
            # one direct chunk read, with no partial-chunk or selection overhead
            rows = (
                1 if name == "masks/feat" else (max(1, min(ROI_CHUNK, (1 << 20) // max(1, row_bytes))) if big else 4096)
            )
            self._ds[name] = self.f.create_dataset(
                name,
                shape=(0, *shape),
                maxshape=(None, *shape),
                dtype=dtype,
                chunks=(rows, *shape),
                compression=self.compression if big else None,
            )
        for k, v in self.attrs.items():
            self.f.attrs[k] = v
        self.f.attrs["complete"] = False

    def _extend(self, name: str, data: np.ndarray) -> None:
        ds = self._ds[name]
        n = ds.shape[0]
        ds.resize(n + len(data), axis=0)
        if len(data):
            ds[n:] = data

    def append(self, b: ImageBlock) -> None:
        n, m = len(b.label), len(b.mask_rows)
        mask_index = np.full(n, -1, np.int32)
        mask_index[b.mask_rows] = self.n_masks + np.arange(m, dtype=np.int32)
        self._extend("rois/image_id", np.full(n, b.image_id, np.int64))
        self._extend("rois/box", b.box.astype(np.float32))
        self._extend("rois/gt_index", b.gt_index.astype(np.int32))
        self._extend("rois/label", b.label.astype(np.int32))
        self._extend("rois/iou", b.iou.astype(np.float32))
        self._extend("rois/gt_box", b.gt_box.astype(np.float32))
        self._extend("rois/mask_index", mask_index)
        self._extend("rois/box_feat", b.box_feat.astype(np.float16))
        self._extend("masks/roi_index", self.n_rois + b.mask_rows.astype(np.int64))
        self._extend("masks/feat", b.mask_feat.astype(np.float16))
        self._extend("masks/target", pack_masks(b.mask_target))
        self._extend("images/image_id", np.array([b.image_id], np.int64))
        self._extend("images/roi_start", np.array([self.n_rois], np.int64))
        self._extend("images/roi_count", np.array([n], np.int64))
        self._extend("images/mask_start", np.array([self.n_masks], np.int64))
        self._extend("images/mask_count", np.array([m], np.int64))
        self._extend("images/scale_factor", np.asarray(b.scale_factor, np.float32)[None])
        self.n_rois += n
        self.n_masks += m
        self.n_images += 1

    def append_file(self, path: str | os.PathLike) -> None:
        """Append every image block of another complete cache file (same schema)."""
        import h5py

        with h5py.File(path, "r") as src:
            nr, nm = src["rois/label"].shape[0], src["masks/roi_index"].shape[0]
            for name in ROI_FIELDS:
                data = src["rois/" + name][...]
                if name == "mask_index":
                    data = np.where(data >= 0, data + self.n_masks, -1).astype(np.int32)
                self._extend("rois/" + name, data)
            for name in MASK_FIELDS:
                data = src["masks/" + name][...]
                self._extend("masks/" + name, data + self.n_rois if name == "roi_index" else data)
            for name in IMAGE_FIELDS:
                data = src["images/" + name][...]
                if name == "roi_start":
                    data = data + self.n_rois
                elif name == "mask_start":
                    data = data + self.n_masks
                self._extend("images/" + name, data)
            self.n_images += src["images/image_id"].shape[0]
        self.n_rois += nr
        self.n_masks += nm

    def _discard(self) -> None:
        """Close (ignoring the errors of a failing disk) and delete the temporary file."""
        self._ds = {}
        if self.f is not None:
            with contextlib.suppress(Exception):
                self.f.close()
            self.f = None
        self.tmp.unlink(missing_ok=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._finish(exc_type, exc)
        except BaseException as err:
            self._quiet.__exit__(type(err), err, None)
            raise
        self._quiet.__exit__(None, None, None)

    def _finish(self, exc_type, exc) -> None:
        """Rename the complete file into place, or discard it (raising storage faults as one line)."""
        if exc_type is not None:
            self._discard()
            err = storage_error(exc, self.path) if isinstance(exc, Exception) else None
            if err is not None:
                raise err from None
            return
        try:
            with storage_errors(self.path):
                self.f.attrs["complete"] = True
                self.f.attrs["num_images"] = self.n_images
                self._ds = {}
                self.f.close()
                self.f = None
                os.replace(self.tmp, self.path)
        except BaseException:
            self._discard()
            raise


def build_index(shards: Iterable[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Merge complete shard files into one index file of HDF5 virtual datasets.

    The index presents all shards as one table of RoIs (and of masks, and of
    images) without copying features; cross-references (``mask_index``,
    ``roi_index``, ``roi_start``, ``mask_start``) are rewritten as real small
    datasets in the index. Shards must share every provenance attribute.
    """
    import h5py

    shards = [Path(s) for s in shards]
    if not shards:
        raise UserError("build_index: no shard files given")
    metas, sizes = [], []
    for s in shards:
        with open_cache(s) as f:
            metas.append(
                {k: f.attrs[k] for k in f.attrs if k not in ("complete", "num_images", "shard", "run_settings")}
            )
            sizes.append(
                {
                    g + "/" + n: f[g + "/" + n].shape[0]
                    for g, fs in (("rois", ROI_FIELDS), ("masks", MASK_FIELDS), ("images", IMAGE_FIELDS))
                    for n in fs
                }
            )
    for s, m in zip(shards[1:], metas[1:]):
        for k in ("checkpoint_sha256", "config_hash", "policy", "box_level", "mask_level", "class_names"):
            if str(m.get(k)) != str(metas[0].get(k)):
                raise UserError(
                    f"shard {s} differs from {shards[0]} in {k}; all shards must come from one extract-features run"
                )
    out = Path(out)
    # per-process temporary name (atomic_path): two ranks finishing together may
    # both build the (identical) index; each renames its own complete file into place
    rewrite = {"rois/mask_index", "masks/roi_index", "images/roi_start", "images/mask_start"}
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as dst:
        for k, v in metas[0].items():
            dst.attrs[k] = v
        with h5py.File(shards[0], "r") as f0:
            for group, fields in (("rois", ROI_FIELDS), ("masks", MASK_FIELDS), ("images", IMAGE_FIELDS)):
                for name in fields:
                    key = f"{group}/{name}"
                    src0 = f0[key]
                    total = sum(sz[key] for sz in sizes)
                    if key in rewrite:
                        parts, roi_off, mask_off = [], 0, 0
                        for s, sz in zip(shards, sizes):
                            with h5py.File(s, "r") as f:
                                d = f[key][...]
                            if key == "rois/mask_index":
                                d = np.where(d >= 0, d + mask_off, -1)
                            elif key in ("masks/roi_index", "images/roi_start"):
                                d = d + roi_off
                            else:
                                d = d + mask_off
                            parts.append(d.astype(src0.dtype))
                            roi_off += sz["rois/label"]
                            mask_off += sz["masks/roi_index"]
                        dst.create_dataset(key, data=np.concatenate(parts) if parts else np.zeros((0,), src0.dtype))
                        continue
                    layout = h5py.VirtualLayout(shape=(total, *src0.shape[1:]), dtype=src0.dtype)
                    off = 0
                    for s, sz in zip(shards, sizes):
                        n = sz[key]
                        if n:
                            rel = os.path.relpath(s, out.parent)
                            layout[off : off + n] = h5py.VirtualSource(rel, key, shape=(n, *src0.shape[1:]))
                        off += n
                    dst.create_virtual_dataset(key, layout, fillvalue=0)
        dst.attrs["complete"] = True
        dst.attrs["num_images"] = sum(sz["images/image_id"] for sz in sizes)
        dst.attrs["shards"] = json.dumps([os.path.relpath(s, out.parent) for s in shards])
    return out
