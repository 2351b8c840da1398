"""``extract-features``: the extraction loop over a training split (docs/architecture.md#cache-schema).

Work is split in shards (one per rank) and, within a shard, in segments of
consecutive images, each written to its own file under a temporary name and
renamed when complete: a run killed at any moment and restarted with
``--resume`` redoes at most one segment per rank and ends with the same cache.
A resume is accepted only when every setting of
:func:`crat_ft.pipeline.extract_settings.run_settings` matches
the recorded one. Each shard is locked against a second run, and the disk's
free space is checked against a projection after the first segment.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from crat_ft.cache import INDEX_FILE, shard_name, stage_dir
from crat_ft.common.errors import UserError
from crat_ft.common.progress import Progress
from crat_ft.detector.extractor import Extractor, extraction_pipeline
from crat_ft.detector.roi_policy import RoIPolicy, project_size
from crat_ft.engine.config import base_dataset_cfg, model_cfg_text, prepare_config
from crat_ft.pipeline.extract_segments import (
    SpaceCheck,
    finish_index,
    merge_segments,
    remove_segments,
    report_shard,
    segment_done,
    write_segment,
)
from crat_ft.pipeline.extract_settings import SETTINGS_FILE, check_same_settings, parse_shard, run_settings


def planned_settings(
    config, checkpoint, *, cfg_options=(), data_root=None, policy: RoIPolicy = RoIPolicy(), box_level: str = "fc",
    mask_level: str = "logits", shard: str | None = None, batch_size: int = 4, segment_images: int = 32,
    compression: str | None = None, max_images: int | None = None, trust_checkpoint: bool = False,
) -> dict:  # fmt: skip
    """The run settings :func:`extract_features` with these arguments would record for its shard
    (the demo compares them with :func:`recorded_settings` to decide whether a cache is reused)."""
    rank, world = parse_shard(shard)
    cfg, sha, dataset, mine = _plan_shard(
        config, checkpoint, cfg_options, data_root, max_images, rank, world, trust_checkpoint
    )
    return run_settings(
        cfg=cfg, sha=sha, policy=policy, box_level=box_level, mask_level=mask_level, segment_images=segment_images,
        batch_size=batch_size, compression=compression, rank=rank, world=world, max_images=max_images,
        image_ids=[int(dataset.get_data_info(k)["img_id"]) for k in mine],
    )  # fmt: skip


def extract_features(
    config: str | os.PathLike,
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    cfg_options=(),
    data_root: str | os.PathLike | None = None,
    policy: RoIPolicy = RoIPolicy(),
    box_level: str = "fc",
    mask_level: str = "logits",
    shard: str | None = None,
    resume: bool = False,
    batch_size: int = 4,
    segment_images: int = 32,
    compression: str | None = None,
    max_images: int | None = None,
    trust_checkpoint: bool = False,
    progress: bool = True,
    space_check: bool = True,
    workers: int | None = None,
) -> Path:
    """Extract the cache of the config's training split into directory ``out``.

    Steps: check the output and settings (cheap) → build the frozen detector
    → extract segments of images (each an atomic file; finished ones are kept
    for ``--resume``) → merge them into this shard's file → build the index
    once every shard exists. The shard is locked against a second run; a
    resume is accepted only when every setting in :func:`run_settings` matches.

    ``workers`` DataLoader processes decode the images (default: :func:`default_workers`);
    the cache is the same whatever their number.

    Returns:
        ``out/index.h5`` once every shard exists (the merged virtual index),
        else this shard's file.
    """
    from crat_ft.common.files import RunLock, output_dir

    policy.validate()
    for name, value, low in (
        ("--batch-size", batch_size, 1),
        ("--segment-images", segment_images, 1),
        ("--max-images", max_images, 1),
        ("--workers", workers, 0),
    ):
        if value is not None and value < low:
            raise UserError(f"{name}: expected >= {low}, got {value}")
    if compression not in (None, "lzf", "gzip"):
        raise UserError(f"--compression: expected none, lzf or gzip, got {compression!r}")
    rank, world = parse_shard(shard)
    with (
        output_dir(out, "--out") as out,
        RunLock(out / f".{Path(shard_name(rank, world)).stem}.lock", f"--out {out} (shard {rank}/{world})"),
    ):
        return _extract_locked(
            config,
            checkpoint,
            out,
            out / shard_name(rank, world),
            rank=rank,
            world=world,
            cfg_options=cfg_options,
            data_root=data_root,
            policy=policy,
            box_level=box_level,
            mask_level=mask_level,
            resume=resume,
            batch_size=batch_size,
            segment_images=segment_images,
            compression=compression,
            max_images=max_images,
            trust_checkpoint=trust_checkpoint,
            progress=progress,
            space_check=space_check,
            workers=default_workers() if workers is None else workers,
        )


def default_workers() -> int:
    """Image-decoding processes per extraction process: on a GPU up to 4 (the node's cores shared among
    its ranks), so the detector never waits for JPEG decoding and polygon rasterising; on a CPU none
    (the cores already run the detector)."""
    import torch

    if not torch.cuda.is_available():
        return 0
    return max(1, min(4, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))


def _extract_locked(
    config, checkpoint, out: Path, shard_path: Path, *, rank, world, cfg_options, data_root, policy, box_level,
    mask_level, resume, batch_size, segment_images, compression, max_images, trust_checkpoint, progress, space_check,
    workers,
) -> Path:  # fmt: skip
    from crat_ft.common.files import atomic_write_text
    from crat_ft.common.progress import output_begins
    from crat_ft.detector.frozen import num_stages

    seg_dir = out / ".segments" / shard_path.stem
    _clean_or_refuse_start(out, shard_path, seg_dir, resume)
    cfg, sha, dataset, mine = _plan_shard(
        config, checkpoint, cfg_options, data_root, max_images, rank, world, trust_checkpoint
    )
    stages = num_stages(cfg)
    shards = [stage_dir(out, s, stages) / shard_path.name for s in range(stages)]
    settings = run_settings(
        cfg=cfg, sha=sha, policy=policy, box_level=box_level, mask_level=mask_level, segment_images=segment_images,
        batch_size=batch_size, compression=compression, rank=rank, world=world, max_images=max_images,
        image_ids=[int(dataset.get_data_info(k)["img_id"]) for k in mine],
    )  # fmt: skip
    if _check_resume(out, shards, seg_dir, settings):  # this shard is finished
        return finish_index(out, world, shards)
    extractor, attrs = _build_extractor(
        cfg, config, checkpoint, policy, box_level, mask_level, trust_checkpoint, settings
    )
    # the checks passed (the checkpoint loaded): from here on this run writes
    output_begins(
        f"extract-features: {config} + {checkpoint} -> {out}; run settings {json.dumps(settings, sort_keys=True)}"
    )
    seg_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(seg_dir / SETTINGS_FILE, json.dumps(settings, sort_keys=True))
    datasets = [dataset, _flipped(cfg)] if policy.flip else [dataset]
    segments = [mine[j : j + segment_images] for j in range(0, len(mine), segment_images)]
    n_views = len(datasets)
    bar = Progress(len(mine) * n_views, f"extract-features shard {rank}/{world}") if progress else None
    t0 = time.time()
    # the disk is shared by every shard not written yet: each rank projects all of them from its own
    unfinished = sum(not (shards[0].parent / shard_name(i, world)).exists() for i in range(world))
    space = SpaceCheck(out, seg_dir, len(segments) * stages, unfinished) if space_check else None
    try:
        for j, seg in enumerate(segments):
            seg_paths = [seg_dir / _segment_name(j, s, stages) for s in range(stages)]
            if not all([segment_done(p, sha) for p in seg_paths]):
                write_segment(seg_paths, seg, extractor, attrs, datasets, batch_size, compression, bar, workers)
                if space:
                    space.after_write()
            elif bar:
                bar.update(len(seg) * n_views)
        for s, shard in enumerate(shards):
            shard.parent.mkdir(exist_ok=True)
            segs = [seg_dir / _segment_name(j, s, stages) for j in range(len(segments))]
            merge_segments(shard, segs, extractor, s, attrs[s], compression)
    finally:
        extractor.tap.close()
    remove_segments(out, seg_dir)
    if progress:
        n_classes = len(json.loads(attrs[0]["class_names"]))
        for s, shard in enumerate(shards):
            report_shard(shard, rank, world, len(mine) * n_views, n_classes, time.time() - t0, s, stages)
    return finish_index(out, world, shards)


def _segment_name(j: int, stage: int, stages: int) -> str:
    return f"seg-{j:06d}.h5" if stages == 1 else f"seg-{j:06d}-stage{stage}.h5"


def _clean_or_refuse_start(out: Path, shard_path: Path, seg_dir: Path, resume: bool) -> None:
    """Remove what killed or refused runs left (an index, shard or segment being written, a segment
    directory without segments); refuse to overwrite without ``--resume``."""
    from crat_ft.common.files import clean_stale_temps, temp_pattern

    for where in [out, *sorted(out.glob("stage-*"))]:
        for name in (INDEX_FILE, shard_path.name):
            clean_stale_temps(where, temp_pattern(where / name))
    clean_stale_temps(seg_dir)
    if seg_dir.exists() and not any(seg_dir.glob("seg-*.h5")):
        remove_segments(out, seg_dir)  # a run that stopped before its first segment: nothing to continue
    _refuse_other_world_size(out, shard_path)
    existing = [p for p in [shard_path, *sorted(out.glob(f"stage-*/{shard_path.name}"))] if p.exists()]
    if existing and not resume:
        raise UserError(f"{existing[0]} already exists; pass --resume to reuse it or choose a new --out")
    if seg_dir.exists() and not resume:
        raise UserError(f"{out} holds an unfinished extraction; pass --resume to continue it or delete {out}")


def _refuse_other_world_size(out: Path, shard_path: Path) -> None:
    """Shards are a function of the world size (image ``k`` goes to shard ``k mod N``): a cache begun
    with another N is continued by N processes only, never silently redone beside the old shards."""
    world = shard_path.stem.rsplit("-of-", 1)[1]
    names = [p.name for p in [*out.glob("shard-*-of-*.h5"), *out.glob("stage-*/shard-*-of-*.h5")]]
    names += [p.name for p in (out / ".segments").glob("shard-*-of-*") if any(p.glob("seg-*.h5"))]
    other = sorted({n.split("-of-")[1][:5] for n in names} - {world})
    if other:
        n = int(other[0])
        raise UserError(
            f"--out {out} holds the shards of a {n}-process extraction, this run has {int(world)}; run it with "
            f"{n} processes (torchrun --nproc-per-node {n}, or --shard I/{n}), or choose a new --out"
        )


def _plan_shard(config, checkpoint, cfg_options, data_root, max_images, rank: int, world: int, trust_checkpoint: bool):
    """The detector config, the checkpoint's sha256, the training dataset and this shard's image indices."""
    from mmdet.registry import DATASETS

    from crat_ft.common.files import sha256_file
    from crat_ft.detector.frozen import trained_classes
    from crat_ft.engine.checkpoint import check_checkpoint_path
    from crat_ft.heads.registry import register_all

    register_all()
    check_checkpoint_path(checkpoint)
    known = trained_classes(checkpoint, trust_checkpoint)
    cfg = prepare_config(config, cfg_options, data_root, ("train_dataloader",), trained_classes=known)
    ds_cfg = base_dataset_cfg(cfg).copy()
    ds_cfg["pipeline"] = extraction_pipeline(ds_cfg.get("pipeline", []), flip=False)
    dataset = DATASETS.build(ds_cfg)
    n_total = len(dataset) if max_images is None else min(len(dataset), max_images)
    return cfg, sha256_file(checkpoint), dataset, list(range(rank, n_total, world))


def _flipped(cfg):
    """The training dataset again, every image flipped horizontally (view 1)."""
    from mmdet.registry import DATASETS

    flip_cfg = base_dataset_cfg(cfg).copy()
    flip_cfg["pipeline"] = extraction_pipeline(flip_cfg.get("pipeline", []), flip=True)
    return DATASETS.build(flip_cfg)


def _check_resume(out: Path, shards: list[Path], seg_dir: Path, settings: dict) -> bool:
    """Refuse a resume whose settings differ from the recorded ones; True when the shard is already finished.

    A finished shard (of a cascade: every stage's shard file) records its
    settings in its attributes, an unfinished one in ``.segments/<shard>/run.json``.
    Segments left beside a finished shard (a run killed right after the shard's
    rename) are removed.
    """
    from crat_ft.cache import cache_meta, open_cache

    for shard_path in shards:
        if shard_path.exists():
            with open_cache(shard_path) as f:
                recorded = cache_meta(f).get("run_settings")
            check_same_settings(json.loads(recorded) if recorded else None, settings, shard_path, out)
    if all(p.exists() for p in shards):
        remove_segments(out, seg_dir)
        return True
    if seg_dir.exists():  # it holds segments (see _clean_or_refuse_start)
        settings_file = seg_dir / SETTINGS_FILE
        recorded = json.loads(settings_file.read_text()) if settings_file.is_file() else None
        check_same_settings(recorded, settings, seg_dir, out)
    return False


def _build_extractor(cfg, config, checkpoint, policy, box_level, mask_level, trust_checkpoint, settings):
    """The frozen detector's :class:`Extractor` and the cache attributes of its files (one dict per stage)."""
    import torch

    from crat_ft.cache import base_attrs
    from crat_ft.common.lvis_json import categories_with_counts, load_lvis_json
    from crat_ft.detector.frozen import build_frozen_detector, stage_cfgs
    from crat_ft.engine.config import ann_file_of

    model, sha = build_frozen_detector(cfg, str(checkpoint), trust_checkpoint=trust_checkpoint)
    if torch.cuda.is_available():
        # torchrun's LOCAL_RANK; without torchrun, `--shard I/N` processes take GPUs round robin
        device = int(os.environ.get("LOCAL_RANK", parse_shard(settings["shard"])[0] % torch.cuda.device_count()))
        torch.cuda.set_device(device)
        model = model.to(f"cuda:{device}")
    doc_cats = categories_with_counts(load_lvis_json(ann_file_of(base_dataset_cfg(cfg))))
    counts = np.array([int(c.get("instance_count", 0)) for c in doc_cats])
    extractor = Extractor(model, policy, counts, box_level, mask_level)
    stages = []
    for s, (bbox_head, _) in enumerate(extractor.heads):
        attrs = base_attrs(
            config_text=model_cfg_text(cfg),
            checkpoint_sha=sha,
            class_names=[c["name"] for c in doc_cats],
            class_frequency=[c["frequency"] for c in doc_cats],
            class_instance_count=counts.tolist(),
            policy=asdict(policy),
            box_level=box_level,
            mask_level=mask_level,
            box_shape=extractor.box_shape(s),
            mask_shape=extractor.mask_shape(s),
            mask_size=extractor.mask_size(s),
            bbox_coder=dict(stage_cfgs(cfg.model.roi_head.bbox_head, extractor.stages)[s].bbox_coder),
            stage=s,
            num_stages=extractor.stages,
            reg_class_agnostic=bool(bbox_head.reg_class_agnostic),
        )
        attrs["shard"] = settings["shard"]
        attrs["run_settings"] = json.dumps(settings, sort_keys=True)
        attrs["config_path"] = str(Path(config).resolve())
        attrs["checkpoint_path"] = str(Path(checkpoint).resolve())
        stages.append(attrs)
    return extractor, stages


def dry_run(config, checkpoint, *, sample_images: int = 8, policy: RoIPolicy = RoIPolicy(), **kwargs) -> str:
    """Extract a few images to a temporary directory and print the projected size of the whole cache
    (of every stage, for a cascade)."""
    from dataclasses import replace

    from crat_ft.cache import RoIReader, stage_indexes
    from crat_ft.common.files import owned_tempdir
    from crat_ft.common.lvis_json import load_lvis_json
    from crat_ft.engine.config import ann_file_of, load_config, set_data_root

    # measure positives per gt without the per-class quotas
    probe = replace(policy, box_pos_per_class=10**9, mask_pos_per_class=0)
    with owned_tempdir("crat-ft-dry-run") as tmp:
        path = extract_features(
            config, checkpoint, tmp, policy=probe, max_images=sample_images, progress=False, **kwargs
        )
        readers = [RoIReader(index) for index in stage_indexes(path)]
    # the sample extraction above validated config and data; only the annotation path is needed here
    cfg = load_config(config, kwargs.get("cfg_options", ()))
    if kwargs.get("data_root") is not None:
        set_data_root(cfg, kwargs["data_root"])
    doc = load_lvis_json(ann_file_of(base_dataset_cfg(cfg)))
    gib = 2**30
    lines, total, bound = [], 0, 0
    for s, reader in enumerate(readers):
        meta = reader.meta
        sample_ids = set(reader.image_ids.tolist())
        n_gt = sum(1 for a in doc["annotations"] if a["image_id"] in sample_ids)
        c = reader.num_classes
        pos_per_gt = float((reader.labels < c).sum()) / max(1, n_gt)
        neg_per_image = float((reader.labels == c).sum()) / max(1, len(reader.image_ids))
        counts = np.array(meta["class_instance_count"], float)
        box_bytes = int(np.prod(meta["box_shape"])) * 2
        mask_bytes = int(np.prod(meta["mask_shape"])) * 2 if int(meta["mask_size"]) else 0
        proj = project_size(
            n_images=len(doc["images"]),
            instance_count=counts,
            policy=policy,
            pos_per_gt=pos_per_gt,
            neg_per_image=neg_per_image,
            box_bytes=box_bytes,
            mask_bytes=mask_bytes,
            mask_size=int(meta["mask_size"]),
        )
        stage = f" stage {s}:" if len(readers) > 1 else ""
        lines += [
            f"dry run:{stage} measured {len(reader.image_ids)} images: {pos_per_gt:.1f} positives per gt, "
            f"{neg_per_image:.1f} negatives per image",
            f"  per RoI: box features {box_bytes / 1024:.1f} KiB (level {meta['box_level']} {tuple(meta['box_shape'])}), "
            f"mask features {mask_bytes / 1024:.1f} KiB per cached mask (level {meta['mask_level']} {tuple(meta['mask_shape'])})",
            f"  projected for {len(doc['images'])} images, {c} classes, policy {asdict(policy)}:",
        ]
        for k, v in proj["parts"].items():
            lines.append(f"    {k:<26} {v / gib:9.3f} GiB")
        lines.append(
            f"    {'total':<26} {proj['total'] / gib:9.3f} GiB   (upper bound from the caps: {proj['bound'] / gib:.3f} GiB)"
        )
        total, bound = total + proj["total"], bound + proj["bound"]
    if len(readers) > 1:
        lines.append(
            f"all {len(readers)} stages: total {total / gib:.3f} GiB   (upper bound from the caps: {bound / gib:.3f} GiB)"
        )
    return "\n".join(lines)
