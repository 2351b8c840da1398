"""A shard's segments (see :mod:`crat_ft.pipeline.extract`): each written to its own cache file, checked when
a resume finds it, merged into the shard, then removed; the disk's free space checked against a projection
after the first segment; the shard's report and the index over all shards.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from crat_ft.cache import INDEX_FILE, shard_name
from crat_ft.common.errors import UserError

SPACE_MARGIN = 1.1


def segment_done(seg_path: Path, sha: str) -> bool:
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


def write_segment(seg_paths, seg, extractor, attrs, datasets, batch_size, compression, bar, workers) -> None:
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


def merge_segments(shard_path, segments, extractor, stage, attrs, compression) -> None:
    from crat_ft.cache import CacheWriter

    shape = (extractor.box_shape(stage), extractor.mask_shape(stage))
    with CacheWriter(shard_path, attrs, *shape, compression=compression) as w:
        for seg in segments:
            w.append_file(seg)


class SpaceCheck:
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


def remove_segments(out: Path, seg_dir: Path) -> None:
    shutil.rmtree(seg_dir, ignore_errors=True)
    try:
        (out / ".segments").rmdir()
    except OSError:
        pass


def report_shard(
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


def finish_index(out: Path, world: int, shards: list[Path]) -> Path:
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
