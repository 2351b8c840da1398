"""``extract-features``: the extraction loop over a training split (docs/architecture.md#cache-schema).

Work is split in shards (one per rank) and, within a shard, in segments of
consecutive images, each written to its own file under a temporary name and
renamed when complete: a run killed at any moment and restarted with
``--resume`` redoes at most one segment per rank and ends with the same cache.
A resume is accepted only when every setting of :func:`run_settings` matches
the recorded one. Each shard is locked against a second run, and the disk's
free space is checked against a projection after the first segment.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from crat_ft.cache import INDEX_FILE, config_hash, shard_name, stage_dir
from crat_ft.common.errors import UserError
from crat_ft.common.progress import Progress
from crat_ft.detector.extractor import Extractor, extraction_pipeline
from crat_ft.detector.roi_policy import RoIPolicy, project_size
from crat_ft.engine.config import base_dataset_cfg, model_cfg_text, prepare_config


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
SPACE_MARGIN = 1.1


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
        return _finish_index(out, world, shards)
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
    space = _SpaceCheck(out, seg_dir, len(segments) * stages, unfinished) if space_check else None
    try:
        for j, seg in enumerate(segments):
            seg_paths = [seg_dir / _segment_name(j, s, stages) for s in range(stages)]
            if not all([_segment_done(p, sha) for p in seg_paths]):
                _write_segment(seg_paths, seg, extractor, attrs, datasets, batch_size, compression, bar, workers)
                if space:
                    space.after_write()
            elif bar:
                bar.update(len(seg) * n_views)
        for s, shard in enumerate(shards):
            shard.parent.mkdir(exist_ok=True)
            segs = [seg_dir / _segment_name(j, s, stages) for j in range(len(segments))]
            _merge_segments(shard, segs, extractor, s, attrs[s], compression)
    finally:
        extractor.tap.close()
    _remove_segments(out, seg_dir)
    if progress:
        n_classes = len(json.loads(attrs[0]["class_names"]))
        for s, shard in enumerate(shards):
            _report_shard(shard, rank, world, len(mine) * n_views, n_classes, time.time() - t0, s, stages)
    return _finish_index(out, world, shards)


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
        _remove_segments(out, seg_dir)  # a run that stopped before its first segment: nothing to continue
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
        _remove_segments(out, seg_dir)
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


def _segment_done(seg_path: Path, sha: str) -> bool:
    """Whether a segment file of an earlier run is complete and valid (an invalid one is removed)."""
    from crat_ft.cache import open_cache

    if not seg_path.exists():
        return False
    try:
        open_cache(seg_path, checkpoint_sha256=sha).close()
        return True
    except UserError:
        seg_path.unlink()
        return False


def _batches(dataset, indices: list[int], batch_size: int, workers: int):
    """``pseudo_collate`` batches of ``dataset[k]`` for ``k`` in ``indices``, in order; with ``workers``,
    decoded by DataLoader processes while the detector runs."""
    import torch
    from mmengine.dataset import pseudo_collate

    if workers == 0:
        for b in range(0, len(indices), batch_size):
            yield pseudo_collate([dataset[k] for k in indices[b : b + batch_size]])
        return
    subset = torch.utils.data.Subset(dataset, indices)
    yield from torch.utils.data.DataLoader(
        subset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=pseudo_collate
    )


def _write_segment(seg_paths, seg, extractor, attrs, datasets, batch_size, compression, bar, workers) -> None:
    """One segment: a file per stage, each renamed into place only when every stage's blocks are written."""
    from contextlib import ExitStack

    from crat_ft.cache import CacheWriter

    with ExitStack() as stack:
        writers = [
            stack.enter_context(
                CacheWriter(path, attrs[s], extractor.box_shape(s), extractor.mask_shape(s), compression=compression)
            )
            for s, path in enumerate(seg_paths)
        ]
        for view, ds in enumerate(datasets):
            for batch in _batches(ds, seg, batch_size, workers):
                for blocks in extractor(batch, view):
                    for w, block in zip(writers, blocks):
                        w.append(block)
                if bar:
                    bar.update(len(batch["inputs"]))


def _merge_segments(shard_path, segments, extractor, stage, attrs, compression) -> None:
    from crat_ft.cache import CacheWriter

    shape = (extractor.box_shape(stage), extractor.mask_shape(stage))
    with CacheWriter(shard_path, attrs, *shape, compression=compression) as w:
        for seg in segments:
            w.append_file(seg)


class _SpaceCheck:
    """Stops an extraction early when the disk cannot hold the projected cache.

    After the first segment this run writes, the mean size of the segments on
    disk projects the ones still to write plus the merged shard file (a copy of
    all segments, written before they are removed), with a margin of
    :data:`SPACE_MARGIN`, times the shards still unfinished (every rank writes to
    the same disk, so each checks for all of them).
    """

    def __init__(self, out: Path, seg_dir: Path, n_segments: int, unfinished_shards: int = 1) -> None:
        self.out, self.seg_dir, self.n_segments = out, seg_dir, n_segments
        self.unfinished = max(1, unfinished_shards)
        self.checked = False

    def after_write(self) -> None:
        from crat_ft.common.files import StorageError, free_bytes

        if self.checked:
            return
        self.checked = True
        sizes = [p.stat().st_size for p in self.seg_dir.glob("seg-*.h5")]
        per_segment = sum(sizes) / len(sizes)
        need = SPACE_MARGIN * per_segment * ((self.n_segments - len(sizes)) + self.n_segments) * self.unfinished
        free = free_bytes(self.out)
        if need > free:
            shards = f", for {self.unfinished} unfinished shards" if self.unfinished > 1 else ""
            raise StorageError(
                f"not enough free space in {self.out}: the cache needs about {need / 2**20:.1f} MiB more "
                f"(projected from {len(sizes)} segment(s), with the merged shard{shards}), {free / 2**20:.1f} MiB are free; "
                "free space or choose another --out and rerun with --resume (or pass --skip-space-check)"
            )


def _remove_segments(out: Path, seg_dir: Path) -> None:
    shutil.rmtree(seg_dir, ignore_errors=True)
    try:
        (out / ".segments").rmdir()
    except OSError:
        pass


def _report_shard(
    shard_path: Path, rank: int, world: int, n_images: int, n_classes: int, seconds: float, stage: int, stages: int
) -> None:
    from crat_ft.cache import open_cache

    with open_cache(shard_path) as f:
        labels = f["rois/label"][...]
        n_masks = f["masks/roi_index"].shape[0]
    where = f" stage {stage}" if stages > 1 else ""
    print(
        f"extract-features: shard {rank}/{world}{where}: {n_images} images, {len(labels)} RoIs, "
        f"{int((labels < n_classes).sum())} positives, "
        f"{n_masks} masks, {shard_path.stat().st_size / 2**20:.1f} MiB, {seconds:.1f} s -> {shard_path}",
        file=sys.stderr,
        flush=True,
    )


def _finish_index(out: Path, world: int, shards: list[Path]) -> Path:
    """Build each stage's index once every shard of it exists.

    Returns:
        ``out/index.h5`` (a cascade: ``out``, holding ``stage-<s>/index.h5``)
        when every index is built, else this shard's (first stage's) file.
    """
    from crat_ft.cache import build_index

    done = True
    for shard in shards:
        all_shards = [shard.parent / shard_name(i, world) for i in range(world)]
        if all(s.exists() for s in all_shards):
            build_index(all_shards, shard.parent / INDEX_FILE)
        else:
            done = False
    if not done:
        return shards[0]
    return out / INDEX_FILE if len(shards) == 1 else out


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
