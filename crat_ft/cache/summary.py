"""``crat-ft inspect-cache``: a human-readable summary of a cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from crat_ft.cache.schema import cache_meta, open_cache


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
        files = [path, *(path.parent / s for s in json.loads(f.attrs.get("shards", "[]")))]
    nbytes = _stored_bytes(files, ("rois/box_feat", "masks/feat", "masks/target"))
    on_disk = sum(p.stat().st_size for p in files)
    lines = [
        f"cache {path}  ({on_disk / 2**20:.1f} MiB on disk{f', index and {len(files) - 1} shards' if files[1:] else ''})",
        f"  format v{meta['format_version']}, written by crat-ft {meta['crat_ft_version']}",
        f"  checkpoint sha256 {meta['checkpoint_sha256']}, config hash {meta['config_hash']}",
        f"  levels: box={meta['box_level']} {tuple(meta['box_shape'])}, "
        f"mask={meta['mask_level']} {tuple(meta['mask_shape'])}, mask size {meta['mask_size']}",
        f"  images {n_img}, RoIs {len(labels)} ({int(pos.sum())} positive, {int((labels == c).sum())} background), "
        f"masks {int(masks.sum())}",
        f"  bytes: box features {nbytes['rois/box_feat'] / 2**20:.1f} MiB, "
        f"mask features {nbytes['masks/feat'] / 2**20:.1f} MiB, mask targets {nbytes['masks/target'] / 2**20:.2f} MiB",
        f"  policy: {json.dumps(meta['policy'], sort_keys=True)}",
        *_stage_lines(meta),
        "  positives (masks) per frequency group:",
    ]
    for g, gname in (("r", "rare"), ("c", "common"), ("f", "frequent")):
        idx = [i for i in range(c) if freq[i] == g]
        lines.append(
            f"    {gname:<9} {len(idx):4d} classes  {int(pos[idx].sum()):8d} RoIs ({int(masks[idx].sum())} masks)"
        )
    lines.append("  positives (masks) per class:")
    for i in range(c):
        lines.append(f"    {names[i]:<24} {freq[i]}  {int(pos[i]):7d} ({int(masks[i])})")
    return "\n".join(lines)


def _stored_bytes(files: list[Path], names: tuple[str, ...]) -> dict[str, int]:
    """Bytes each dataset takes on disk, summed over ``files``. An index holds virtual datasets (no bytes of
    their own), so its shards hold the features; a single-file cache holds them itself."""
    import h5py

    nbytes = dict.fromkeys(names, 0)
    for file in files:
        with h5py.File(file, "r") as f:
            for name in names:
                if not f[name].is_virtual:
                    nbytes[name] += f[name].id.get_storage_size()
    return nbytes


def _stage_lines(meta: dict) -> list[str]:
    """What a cascade stage's cache is, and what CRAT retrains from it."""
    lines = []
    if int(meta.get("num_stages", 1)) > 1:
        lines.append(f"  stage {meta['stage']} of a {meta['num_stages']}-stage cascade")
    if meta.get("reg_class_agnostic"):
        lines.append(
            "  box regressor: class-agnostic, kept as it is; CRAT's box branch does not apply (classifier and masks only)"
        )
    return lines
