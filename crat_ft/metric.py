"""The ``custom_imports`` name of crat-ft's LVIS metric: the module is :mod:`crat_ft.evaluation.metric`.

Importing it registers ``CratLVISMetric`` in mmdet::

    custom_imports = dict(imports=['crat_ft.metric'], allow_failed_imports=False)
"""

from crat_ft.evaluation.metric import SPILL_DIR, CratLVISMetric

__all__ = ["SPILL_DIR", "CratLVISMetric"]
