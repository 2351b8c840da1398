"""The commands that measure: ``evaluate``, ``evaluate-results``, ``compare``, ``analyze-errors``,
``fisher-neighbors``.
"""

from __future__ import annotations

import click

from crat_ft.cli.options import (
    CFG_OPTIONS,
    COUNT,
    POSITIVE,
    TRUST,
    VERBOSE,
    int_list,
    peak_gpu_memory,
    rank,
    split_options,
)
from crat_ft.common.errors import UserError


@click.command()
@click.argument("config", type=click.Path())
@click.argument("checkpoint", type=click.Path())
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False),
    help='Metrics JSON: {"bbox": {...}, "segm": {...}, "fixed": {AP-fixed, same keys}, "matches": {iou type: '
    "the id of the detections its matches file holds}}.",
)
@click.option(
    "--data-root", type=click.Path(), default=None, help="LVIS-format data directory (overrides the config's)."
)
@click.option("--per-class-csv", type=click.Path(dir_okay=False), default=None, help="Default: <out>_per_class.csv.")
@click.option(
    "--heads",
    type=click.Path(),
    default=None,
    help="Evaluate CHECKPOINT with these retrained heads merged in (no file written).",
)
@click.option(
    "--protocol",
    "protocols",
    type=click.Choice(["fixed", "pool"]),
    multiple=True,
    default=("fixed",),
    show_default=True,
    help="Also report AP-fixed (10,000 detections per class, no per-image cap) and/or AP-pool (one curve over all classes).",
)
@click.option("--outfile-prefix", type=click.Path(dir_okay=False), default=None,
              help="Also write the detections as mmdet does: PREFIX.bbox.json and PREFIX.segm.json (for analyze-errors).")  # fmt: skip
@TRUST
@CFG_OPTIONS
@VERBOSE
def evaluate(config, checkpoint, out, data_root, per_class_csv, heads, protocols, outfile_prefix, trust_checkpoint,
             cfg_options, verbose):  # fmt: skip
    """Evaluate CHECKPOINT on the config's test split with the LVIS v1 protocol.

    Beside --out it keeps the per-image matches (<out stem>_matches_bbox.npz, ..._segm.npz) that
    `crat-ft compare` resamples.
    """
    from pathlib import Path

    from crat_ft.common.progress import framework_log
    from crat_ft.evaluation.lvis import format_table
    from crat_ft.pipeline.evaluate import evaluate_detector

    with framework_log(Path(out).with_suffix(".log"), verbose=verbose):
        metrics = evaluate_detector(
            config,
            checkpoint,
            out,
            cfg_options=split_options(cfg_options),
            data_root=data_root,
            trust_checkpoint=trust_checkpoint,
            per_class_csv=per_class_csv,
            heads=heads,
            extra_protocols=protocols,
            outfile_prefix=outfile_prefix,
        )
    if rank() != 0:  # under torchrun rank 0 writes and reports
        return
    extra = {p: metrics.pop(p) for p in protocols}
    click.echo(format_table(metrics, title="LVIS v1 metrics (%)"))
    for p, m in extra.items():
        click.echo(format_table(m, title=PROTOCOL_TITLES[p]))
    click.echo(f"metrics: {out}{peak_gpu_memory()}")


PROTOCOL_TITLES = {
    "standard": "LVIS v1 metrics (%)",
    "fixed": "AP-fixed (%, 10,000 detections per class, no per-image cap)",
    "pool": "AP-pool (%, 10,000 detections per class, one curve over all classes)",
}


@click.command("evaluate-results")
@click.argument("gt", type=click.Path())
@click.argument("results", type=click.Path())
@click.option("--iou-type", "iou_types", type=click.Choice(["bbox", "segm"]), multiple=True,
              help="bbox and/or segm (default: bbox, plus segm when the detections have masks).")  # fmt: skip
@click.option("--protocol", type=click.Choice(["standard", "fixed", "pool"]), default="standard", show_default=True,
              help="standard: LVIS v1, 300 detections per image; fixed: AP-fixed, 10,000 per class, no per-image cap; "
                   "pool: AP-pool, AP-fixed's budget and one curve over all classes.")  # fmt: skip
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the metrics as JSON here.")
def evaluate_results(gt, results, iou_types, protocol, out):
    """LVIS metrics of RESULTS (a JSON results file of mmdet, detectron2 or lvis-api) against annotation file GT."""
    import contextlib
    import json
    from pathlib import Path

    from crat_ft.common.files import atomic_write_text, output_dir, refuse_output_among_inputs
    from crat_ft.evaluation.lvis import format_table
    from crat_ft.evaluation.results import evaluate_results as run

    if out:
        refuse_output_among_inputs(out, [gt, results], "--out")
    # --out's directory is checked first: an unwritable --out fails before the metrics are computed
    with output_dir(Path(out).parent, "the directory of --out") if out else contextlib.nullcontext():
        metrics = run(gt, results, iou_types=list(iou_types) or None, protocol=protocol)
        if out:
            atomic_write_text(out, json.dumps({"protocol": protocol, **metrics}, indent=2))
    click.echo(format_table(metrics, title=PROTOCOL_TITLES[protocol]))
    if out:
        click.echo(f"metrics: {out}")


