"""Locations of the files that ship with crat-ft."""

from pathlib import Path


def config_root() -> Path:
    """Directory holding crat-ft's configs (``configs/`` in a checkout).

    Installed with ``pip install .`` the configs live in the package
    (``crat_ft/configs``); in a source checkout they sit beside it.
    """
    here = Path(__file__).resolve().parents[1]  # the crat_ft package
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "demo").is_dir():
            return candidate
    raise FileNotFoundError(f"crat-ft configs not found next to {here}; reinstall crat-ft with `pip install .`")


def demo_config(name: str = "mask-rcnn_r18_fpn_tiny_synthetic.py") -> Path:
    """Path of a config in ``configs/demo``."""
    return config_root() / "demo" / name
