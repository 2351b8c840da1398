"""The ``custom_imports`` name of CRAT in mmdet's end-to-end training: the module is :mod:`crat_ft.heads.plugin`.

Importing it registers ``CratShared2FCBBoxHead``, ``CratConvFCBBoxHead`` and ``CratFCNMaskHead`` in mmdet::

    custom_imports = dict(imports=['crat_ft.plugin'], allow_failed_imports=False)
"""

from crat_ft.heads.plugin import (
    PLAIN_TYPES,
    PLUGIN_KEYS,
    STATS_NAMES,
    CratConvFCBBoxHead,
    CratFCNMaskHead,
    CratShared2FCBBoxHead,
    export_plain,
    plain_config,
    plain_state_dict,
)

__all__ = [
    "PLAIN_TYPES",
    "PLUGIN_KEYS",
    "STATS_NAMES",
    "CratShared2FCBBoxHead",
    "CratConvFCBBoxHead",
    "CratFCNMaskHead",
    "plain_config",
    "plain_state_dict",
    "export_plain",
]
