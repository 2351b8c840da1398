"""``evaluate``: LVIS evaluation of a whole detector through mmengine's ``Runner``.

Built from an mmdet config, so logging, distributed launch and hooks behave as every mmdet user
expects; ``--heads`` merges retrained class-wise layers in first (:mod:`crat_ft.heads.export`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from crat_ft.common.errors import UserError


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
