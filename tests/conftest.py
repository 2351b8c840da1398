"""Shared fixtures: tiny real instances built inside the tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from crat_ft.synthetic import DemoDataSpec, make_demo_data

TINY_SPEC = DemoDataSpec(seed=3, train_images=40, val_images=10, classes=40)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A tiny synthetic LVIS-format dataset (40 classes, 40 train / 10 val images)."""
    return make_demo_data(tmp_path_factory.mktemp("data") / "synthetic", TINY_SPEC, progress=False)


def crat_ft_exe() -> list[str]:
    """The installed ``crat-ft`` console script (the one a user runs)."""
    exe = Path(sys.executable).parent / "crat-ft"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("crat-ft")
    if found is None:
        pytest.fail("crat-ft is not installed; run `bash scripts/setup.sh`")
    return [found]


def run_cli(*args, cwd=None, timeout=900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(crat_ft_exe() + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
