"""Several evaluations at the same time on a CPU (:func:`evaluate_jobs`), each a forked process with its
share of torch's threads, reporting to one progress line; :func:`die_with_parent` ends a child with its parent.
"""

from __future__ import annotations

import os
from pathlib import Path

from crat_ft.common.errors import UserError
from crat_ft.pipeline.evaluate import evaluate_detector


def evaluate_side_by_side(
    config: str | os.PathLike,
    checkpoint: str | os.PathLike,
    jobs: dict[str, tuple[str | os.PathLike | None, str | os.PathLike]],
    *,
    data_root: str | os.PathLike | None = None,
    log=None,
    with_results: bool = False,
) -> None:
    """Evaluate several class-wise layer sets of one detector, at the same time on a CPU.

    ``jobs`` maps a name to ``(heads, out)`` as :func:`evaluate_detector` takes them
    (``heads=None`` evaluates ``checkpoint`` itself). ``with_results``: each job also writes
    its detections as ``results.bbox.json`` / ``results.segm.json`` beside its ``out``
    (mmdet's ``outfile_prefix`` format). The rest is :func:`evaluate_jobs`.
    """
    evaluate_jobs(
        {
            name: dict(
                config=config,
                checkpoint=checkpoint,
                out=out,
                data_root=data_root,
                heads=heads,
                outfile_prefix=Path(out).parent / "results" if with_results else None,
            )
            for name, (heads, out) in jobs.items()
        },
        log=log,
    )


def evaluate_jobs(jobs: dict[str, dict], *, log=None) -> None:
    """Run several evaluations, at the same time on a CPU.

    ``jobs`` maps a name to the keyword arguments of one :func:`evaluate_detector` call
    (``config``, ``checkpoint``, ``out`` and any of its options), so each job may be another
    detector. Much of mmdet's CPU test loop is single-threaded Python (mask pasting, mask
    encoding, the metric), so on a CPU one forked process per job, each with its share of
    torch's threads, finishes sooner than the jobs one after another. The thread count moves
    a detection's score at most in its last bits: the metrics are those of evaluations one by
    one (the demo's agree to 1e-7). With CUDA, or where processes cannot be forked, the jobs
    run one after another.

    ``log`` (an open text file) receives the jobs' stdout (mmengine's logs); one progress
    line on stderr counts the images of all jobs. A failed job raises its error here
    after the others finished; what each job wrote is complete or absent.
    """
    import multiprocessing
    import sys
    from queue import Empty

    import torch

    if len(jobs) < 2 or sys.platform != "linux" or torch.cuda.is_available():
        for kwargs in jobs.values():
            evaluate_detector(**kwargs)
        return
    from crat_ft.common.progress import Progress

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    threads = max(1, torch.get_num_threads() // len(jobs))
    for stream in (sys.stdout, sys.stderr, log):
        if stream is not None:
            stream.flush()  # a forked child must not write its parent's buffered text again
    procs = {
        name: ctx.Process(target=_evaluate_job, args=(queue, name, os.getpid(), threads, log, kwargs), daemon=True)
        for name, kwargs in jobs.items()
    }
    for proc in procs.values():
        proc.start()
    bar = None  # every job evaluates a test split of the same size: the first job's count, times the jobs
    errors: dict[str, BaseException | str] = {}
    finished: set[str] = set()
    while len(finished) < len(procs):
        try:
            kind, name, value = queue.get(timeout=1.0)
        except Empty:  # see whether a job died without a word (killed, out of memory)
            for name, proc in procs.items():
                if name not in finished and proc.exitcode is not None:
                    finished.add(name)
                    if proc.exitcode != 0:
                        errors[name] = f"the process ended with exit code {proc.exitcode}"
            continue
        if kind == "total":
            bar = bar or Progress(value * len(procs), f"evaluate ({', '.join(procs)})")
        elif kind == "step":
            bar.update(value)
        else:
            finished.add(name)
            if kind == "error":
                errors[name] = value
    for proc in procs.values():
        proc.join()
    if bar is not None:
        bar.finish()  # where a failed job left it short
    for name, error in errors.items():
        if isinstance(error, UserError):
            raise error
        where = getattr(log, "name", None)
        raise RuntimeError(f"evaluating {name} failed: {error}" + (f"; its traceback is in {where}" if where else ""))


class _QueueBar:
    """A progress bar that reports to the parent process's queue (see :func:`evaluate_jobs`)."""

    def __init__(self, queue, name: str, total: int) -> None:
        self.queue, self.name = queue, name
        queue.put(("total", name, total))

    def update(self, n: int) -> None:
        self.queue.put(("step", self.name, n))


def die_with_parent(parent: int) -> None:
    """Have Linux end this process when its parent ends, so that a killed demo leaves no
    evaluation running, nor a killed torchrun its workers (what they had not committed is
    cleaned by the next run)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent ended before the request was made
        os._exit(1)


def _evaluate_job(queue, name: str, parent: int, threads: int, log, kwargs: dict) -> None:
    """One job of :func:`evaluate_jobs`, in a forked process."""
    import contextlib
    import sys
    import traceback

    import torch

    die_with_parent(parent)
    torch.set_num_threads(threads)
    try:
        with contextlib.redirect_stdout(log) if log is not None else contextlib.nullcontext():
            evaluate_detector(**kwargs, make_bar=lambda total, label, unit: _QueueBar(queue, name, total))
        queue.put(("done", name, None))
    except BaseException as exc:
        if not isinstance(exc, UserError):
            traceback.print_exc(file=log if log is not None else sys.stderr)
        queue.put(("error", name, exc if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    finally:
        if log is not None:
            log.flush()