@click.command()
@click.argument("gt", type=click.Path())
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@click.option("--seeds", default=None, metavar="S1,S2,...",
              help="One run per seed in each arm: A and B hold {seed} (e.g. runs/s{seed}/baseline); "
                   "run s of A pairs with run s of B.")  # fmt: skip
@click.option("--iou-type", "iou_types", type=click.Choice(["bbox", "segm"]), multiple=True,
              help="bbox and/or segm (default: what both arms have).")  # fmt: skip
@click.option(
    "--resamples", default=1000, show_default=True, type=POSITIVE, help="Bootstrap resamples (1000 to 100000)."
)
@click.option("--bootstrap-seed", default=0, show_default=True, type=COUNT, help="Seed of the resampling.")
@click.option(
    "--names", default="A,B", show_default=True, metavar="NAME_A,NAME_B", help="What to call A and B in the table."
)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the comparison as JSON here.")
def compare(gt, a, b, seeds, iou_types, resamples, bootstrap_seed, names, out):
    """B - A on the val split GT: AP, APr, APc, APf with 95% paired bootstrap intervals over images.

    A and B are each a results file (JSON list of LVIS detections, e.g. mmdet's PREFIX.segm.json) or an
    `evaluate` output (its metrics JSON, or the directory holding metrics.json: evaluate keeps the
    per-image matches beside it).
    """
    import contextlib
    from pathlib import Path

    from crat_ft.analysis.compare import compare as run
    from crat_ft.analysis.compare import compare_inputs, format_comparison, verdict, write_json
    from crat_ft.common.files import output_dir, refuse_output_among_inputs

    seed_list = int_list(seeds, "--seeds") if seeds else None
    pair = tuple(n.strip() for n in names.split(","))
    if len(pair) != 2 or not all(pair):
        raise UserError(f"--names: expected two names separated by a comma, got {names!r}")
    if out:
        refuse_output_among_inputs(out, compare_inputs(gt, a, b, seed_list), "--out")
    with output_dir(Path(out).parent, "the directory of --out") if out else contextlib.nullcontext():
        result = run(gt, a, b, seeds=seed_list, iou_types=list(iou_types) or None, n_resamples=resamples,
                     bootstrap_seed=bootstrap_seed)  # fmt: skip
        if out:
            write_json(out, result)
    click.echo(format_comparison(result, pair))
    for iou in ("bbox", "segm"):
        if iou in result:
            click.echo(verdict(result, pair, "APr", iou))
    if out:
        click.echo(f"comparison: {out}")


@click.command("analyze-errors")
@click.argument("gt", type=click.Path())
@click.argument("results", type=click.Path())
@click.argument("results2", type=click.Path(), required=False)
@click.option("--iou-type", "iou_types", type=click.Choice(["bbox", "segm"]), multiple=True,
              help="bbox and/or segm (default: bbox, plus segm when every results file has masks).")  # fmt: skip
@click.option(
    "--names", default=None, metavar="NAME[,NAME2]", help="What to call the models (default: the file names)."
)
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="Write errors.json and errors_<iou type>.png (stacked bars per frequency group) here.")  # fmt: skip
def analyze_errors(gt, results, results2, iou_types, names, out_dir):
    """Where the AP goes: TIDE's error types under LVIS's federated rules, per frequency group, and the
    class-oracle AP (each detection takes the class of the ground truth it overlaps most).

    RESULTS (and RESULTS2, shown beside it) are JSON results files (mmdet's PREFIX.bbox.json / PREFIX.segm.json).
    """
    from crat_ft.analysis.error_analysis import analyze_results

    files = [results] + ([results2] if results2 else [])
    labels = [n.strip() for n in names.split(",")] if names else None
    if labels is not None and len(labels) != len(files):
        raise UserError(f"--names: expected {len(files)} name(s) separated by commas, got {names!r}")
    text, written = analyze_results(gt, files, labels, iou_types=list(iou_types) or None, out_dir=out_dir)
    click.echo(text)
    for path in written:
        click.echo(f"written: {path}")


@click.command("fisher-neighbors")
@click.argument("heads", type=click.Path())
@click.option("--class", "class_name", default=None, help="One class (default: every rare class).")
@click.option("--top", default=5, show_default=True, type=POSITIVE)
@click.option("--branch", type=click.Choice(["box", "mask"]), default="box", show_default=True)
def fisher_neighbors(heads, class_name, top, branch):
    """Top-K Fisher neighbours of classes, from a heads file's statistics (within each class's donor group
    when the heads were trained with crat.donor_groups: the groups the heads file records)."""
    from crat_ft.analysis.diagnostics import fisher_neighbors as run

    click.echo(run(heads, class_name=class_name, top=top, branch=branch))
