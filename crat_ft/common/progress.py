"""What a person sees on the console: a one-line progress report on stderr (a bar on a terminal, a line
every 10 s in logs), and :func:`framework_log`, which sends the frameworks' output to a file."""

from __future__ import annotations

import contextlib
import sys
import time


class Progress:
    """A one-line progress report with items/s and ETA (stderr)."""

    def __init__(self, total: int, label: str, unit: str = "images", *, start: int = 0) -> None:
        """``start``: items done before this process began (a resumed run); they count toward
        ``total`` but not toward the rate."""
        self.total, self.label, self.unit = total, label, unit
        self.done = self.start = start
        self.t0 = time.time()
        self.last = 0.0
        self.tty = sys.stderr.isatty()

    def update(self, n: int) -> None:
        self.done += n
        now = time.time()
        if now - self.last < (0.5 if self.tty else 10.0) and self.done < self.total:
            return
        self._show(now)

    def finish(self) -> None:
        """Show where it stopped, when that is short of the total (a failed part)."""
        if self.done < self.total:
            self._show(time.time(), stopped=True)
            if self.tty:
                print(file=sys.stderr)

    def _show(self, now: float, stopped: bool = False) -> None:
        self.last = now
        rate = (self.done - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        per = "img" if self.unit == "images" else "it"
        msg = f"{self.label}: {self.done}/{self.total} {self.unit}  {rate:.1f} {per}/s  " + (
            "stopped" if stopped else f"ETA {eta:.0f}s"
        )
        print(("\r" + msg) if self.tty else msg, end="" if self.tty else "\n", file=sys.stderr, flush=True)
        if self.tty and self.done >= self.total:
            print(file=sys.stderr)


class _LogFile:
    """A text stream appending to a file; storage faults silence it (the framework log is best
    effort: the command's own errors say what went wrong).

    Until :meth:`begin` the text is held in memory: a command refused before its work writes no
    log, and so changes nothing in an existing output directory.
    """

    def __init__(self, path) -> None:
        self.path, self._f, self._dead = path, None, False
        self._held: list[str] | None = []

    def begin(self) -> None:
        """Write what was held, and every later write, to the file."""
        if self._held is None:
            return
        held, self._held = self._held, None
        if held:
            self.write("".join(held))

    def write_note(self, line: str) -> None:
        """A line of crat-ft's own, straight into the file."""
        self.write(line.rstrip("\n") + "\n")

    def write(self, text: str) -> int:
        if self._held is not None:
            self._held.append(text)
            return len(text)
        if self._dead:
            return len(text)
        try:
            if self._f is None:
                from pathlib import Path

                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                self._f = open(self.path, "a")
            return self._f.write(text)
        except OSError:
            self._dead = True
            return len(text)

    def flush(self) -> None:
        if self._f is not None and not self._dead:
            try:
                self._f.flush()
            except OSError:
                self._dead = True

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                pass


# the framework logs of the commands running in this process (framework_log pushes, output_begins releases)
_OPEN_LOGS: list[_LogFile] = []


def output_begins(note: str | None = None) -> None:
    """Say that the running command has passed its checks and starts writing its outputs.

    From here on the framework log of :func:`framework_log` goes to its file; before, it is
    held, so a command refused in its checks leaves no log. ``note`` (a line saying what the
    command is about to do) goes into that log only. Without a framework log, nothing.
    """
    for log in _OPEN_LOGS:
        log.begin()
        if note:
            log.write_note(note)


@contextlib.contextmanager
def framework_log(path, *, verbose: bool = False):
    """Send stdout (mmengine's console log, config dumps) and Python warnings to ``path``.

    The console keeps stderr: crat-ft's own lines, progress lines and errors;
    where the log is is said at the end of a successful run.
    mmengine's loggers write to ``sys.stdout`` as it is when they are created,
    so a Runner built inside this context logs to the file. ``verbose`` keeps
    everything on the console.

    The file is written from :func:`output_begins` on, or at the end of a
    successful command; a command that fails before its outputs begin writes none.
    """
    import warnings

    if verbose:
        yield
        return
    from pathlib import Path

    log = _LogFile(path)
    _OPEN_LOGS.append(log)
    ok = False
    with contextlib.redirect_stdout(log), warnings.catch_warnings():
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: log.write(
            warnings.formatwarning(message, category, filename, lineno, line)
        )
        try:
            yield
            ok = True
        finally:
            _OPEN_LOGS.remove(log)
            if ok:
                log.begin()
            log.close()
    # only after success (an error stays the one line that names it), and only if there was any
    if Path(path).exists():
        print(f"framework logs: {path}", file=sys.stderr, flush=True)
