"""What decides the bytes of an extracted shard, recorded beside it (:mod:`crat_ft.common.run_record`): the
shard ``--shard I/N`` names (:func:`parse_shard`) and the settings a ``--resume`` must match
(:func:`run_settings`), compared (:func:`check_same_settings`) and read back from a cache
(:func:`recorded_settings`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from crat_ft.cache import config_hash, shard_name
from crat_ft.common.errors import UserError
from crat_ft.detector.roi_policy import RoIPolicy
from crat_ft.engine.config import base_dataset_cfg, model_cfg_text


def parse_shard(shard: str | None) -> tuple[int, int]:
    """``"I/N"`` -> (I, N); defaults to the torchrun rank/world size, else (0, 1)."""
    if shard:
        try:
            i, n = (int(v) for v in shard.split("/"))
        except ValueError:
            raise UserError(f"--shard: expected I/N such as 0/4, got {shard!r}") from None
        if not (n >= 1 and 0 <= i < n):
            raise UserError(f"--shard: expected 0 <= I < N, got {shard!r}")
        return i, n
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


SETTINGS_FILE = "run.json"


def run_settings(
    *,
    cfg,
    sha: str,
    policy: RoIPolicy,
    box_level: str,
    mask_level: str,
    segment_images: int,
    batch_size: int,
    compression: str | None,
    rank: int,
    world: int,
    image_ids: list[int],
    max_images: int | None,
) -> dict:
    """Everything that decides the bytes of one shard (a run record's settings, :mod:`crat_ft.common.run_record`):
    a resume must match all of it. ``data`` is the identity of the training annotations (their sha256)."""
    from crat_ft.common.run_record import data_identity
    from crat_ft.engine.config import ann_file_of

    ds = base_dataset_cfg(cfg)
    ds_plain = ds.to_dict() if hasattr(ds, "to_dict") else dict(ds)
    return {
        "checkpoint_sha256": sha,
        "config_hash": config_hash(model_cfg_text(cfg)),
        "dataset_hash": config_hash(json.dumps(ds_plain, sort_keys=True, default=str)),
        "data": data_identity([ann_file_of(ds)]),
        "policy": asdict(policy),
        "box_level": box_level,
        "mask_level": mask_level,
        "segment_images": segment_images,
        "batch_size": batch_size,
        "compression": compression,
        "shard": f"{rank}/{world}",
        "max_images": max_images,
        "num_images": len(image_ids),
        "image_ids_hash": config_hash(json.dumps(image_ids)),
    }


def check_same_settings(recorded: dict | None, current: dict, where: Path, out: Path) -> None:
    """Refuse to resume when any setting of the recorded run differs from this one (named by
    :func:`crat_ft.common.run_record.difference_text`)."""
    from crat_ft.common.run_record import difference_text

    start_over = f"rerun with the recorded settings, or delete {out} (or choose a new --out) to start over"
    if recorded is None:
        raise UserError(f"--resume: {where} records no run settings (an older crat-ft wrote it); {start_over}")
    differs = difference_text({"settings": recorded}, {"settings": current})
    if differs is not None:
        raise UserError(f"--resume: {where} was made with {differs}; {start_over}")


def recorded_settings(out: str | os.PathLike, shard: str | None = None) -> dict | None:
    """The run settings a cache directory records for a shard (default: this process's): a finished
    shard's, else an unfinished extraction's; None when ``out`` holds neither."""
    from crat_ft.cache import cache_meta, open_cache

    out = Path(out)
    rank, world = parse_shard(shard)
    name = shard_name(rank, world)
    for path in [out / name, *sorted(out.glob(f"stage-*/{name}"))]:
        if path.exists():
            with open_cache(path) as f:
                recorded = cache_meta(f).get("run_settings")
            return json.loads(recorded) if recorded else None
    settings_file = out / ".segments" / Path(name).stem / SETTINGS_FILE
    return json.loads(settings_file.read_text()) if settings_file.is_file() else None
