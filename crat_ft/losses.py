"""The ``custom_imports`` name of crat-ft's classifier losses: the module is :mod:`crat_ft.heads.losses`.

Importing it registers ``GroupSoftmaxLoss`` and ``DualSoftmaxScores`` in mmdet::

    custom_imports = dict(imports=['crat_ft.losses'], allow_failed_imports=False)
"""

from crat_ft.heads.losses import CRAT_LOSSES, DEFAULT_GROUP_BOUNDS, DualSoftmaxScores, GroupSoftmaxLoss, class_groups

__all__ = ["CRAT_LOSSES", "DEFAULT_GROUP_BOUNDS", "DualSoftmaxScores", "GroupSoftmaxLoss", "class_groups"]
