"""Detections as columns, in memory or spilled to disk (docs/architecture.md#evaluation-protocol).

LVIS evaluation at full scale holds ~6 million detections (19,809 val images
x 300), each with an RLE mask. As Python dicts that is tens of GiB; as columns
it is ~40 bytes per detection plus the RLE bytes, which stay on disk
(memory-mapped) until the category chunk that needs them is evaluated.

Columns of :class:`Detections` (``n`` rows): ``image_id`` (n,) int64,
``category_id`` (n,) int64, ``score`` (n,) float64, ``bbox`` (n, 4) float64
(x, y, w, h), and for masks ``rle`` (the RLE ``counts`` strings of all rows,
concatenated, uint8), ``rle_offset`` (n + 1,) int64 and ``rle_size`` (n, 2)
int64 (height, width).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np

from crat_ft.common.errors import UserError

COLUMNS = ("image_id", "category_id", "score", "bbox")
MASK_COLUMNS = ("rle", "rle_offset", "rle_size")


@dataclass
class Detections:
    """Detections as columns; see the module docstring. Mask columns are None for boxes only."""

    image_id: np.ndarray
    category_id: np.ndarray
    score: np.ndarray
    bbox: np.ndarray
    rle: np.ndarray | None = None
    rle_offset: np.ndarray | None = None
    rle_size: np.ndarray | None = None
    area: np.ndarray | None = None  # set only for masks given without boxes: the mask area (lvis-api's rule)
    source: Sequence[dict] | None = None  # the dicts the columns were made from (to_dicts copies them)

    def __len__(self) -> int:
        return len(self.score)

    @property
    def has_masks(self) -> bool:
        return self.rle is not None

    @classmethod
    def from_dicts(cls, dets: Sequence[dict], masks: bool | None = None) -> "Detections":
        """Columns of LVIS result dicts (``segmentation`` RLEs with ``counts`` as str or bytes)."""
        n = len(dets)
        masks = bool(n) and "segmentation" in dets[0] if masks is None else masks
        boxes = bool(n) and "bbox" in dets[0]
        out = cls(
            source=dets,
            image_id=np.fromiter((d["image_id"] for d in dets), np.int64, n),
            category_id=np.fromiter((d["category_id"] for d in dets), np.int64, n),
            score=np.fromiter((d["score"] for d in dets), np.float64, n),
            bbox=np.asarray([d["bbox"] for d in dets], np.float64).reshape(n, 4) if boxes else np.zeros((n, 4)),
        )
        if masks:
            counts = [d["segmentation"]["counts"] for d in dets]
            counts = [c.encode() if isinstance(c, str) else bytes(c) for c in counts]
            out.rle = np.frombuffer(b"".join(counts), np.uint8)
            out.rle_offset = np.concatenate([[0], np.cumsum([len(c) for c in counts])]).astype(np.int64)
            out.rle_size = np.asarray([d["segmentation"]["size"] for d in dets], np.int64).reshape(n, 2)
            if n and not boxes:  # as lvis-api: the box from the mask, the area the mask's
                import pycocotools.mask as mask_util

                rles = [{"size": d["segmentation"]["size"], "counts": c} for d, c in zip(dets, counts)]
                out.bbox = np.asarray(mask_util.toBbox(rles), np.float64).reshape(n, 4)
                out.area = np.asarray(mask_util.area(rles), np.float64)
        return out

    @classmethod
    def concat(cls, parts: Sequence["Detections"]) -> "Detections":
        """One table of several (all with masks, or all without)."""
        if not parts:
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros((0, 4)))
        out = cls(*(np.concatenate([getattr(p, c) for p in parts]) for c in COLUMNS))
        if all(p.area is not None for p in parts):
            out.area = np.concatenate([p.area for p in parts])
        if parts[0].has_masks:
            out.rle = np.concatenate([p.rle for p in parts])
            starts = np.cumsum([0] + [len(p.rle) for p in parts[:-1]])
            out.rle_offset = np.concatenate([[0]] + [p.rle_offset[1:] + s for p, s in zip(parts, starts)])
            out.rle_size = np.concatenate([p.rle_size for p in parts])
        return out

    def take(self, rows: np.ndarray) -> "Detections":
        """The table of ``rows`` (in memory)."""
        out = Detections(*(getattr(self, c)[rows] for c in COLUMNS))
        if self.area is not None:
            out.area = self.area[rows]
        if self.has_masks:
            counts = [bytes(self.rle[self.rle_offset[r] : self.rle_offset[r + 1]]) for r in rows.tolist()]
            out.rle = np.frombuffer(b"".join(counts), np.uint8)
            out.rle_offset = np.concatenate([[0], np.cumsum([len(c) for c in counts])]).astype(np.int64)
            out.rle_size = self.rle_size[rows]
        return out

    def to_dicts(self, rows: np.ndarray, *, with_masks: bool) -> list[dict]:
        """LVIS result dicts of ``rows`` (a segm evaluation keeps the boxes: lvis-api takes the area from them)."""
        if self.source is not None:  # shallow copies of the caller's dicts: faster than rebuilding them
            out = []
            for r in rows.tolist():
                d = dict(self.source[r])
                if not with_masks:
                    d.pop("segmentation", None)
                if "bbox" not in d:
                    d["bbox"] = self.bbox[r].tolist()
                if self.area is not None:
                    d["area"] = float(self.area[r])
                out.append(d)
            return out
        out = []
        for r in rows.tolist():
            d = {
                "image_id": int(self.image_id[r]),
                "category_id": int(self.category_id[r]),
                "score": float(self.score[r]),
                "bbox": self.bbox[r].tolist(),
            }
            if with_masks:
                counts = bytes(self.rle[self.rle_offset[r] : self.rle_offset[r + 1]])
                d["segmentation"] = {"size": self.rle_size[r].tolist(), "counts": counts.decode()}
            if self.area is not None:
                d["area"] = float(self.area[r])
            out.append(d)
        return out

    def save(self, directory: str | os.PathLike) -> None:
        """One ``.npy`` per column in ``directory`` (created), readable memory-mapped by :meth:`load`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and f.name != "source":
                np.save(directory / f"{f.name}.npy", value)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Detections":
        """A table saved by :meth:`save`; the RLE bytes stay memory-mapped on disk."""
        directory = Path(directory)
        try:
            cols = {c: np.load(directory / f"{c}.npy") for c in COLUMNS}
            if (directory / "area.npy").exists():
                cols["area"] = np.load(directory / "area.npy")
            if (directory / "rle.npy").exists():
                cols["rle"] = np.load(directory / "rle.npy", mmap_mode="r")
                cols["rle_offset"] = np.load(directory / "rle_offset.npy")
                cols["rle_size"] = np.load(directory / "rle_size.npy")
        except (OSError, ValueError) as exc:
            raise UserError(f"spilled detections in {directory} are unreadable ({exc}); rerun the evaluation") from None
        return cls(**cols)


