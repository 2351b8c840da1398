"""Results files of any tool, read and evaluated (``evaluate-results``).

Results files are read by one reader, :func:`read_results` (``evaluate-results``,
``compare`` and ``analyze-errors`` all use it): the file's shape first
(:func:`load_results_file`), then every detection against the ground truth
(:func:`crat_ft.evaluation.checks.check_results`; RLE masks are decoded by
:func:`crat_ft.evaluation.checks.rle_problem` before the COCO mask API, which
trusts them, ever sees them). A bad file stops with one line naming the first
bad detection.
"""

from __future__ import annotations

import os
from typing import Sequence

from crat_ft.common.errors import UserError
from crat_ft.common.lvis_json import load_lvis_json
from crat_ft.evaluation.checks import check_results, shown
from crat_ft.evaluation.detections import Detections
from crat_ft.evaluation.lvis import IOU_TYPES, lvis_metrics


def is_metrics(doc) -> bool:
    """Whether a parsed JSON is a metrics file (``evaluate``'s or ``evaluate-results``' ``--out``)."""
    return isinstance(doc, dict) and any(isinstance(doc.get(iou), dict) and "AP" in doc[iou] for iou in IOU_TYPES)


def read_json(path: str | os.PathLike, what: str):
    """A JSON file's content; one-line errors for a missing path, a directory, or text that is not JSON."""
    import json
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory; pass the JSON file itself")
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; check the path")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{what} {path} is not JSON ({first}); pass a JSON results file") from None


def load_results_file(path: str | os.PathLike, doc=None) -> list[dict]:
    """Detections from a JSON results file (mmdet's ``outfile_prefix`` ``.bbox.json``/``.segm.json``,
    detectron2's ``lvis_instances_results.json``, lvis-api's format: a list of detection dicts).

    Only the file's shape is checked here; :func:`read_results` checks the detections too.

    Args:
        doc: the file's parsed JSON, where the caller has read it already.

    Raises:
        UserError: missing, a directory, not JSON, a pickle, an annotation or metrics file, or not a list
            of detections.
    """
    from pathlib import Path

    path = Path(path)
    if path.suffix in (".pkl", ".pickle") and path.is_file():
        raise UserError(
            f"{path} is a pickle (mmdet's --out); crat-ft reads JSON results: rerun mmdet's test with "
            "--cfg-options test_evaluator.outfile_prefix=PREFIX and pass PREFIX.bbox.json or PREFIX.segm.json"
        )
    if path.is_dir():
        raise UserError(
            f"results file {path} is a directory; pass a JSON results file (e.g. PREFIX.segm.json, which "
            "`crat-ft evaluate --outfile-prefix PREFIX` writes)"
        )
    if doc is None:
        doc = read_json(path, "results file")
    if isinstance(doc, dict) and "annotations" in doc and "images" in doc:
        raise UserError(
            f"{path} is an annotation file (it has images and annotations), not results; pass the detections file"
        )
    if is_metrics(doc):
        raise UserError(
            f"{path} is a metrics file (it holds AP values), not detections; pass the results file the metrics "
            "were computed from (e.g. PREFIX.segm.json of `crat-ft evaluate --outfile-prefix PREFIX`)"
        )
    if not isinstance(doc, list):
        raise UserError(
            f"results file {path} should be a JSON list of detections (image_id, category_id, score, bbox "
            f"[and segmentation]), got a {type(doc).__name__}"
        )
    for i, det in enumerate(doc):
        if not isinstance(det, dict):
            raise UserError(
                f"results file {path}: results[{i}]: expected a detection object, got {shown(det)}; "
                "pass a list of detections"
            )
    return doc


def read_results(path: str | os.PathLike, gt_doc: dict, doc=None) -> Detections:
    """The detections of a results file as checked columns (:func:`load_results_file`, then
    :func:`check_results` against ``gt_doc``): the reader ``evaluate-results``, ``compare`` and
    ``analyze-errors`` share.

    Args:
        doc: the file's parsed JSON, where the caller has read it already.

    Raises:
        UserError: a bad file or detection (the message names it), or a file without detections.
    """
    dets = load_results_file(path, doc)
    if not dets:
        raise UserError(f"results file {path} holds no detections; pass the file of a model that detected something")
    return check_results(dets, gt_doc, f"results file {path}: results")


def results_iou_types(dets: Detections, iou_types: Sequence[str] | None, path: str | os.PathLike) -> list[str]:
    """The IoU types asked for (default: bbox, plus segm when the detections have masks), checked against them."""
    wanted = list(iou_types) if iou_types else ["bbox"] + (["segm"] if dets.has_masks else [])
    if "segm" in wanted and not dets.has_masks:
        raise UserError(
            f"results file {path}: results[0] lacks 'segmentation'; LVIS segm results need image_id, category_id, "
            "score and segmentation: pass the segm results (PREFIX.segm.json) or --iou-type bbox"
        )
    return wanted


def evaluate_results(
    gt: str | os.PathLike,
    results: str | os.PathLike,
    *,
    iou_types: Sequence[str] | None = None,
    protocol: str = "standard",
    max_dets: int = 300,
) -> dict:
    """``crat-ft evaluate-results``: LVIS metrics of a results file another tool wrote.

    Args:
        iou_types: default ``bbox``, plus ``segm`` when the detections carry masks.

    Returns:
        ``{iou_type: metrics}`` (see :func:`lvis_metrics`).
    """
    gt_doc = load_lvis_json(gt)
    dets = read_results(results, gt_doc)
    wanted = results_iou_types(dets, iou_types, results)
    return {iou: lvis_metrics(gt_doc, dets, iou, max_dets, protocol=protocol) for iou in wanted}
