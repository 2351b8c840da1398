"""crat-ft: decoupled fine-tuning of mmdet detectors for long-tailed data.

Importing this package is cheap: torch, mmdet and mmengine are imported by the
submodules that need them.
"""

__version__ = "0.1.0"
