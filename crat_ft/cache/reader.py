"""Reading caches for training: :class:`RoIReader` (block reads, lazy per-process handles).

Shape legend: ``N`` RoIs, ``M`` cached masks, ``S`` mask side; labels follow
mmdet (foreground ``0..C-1``, background ``C``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from crat_ft.cache.schema import cache_meta, open_cache, unpack_masks

# recorded where the detector was; the detector itself is named by checkpoint_sha256 and config_hash
_LOCATION_ATTRS = ("config_path", "checkpoint_path")


def cache_identity(readers) -> str:
    """A hex sha256 naming what a cache holds, wherever it lies.

    It covers each stage's attributes (format, detector config hash, checkpoint
    sha256, classes, RoI policy, levels, shards' run settings) except the paths
    they were made from, and the tables that place every RoI and mask (label,
    image, mask rows). Feature values are not hashed (tens of GB on LVIS): they
    are a function of the above.

    Args:
        readers: a :class:`RoIReader`, or a Cascade R-CNN's list of them (one per stage).
    """
    import hashlib

    h = hashlib.sha256()
    for r in readers if isinstance(readers, (list, tuple)) else [readers]:
        meta = {k: v for k, v in r.meta.items() if k not in _LOCATION_ATTRS}
        h.update(json.dumps(meta, sort_keys=True, default=str).encode())
        for table in (r.labels, r.roi_image, r.image_ids, r.mask_roi):
            h.update(np.ascontiguousarray(table).tobytes())
    return h.hexdigest()


class RoIReader:
    """Random access to cached RoIs and masks by index, reading whole image blocks.

    HDF5 is slow at scattered single-row reads, so a request for some RoI
    indices reads, for every image they fall in, that image's contiguous block
    once and picks the rows from it. The file is opened lazily in the process
    that reads (h5py handles cannot cross fork/pickle), so a reader can be
    handed to DataLoader workers.

    Box features at level ``fc`` are small (2 KiB per RoI for D = 1024) while
    a training batch draws hundreds of RoIs from all over the file: every
    h5py read call costs ~50 µs whatever its size, so scattered rows are
    ~100x slower than a contiguous slice. The reader therefore keeps the box
    feature table in RAM when it fits ``box_memory_bytes`` (read once,
    sequentially) and reads the large mask features per image block.

    Args:
        path: cache file (a shard or the merged index).
        checkpoint_sha256: if given, refuse a cache of another checkpoint.
        in_memory: load every table, masks included, into RAM first.
        box_memory_bytes: RAM budget for the box feature table (0: always read from disk).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        checkpoint_sha256: str | None = None,
        in_memory: bool = False,
        box_memory_bytes: int = 8 << 30,
    ) -> None:
        import h5py

        self.path = Path(path)
        with open_cache(self.path, checkpoint_sha256=checkpoint_sha256) as f:
            self.meta = cache_meta(f)
            self.labels = f["rois/label"][...]
            self.roi_image = f["rois/image_id"][...]
            self.mask_index = f["rois/mask_index"][...]
            self.mask_roi = f["masks/roi_index"][...]
            self.image_ids = f["images/image_id"][...]
            self.roi_start = f["images/roi_start"][...]
            self.roi_count = f["images/roi_count"][...]
            self.mask_start = f["images/mask_start"][...]
            self.mask_count = f["images/mask_count"][...]
            self._mem = {}
            if in_memory:
                self._mem = {
                    k: f[k][...] for k in ("rois/box_feat", "rois/box", "rois/gt_box", "masks/feat", "masks/target")
                }
            else:
                for k in ("rois/box", "rois/gt_box", "masks/target"):  # 16, 16 and ~100 bytes per row
                    self._mem[k] = f[k][...]
                ds = f["rois/box_feat"]
                if ds.size * ds.dtype.itemsize <= box_memory_bytes:
                    self._mem["rois/box_feat"] = ds[...]
        self.num_classes = len(self.meta["class_names"])
        # Reads go straight to the shard files: HDF5 virtual datasets add ~8x
        # overhead per read call, so the index is used only for its tables.
        shards = (
            json.loads(self.meta["shards"]) if isinstance(self.meta.get("shards"), str) else self.meta.get("shards")
        )
        if shards:
            self._shard_paths = [self.path.parent / s for s in shards]
            n_rois, n_masks = [], []
            for sp in self._shard_paths:
                with h5py.File(sp, "r") as sf:
                    n_rois.append(sf["rois/label"].shape[0])
                    n_masks.append(sf["masks/roi_index"].shape[0])
        else:
            self._shard_paths = [self.path]
            n_rois, n_masks = [len(self.labels)], [len(self.mask_roi)]
        self._offsets = {
            "rois": np.concatenate([[0], np.cumsum(n_rois)]),
            "masks": np.concatenate([[0], np.cumsum(n_masks)]),
        }
        self.mask_labels = self.labels[self.mask_roi]
        self.mask_image = self.roi_image[self.mask_roi]
        # image (block) of each RoI and each mask
        self.roi_block = np.repeat(np.arange(len(self.image_ids)), self.roi_count)
        self.mask_block = np.repeat(np.arange(len(self.image_ids)), self.mask_count)
        self._f = None
        self._pid = None
        self._datasets = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_f"] = None
        state["_pid"] = None
        state["_datasets"] = {}
        return state

    def _files(self) -> list:
        import h5py

        if self._f is None or self._pid != os.getpid():
            self._f = [h5py.File(p, "r") for p in self._shard_paths]
            self._datasets = {}
            self._pid = os.getpid()
        return self._f

    def _dataset(self, k: int, key: str):
        ds = self._datasets.get((k, key))
        if ds is None:
            ds = self._datasets[(k, key)] = self._files()[k][key]
        return ds

    def _read_range(self, key: str, start: int, end: int) -> np.ndarray:
        """Rows [start, end) of ``key`` across shards (global row numbers)."""
        offs = self._offsets[key.split("/")[0]]
        parts = []
        for k in range(len(self._files())):
            lo, hi = max(start, offs[k]), min(end, offs[k + 1])
            if lo < hi:
                parts.append(self._dataset(k, key)[lo - offs[k] : hi - offs[k]])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _gather(
        self, key: str, index: np.ndarray, block_of: np.ndarray, starts: np.ndarray, counts: np.ndarray
    ) -> np.ndarray:
        if key in self._mem:
            return self._mem[key][index]
        ds = self._dataset(0, key)
        out = np.empty((len(index), *ds.shape[1:]), ds.dtype)
        blocks = block_of[index]
        uniq = np.unique(blocks)
        # one read per run of adjacent image blocks (a sequential request is one read)
        breaks = np.nonzero(np.diff(uniq) != 1)[0] + 1
        for run in np.split(uniq, breaks):
            if len(run) == 0:
                continue
            s = int(starts[run[0]])
            e = int(starts[run[-1]] + counts[run[-1]])
            sel = np.nonzero((blocks >= run[0]) & (blocks <= run[-1]))[0]
            data = self._read_range(key, s, e)
            out[sel] = data[index[sel] - s]
        return out

    def _direct_row(self, key: str, row: int, out: np.ndarray) -> bool:
        """Read one row stored as its own uncompressed chunk straight into ``out``; False if not possible."""
        offs = self._offsets[key.split("/")[0]]
        k = int(np.searchsorted(offs, row, side="right") - 1)
        ds = self._dataset(k, key)
        if ds.chunks is None or ds.chunks[0] != 1 or ds.compression is not None:
            return False
        _, raw = ds.id.read_direct_chunk((row - int(offs[k]),) + (0,) * (ds.ndim - 1))
        out[...] = np.frombuffer(raw, dtype=ds.dtype).reshape(out.shape)
        return True

    def _gather_rows(self, key: str, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` of a dataset of large rows.

        Mask features are ~100 KiB per row and stored one per chunk: each row
        is one direct chunk read (reading its image block instead would read
        ~10x more bytes, and h5py's fancy indexing is slower still). Other
        layouts are read with one call per run of adjacent rows.
        """
        if key in self._mem:
            return self._mem[key][index]
        ds = self._dataset(0, key)
        out = np.empty((len(index), *ds.shape[1:]), ds.dtype)
        if len(index) and self._direct_row(key, int(index[0]), out[0]):
            for j in range(1, len(index)):
                self._direct_row(key, int(index[j]), out[j])
            return out
        order = np.argsort(index, kind="stable")
        sorted_idx = index[order]
        breaks = np.nonzero(np.diff(sorted_idx) > 1)[0] + 1
        pos = 0
        for run in np.split(sorted_idx, breaks):
            if len(run) == 0:
                continue
            data = self._read_range(key, int(run[0]), int(run[-1]) + 1)
            out[order[pos : pos + len(run)]] = data[run - run[0]]
            pos += len(run)
        return out

    def read_rois(self, index: np.ndarray) -> dict:
        """Fields of RoIs ``index`` (N,): box_feat, box, gt_box, label."""
        index = np.asarray(index, np.int64)
        args = (index, self.roi_block, self.roi_start, self.roi_count)
        return {
            "box_feat": self._gather("rois/box_feat", *args),
            "box": self._gather("rois/box", *args),
            "gt_box": self._gather("rois/gt_box", *args),
            "label": self.labels[index],
        }

    def read_masks(self, index: np.ndarray) -> dict:
        """Fields of masks ``index`` (M,): mask_feat, mask_target (M, S, S) bool, mask_label."""
        index = np.asarray(index, np.int64)
        packed = self._gather_rows("masks/target", index)
        return {
            "mask_feat": self._gather_rows("masks/feat", index),
            "mask_target": unpack_masks(packed, int(self.meta["mask_size"])),
            "mask_label": self.mask_labels[index],
        }

    def class_index(self) -> list[np.ndarray]:
        """Per-class arrays of positive RoI indices (for samplers)."""
        order = np.argsort(self.labels, kind="stable")
        bounds = np.searchsorted(self.labels[order], np.arange(self.num_classes + 1))
        return [order[bounds[c] : bounds[c + 1]] for c in range(self.num_classes)]
