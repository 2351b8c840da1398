"""The tested stack: its range is checked by every command, and installing crat-ft into an existing
environment keeps that environment's torch, torchvision, mmcv and numpy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import crat_ft_exe

ROOT = Path(__file__).resolve().parents[1]


def _fake_distribution(root: Path, name: str, version: str) -> Path:
    """A ``<name>-<version>.dist-info`` that importlib.metadata finds first on PYTHONPATH."""
    info = root / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return root


@pytest.mark.parametrize("name, version", [("mmcv", "2.2.0"), ("mmdet", "3.2.0"), ("mmcv", "1.7.1")])
def test_every_command_refuses_an_mmcv_or_mmdet_outside_the_tested_range(tmp_path, name, version):
    fake = _fake_distribution(tmp_path / "site", name, version)
    env = dict(os.environ, PYTHONPATH=str(fake), PYTHONWARNINGS="ignore")
    expected = {"mmcv": "mmcv>=2.0, <2.2", "mmdet": "mmdet>=3.3, <3.4"}[name]
    for args in (["evaluate-results", tmp_path / "gt.json", tmp_path / "r.json"], ["make-demo-data", tmp_path / "d"]):
        r = subprocess.run([*crat_ft_exe(), *map(str, args)], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 2 and r.stderr.splitlines() == [
            f"crat-ft: error: {name} {version} is outside the range crat-ft is tested with ({expected}); "
            f"install a {name} in that range (`crat-ft env` shows the whole stack)"
        ], r.stderr
    assert not (tmp_path / "d").exists()
    r = subprocess.run([*crat_ft_exe(), "env"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and f"tested range       OUTSIDE: {name} {version}" in r.stdout
    assert f"crat-ft: problem: {name} {version} is outside the tested range ({expected})" in r.stderr
    r = subprocess.run([*crat_ft_exe(), "evaluate-results", "--help"], capture_output=True, text=True, env=env)
    assert r.returncode == 0  # help is always given


def test_env_says_the_running_stack_is_inside_the_tested_range():
    from crat_ft.common.envinfo import SUPPORTED, outside_range

    r = subprocess.run([*crat_ft_exe(), "env"], capture_output=True, text=True, timeout=120)
    assert outside_range() == {}
    (row,) = [line for line in r.stdout.splitlines() if line.startswith("tested range")]
    assert row.split(None, 2)[2].startswith("inside (python>=3.10, <3.12, torch>=2.1, <2.15, numpy>=1.22, <2.0,")
    assert set(SUPPORTED) == {"python", "torch", "numpy", "mmcv", "mmengine", "mmdet"}


def test_pip_install_into_an_existing_environment_replaces_nothing_it_has():
    """What `pip install .` would install into this environment: crat-ft alone (its dependencies are
    there), never another torch, torchvision, mmcv or numpy."""
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation", "--quiet",
         "--report", "-", f"{ROOT}[test]"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    names = [item["metadata"]["name"] for item in json.loads(r.stdout)["install"]]
    assert names == ["crat-ft"], names
