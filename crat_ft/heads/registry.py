"""``register_all``: everything crat-ft needs registered before mmdet/mmengine build from configs.

mmdet's modules (default scope ``mmdet``), crat-ft's classifier losses
(:mod:`crat_ft.heads.losses`), LVIS metric (:mod:`crat_ft.evaluation.metric`) and DDP wrapper
(:mod:`crat_ft.common.dist`), and crat-ft's
safe checkpoint loader as mmengine's loader for local files
(:func:`crat_ft.engine.checkpoint.allow_mmengine_pickles`). Idempotent.
"""

from __future__ import annotations


def register_all() -> None:
    """Register mmdet's and crat-ft's modules and the safe checkpoint loader."""
    import mmdet.utils

    import crat_ft.common.dist  # noqa: F401  (registers CratDistributedDataParallel)
    import crat_ft.evaluation.metric  # noqa: F401  (registers CratLVISMetric)
    import crat_ft.heads.losses  # noqa: F401  (registers GroupSoftmaxLoss, DualSoftmaxScores)
    from crat_ft.engine.checkpoint import allow_mmengine_pickles

    mmdet.utils.register_all_modules(init_default_scope=True)
    allow_mmengine_pickles()
