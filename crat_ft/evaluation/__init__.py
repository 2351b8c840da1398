"""LVIS evaluation: detections as columns, checked against the ground truth, the LVIS metric, results files,
matching, and the metric registered in mmdet.

The public Python API is :func:`lvis_metrics` (docs/cli.md). The modules: :mod:`~crat_ft.evaluation.detections`
(detections as columns, spilled per process), :mod:`~crat_ft.evaluation.checks` (detections checked against the
ground truth), :mod:`~crat_ft.evaluation.lvis` (the metric on faster-coco-eval, tables),
:mod:`~crat_ft.evaluation.results` (results files of any tool), :mod:`~crat_ft.evaluation.matching` (match tables)
and :mod:`~crat_ft.evaluation.metric` (``CratLVISMetric``, registered in mmdet).
"""

from crat_ft.evaluation.lvis import lvis_metrics

__all__ = ["lvis_metrics"]
