"""``register_all``: everything crat-ft needs registered before mmdet/mmengine build from configs.

mmdet's modules (default scope ``mmdet``), crat-ft's classifier losses
(:mod:`crat_ft.losses`), LVIS metric (:mod:`crat_ft.metric`) and DDP wrapper
(:mod:`crat_ft.dist`), and crat-ft's
safe checkpoint loader as mmengine's loader for local files
(:func:`crat_ft.checkpoint.allow_mmengine_pickles`). Idempotent.
"""

from __future__ import annotations


def register_all() -> None:
    """Register mmdet's and crat-ft's modules and the safe checkpoint loader."""
    import mmdet.utils

    import crat_ft.dist  # noqa: F401  (registers CratDistributedDataParallel)
    import crat_ft.losses  # noqa: F401  (registers GroupSoftmaxLoss, DualSoftmaxScores)
    import crat_ft.metric  # noqa: F401  (registers CratLVISMetric)
    from crat_ft.checkpoint import allow_mmengine_pickles

    mmdet.utils.register_all_modules(init_default_scope=True)
    allow_mmengine_pickles()