class DetectionSpill:
    """Writes one process's detections to disk in parts as they arrive (evaluation never holds them all as dicts).

    Each :meth:`add` takes one image's detections; every ``part_rows``
    detections a part ``<directory>/part-<tag>-<k>/`` is written, with the
    sequence numbers of the images it covers (``images.npy``, images without
    detections included). Images are numbered in arrival order, so a reader
    can keep exactly the images the test loop reports (mmengine pads the last
    batch of a distributed sampler) and can tell when one is missing.
    """

    def __init__(self, directory: str | os.PathLike, tag: str, part_rows: int = 500_000) -> None:
        self.directory, self.tag, self.part_rows = Path(directory), tag, part_rows
        self.buffer: list[Detections] = []
        self.sequence: list[np.ndarray] = []
        self.rows = 0
        self.parts = 0
        self.images = 0
        self.first_image = 0  # sequence number of the buffer's first image

    def add(self, dets: Detections) -> int:
        """Buffer one image's detections; returns its sequence number."""
        seq = self.images
        self.images += 1
        self.buffer.append(dets)
        self.sequence.append(np.full(len(dets), seq, np.int64))
        self.rows += len(dets)
        if self.rows >= self.part_rows:
            self.flush()
        return seq

    def flush(self) -> None:
        if not self.buffer:
            return
        part = self.directory / f"part-{self.tag}-{self.parts:05d}"
        Detections.concat(self.buffer).save(part)
        np.save(part / "sequence.npy", np.concatenate(self.sequence))
        np.save(part / "images.npy", np.arange(self.first_image, self.images, dtype=np.int64))
        self.buffer, self.sequence, self.rows = [], [], 0
        self.first_image = self.images
        self.parts += 1


def _tag_of(part: Path) -> str:
    return part.name[len("part-") :].rsplit("-", 1)[0]


