"""The public name of CRAT's maths, pure tensors: the module is :mod:`crat_ft.heads.transfusion`."""

from crat_ft.heads import transfusion as _transfusion
from crat_ft.heads.transfusion import *  # noqa: F403  (the names of its __all__)

__all__ = _transfusion.__all__
