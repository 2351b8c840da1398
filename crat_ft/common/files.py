"""Files: atomic writes, locks, temporary directories, disk faults, file hashes.

Every file crat-ft writes appears complete or not at all: it is written under a
temporary name that carries the writer's pid (``.<stem>.tmp-<pid><suffix>``) and
renamed into place. A run cleans the temporary files of earlier runs that were
killed (their pid is gone) before it starts. Output directories are checked
for writability before any expensive work, and a full disk or a read-only file
system ends the command with one line (:class:`StorageError`, exit code 1),
removing what the failed write left.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from crat_ft.common.errors import StorageError, UserError

# errors that mean "the output cannot be written here", whatever wrote it
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM}
# how libraries that hide errno (h5py, torch's zip writer) report the same faults
_STORAGE_PHRASES = (
    (errno.ENOSPC, "No space left"),
    (errno.EDQUOT, "Disk quota"),
    (errno.EROFS, "Read-only file system"),
    (errno.EFBIG, "File too large"),
    (errno.EACCES, "Permission denied"),
)


def _storage_reason(exc: BaseException, permission: bool = True) -> str | None:
    codes = STORAGE_ERRNOS if permission else STORAGE_ERRNOS - {errno.EACCES, errno.EPERM}
    code = getattr(exc, "errno", None)
    if code in codes:
        return os.strerror(code)
    text = str(exc)
    for code, phrase in _STORAGE_PHRASES:
        if code in codes and (phrase in text or f"errno = {code}," in text):
            return os.strerror(code)
    if "file write failed" in text:  # torch's zip writer says no more
        return "write failed: disk full or not writable"
    return None


def storage_error(exc: BaseException, path: str | os.PathLike, *, permission: bool = True) -> StorageError | None:
    """The one-line :class:`StorageError` for ``exc`` if it is a storage fault, else None.

    ``permission=False`` leaves permission errors out (where ``exc`` may come
    from reading an input, not from writing an output).
    """
    if isinstance(exc, StorageError):
        return exc
    reason = _storage_reason(exc, permission)
    if reason is None:
        return None
    return StorageError(f"cannot write {path} ({reason}); free space or choose a writable location, then rerun")


class QuietFinalizerFaults:
    """While active, drop the "Exception ignored" reports of finalizers that failed on a storage fault.

    h5py flushes when its objects are deallocated; on a full disk every such
    flush fails and prints a traceback that says nothing the one-line
    :class:`StorageError` does not. If the block ends with a storage fault the
    filter stays installed (the process is ending with that error), else the
    previous hook is restored.
    """

    def __enter__(self) -> "QuietFinalizerFaults":
        # Cython finalizers (h5py's) print through sys.excepthook, then sys.unraisablehook
        self.previous = (sys.unraisablehook, sys.excepthook)
        unraisable_hook, except_hook = self.previous

        def quiet_unraisable(unraisable) -> None:
            if _storage_reason(unraisable.exc_value) is None:
                unraisable_hook(unraisable)

        def quiet_except(exc_type, value, tb) -> None:
            if _storage_reason(value) is None:
                except_hook(exc_type, value, tb)

        sys.unraisablehook, sys.excepthook = quiet_unraisable, quiet_except
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None or _storage_reason(exc) is None:
            sys.unraisablehook, sys.excepthook = self.previous


@contextlib.contextmanager
def storage_errors(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise storage faults inside the block as one-line :class:`StorageError`."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        err = storage_error(exc, path)
        if err is None:
            raise
        raise err from None


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes (checkpoints are identified by it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def temp_name(path: Path) -> Path:
    """The temporary name of ``path`` for this process: ``.<stem>.tmp-<pid><suffix>`` beside it.

    The suffix stays last, so writers that choose a format by it (mmengine's
    ``Config.dump``) write the right one.
    """
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def temp_pattern(path: Path) -> str:
    """Glob of every :func:`temp_name` of ``path`` (any pid), for :func:`clean_stale_temps`."""
    return f".{path.stem}.tmp-*"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_PID_SUFFIX = re.compile(r"\.tmp-(\d+)(?:[-.].*)?$")


def clean_stale_temps(directory: Path, pattern: str = ".*.tmp-*") -> list[Path]:
    """Remove temporary files/dirs matching ``pattern`` in ``directory`` whose writer pid is gone."""
    removed = []
    if not directory.is_dir():
        return removed
    for p in directory.glob(pattern):
        m = _PID_SUFFIX.search(p.name)
        if m is None or pid_alive(int(m.group(1))):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed to ``path``, on failure removed.

    Storage faults become :class:`StorageError`.
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        with storage_errors(path):
            yield tmp
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def commit_together(pairs: list[tuple[Path, Path]], journal: Path) -> None:
    """Rename several temporary files into place as one unit.

    A journal listing the destinations exists while the renames happen; a run
    killed among them leaves the journal, and :func:`recover_journal` at the
    next start removes the inconsistent set.
    """
    with storage_errors(journal):
        journal.write_text("\n".join(str(final) for _, final in pairs))
        for tmp, final in pairs:
            os.replace(tmp, final)
        journal.unlink()


def recover_journal(journal: Path) -> None:
    """Undo an interrupted :func:`commit_together`: remove its destinations and the journal."""
    if not journal.exists():
        return
    for line in journal.read_text().splitlines():
        if line.strip():
            Path(line).unlink(missing_ok=True)
    journal.unlink(missing_ok=True)


def check_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Create ``path`` if needed and check that files can be created in it.

    Raises:
        StorageError: the directory cannot be created or written, naming ``what`` (e.g. ``--out``).
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".crat-ft-probe.tmp-{os.getpid()}-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise StorageError(f"{what} {path} is not writable ({reason}); choose a writable directory") from None
    return path


@contextlib.contextmanager
def output_dir(path: str | os.PathLike, what: str) -> Iterator[Path]:
    """:func:`check_writable_dir` for a command's output directory, undone if the command fails.

    A command refused after this point (a bad checkpoint, a settings mismatch)
    must not leave an empty ``--out`` behind: on an exception, the directories
    this call created are removed again if they are still empty. A directory
    that holds anything (a failed run's checkpoints and logs) is kept.
    """
    path = Path(path)
    created = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    check_writable_dir(path, what)
    try:
        yield path
    except BaseException:
        for p in created:
            try:
                p.rmdir()
            except OSError:
                break
        raise


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes for unprivileged writers on the file system holding ``path``."""
    return shutil.disk_usage(path).free


class RunLock:
    """An exclusive lock on an output, held by one crat-ft run at a time.

    ``fcntl.flock`` on ``lock_path`` (which holds the owner's pid); the kernel
    releases it when the process dies, so a killed run never blocks the next
    one. A second run gets one line naming the first one's pid.

    Args:
        lock_path: the lock file (created; removed on release).
        what: the output, for the message (e.g. ``"--work-dir runs/a"``).
    """

    def __init__(self, lock_path: str | os.PathLike, what: str) -> None:
        self.path = Path(lock_path)
        self.what = what
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        while True:
            with storage_errors(self.path):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UserError(
                    f"another crat-ft run (pid {owner}) is using {self.what}; wait for it to finish or choose another output"
                ) from None
            # the previous holder may have removed the file between our open and lock: retry on the new file
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


def new_owned_tempdir(prefix: str) -> Path:
    """A new temporary directory named for this process, ``<prefix>.tmp-<pid>-<random>`` in the system
    temporary directory; those of processes that are gone are removed first. The caller removes it."""
    base = Path(tempfile.gettempdir())
    clean_stale_temps(base, f"{prefix}.tmp-*")
    return Path(tempfile.mkdtemp(prefix=f"{prefix}.tmp-{os.getpid()}-", dir=base))


@contextlib.contextmanager
def owned_tempdir(prefix: str) -> Iterator[Path]:
    """:func:`new_owned_tempdir`, removed when the block ends."""
    path = new_owned_tempdir(prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def refuse_output_among_inputs(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], option: str) -> None:
    """Refuse an output path that is one of the command's inputs, before anything is written.

    Paths are compared resolved (symlinks followed), and by ``os.path.samefile``
    where both exist, so a hard link or another spelling of an input is caught too.

    Args:
        out: the output path given to ``option``.
        inputs: the command's input paths; ``None`` entries are skipped.
        option: the option's name for the message, e.g. ``"--out"``.

    Raises:
        UserError: ``out`` is one of ``inputs``.
    """
    out_path = Path(out)
    out_resolved = out_path.resolve()
    for given in inputs:
        if given is None:
            continue
        path = Path(given)
        same = path.resolve() == out_resolved
        if not same and out_path.exists() and path.exists():
            try:
                same = os.path.samefile(out_path, path)
            except OSError:
                same = False
        if same:
            raise UserError(
                f"{option} {out} is also an input of this command ({given}); choose another path, "
                "an output never replaces an input"
            )
