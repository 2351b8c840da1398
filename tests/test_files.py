"""crat_ft.common.files: storage-fault classification, atomic writes, stale temporaries, locks."""

import errno
import os
import subprocess

import pytest

from crat_ft.common.errors import StorageError, UserError
from crat_ft.common.files import (
    RunLock,
    atomic_path,
    atomic_write_text,
    clean_stale_temps,
    storage_error,
    temp_name,
    temp_pattern,
)


def test_storage_faults_are_recognised_whatever_reports_them():
    full = storage_error(OSError(errno.ENOSPC, "No space left on device"), "out/x.h5")
    assert isinstance(full, StorageError) and full.exit_code == 1
    assert (
        str(full)
        == "cannot write out/x.h5 (No space left on device); free space or choose a writable location, then rerun"
    )
    h5py_text = OSError(
        "Can't write data (file write failed: ..., errno = 28, error message = 'No space left on device')"
    )
    assert "(No space left on device)" in str(storage_error(h5py_text, "x"))
    torch_text = RuntimeError(
        "[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing file data/0: file write failed"
    )
    assert "(write failed: disk full or not writable)" in str(storage_error(torch_text, "x"))
    assert "(Read-only file system)" in str(storage_error(OSError(errno.EROFS, "Read-only file system"), "x"))
    denied = PermissionError(errno.EACCES, "Permission denied")
    assert storage_error(denied, "x") is not None and storage_error(denied, "x", permission=False) is None
    assert storage_error(ValueError("shape mismatch"), "x") is None
    assert storage_error(FileNotFoundError(errno.ENOENT, "No such file"), "x") is None


def test_atomic_path_leaves_nothing_on_failure_and_replaces_on_success(tmp_path):
    target = tmp_path / "heads.pth"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["heads.pth"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["heads.pth"]
    assert temp_name(target).name == f".heads.tmp-{os.getpid()}.pth"


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    target = tmp_path / "index.h5"
    stale = tmp_path / f".index.tmp-{dead.pid}.h5"
    live = temp_name(target)
    for p in (stale, live):
        p.write_text("x")
    assert clean_stale_temps(tmp_path, temp_pattern(target)) == [stale]
    assert not stale.exists() and live.exists()


def test_a_second_lock_on_the_same_output_is_refused_naming_the_holder(tmp_path):
    lock = tmp_path / ".crat-ft.lock"
    with RunLock(lock, "--work-dir w"):
        assert lock.read_text() == str(os.getpid())
        with pytest.raises(UserError, match=rf"^another crat-ft run \(pid {os.getpid()}\) is using --work-dir w; wait"):
            with RunLock(lock, "--work-dir w"):
                pass
    assert not lock.exists()
    with RunLock(lock, "--work-dir w"):  # free again
        pass
