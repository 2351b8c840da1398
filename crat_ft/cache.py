"""The RoI feature cache: the ONE owner of the HDF5 schema (DESIGN §6).

Shape legend: ``N`` RoIs, ``M`` cached masks (a subset of the positives), ``I``
images, ``D`` box feature width (level ``fc``) or ``C_r x 7 x 7`` (level
``roi``), ``K x S x S`` mask feature (level ``logits``: input of
``conv_logits``) or ``C_r x 14 x 14`` (level ``roi``), ``S`` mask side.
Labels follow mmdet: foreground classes ``0..C-1``, background ``C``.

A cache file (a shard, or the merged index) holds::

    /rois/image_id     (N,)   int64      image of each RoI (RoIs of an image are contiguous)
    /rois/box          (N, 4) float32    RoI box, x1 y1 x2 y2, network-input coordinates
    /rois/gt_index     (N,)   int32      index of the assigned gt in its image, -1 = background
    /rois/label        (N,)   int32      gt class, C = background
    /rois/iou          (N,)   float32    IoU with the assigned gt
    /rois/gt_box       (N, 4) float32    assigned gt box (zeros for background)
    /rois/mask_index   (N,)   int32      row in /masks, -1 = no cached mask
    /rois/box_feat     (N, *box_shape)  float16
    /masks/roi_index   (M,)   int64      row in /rois
    /masks/feat        (M, *mask_shape) float16
    /masks/target      (M, ceil(S*S/8)) uint8   bit-packed S x S target (np.packbits)
    /images/image_id   (I,)   int64
    /images/roi_start, /images/roi_count, /images/mask_start, /images/mask_count  (I,) int64
    /images/scale_factor (I, 2) float32  network input / original image scale (w, h)

and attributes (see :data:`REQUIRED_ATTRS`). Files are written under a
temporary name and renamed when complete; a file without ``complete=True`` is
never accepted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

import crat_ft
from crat_ft.errors import UserError
from crat_ft.files import QuietFinalizerFaults, atomic_path, storage_error, storage_errors, temp_name

FORMAT_NAME = "crat-ft-roi-cache"
FORMAT_VERSION = 1
REQUIRED_ATTRS = (
    "format",
    "format_version",
    "crat_ft_version",
    "config_hash",
    "checkpoint_sha256",
    "class_names",
    "class_frequency",
    "class_instance_count",
    "policy",
    "box_level",
    "mask_level",
    "mask_size",
    "bbox_coder",
    "complete",
)
ROI_FIELDS = ("image_id", "box", "gt_index", "label", "iou", "gt_box", "mask_index", "box_feat")
MASK_FIELDS = ("roi_index", "feat", "target")
IMAGE_FIELDS = ("image_id", "roi_start", "roi_count", "mask_start", "mask_count", "scale_factor")
ROI_CHUNK = 256


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def config_hash(model_cfg_text: str) -> str:
    return hashlib.sha256(model_cfg_text.encode()).hexdigest()[:16]


@dataclass
class ImageBlock:
    """Everything cached for one image (numpy arrays; RoI rows then mask rows)."""

    image_id: int
    scale_factor: np.ndarray  # (2,)
    box: np.ndarray  # (n, 4) float32
    gt_index: np.ndarray  # (n,) int32
    label: np.ndarray  # (n,) int32
    iou: np.ndarray  # (n,) float32
    gt_box: np.ndarray  # (n, 4) float32
    box_feat: np.ndarray  # (n, *box_shape) float16
    mask_rows: np.ndarray  # (m,) int64 rows of this block's RoIs that have a cached mask
    mask_feat: np.ndarray  # (m, *mask_shape) float16
    mask_target: np.ndarray  # (m, S, S) bool


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """(m, S, S) bool -> (m, ceil(S*S/8)) uint8."""
    m, s = masks.shape[0], masks.shape[-1]
    return np.packbits(masks.reshape(m, s * s).astype(bool), axis=1)


def unpack_masks(packed: np.ndarray, size: int) -> np.ndarray:
    """(m, ceil(S*S/8)) uint8 -> (m, S, S) bool."""
    return np.unpackbits(packed, axis=1, count=size * size).reshape(-1, size, size).astype(bool)


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
            "masks/target": (((s * s + 7) // 8,), np.uint8),
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
            rows = 1 if name == "masks/feat" else (max(1, min(ROI_CHUNK, (1 << 20) // max(1, row_bytes))) if big else 4096)
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


# --------------------------------------------------------------------------- validation and reading


def open_cache(path: str | os.PathLike, *, checkpoint_sha256: str | None = None):
    """Open a cache file read-only after validating it.

    Raises:
        UserError: missing, truncated or foreign file, an old format version,
            an incomplete file, or (given ``checkpoint_sha256``) a cache made
            from a different checkpoint.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise UserError(f"feature cache {path} does not exist; create it with `crat-ft extract-features`")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise UserError(
            f"feature cache {path} is not a readable HDF5 file ({str(exc).splitlines()[0]}); it is truncated or foreign: re-run extract-features"
        ) from None
    try:
        attrs = f.attrs
        if attrs.get("format") != FORMAT_NAME:
            raise UserError(f"{path} is an HDF5 file but not a crat-ft feature cache (format attribute {attrs.get('format')!r}); pass the file written by `crat-ft extract-features`")
        version = int(attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise UserError(f"feature cache {path} has format version {version}, this crat-ft reads version {FORMAT_VERSION}; re-run extract-features with this version")
        missing = [k for k in REQUIRED_ATTRS if k not in attrs]
        if missing:
            raise UserError(f"feature cache {path} lacks attributes {missing}; it is damaged: re-run extract-features")
        if not bool(attrs["complete"]):
            raise UserError(f"feature cache {path} is incomplete (its writer did not finish); re-run extract-features with --resume")
        for group, fields in (("rois", ROI_FIELDS), ("masks", MASK_FIELDS), ("images", IMAGE_FIELDS)):
            for name in fields:
                if f"{group}/{name}" not in f:
                    raise UserError(f"feature cache {path} lacks dataset /{group}/{name}; it is damaged: re-run extract-features")
        if checkpoint_sha256 is not None and attrs["checkpoint_sha256"] != checkpoint_sha256:
            raise UserError(
                f"feature cache {path} was made from checkpoint sha256 {attrs['checkpoint_sha256'][:12]}..., "
                f"not the given checkpoint ({checkpoint_sha256[:12]}...); re-extract features with this checkpoint or pass the matching one"
            )
        # reading the last rows fails on a truncated file
        n = f["rois/label"].shape[0]
        if n:
            f["rois/box_feat"][n - 1]
        if f["masks/roi_index"].shape[0]:
            f["masks/feat"][-1]
    except UserError:
        f.close()
        raise
    except Exception as exc:
        f.close()
        raise UserError(f"feature cache {path} could not be read ({type(exc).__name__}: {exc}); it is truncated or damaged: re-run extract-features") from None
    return f


def cache_meta(f) -> dict:
    """Attributes of an open cache as plain Python values."""
    out = {}
    for k, v in f.attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        if isinstance(v, np.generic):
            v = v.item()
        if k in ("class_names", "class_frequency", "class_instance_count", "policy", "bbox_coder", "box_shape", "mask_shape"):
            v = json.loads(v)
        out[k] = v
    return out


def summarize(path: str | os.PathLike) -> str:
    """Human-readable summary of a cache (``crat-ft inspect-cache``)."""
    path = Path(path)
    with open_cache(path) as f:
        meta = cache_meta(f)
        labels = f["rois/label"][...]
        mask_labels = labels[f["masks/roi_index"][...]] if f["masks/roi_index"].shape[0] else np.zeros(0, int)
        n_img = f["images/image_id"].shape[0]
        names, freq = meta["class_names"], meta["class_frequency"]
        c = len(names)
        pos = np.bincount(labels[labels < c], minlength=c)
        masks = np.bincount(mask_labels, minlength=c)
        nbytes = {name: f[name].id.get_storage_size() for name in ("rois/box_feat", "masks/feat", "masks/target")}
    lines = [
        f"cache {path}  ({path.stat().st_size / 2**20:.1f} MiB on disk)",
        f"  format v{meta['format_version']}, written by crat-ft {meta['crat_ft_version']}",
        f"  checkpoint sha256 {meta['checkpoint_sha256']}, config hash {meta['config_hash']}",
        f"  levels: box={meta['box_level']} {tuple(meta['box_shape'])}, mask={meta['mask_level']} {tuple(meta['mask_shape'])}, mask size {meta['mask_size']}",
        f"  images {n_img}, RoIs {len(labels)} ({int(pos.sum())} positive, {int((labels == c).sum())} background), masks {int(masks.sum())}",
        f"  bytes: box features {nbytes['rois/box_feat'] / 2**20:.1f} MiB, mask features {nbytes['masks/feat'] / 2**20:.1f} MiB, mask targets {nbytes['masks/target'] / 2**20:.2f} MiB",
        f"  policy: {json.dumps(meta['policy'], sort_keys=True)}",
        "  positives (masks) per frequency group:",
    ]
    for g, gname in (("r", "rare"), ("c", "common"), ("f", "frequent")):
        idx = [i for i in range(c) if freq[i] == g]
        lines.append(f"    {gname:<9} {len(idx):4d} classes  {int(pos[idx].sum()):8d} RoIs ({int(masks[idx].sum())} masks)")
    lines.append("  positives (masks) per class:")
    for i in range(c):
        lines.append(f"    {names[i]:<24} {freq[i]}  {int(pos[i]):7d} ({int(masks[i])})")
    return "\n".join(lines)


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
            metas.append({k: f.attrs[k] for k in f.attrs if k not in ("complete", "num_images", "shard", "run_settings")})
            sizes.append({g + "/" + n: f[g + "/" + n].shape[0] for g, fs in (("rois", ROI_FIELDS), ("masks", MASK_FIELDS), ("images", IMAGE_FIELDS)) for n in fs})
    for s, m in zip(shards[1:], metas[1:]):
        for k in ("checkpoint_sha256", "config_hash", "policy", "box_level", "mask_level", "class_names"):
            if str(m.get(k)) != str(metas[0].get(k)):
                raise UserError(f"shard {s} differs from {shards[0]} in {k}; all shards must come from one extract-features run")
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


def base_attrs(
    *,
    config_text: str,
    checkpoint_sha: str,
    class_names: list[str],
    class_frequency: list[str],
    class_instance_count: list[int],
    policy: dict,
    box_level: str,
    mask_level: str,
    box_shape: Sequence[int],
    mask_shape: Sequence[int],
    mask_size: int,
    bbox_coder: dict,
) -> dict:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "crat_ft_version": crat_ft.__version__,
        "config_hash": config_hash(config_text),
        "checkpoint_sha256": checkpoint_sha,
        "class_names": json.dumps(class_names),
        "class_frequency": json.dumps(class_frequency),
        "class_instance_count": json.dumps(class_instance_count),
        "policy": json.dumps(policy, sort_keys=True),
        "box_level": box_level,
        "mask_level": mask_level,
        "box_shape": json.dumps(list(box_shape)),
        "mask_shape": json.dumps(list(mask_shape)),
        "mask_size": int(mask_size),
        "bbox_coder": json.dumps(bbox_coder, sort_keys=True, default=str),
    }


# --------------------------------------------------------------------------- training reader


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
                self._mem = {k: f[k][...] for k in ("rois/box_feat", "rois/box", "rois/gt_box", "masks/feat", "masks/target")}
            else:
                for k in ("rois/box", "rois/gt_box", "masks/target"):  # 16, 16 and ~100 bytes per row
                    self._mem[k] = f[k][...]
                ds = f["rois/box_feat"]
                if ds.size * ds.dtype.itemsize <= box_memory_bytes:
                    self._mem["rois/box_feat"] = ds[...]
        self.num_classes = len(self.meta["class_names"])
        # Reads go straight to the shard files: HDF5 virtual datasets add ~8x
        # overhead per read call, so the index is used only for its tables.
        shards = json.loads(self.meta["shards"]) if isinstance(self.meta.get("shards"), str) else self.meta.get("shards")
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
        self._offsets = {"rois": np.concatenate([[0], np.cumsum(n_rois)]), "masks": np.concatenate([[0], np.cumsum(n_masks)])}
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

    def _gather(self, key: str, index: np.ndarray, block_of: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
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
