"""LVIS evaluation: detections as columns, the LVIS metric, matching, and the metric registered in mmdet.

The public Python API is :func:`lvis_metrics` (docs/cli.md); the modules are
:mod:`~crat_ft.evaluation.detections`, :mod:`~crat_ft.evaluation.lvis`,
:mod:`~crat_ft.evaluation.matching` and :mod:`~crat_ft.evaluation.metric`.
"""

from crat_ft.evaluation.lvis import lvis_metrics

__all__ = ["lvis_metrics"]
