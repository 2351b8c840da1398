"""A pre-imported ``crat-ft`` for the tests: one interpreter imports torch, mmcv, mmengine and mmdet once,
then forks a child per command, so a test pays for its command's work and not for ~4 s of imports.

To the command, each child is a fresh ``crat-ft`` process: its own pid and process group, its own argv,
working directory and environment (``OMP_NUM_THREADS`` included: torch's thread count is set
from it), stdin from /dev/null, stdout and stderr into files the test reads, a
freshly seeded ``random`` and numpy, and the interpreter's exit (non-daemon threads joined, atexit
handlers run, streams flushed, an uncaught exception's traceback printed with exit code 1; see
:func:`_exit`). Only
third-party modules are imported ahead: everything of crat_ft (and so every registration into mmdet's
registries) happens inside the child, as in a real process.

Tests that kill a command, time it, or start it under torchrun use real processes (``subprocess``), and
``CRAT_FT_TEST_FRESH_PROCESSES=1`` makes every command a real process.

Run as a script, this module is the server: requests are JSON lines on stdin, replies are JSON lines on
the file descriptor given as its argument (``{"pid": ...}`` when a child starts, ``{"code": ...}`` when it
ends).
"""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

# what every crat-ft command imports before it does any work (torch's own import is most of it)
PRELOAD = (
    "numpy",
    "scipy.stats",
    "torch",
    "torchvision",
    "h5py",
    "click",
    "mmcv",
    "mmcv.ops",
    "mmengine",
    "mmengine.runner",
    "mmengine.dataset",
    "mmdet",
    "mmdet.models",
    "mmdet.datasets",
    "mmdet.evaluation",
    "mmdet.structures",
    "lvis",
    "faster_coco_eval",
    "matplotlib",
    "matplotlib.pyplot",
)


def _serve(reply_fd: int) -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    gc.freeze()  # the children's collections skip what was imported: they do not copy its pages to scan it
    reply = os.fdopen(reply_fd, "w", buffering=1)
    reply.write(json.dumps({"ready": os.getpid()}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            reply.close()
            _become_command(request)  # never returns: the child ends as a process that ran crat-ft
        reply.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        reply.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")


def _become_command(request: dict) -> None:
    import random
    import tempfile

    import numpy as np

    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    os.chdir(request["cwd"])
    threads = request["env"].get("OMP_NUM_THREADS")
    if threads != os.environ.get("OMP_NUM_THREADS"):  # torch read the server's at import: set the command's
        import torch

        torch.set_num_threads(int(threads) if threads else os.cpu_count())
    os.environ.clear()
    os.environ.update(request["env"])
    tempfile.tempdir = None  # $TMPDIR is read again, as a new process would
    random.seed()
    np.random.seed()
    sys.argv = [request["exe"], *request["args"]]
    from crat_ft.cli.main import main

    try:
        main()
        code = 0
    except SystemExit as exc:  # what the interpreter makes of it
        code = exc.code
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    _exit(code)


def _exit(code: int) -> None:
    """End as the interpreter ends a process, less the teardown of its modules (1.4 s with torch and mmdet
    loaded, and nothing a command can see): wait for non-daemon threads, run the atexit handlers, flush the
    streams, then the C library's exit, so that the C atexit handlers (HDF5 closing its files) run too."""
    import atexit
    import ctypes
    import threading

    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    ctypes.CDLL(None).exit(code)


class CliServer:
    """The pytest side: starts the server once and runs each command in a fresh child of it."""

    def __init__(self, python: str):
        self._log = tempfile.NamedTemporaryFile(prefix="crat-ft-cli-server-", suffix=".log", delete=False)
        read_fd, write_fd = os.pipe()
        self._proc = subprocess.Popen(
            [python, __file__, str(write_fd)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            pass_fds=(write_fd,),
            text=True,
            env=dict(os.environ, PYTHONWARNINGS="ignore"),
            cwd="/",
        )
        os.close(write_fd)
        self._replies = read_fd
        self._buffer = b""
        self._running: Command | None = None
        self._reply("ready", timeout=300)

    def _reply(self, key: str, timeout: float | None) -> int:
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([self._replies], [], [], timeout)
            if not ready:
                raise TimeoutError(key)
            chunk = os.read(self._replies, 4096)
            if not chunk:
                log = Path(self._log.name).read_text()[-3000:]
                raise RuntimeError(f"the crat-ft test server died (waiting for {key!r}):\n{log}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message = json.loads(line)
        return message[key]

    def start(self, exe: str, args: list[str], cwd=None, env: dict | None = None) -> Command:
        """Start ``exe args`` in a child; one command at a time (one a test left running is killed first)."""
        if self._running is not None and self._running.poll() is None:
            os.killpg(self._running.pid, signal.SIGKILL)
            self._running.wait(60)
        tmp = tempfile.TemporaryDirectory(prefix="crat-ft-cli-")
        out, err = Path(tmp.name, "stdout"), Path(tmp.name, "stderr")
        request = dict(exe=exe, args=args, cwd=str(cwd or os.getcwd()), env=env if env is not None else dict(os.environ),
                       stdout=str(out), stderr=str(err))  # fmt: skip
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        self._running = Command(self, [exe, *args], self._reply("pid", timeout=60), tmp)
        return self._running

    def run(self, exe: str, args: list[str], cwd, env: dict, timeout: float) -> subprocess.CompletedProcess:
        """``subprocess.run(..., capture_output=True, text=True, timeout=timeout)``, in a child."""
        command = self.start(exe, args, cwd, env)
        try:
            command.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(command.pid, signal.SIGKILL)
            command.wait(60)
            out, err = command.output()
            raise subprocess.TimeoutExpired(command.args, timeout, out, err) from None
        return subprocess.CompletedProcess(command.args, command.returncode, *command.output())

    def close(self) -> None:
        self._proc.stdin.close()
        self._proc.wait(timeout=60)
        os.close(self._replies)
        os.unlink(self._log.name)


if __name__ == "__main__":
    fd = int(sys.argv[1])
    sys.argv = sys.argv[:1]
    _serve(fd)


class Command:
    """A command started by :meth:`CliServer.start`: ``pid`` (its process group), ``poll``, ``wait``, ``output``."""

    def __init__(self, server: CliServer, args: list[str], pid: int, tmp: tempfile.TemporaryDirectory):
        self.server, self.args, self.pid, self._tmp = server, args, pid, tmp
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                self.returncode = self.server._reply("code", timeout=0)
            except TimeoutError:
                pass
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            try:
                self.returncode = self.server._reply("code", timeout=timeout)
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
        return self.returncode

    def output(self) -> tuple[str, str]:
        """What the command wrote to stdout and stderr (it has ended); its files are removed."""
        out, err = (Path(self._tmp.name, name).read_text() for name in ("stdout", "stderr"))
        self._tmp.cleanup()
        return out, err
