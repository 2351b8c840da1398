"""``CratLVISMetric``: the LVIS v1 metric in mmdet's test loop (registered in mmdet's ``METRICS``).

Importing this module registers it; configs name it as
``test_evaluator = dict(type='CratLVISMetric', ann_file=..., metric=['bbox', 'segm'])``.
Each process writes its detections to disk as they arrive
(:class:`crat_ft.evaluation.detections.DetectionSpill`, columns, masks as RLE bytes);
mmengine gathers only a (process, image number) pair per image, so no
detection crosses processes or stays in memory as a dict. The main process
then evaluates them with :func:`crat_ft.evaluation.lvis.lvis_metrics`, a chunk of
categories at a time (see docs/architecture.md#evaluation-protocol).
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np
from mmdet.registry import METRICS
from mmengine.evaluator import BaseMetric
from mmengine.logging import MMLogger

from crat_ft.common.dist import broadcast_from_rank0
from crat_ft.common.errors import UserError
from crat_ft.common.lvis_json import categories_by_id, load_lvis_json
from crat_ft.evaluation.detections import (
    RUN_PREFIX,
    Detections,
    DetectionSpill,
    claim_spill_run,
    load_spilled,
    release_spill_run,
)
from crat_ft.evaluation.lvis import IOU_TYPES, PROTOCOLS, format_table, lvis_metrics, write_per_class_csv


@METRICS.register_module()
class CratLVISMetric(BaseMetric):
    """LVIS v1 bbox/segm metric for mmdet's test loop, on :func:`lvis_metrics`.

    Args:
        ann_file: the LVIS annotation file of the evaluated split.
        metric: ``"bbox"``, ``"segm"`` or both.
        max_dets: detections per image across categories (LVIS: 300).
        cat_chunk_size: categories per evaluation chunk (bounded memory).
        per_class_csv: if set, write the per-class AP table there.
        spill_dir: where the processes write their detections, the same directory for
            every rank (default: ``crat-ft-detections`` in the system's temporary directory;
            several nodes need a shared ``spill_dir``). Each evaluation writes into a
            subdirectory of its own, ``run-<id>-<k>``, named by a run id that rank 0 draws and
            sends to the others, and reads only its own parts; rank 0 holds a lock on it while
            the evaluation runs and removes it afterwards. A subdirectory whose lock nobody holds
            (a killed run's) is removed by the next evaluation; a live one is never touched, so
            several evaluations may share one ``spill_dir``.
        extra_protocols: also compute these protocols of :func:`lvis_metrics`
            (``"fixed"``: AP-fixed, ``"pool"``: AP-pool; ``last_results[protocol]``).
            They see what the model outputs: raise ``model.test_cfg.rcnn.max_per_img``
            for them to see more than 300 detections per image.
        matches_files: ``{iou_type: path}``: write the per-(image, category) matches there
            (:class:`crat_ft.evaluation.matching.MatchTable`, what ``crat-ft compare`` resamples).
        outfile_prefix: also write the detections as mmdet does, ``PREFIX.bbox.json`` and
            (with masks) ``PREFIX.segm.json`` (what ``crat-ft analyze-errors`` reads).
    """

    default_prefix = "lvis"

    def __init__(
        self,
        *,
        ann_file: str,
        metric: str | Sequence[str] = ("bbox", "segm"),
        max_dets: int = 300,
        cat_chunk_size: int | None = None,
        per_class_csv: str | None = None,
        extra_protocols: Sequence[str] = ("fixed",),
        spill_dir: str | None = None,
        matches_files: dict | None = None,
        outfile_prefix: str | None = None,
        collect_device: str = "cpu",
        prefix: str | None = None,
    ) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        metrics = [metric] if isinstance(metric, str) else list(metric)
        for m in metrics:
            if m not in IOU_TYPES:
                raise UserError(f"CratLVISMetric.metric: expected items of {IOU_TYPES}, got {m!r}")
        self.iou_types = metrics
        self.ann_file = ann_file
        self.max_dets = max_dets
        self.cat_chunk_size = cat_chunk_size
        for p in extra_protocols:
            if p not in PROTOCOLS or p == "standard":
                raise UserError(f"CratLVISMetric.extra_protocols: expected items of ('fixed', 'pool'), got {p!r}")
        self.extra_protocols = list(extra_protocols)
        self.spill_dir = spill_dir if spill_dir is not None else str(Path(tempfile.gettempdir()) / SPILL_DIR)
        # drawn here: mmengine builds metrics on every rank at the same point, so the broadcast is safe
        self._run_id = broadcast_from_rank0(uuid.uuid4().hex[:12])
        self._evaluations = 0  # evaluations so far (a validation metric runs once per interval)
        self.run_dir: str | None = None  # the directory of the evaluation under way
        self._spill = None
        self._lock = None
        self.per_class_csv = per_class_csv
        self.matches_files = dict(matches_files or {})
        self.outfile_prefix = outfile_prefix
        self._doc = None
        self.last_results: dict = {}

    @property
    def doc(self) -> dict:
        if self._doc is None:
            self._doc = load_lvis_json(self.ann_file)
        return self._doc

    @property
    def _run(self) -> str:
        return f"{self._run_id}-{self._evaluations}"

    def _spiller(self) -> DetectionSpill:
        if self._spill is None:
            from mmengine.dist import get_rank

            if get_rank() == 0:
                self._lock = claim_spill_run(self.spill_dir, self._run)
            self.run_dir = str(Path(self.spill_dir) / f"{RUN_PREFIX}{self._run}")
            self._spill = DetectionSpill(self.run_dir, tag=f"{self._run}-rank{get_rank()}")
        return self._spill

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        import pycocotools.mask as mask_util

        cat_ids = np.array([c["id"] for c in categories_by_id(self.doc)], np.int64)
        spill = self._spiller()
        for sample in data_samples:
            pred = sample["pred_instances"]
            xyxy = pred["bboxes"].cpu().numpy().astype(np.float64).reshape(-1, 4)
            n = len(xyxy)
            dets = Detections(
                image_id=np.full(n, int(sample["img_id"]), np.int64),
                category_id=cat_ids[pred["labels"].cpu().numpy().astype(np.int64)],
                score=pred["scores"].cpu().numpy().astype(np.float64),
                bbox=np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1),
            )
            if "masks" in pred and "segm" in self.iou_types:
                masks = pred["masks"].cpu().numpy().astype(np.uint8)
                rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0))) if n else []
                counts = [r["counts"] for r in rles]
                dets.rle = np.frombuffer(b"".join(counts), np.uint8)
                dets.rle_offset = np.concatenate([[0], np.cumsum([len(c) for c in counts])]).astype(np.int64)
                dets.rle_size = np.asarray([r["size"] for r in rles], np.int64).reshape(n, 2)
            # one small entry per image: mmengine truncates ``results`` to the dataset size
            self.results.append((spill.tag, spill.add(dets)))

    def evaluate(self, size: int) -> dict:
        """The metrics on every rank; an error of the main process's evaluation raised on every rank.

        Every process writes out what it buffered before the main one reads all of it. mmengine's
        ``BaseMetric.evaluate`` would leave the other ranks waiting for a broadcast that never
        comes when ``compute_metrics`` fails; here the main process always broadcasts, its
        metrics (with :attr:`last_results`) or its error, so every rank ends the same way.
        """
        from mmengine.dist import barrier, broadcast_object_list, collect_results, is_main_process

        self._spiller().flush()
        barrier()
        failure = None
        outcome: list = [None]
        try:
            results = collect_results(self.results, size, self.collect_device)
            if is_main_process():
                try:
                    metrics = self.compute_metrics(results)
                    named = {f"{self.prefix}/{k}" if self.prefix else k: v for k, v in metrics.items()}
                    outcome = [("ok", named, self.last_results)]
                except Exception as exc:  # sent to the other ranks, then raised here as it is
                    failure = exc
                    outcome = [("error", isinstance(exc, UserError), f"{type(exc).__name__}: {exc}")]
            broadcast_object_list(outcome)
        finally:
            self.results.clear()
            self._remove_spill()
        if failure is not None:
            raise failure
        status, *rest = outcome[0]
        if status == "error":
            user_error, message = rest
            raise (UserError if user_error else RuntimeError)(f"rank 0 failed to compute the LVIS metrics ({message})")
        named, self.last_results = rest
        return named

    def _remove_spill(self) -> None:
        from mmengine.dist import barrier

        barrier()
        if self._lock is not None:
            release_spill_run(self.spill_dir, self._run, self._lock)
            self._lock = None
        self._spill = None
        self._evaluations += 1

    def compute_metrics(self, results: list) -> dict:
        logger = MMLogger.get_current_instance()
        keep: dict[str, set[int]] = {}
        for tag, seq in results:
            keep.setdefault(tag, set()).add(seq)
        results = load_spilled(self.run_dir, keep)
        out, per_class = {}, {}
        for iou in self.iou_types:
            if iou == "segm" and len(results) and not results.has_masks:
                raise UserError("segm metric requested but the model predicts no masks; use metric=['bbox']")
            m = lvis_metrics(self.doc, results, iou, self.max_dets, cat_chunk_size=self.cat_chunk_size, per_class=True)
            per_class[iou] = m.pop("per_class")
            out[iou] = m
        self.last_results = {"metrics": out, "per_class": per_class}
        logger.info("\n" + format_table(out, title=f"LVIS metrics ({len(results)} detections)"))
        for protocol in self.extra_protocols:
            extra = {
                iou: lvis_metrics(self.doc, results, iou, protocol=protocol, cat_chunk_size=self.cat_chunk_size)
                for iou in self.iou_types
            }
            self.last_results[protocol] = extra
            logger.info("\n" + format_table(extra, title=f"LVIS AP-{protocol} metrics (10,000 per class)"))
        if self.per_class_csv:
            write_per_class_csv(self.per_class_csv, categories_by_id(self.doc), per_class)
        self._write_matches_and_results(results)
        return {f"{iou}_{k}": v for iou, m in out.items() for k, v in m.items()}

    def _write_matches_and_results(self, results: Detections) -> None:
        import json

        from crat_ft.common.files import atomic_write_text
        from crat_ft.evaluation.matching import index_ground_truth, match_table

        if self.matches_files:
            gt = index_ground_truth(self.doc)
            for iou in self.iou_types:
                if iou in self.matches_files:
                    match_table(self.doc, results, iou, self.max_dets, gt=gt).save(self.matches_files[iou])
        if self.outfile_prefix:
            rows = np.arange(len(results))
            atomic_write_text(f"{self.outfile_prefix}.bbox.json", json.dumps(results.to_dicts(rows, with_masks=False)))
            if results.has_masks and "segm" in self.iou_types:
                atomic_write_text(
                    f"{self.outfile_prefix}.segm.json", json.dumps(results.to_dicts(rows, with_masks=True))
                )


SPILL_DIR = "crat-ft-detections"
