"""Stage-1 training and LVIS evaluation of whole detectors through mmengine's ``Runner``.

Both are built from an mmdet config, so logging, checkpoints, distributed
launch and hooks behave as every mmdet user expects.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from crat_ft.common.errors import UserError
from crat_ft.common.files import atomic_torch_save

DETECTOR_FILE = "detector.pth"


def demo_schedule(iters: int) -> list[str]:
    """``--cfg-options`` that train the demo detector ``iters`` iterations on its own schedule's proportions
    (the config's 600: linear warm-up over the first sixth, learning-rate steps at 3/4 and 11/12)."""
    if iters < 12:
        raise UserError(f"--detector-iters: the demo schedule needs at least 12 iterations, got {iters}")
    return [f"train_cfg.max_iters={iters}", f"param_scheduler.0.end={iters // 6}", f"param_scheduler.1.end={iters}",
            f"param_scheduler.1.milestones=[{iters * 3 // 4},{iters * 11 // 12}]"]  # fmt: skip


def train_detector(
    config: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    cfg_options: Iterable[str] | dict = (),
    data_root: str | os.PathLike | None = None,
    seed: int | None = None,
    resume: bool = False,
    trust_checkpoint: bool = False,
) -> Path:
    """Train an mmdet detector end to end with mmengine's Runner.

    Steps: resolve the config (``cfg_options``, ``data_root``, ``seed``) and its run record
    (:func:`detector_record`) → without ``resume``, refuse a work dir holding a run; with it, refuse
    another record and take the checkpoint ``last_checkpoint`` names → write the record
    (``run.json``) → train → write ``detector.pth``. A refused run leaves the work dir as it found it.

    Args:
        config: mmdet config file.
        work_dir: where logs and checkpoints go.
        cfg_options: validated ``key=value`` overrides.
        data_root: LVIS-format data directory (overrides the config's).
        seed: training seed (overrides ``randomness.seed``).
        resume: continue the run in ``work_dir`` (its settings must be this run's).
        trust_checkpoint: unpickle the work dir's checkpoints (and ``load_from``) beyond the allow-list.

    Returns:
        ``work_dir/detector.pth``: the final weights with class names and the run record in its
        meta, written only when training finished.
    """
    from crat_ft.common.files import output_dir
    from crat_ft.heads.registry import register_all

    register_all()
    cfg = detector_train_config(config, cfg_options, data_root, seed)
    with output_dir(work_dir, "--work-dir") as work_dir:
        return _train_in(cfg, work_dir, resume, trust_checkpoint)


def detector_train_config(config, cfg_options=(), data_root=None, seed: int | None = None):
    """The config ``train-detector`` trains with: ``cfg_options`` and ``data_root`` applied, class names
    filled in, ``randomness.seed`` set to ``seed`` (when given)."""
    from crat_ft.engine.config import prepare_config

    cfg = prepare_config(config, cfg_options, data_root, ("train_dataloader", "val_dataloader", "test_dataloader"))
    if seed is not None:  # randomness.deterministic (mmengine: torch's deterministic algorithms) as configured
        cfg.randomness = dict(seed=seed, deterministic=bool((cfg.get("randomness") or {}).get("deterministic", False)))
    return cfg


def detector_record(cfg) -> dict:
    """What decides a stage-1 detector's weights (a :mod:`crat_ft.common.run_record` record).

    ``settings``: the resolved config (:func:`detector_train_config`) less
    ``OPERATIONAL_KEYS["train-detector"]``; ``inputs``: the training data's annotation files and the
    ``load_from`` checkpoint by sha256 (their paths under ``paths``); ``world_size``: the processes
    (each takes its own batch).
    """
    from crat_ft.common.dist import world_size
    from crat_ft.common.files import sha256_file
    from crat_ft.common.run_record import OPERATIONAL_KEYS, data_identity, flat_settings
    from crat_ft.engine.config import ann_file_of

    tree = cfg.to_dict()
    settings = flat_settings(tree, OPERATIONAL_KEYS["train-detector"])
    annotations = [str(ann_file_of(ds)) for ds in _datasets_of(cfg.train_dataloader.dataset)]
    load_from = cfg.get("load_from")
    local = load_from if load_from and "://" not in str(load_from) else None
    inputs = {"data": data_identity(annotations), "load_from": load_from}
    if local is not None:
        if not Path(local).is_file():
            raise UserError(f"load_from: {local} does not exist; check the config's load_from")
        inputs["load_from"] = "sha256:" + sha256_file(local)
    return {
        "command": "train-detector",
        "settings": settings,
        "inputs": inputs,
        "paths": {"data": annotations, "load_from": load_from},
        "world_size": world_size(),
    }


def _datasets_of(ds) -> list:
    """The dataset dicts that hold an ``ann_file`` under a dataset config (wrappers and concatenations walked)."""
    if "ann_file" in ds:
        return [ds]
    inner = ds.get("datasets") or ([ds["dataset"]] if "dataset" in ds else [])
    return [d for sub in inner for d in _datasets_of(sub)]


def _train_in(cfg, work_dir: Path, resume: bool, trust_checkpoint: bool) -> Path:
    from mmengine.runner import Runner

    from crat_ft.common.dist import distributed_runner_cfg, rank
    from crat_ft.common.files import clean_stale_temps, temp_pattern
    from crat_ft.common.progress import output_begins
    from crat_ft.common.run_record import RECORD_FILE, check_resume, refuse_existing_run, write_record
    from crat_ft.engine.checkpoint import trusted_loading
    from crat_ft.engine.runner import on_rank0, resume_point, unique_names, unwrap
    from crat_ft.heads.hooks import ConsoleProgressHook, NonFiniteGuardHook

    record = detector_record(cfg)

    def checks() -> Path | None:  # rank 0 checks the work dir; every rank gets its answer
        for name in (DETECTOR_FILE, RECORD_FILE):
            clean_stale_temps(work_dir, temp_pattern(work_dir / name))
        if not resume:
            refuse_existing_run(work_dir, "train-detector", (DETECTOR_FILE,))
            return None
        check_resume(work_dir, record, (DETECTOR_FILE,))
        return resume_point(work_dir, trust=trust_checkpoint, command="train-detector")

    start = on_rank0(checks)
    cfg.work_dir = str(work_dir)
    # resume from the checkpoint last_checkpoint names; without one, start afresh (from the config's own
    # load_from, if any)
    cfg.resume = start is not None
    if start is not None:
        cfg.load_from = str(start)
    unique_names(cfg, "train-detector")
    distributed_runner_cfg(cfg)  # under torchrun: DDP over every rank, mmengine's samplers split the data
    output_begins()
    if rank() == 0:
        write_record(work_dir / RECORD_FILE, record)
    with trusted_loading(trust_checkpoint):  # the Runner loads load_from, or the checkpoint it resumes
        runner = Runner.from_cfg(cfg)
        runner.register_hook(NonFiniteGuardHook(), "VERY_HIGH")
        runner.register_hook(ConsoleProgressHook("train-detector"))
        runner.train()
    model = unwrap(runner.model)
    out = work_dir / DETECTOR_FILE
    if runner.rank != 0:  # DDP keeps every rank's weights equal; rank 0 writes them
        return out
    meta = {
        "crat_ft_stage": "stage1",
        "dataset_meta": {"classes": list(runner.train_dataloader.dataset.metainfo["classes"])},
        "iter": runner.iter,
        "cfg": cfg.pretty_text,
        "run": record,
    }
    atomic_torch_save({"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "meta": meta}, out)
    runner.logger.info(f"final detector weights: {out}")
    return out


def evaluate_detector(
    config: str | os.PathLike,
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    cfg_options: Iterable[str] | dict = (),
    data_root: str | os.PathLike | None = None,
    trust_checkpoint: bool = False,
    per_class_csv: str | os.PathLike | None = None,
    heads: str | os.PathLike | None = None,
    extra_protocols: Sequence[str] = ("fixed",),
    make_bar=None,
    outfile_prefix: str | os.PathLike | None = None,
) -> dict:
    """Evaluate a detector checkpoint on the config's test split with the LVIS protocol
    (and ``extra_protocols``: ``"fixed"`` AP-fixed, ``"pool"`` AP-pool, each under its own key).

    Writes ``out`` as ``{"bbox": {...}, "segm": {...}, "fixed": {"bbox": ..., "segm": ...}, "matches": {...}}``
    (keys of :data:`crat_ft.evaluation.lvis.METRIC_KEYS`; ``fixed`` holds AP-fixed; ``matches`` the id of the
    detections each matches file was made from, which ``crat-ft compare`` checks) and the per-class CSV beside it
    (``<out stem>_per_class.csv`` unless ``per_class_csv`` is given), and the per-(image, category)
    matches that ``crat-ft compare`` resamples (``<out stem>_matches_bbox.npz``, ``..._segm.npz``).
    With ``outfile_prefix``, also the detections as mmdet writes them (``PREFIX.bbox.json``,
    ``PREFIX.segm.json``: what ``crat-ft analyze-errors`` reads).

    With ``heads``, the retrained class-wise layers are merged into the
    checkpoint in a temporary directory first (nothing is written beside
    ``out``); ``cfg_options`` apply to that merge too. ``make_bar`` replaces the console
    progress line (see :class:`crat_ft.heads.hooks.ConsoleProgressHook`).

    The output directories are checked for writability before the model is
    built; the JSON and the CSV are renamed into place together at the end
    (a run killed in between leaves a journal that the next run cleans).

    Returns:
        The metrics dict written to ``out``.
    """
    import contextlib

    from crat_ft.analysis.compare import matches_path
    from crat_ft.common.files import output_dir, owned_tempdir, refuse_output_among_inputs
    from crat_ft.evaluation.lvis import IOU_TYPES

    out = Path(out)
    csv_path = Path(per_class_csv) if per_class_csv else out.with_name(out.stem + "_per_class.csv")
    inputs = (config, checkpoint, heads)
    refuse_output_among_inputs(out, inputs, "--out")
    refuse_output_among_inputs(csv_path, inputs, "--per-class-csv")
    for iou in IOU_TYPES:
        refuse_output_among_inputs(matches_path(out, iou), inputs, f"--out's {iou} matches")
        if outfile_prefix is not None:
            refuse_output_among_inputs(f"{outfile_prefix}.{iou}.json", inputs, "--outfile-prefix")
    with contextlib.ExitStack() as dirs:  # a refused evaluation leaves no directory it created
        for path, what in ((out, "the directory of --out"), (csv_path, "the directory of --per-class-csv")):
            dirs.enter_context(output_dir(path.parent, what))
        journal = _prepare_outputs(out, csv_path)
        if heads is not None:
            from crat_ft.heads.export import export_checkpoint

            with owned_tempdir("crat-ft-merged") as tmp:
                merged, merged_cfg = export_checkpoint(
                    str(config),
                    str(checkpoint),
                    str(heads),
                    str(tmp / "merged.pth"),
                    trust_checkpoint=trust_checkpoint,
                    cfg_options=cfg_options,
                )
                return evaluate_detector(
                    merged_cfg or config, merged, out, cfg_options=cfg_options, data_root=data_root,
                    per_class_csv=csv_path, extra_protocols=extra_protocols, make_bar=make_bar,
                    outfile_prefix=outfile_prefix,
                )  # fmt: skip
        if outfile_prefix is not None:
            dirs.enter_context(output_dir(Path(outfile_prefix).parent, "the directory of --outfile-prefix"))
        cfg = _test_config(config, checkpoint, cfg_options, data_root, trust_checkpoint)
        return _run_test_and_write(cfg, trust_checkpoint, out, csv_path, journal, extra_protocols, make_bar,
                                   outfile_prefix)  # fmt: skip


def _prepare_outputs(out: Path, csv_path: Path) -> Path:
    """Clean what killed runs left beside the outputs (rank 0 only: a pid names a process of its own
    node); the journal of the final commit."""
    from crat_ft.analysis.compare import matches_path
    from crat_ft.common.dist import rank
    from crat_ft.common.files import clean_stale_temps, recover_journal, temp_pattern
    from crat_ft.evaluation.lvis import IOU_TYPES

    journal = out.with_name(f".{out.name}.commit")
    if rank() == 0:
        for path in (out, csv_path, *(matches_path(out, iou) for iou in IOU_TYPES)):  # temporary files, spills
            clean_stale_temps(path.parent, temp_pattern(path))
        recover_journal(journal)
    return journal


def _test_config(config, checkpoint, cfg_options, data_root, trust_checkpoint: bool):
    """The detector config set up for mmdet's test loop with crat-ft's LVIS metric and ``checkpoint``."""
    from crat_ft.detector.frozen import check_checkpoint_class_names, check_checkpoint_classes, trained_classes
    from crat_ft.engine.checkpoint import load_checkpoint_file, state_dict_of
    from crat_ft.engine.config import ann_file_of, dataset_class_names, prepare_config
    from crat_ft.engine.runner import unique_names
    from crat_ft.heads.registry import register_all

    register_all()
    known = trained_classes(checkpoint, trust_checkpoint)
    cfg = prepare_config(config, cfg_options, data_root, ("test_dataloader",), trained_classes=known)
    ckpt = load_checkpoint_file(checkpoint, trust=trust_checkpoint)
    check_checkpoint_classes(cfg, state_dict_of(ckpt), str(checkpoint))
    check_checkpoint_class_names(ckpt.get("meta"), dataset_class_names(cfg), str(checkpoint))
    evaluator = cfg.get("test_evaluator")
    evaluators = evaluator if isinstance(evaluator, list) else [evaluator]
    lvis = [e for e in evaluators if isinstance(e, dict) and e.get("type") == "CratLVISMetric"]
    if not lvis:
        raise UserError(
            f"config {config}: test_evaluator should be a CratLVISMetric, got {evaluator!r}; "
            "set test_evaluator = dict(type='CratLVISMetric', ann_file=..., metric=['bbox', 'segm'])"
        )
    if not lvis[0].get("ann_file"):
        lvis[0]["ann_file"] = str(ann_file_of(cfg.test_dataloader.dataset))
    cfg.load_from = str(checkpoint)
    cfg.resume = False
    for key in ("train_dataloader", "train_cfg", "optim_wrapper", "param_scheduler"):
        cfg.pop(key, None)
    unique_names(cfg, "evaluate")
    return cfg


def _run_test_and_write(
    cfg,
    trust_checkpoint: bool,
    out: Path,
    csv_path: Path,
    journal: Path,
    extra_protocols: Sequence[str],
    make_bar=None,
    outfile_prefix=None,
) -> dict:
    """Run the test loop in a private work dir; rename the JSON and the per-class CSV into place together."""
    import contextlib

    from mmengine.runner import Runner

    from crat_ft.analysis.compare import matches_ids, matches_path
    from crat_ft.common.dist import distributed_runner_cfg, rank
    from crat_ft.common.files import commit_together, owned_tempdir, storage_errors, temp_name
    from crat_ft.common.progress import output_begins
    from crat_ft.engine.checkpoint import trusted_loading
    from crat_ft.evaluation.lvis import IOU_TYPES
    from crat_ft.evaluation.metric import CratLVISMetric
    from crat_ft.heads.hooks import ConsoleProgressHook

    evaluators = cfg.test_evaluator if isinstance(cfg.test_evaluator, list) else [cfg.test_evaluator]
    lvis = next(e for e in evaluators if e.get("type") == "CratLVISMetric")
    lvis["per_class_csv"] = str(temp_name(csv_path))  # written by rank 0 only
    lvis["extra_protocols"] = list(extra_protocols)
    iou_types = lvis.get("metric", ("bbox", "segm"))
    matches = {iou: matches_path(out, iou) for iou in ([iou_types] if isinstance(iou_types, str) else iou_types)}
    lvis["matches_files"] = {iou: str(temp_name(p)) for iou, p in matches.items()}
    if outfile_prefix is not None:
        lvis["outfile_prefix"] = str(outfile_prefix)
    distributed_runner_cfg(cfg)
    # detections go to disk beside --out (``.<stem>.detections/``), into a subdirectory of this
    # evaluation's own that the metric makes, locks and removes (see CratLVISMetric's spill_dir)
    spill = out.with_name(f".{out.stem}.detections")
    lvis["spill_dir"] = str(spill)
    output_begins()
    main = rank() == 0
    try:
        with owned_tempdir("crat-ft-eval") as tmp:
            cfg.work_dir = str(tmp)
            with trusted_loading(trust_checkpoint):
                runner = Runner.from_cfg(cfg)
                runner.register_hook(ConsoleProgressHook("evaluate", make_bar))
                runner.test()
            metric = next(m for m in runner.test_evaluator.metrics if isinstance(m, CratLVISMetric))
            results = dict(metric.last_results["metrics"])  # every rank has them; rank 0 writes them
            for protocol in metric.extra_protocols:
                results[protocol] = metric.last_results[protocol]
        if main:
            with storage_errors(out):
                # the identity of the detections each matches file was made from: compare uses matches
                # only beside the metrics of those very detections
                ids = matches_ids({iou: temp_name(p) for iou, p in matches.items()})
                temp_name(out).write_text(json.dumps({**results, "matches": ids}, indent=2))
            made = [(temp_name(p), p) for p in matches.values() if temp_name(p).exists()]
            for iou in IOU_TYPES:  # an earlier evaluation's matches of an IoU type this one did not evaluate
                if iou not in matches:
                    matches_path(out, iou).unlink(missing_ok=True)
            commit_together(made + [(temp_name(csv_path), csv_path), (temp_name(out), out)], journal)
    finally:
        if main:
            for p in matches.values():
                temp_name(p).unlink(missing_ok=True)
            temp_name(csv_path).unlink(missing_ok=True)
            temp_name(out).unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # kept while another evaluation of this --out holds a run there
                spill.rmdir()
    return results


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
