"""Shared fixtures: tiny real instances built inside the tests."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

if "PYTEST_XDIST_WORKER" in os.environ:  # xdist workers share the cores: one thread each (set before torch loads)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
from cli_server import CliServer  # noqa: E402

from crat_ft.synthetic.dataset import make_demo_data  # noqa: E402
from crat_ft.synthetic.variants import DemoDataSpec  # noqa: E402

TINY_SPEC = DemoDataSpec(seed=3, train_images=40, val_images=10, classes=40)


def _once_per_session(tmp_path_factory, name: str, build) -> Path:
    """``build(directory)`` once per test session: the xdist workers share what the first one built
    (they take turns on a lock); without xdist, a session fixture is already built once."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent / "shared"  # the session's directory, above each worker's
    shared.mkdir(exist_ok=True)
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = shared / f"{name}.done"
        if not done.exists():  # (a build that failed in the other worker left a directory to remove)
            shutil.rmtree(shared / name, ignore_errors=True)
            (shared / name).mkdir()
            done.write_text(str(build(shared / name)))
        return Path(done.read_text())


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A tiny synthetic LVIS-format dataset (40 classes, 40 train / 10 val images)."""
    return _once_per_session(
        tmp_path_factory, "data", lambda d: make_demo_data(d / "synthetic", TINY_SPEC, progress=False)
    )


def crat_ft_exe() -> list[str]:
    """The installed ``crat-ft`` console script (the one a user runs)."""
    exe = Path(sys.executable).parent / "crat-ft"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("crat-ft")
    if found is None:
        pytest.fail("crat-ft is not installed; run `bash scripts/setup.sh`")
    return [found]


_SERVER: list[CliServer] = []


def _fresh_processes() -> bool:
    return os.environ.get("CRAT_FT_TEST_FRESH_PROCESSES") == "1"


def _server() -> CliServer:
    if not _SERVER:
        _SERVER.append(CliServer(sys.executable))
    return _SERVER[0]


def _command(args, env=None) -> tuple[list[str], dict]:
    """The argv of ``crat-ft args`` and its environment: this one, warnings off, plus ``env``."""
    return crat_ft_exe() + [str(a) for a in args], dict(os.environ, PYTHONWARNINGS="ignore", **(env or {}))


def run_cli(*args, cwd=None, env=None, timeout=900) -> subprocess.CompletedProcess:
    """``crat-ft args`` as a user runs it (``env`` adds to the environment). Each command runs in a fresh
    child of a pre-imported interpreter (tests/cli_server.py), or in a real new process with
    ``CRAT_FT_TEST_FRESH_PROCESSES=1``."""
    argv, env = _command(args, env)
    if _fresh_processes():
        return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    return _server().run(argv[0], argv[1:], cwd, env, timeout)


def start_cli(*args):
    """``crat-ft args`` started in a process group of its own, its output discarded: ``.pid``, ``.poll()``,
    ``.wait(timeout)``, as of a ``subprocess.Popen``. The server runs one command at a time: a ``run_cli``
    or ``start_cli`` before this one ends kills it first, so commands that must overlap (a second run
    racing for a lock) start real processes with ``subprocess``."""
    argv, env = _command(args)
    if _fresh_processes():
        return subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env
        )
    return _server().start(argv[0], argv[1:], None, env)


def kill_cli_after(args, seconds: float) -> None:
    """Start ``crat-ft args`` and SIGKILL its process group after ``seconds``, unless it ends first."""
    command = start_cli(*args)
    try:
        command.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(command.pid, signal.SIGKILL)
        command.wait()


# the longest files first: xdist gives each worker whole files in this order (--no-loadscope-reorder), and
# a long file started last would leave the other workers idle until it ends
LONGEST_FIRST = ("test_lvis_guide.py", "test_demo.py", "test_ablate.py", "test_distributed.py", "test_faults.py",
                 "test_families.py", "test_demo_e2e.py", "test_repository.py")  # fmt: skip


def pytest_collection_modifyitems(items):
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def pytest_sessionfinish(session, exitstatus):
    while _SERVER:
        _SERVER.pop().close()


def extract_args(detector, data, *options) -> list:
    """Arguments of ``crat-ft extract-features`` with the demo config, ``detector`` and ``data``, plus ``options``."""
    return ["extract-features", demo_config_path(), detector, "--data-root", data, *options]


def retrain_args(cache, work_dir, ft_config: str = "crat_synthetic.py") -> list:
    """Arguments of ``crat-ft retrain-heads`` with a demo fine-tune config, ``cache`` and ``work_dir``."""
    from crat_ft.common.paths import demo_config

    return ["retrain-heads", demo_config(ft_config), "--cache", cache, "--work-dir", work_dir]


def demo_config_path() -> Path:
    from crat_ft.common.paths import demo_config

    return demo_config()


# a detector small enough to train in seconds: the demo config with its own settings
TINY_TRAIN_OPTIONS = ["train_cfg.max_iters=4", "default_hooks.checkpoint.interval=4", "default_hooks.logger.interval=1"]


@pytest.fixture(scope="session")
def tiny_detector(tiny_data, tmp_path_factory) -> Path:
    """detector.pth of the demo Mask R-CNN trained 4 iterations on the tiny data (through the CLI)."""

    def train(work: Path) -> Path:
        r = run_cli("train-detector", demo_config_path(), "--work-dir", work, "--data-root", tiny_data, "--seed", 0,
                    "--cfg-options", *TINY_TRAIN_OPTIONS)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        return work / "detector.pth"

    return _once_per_session(tmp_path_factory, "stage1", train)


@pytest.fixture(scope="session")
def tiny_cache(tiny_data, tiny_detector, tmp_path_factory) -> Path:
    """index.h5 of the tiny detector's features on 12 training images."""

    def extract(root: Path) -> Path:
        r = run_cli(*extract_args(tiny_detector, tiny_data), "--out", root / "cache", "--max-images", 12,
                    "--segment-images", 4, "--mask-pos-per-class", 400)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        return root / "cache" / "index.h5"

    return _once_per_session(tmp_path_factory, "cache", extract)
