"""``CratLVISMetric``: the LVIS v1 metric in mmdet's test loop (registered in mmdet's ``METRICS``).

Importing this module registers it; configs name it as
``test_evaluator = dict(type='CratLVISMetric', ann_file=..., metric=['bbox', 'segm'])``.
The metric collects one list of detections per image and evaluates them with
:func:`crat_ft.evaluation.lvis_metrics` (see docs/architecture.md#evaluation-protocol).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from mmdet.registry import METRICS
from mmengine.evaluator import BaseMetric
from mmengine.logging import MMLogger

from crat_ft.errors import UserError
from crat_ft.evaluation import IOU_TYPES, format_table, lvis_metrics, write_per_class_csv
from crat_ft.lvis_json import categories_by_id, load_lvis_json


@METRICS.register_module()
class CratLVISMetric(BaseMetric):
    """LVIS v1 bbox/segm metric for mmdet's test loop, on :func:`lvis_metrics`.

    Args:
        ann_file: the LVIS annotation file of the evaluated split.
        metric: ``"bbox"``, ``"segm"`` or both.
        max_dets: detections per image across categories (LVIS: 300).
        cat_chunk_size: categories per evaluation chunk (bounded memory).
        per_class_csv: if set, write the per-class AP table there.
        ap_fixed: also compute AP-fixed (10,000 detections per class, no per-image
            cap; ``last_results["fixed"]``). It sees what the model outputs: raise
            ``model.test_cfg.rcnn.max_per_img`` for it to see more than 300 per image.
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
        ap_fixed: bool = True,
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
        self.ap_fixed = ap_fixed
        self.per_class_csv = per_class_csv
        self._doc = None
        self.last_results: dict = {}

    @property
    def doc(self) -> dict:
        if self._doc is None:
            self._doc = load_lvis_json(self.ann_file)
        return self._doc

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        import pycocotools.mask as mask_util

        # one entry per image: mmengine truncates ``results`` to the dataset size
        cat_ids = [c["id"] for c in categories_by_id(self.doc)]
        for sample in data_samples:
            dets = []
            pred = sample["pred_instances"]
            img_id = sample["img_id"]
            bboxes = pred["bboxes"].cpu().numpy()
            scores = pred["scores"].cpu().numpy()
            labels = pred["labels"].cpu().numpy()
            masks = pred["masks"].cpu().numpy() if "masks" in pred and "segm" in self.iou_types else None
            for i in range(len(scores)):
                x0, y0, x1, y1 = (float(v) for v in bboxes[i])
                det = {
                    "image_id": img_id,
                    "category_id": cat_ids[int(labels[i])],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": float(scores[i]),
                }
                if masks is not None:
                    rle = mask_util.encode(np.asfortranarray(masks[i].astype(np.uint8)))
                    rle["counts"] = rle["counts"].decode()
                    det["segmentation"] = rle
                dets.append(det)
            self.results.append(dets)

    def compute_metrics(self, results: list) -> dict:
        logger = MMLogger.get_current_instance()
        results = [d for per_image in results for d in per_image]
        out, per_class = {}, {}
        for iou in self.iou_types:
            if iou == "segm" and results and "segmentation" not in results[0]:
                raise UserError("segm metric requested but the model predicts no masks; use metric=['bbox']")
            m = lvis_metrics(self.doc, results, iou, self.max_dets, cat_chunk_size=self.cat_chunk_size, per_class=True)
            per_class[iou] = m.pop("per_class")
            out[iou] = m
        self.last_results = {"metrics": out, "per_class": per_class}
        logger.info("\n" + format_table(out, title=f"LVIS metrics ({len(results)} detections)"))
        if self.ap_fixed:
            fixed = {
                iou: lvis_metrics(self.doc, results, iou, protocol="fixed", cat_chunk_size=self.cat_chunk_size)
                for iou in self.iou_types
            }
            self.last_results["fixed"] = fixed
            logger.info("\n" + format_table(fixed, title="LVIS AP-fixed metrics (10,000 per class)"))
        if self.per_class_csv:
            write_per_class_csv(self.per_class_csv, categories_by_id(self.doc), per_class)
        return {f"{iou}_{k}": v for iou, m in out.items() for k, v in m.items()}
