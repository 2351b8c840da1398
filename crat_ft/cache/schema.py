"""The feature cache's HDF5 schema: layout, attributes, validation (docs/architecture.md#cache-schema).

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

and attributes (see :data:`REQUIRED_ATTRS`). A Cascade R-CNN's cache is a
directory per stage, ``stage-0/``, ``stage-1/``, ... (each a cache as above, with
attributes ``stage`` and ``num_stages``): stage ``s`` holds the RoIs and
features stage ``s``'s class-wise layers see. Files are written under a
temporary name and renamed when complete; a file without ``complete=True`` is
never accepted.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

import crat_ft
from crat_ft.common.errors import UserError, sha_mismatch

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
INDEX_FILE = "index.h5"
# bytes of one RoI's small fields: image_id, box, gt_index, label, iou, gt_box, mask_index
ROI_META_BYTES = 8 + 16 + 4 + 4 + 4 + 16 + 4


def shard_name(i: int, n: int) -> str:
    """File name of shard ``i`` of ``n`` in a cache directory."""
    return f"shard-{i:05d}-of-{n:05d}.h5"


def stage_dir(out: Path, stage: int, stages: int) -> Path:
    """Directory of stage ``stage``'s cache: ``out`` itself for a single-stage detector."""
    return out if stages == 1 else out / f"stage-{stage}"


def stage_indexes(cache: str | os.PathLike) -> list[Path]:
    """The index file of each stage of a cache given as its directory or its index file.

    Raises:
        UserError: no cache there.
    """
    cache = Path(cache)
    if cache.is_file() or cache.suffix == ".h5":
        return [cache]
    if (cache / INDEX_FILE).exists():
        return [cache / INDEX_FILE]
    stages = []
    while (cache / f"stage-{len(stages)}").is_dir():
        stages.append(cache / f"stage-{len(stages)}" / INDEX_FILE)
    if stages:
        return stages
    raise UserError(
        f"{cache} holds no feature cache ({INDEX_FILE}, or stage-0/{INDEX_FILE} for a cascade); "
        "create it with `crat-ft extract-features`, and let every shard finish"
    )


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
    return np.unpackbits(packed, axis=1, count=size * size).reshape(len(packed), size, size).astype(bool)


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
    stage: int = 0,
    num_stages: int = 1,
    reg_class_agnostic: bool = False,
) -> dict:
    return {
        "stage": int(stage),
        "num_stages": int(num_stages),
        "reg_class_agnostic": bool(reg_class_agnostic),
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
            f"feature cache {path} is not a readable HDF5 file ({str(exc).splitlines()[0]}); "
            "it is truncated or foreign: re-run extract-features"
        ) from None
    try:
        attrs = f.attrs
        if attrs.get("format") != FORMAT_NAME:
            raise UserError(
                f"{path} is an HDF5 file but not a crat-ft feature cache (format attribute {attrs.get('format')!r}); "
                "pass the file written by `crat-ft extract-features`"
            )
        version = int(attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise UserError(
                f"feature cache {path} has format version {version}, this crat-ft reads version {FORMAT_VERSION}; "
                "re-run extract-features with this version"
            )
        missing = [k for k in REQUIRED_ATTRS if k not in attrs]
        if missing:
            raise UserError(f"feature cache {path} lacks attributes {missing}; it is damaged: re-run extract-features")
        if not bool(attrs["complete"]):
            raise UserError(
                f"feature cache {path} is incomplete (its writer did not finish); re-run extract-features with --resume"
            )
        for group, fields in (("rois", ROI_FIELDS), ("masks", MASK_FIELDS), ("images", IMAGE_FIELDS)):
            for name in fields:
                if f"{group}/{name}" not in f:
                    raise UserError(
                        f"feature cache {path} lacks dataset /{group}/{name}; it is damaged: re-run extract-features"
                    )
        if checkpoint_sha256 is not None and attrs["checkpoint_sha256"] != checkpoint_sha256:
            raise sha_mismatch(
                f"feature cache {path}",
                attrs["checkpoint_sha256"],
                "the given checkpoint",
                checkpoint_sha256,
                "re-extract features with this checkpoint or pass the matching one",
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
        raise UserError(
            f"feature cache {path} could not be read ({type(exc).__name__}: {exc}); it is truncated or damaged: re-run extract-features"
        ) from None
    return f


def cache_meta(f) -> dict:
    """Attributes of an open cache as plain Python values."""
    out = {}
    for k, v in f.attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        if isinstance(v, np.generic):
            v = v.item()
        if k in (
            "class_names",
            "class_frequency",
            "class_instance_count",
            "policy",
            "bbox_coder",
            "box_shape",
            "mask_shape",
        ):
            v = json.loads(v)
        out[k] = v
    return out