def load_spilled(directory: str | os.PathLike, keep: dict[str, set[int]] | None = None) -> Detections:
    """The spilled detections of one evaluation as one table.

    With ``keep`` (spill tag -> image sequence numbers, what the test loop reported), only the parts
    of those tags are read, only those images are kept, and every one of them must be covered by
    exactly one part: a part that is missing or written twice is an error, never a silent change of
    the evaluated detections. Without ``keep``, every part in ``directory``. The RLE bytes of all
    parts are copied into one file there and memory-mapped.
    """
    directory = Path(directory)
    by_tag: dict[str, list[Path]] = {}
    for part in sorted(directory.glob("part-*")):
        by_tag.setdefault(_tag_of(part), []).append(part)
    missing = sorted(set(keep or ()) - set(by_tag))
    if missing:
        # every process that saw an image wrote a part: on several nodes a local directory hides theirs
        raise UserError(
            f"the detections of {', '.join(missing)} are not in {directory}; with several nodes, set the "
            "metric's spill_dir to a directory that every node shares (else another process removed them: rerun)"
        )
    parts = []
    for tag in sorted(keep) if keep is not None else sorted(by_tag):
        covered = []
        for part in by_tag[tag]:
            dets = Detections.load(part)
            if keep is not None:
                seq = np.load(part / "sequence.npy")
                covered.append(np.load(part / "images.npy"))
                rows = np.nonzero(np.isin(seq, np.fromiter(keep[tag], np.int64, len(keep[tag]))))[0]
                if len(rows) != len(dets):
                    dets = dets.take(rows)
            parts.append(dets)
        if keep is not None:
            covered = np.concatenate(covered)
            lost = set(keep[tag]) - set(covered.tolist())
            if lost or len(np.unique(covered)) != len(covered):
                what = f"{len(lost)} image(s) are missing" if lost else "some images are there twice"
                raise UserError(
                    f"the spilled detections of {tag} in {directory} are incomplete ({what}: another process "
                    "removed or wrote parts there); rerun the evaluation"
                )
    if not parts or not parts[0].has_masks:
        return Detections.concat(parts)
    # the masks: one memory-mapped buffer, filled part by part
    rle_parts = [p.rle for p in parts]
    starts = np.cumsum([0] + [len(r) for r in rle_parts[:-1]])
    offsets = np.concatenate([[0]] + [p.rle_offset[1:] + s for p, s in zip(parts, starts)]).astype(np.int64)
    for p in parts:
        p.rle = np.zeros(0, np.uint8)
    out = Detections.concat(parts)
    path = directory / "rle-all.npy"
    if not sum(len(r) for r in rle_parts):
        out.rle, out.rle_offset = np.zeros(0, np.uint8), offsets
        return out
    merged = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(sum(len(r) for r in rle_parts),))
    for r, s in zip(rle_parts, starts):
        merged[s : s + len(r)] = r
    merged.flush()
    del merged
    out.rle, out.rle_offset = np.load(path, mmap_mode="r"), offsets
    return out


# --------------------------------------------------------------------------- one directory per evaluation

RUN_PREFIX = "run-"


def claim_spill_run(base: str | os.PathLike, run: str):
    """Make ``<base>/run-<run>/``, the spill directory of one evaluation, held by a lock (the main process).

    The lock (``run-<run>.lock``, :class:`crat_ft.common.files.RunLock`) is held until the evaluation
    releases it, and the kernel drops it when the process dies, so a directory whose lock nobody
    holds belongs to an evaluation that is over: those are removed first. A live evaluation's
    directory is never touched, whatever its process id (pids repeat across container starts), and
    evaluations that share ``base`` each read only their own directory.

    Returns:
        The held lock; release it with ``release_spill_run``.
    """
    from crat_ft.common.files import RunLock

    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    lock = RunLock(base / f"{RUN_PREFIX}{run}.lock", f"the spill directory {base / (RUN_PREFIX + run)}")
    lock.__enter__()
    remove_abandoned_runs(base)
    (base / f"{RUN_PREFIX}{run}").mkdir(exist_ok=True)
    return lock


def remove_abandoned_runs(base: str | os.PathLike) -> list[Path]:
    """Remove the run directories under ``base`` whose lock no live evaluation holds."""
    import shutil

    from crat_ft.common.files import RunLock

    removed = []
    for lock_path in sorted(Path(base).glob(f"{RUN_PREFIX}*.lock")):
        try:
            with RunLock(lock_path, "an abandoned spill directory"):
                shutil.rmtree(lock_path.with_suffix(""), ignore_errors=True)
        except UserError:  # held: a live evaluation's
            continue
        removed.append(lock_path.with_suffix(""))
    return removed


def release_spill_run(base: str | os.PathLike, run: str, lock) -> None:
    """Remove an evaluation's run directory, then release its lock."""
    import shutil

    shutil.rmtree(Path(base) / f"{RUN_PREFIX}{run}", ignore_errors=True)
    lock.__exit__(None, None, None)
