"""``crat-ft``: a thin click front end; each command calls one library function.

torch, mmdet and mmengine are imported inside command bodies so that
``crat-ft --help`` is instant. Bad input raises :class:`crat_ft.common.errors.UserError`,
printed here as one line (``crat-ft: error: ...``) with exit code 2.
"""

from __future__ import annotations

import os
import sys

import click

from crat_ft.common.errors import UserError

COUNT = click.IntRange(min=0)
POSITIVE = click.IntRange(min=1)


class _GreedyOption(click.Option):
    """An option taking every following argument up to the next ``-...``, as argparse's nargs='+'.

    mmdet users write ``--cfg-options a=1 b.c=2``; click options take one value.
    """

    def add_to_parser(self, parser, ctx):
        super().add_to_parser(parser, ctx)
        opt_parser = parser._long_opt.get(self.opts[0])
        if opt_parser is None:
            return
        original = opt_parser.process

        def process(value, state):
            values = [value]
            while state.rargs and not state.rargs[0].startswith("-"):
                values.append(state.rargs.pop(0))
            for v in values[:-1]:
                original(v, state)
            original(values[-1], state)

        opt_parser.process = process


CFG_OPTIONS = click.option(
    "--cfg-options",
    cls=_GreedyOption,
    multiple=True,
    metavar="KEY=VALUE",
    help="Override config keys (mmengine syntax, repeatable or space-separated); unknown keys are an error.",
)
TRUST = click.option(
    "--trust-checkpoint",
    is_flag=True,
    help="Allow the checkpoint to unpickle arbitrary Python objects (only for files you trust).",
)

VERBOSE = click.option(
    "--verbose", is_flag=True, help="Show mmengine's and mmdet's own output on the console instead of the log file."
)


def _rank() -> int:
    """torchrun's rank of this process (0 without torchrun)."""
    return int(os.environ.get("RANK", 0))


def _peak_gpu_memory() -> str:
    """`` (peak GPU memory X GiB)`` after a command that ran on CUDA (this process's device), else ``""``."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return ""
    return f" (peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB)"


def _split_options(options: tuple[str, ...]) -> list[str]:
    return [part for opt in options for part in opt.split()]


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            protected = ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args  # click < 8.2
            args = [*protected, *ctx.args]
            if args and args[0] != "env" and not {"-h", "--help"} & set(args):
                from crat_ft.common.envinfo import check_supported_stack

                check_supported_stack()  # an mmcv or mmdet outside the tested range: one line, before any work
            return super().invoke(ctx)
        except UserError as exc:
            _fail(str(exc), getattr(exc, "exit_code", 2))
        except OSError as exc:
            from crat_ft.common.files import storage_error

            # a full or read-only disk anywhere; permission errors may concern inputs: those keep their traceback
            err = storage_error(exc, getattr(exc, "filename", None) or "an output file", permission=False)
            if err is None:
                raise
            _fail(str(err), err.exit_code)


def _fail(message: str, code: int) -> None:
    """Print one line and exit with ``code``.

    After a storage fault (code 1) the process ends with ``os._exit``: HDF5's
    exit handler would otherwise retry the failed writes and can crash.
    """
    click.echo(f"crat-ft: error: {message}", err=True)
    if code != 1:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="crat-ft")
def cli():
    """crat-ft: decoupled fine-tuning of mmdet detectors for long-tailed detection, with CRAT."""


@cli.command()
def env():
    """Print the software stack and whether it is inside the tested range; exit 1 with the fix if mmcv's
    compiled ops are missing, or mmcv or mmdet is outside the range."""
    from crat_ft.common.envinfo import collect, format_rows

    rows, problems = collect()
    click.echo(format_rows(rows))
    for p in problems:
        click.echo(f"crat-ft: problem: {p}", err=True)
    sys.exit(1 if problems else 0)


VARIANT = click.option(
    "--variant",
    type=click.Choice(["families", "colour-shapes"]),
    default="families",
    show_default=True,
    help="families: marked classes in families that share geometry; colour-shapes: flat-coloured shape x colour classes.",
)
SHARING = click.option(
    "--sharing",
    type=click.FloatRange(0.0, 1.0),
    default=0.5,
    show_default=True,
    help="families variant: how much geometry a family's classes share (0 = none, 1 = all).",
)


@cli.command("make-demo-data")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, help="Seed of every random choice (same seed, same bytes).")
@click.option("--train-images", default=800, show_default=True, type=POSITIVE)
@click.option("--val-images", default=200, show_default=True, type=POSITIVE)
@click.option("--classes", default=40, show_default=True, help="Number of classes (2..64).")
@VARIANT
@SHARING
def make_demo_data(out, seed, train_images, val_images, classes, variant, sharing):
    """Write the synthetic long-tailed LVIS-v1-format dataset to OUT."""
    from crat_ft.synthetic.dataset import make_demo_data as run
    from crat_ft.synthetic.variants import DemoDataSpec

    spec = DemoDataSpec(
        seed=seed, train_images=train_images, val_images=val_images, classes=classes, variant=variant, sharing=sharing
    )
    run(out, spec)


@cli.command("train-detector")
@click.argument("config", type=click.Path())
@click.option("--work-dir", required=True, type=click.Path(file_okay=False), help="Logs and checkpoints go here.")
@click.option(
    "--data-root", type=click.Path(), default=None, help="LVIS-format data directory (overrides the config's)."
)
@click.option("--seed", type=int, default=None, help="Training seed (overrides randomness.seed).")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the run in --work-dir from the checkpoint its last_checkpoint names (same settings only).",
)
@TRUST
@CFG_OPTIONS
@VERBOSE
def train_detector(config, work_dir, data_root, seed, resume, trust_checkpoint, cfg_options, verbose):
    """Train an mmdet detector (stage 1) with mmengine's Runner."""
    from pathlib import Path

    from crat_ft.common.progress import framework_log
    from crat_ft.pipeline.train_detector import train_detector as run

    with framework_log(Path(work_dir) / "crat-ft.log", verbose=verbose):
        path = run(
            config,
            work_dir,
            cfg_options=_split_options(cfg_options),
            data_root=data_root,
            seed=seed,
            resume=resume,
            trust_checkpoint=trust_checkpoint,
        )
    if _rank() == 0:  # under torchrun rank 0 writes and reports
        click.echo(f"detector weights: {path}{_peak_gpu_memory()}")


@cli.command()
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
            cfg_options=_split_options(cfg_options),
            data_root=data_root,
            trust_checkpoint=trust_checkpoint,
            per_class_csv=per_class_csv,
            heads=heads,
            extra_protocols=protocols,
            outfile_prefix=outfile_prefix,
        )
    if _rank() != 0:  # under torchrun rank 0 writes and reports
        return
    extra = {p: metrics.pop(p) for p in protocols}
    click.echo(format_table(metrics, title="LVIS v1 metrics (%)"))
    for p, m in extra.items():
        click.echo(format_table(m, title=PROTOCOL_TITLES[p]))
    click.echo(f"metrics: {out}{_peak_gpu_memory()}")


@cli.command("extract-features")
@click.argument("config", type=click.Path())
@click.argument("checkpoint", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Cache directory (shards + index.h5).")
@click.option(
    "--data-root", type=click.Path(), default=None, help="LVIS-format data directory (overrides the config's)."
)
@click.option("--box-level", type=click.Choice(["fc", "roi"]), default="fc", show_default=True)
@click.option("--mask-level", type=click.Choice(["logits", "roi"]), default="logits", show_default=True)
@click.option("--max-pos-per-image", default=64, show_default=True, type=COUNT)
@click.option("--neg-per-image", default=16, show_default=True, type=COUNT)
@click.option(
    "--box-pos-per-class",
    default=2000,
    show_default=True,
    type=COUNT,
    help="Expected cached positives per class (rare classes keep all).",
)
@click.option(
    "--mask-pos-per-class", default=64, show_default=True, type=COUNT, help="Expected cached mask features per class."
)
@click.option("--flip", is_flag=True, help="Also cache the horizontally flipped view.")
@click.option("--seed", default=0, show_default=True)
@click.option("--shard", default=None, metavar="I/N", help="Extract shard I of N (default: torchrun RANK/WORLD_SIZE).")
@click.option("--resume", is_flag=True, help="Continue an interrupted extraction, skipping finished images.")
@click.option("--batch-size", default=4, show_default=True, type=POSITIVE)
@click.option(
    "--workers",
    type=COUNT,
    default=None,
    help="DataLoader processes decoding images (default: up to 4 per GPU process, none on a CPU).",
)
@click.option("--compression", type=click.Choice(["none", "lzf", "gzip"]), default="none", show_default=True)
@click.option("--max-images", type=POSITIVE, default=None, help="Only the first N images (smoke tests).")
@click.option(
    "--segment-images", default=32, show_default=True, type=POSITIVE, help="Images per resumable segment file."
)
@click.option("--dry-run", is_flag=True, help="Measure a few images and print the projected cache size.")
@click.option(
    "--skip-space-check",
    is_flag=True,
    help="Do not stop when the free space looks too small for the projected cache (measured after the first segment).",
)
@TRUST
@CFG_OPTIONS
@VERBOSE
def extract_features(
    config,
    checkpoint,
    out,
    data_root,
    box_level,
    mask_level,
    max_pos_per_image,
    neg_per_image,
    box_pos_per_class,
    mask_pos_per_class,
    flip,
    seed,
    shard,
    resume,
    batch_size,
    workers,
    compression,
    max_images,
    segment_images,
    dry_run,
    skip_space_check,
    trust_checkpoint,
    cfg_options,
    verbose,
):
    """Cache a frozen detector's RoI features for the training split to HDF5."""
    from crat_ft.detector.roi_policy import RoIPolicy
    from crat_ft.pipeline.extract import dry_run as run_dry
    from crat_ft.pipeline.extract import extract_features as run

    policy = RoIPolicy(
        max_pos_per_image=max_pos_per_image,
        neg_per_image=neg_per_image,
        box_pos_per_class=box_pos_per_class,
        mask_pos_per_class=mask_pos_per_class,
        seed=seed,
        flip=flip,
    )
    kwargs = dict(
        cfg_options=_split_options(cfg_options),
        data_root=data_root,
        policy=policy,
        box_level=box_level,
        mask_level=mask_level,
        batch_size=batch_size,
        compression=None if compression == "none" else compression,
        trust_checkpoint=trust_checkpoint,
    )
    if dry_run:
        click.echo(run_dry(config, checkpoint, **kwargs))
        return
    from pathlib import Path

    from crat_ft.common.progress import framework_log
    from crat_ft.pipeline.extract_settings import parse_shard

    i, n = parse_shard(shard)
    log = Path(out) / ("extract-features.log" if n == 1 else f"extract-features-shard-{i}-of-{n}.log")
    with framework_log(log, verbose=verbose):
        path = run(
            config,
            checkpoint,
            out,
            shard=shard,
            resume=resume,
            max_images=max_images,
            segment_images=segment_images,
            space_check=not skip_space_check,
            workers=workers,
            **kwargs,
        )
    click.echo(f"feature cache: {path}{_peak_gpu_memory()}")


@cli.command("inspect-cache")
@click.argument("cache", type=click.Path())
def inspect_cache(cache):
    """Summarise a feature cache: RoIs, positives per class and group, levels, bytes, provenance."""
    from pathlib import Path

    from crat_ft.cache import stage_indexes, summarize

    click.echo("\n".join(summarize(index) for index in stage_indexes(Path(cache))))


@cli.command("retrain-heads")
@click.argument("ft_config", type=click.Path())
@click.option("--cache", required=True, type=click.Path(), help="Feature cache (directory or index.h5).")
@click.option("--work-dir", required=True, type=click.Path(file_okay=False))
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the run in --work-dir from the checkpoint its last_checkpoint names (same settings only).",
)
@TRUST
@CFG_OPTIONS
@VERBOSE
def retrain_heads(ft_config, cache, work_dir, resume, trust_checkpoint, cfg_options, verbose):
    """Retrain the class-wise layers from the cache (CRAT + rebalanced classifier) with mmengine's Runner."""
    from pathlib import Path

    from crat_ft.common.progress import framework_log
    from crat_ft.pipeline.retrain import retrain_heads as run

    with framework_log(Path(work_dir) / "crat-ft.log", verbose=verbose):
        path = run(
            ft_config,
            cache,
            work_dir,
            cfg_options=_split_options(cfg_options),
            resume=resume,
            trust_checkpoint=trust_checkpoint,
        )
    if _rank() == 0:  # under torchrun only rank 0 writes heads.pth
        click.echo(f"retrained heads: {path}{_peak_gpu_memory()}")


@cli.command()
@click.argument("config", type=click.Path())
@click.argument("checkpoint", type=click.Path())
@click.argument("heads", type=click.Path())
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The merged mmdet checkpoint.")
@click.option(
    "--tau-norm",
    type=click.FloatRange(min=0),
    default=None,
    help="Post-hoc tau-normalisation of the classifier (default: the heads' export setting).",
)
@click.option(
    "--logit-adjust",
    type=click.FloatRange(min=0),
    default=None,
    help="Post-hoc logit adjustment strength (default: the heads' export setting).",
)
@click.option(
    "--combine-original",
    type=float,
    default=None,
    help="Mix in the original classifier's scores with this weight in [0, 1] (SimCal dual head; default: the heads' export setting).",
)
@TRUST
@CFG_OPTIONS
def export(config, checkpoint, heads, out, tau_norm, logit_adjust, combine_original, trust_checkpoint, cfg_options):
    """Merge retrained HEADS into CHECKPOINT: an ordinary mmdet checkpoint."""
    from crat_ft.heads.export import export_checkpoint

    path, cfg_path = export_checkpoint(
        config,
        checkpoint,
        heads,
        out,
        tau_norm=tau_norm,
        logit_adjust=logit_adjust,
        combine_original=combine_original,
        trust_checkpoint=trust_checkpoint,
        cfg_options=_split_options(cfg_options),
    )
    click.echo(f"merged checkpoint: {path}")
    if cfg_path:
        click.echo(
            f"config for it: {cfg_path} (its classifier differs from the one {config} builds; use this config with the checkpoint)"
        )


PROTOCOL_TITLES = {
    "standard": "LVIS v1 metrics (%)",
    "fixed": "AP-fixed (%, 10,000 detections per class, no per-image cap)",
    "pool": "AP-pool (%, 10,000 detections per class, one curve over all classes)",
}


@cli.command("evaluate-results")
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


@cli.command()
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

    seed_list = _int_list(seeds, "--seeds") if seeds else None
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


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{option}: expected integers separated by commas, got {text!r}") from None
    if not values:
        raise UserError(f"{option}: expected integers separated by commas, got {text!r}")
    return values


@cli.command("analyze-errors")
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


@cli.command("export-plain")
@click.argument("config", type=click.Path())
@click.argument("checkpoint", type=click.Path())
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The plain mmdet checkpoint.")
@TRUST
@CFG_OPTIONS
def export_plain(config, checkpoint, out, trust_checkpoint, cfg_options):
    """A detector trained end to end with crat-ft's mmdet plugin heads, as stock mmdet loads it.

    Writes OUT without the Fisher statistics and OUT's stem + .py: CONFIG with mmdet's own head types
    and metric, and no crat_ft imports.
    """
    from crat_ft.heads.plugin import export_plain as run

    path, cfg_path = run(
        config, checkpoint, out, cfg_options=_split_options(cfg_options), trust_checkpoint=trust_checkpoint
    )
    click.echo(f"plain mmdet checkpoint: {path}\nconfig for it: {cfg_path}")


@cli.command("fisher-neighbors")
@click.argument("heads", type=click.Path())
@click.option("--class", "class_name", default=None, help="One class (default: every rare class).")
@click.option("--top", default=5, show_default=True, type=POSITIVE)
@click.option("--branch", type=click.Choice(["box", "mask"]), default="box", show_default=True)
def fisher_neighbors(heads, class_name, top, branch):
    """Top-K Fisher neighbours of classes, from a heads file's statistics (within each class's donor group
    when the heads were trained with crat.donor_groups: the groups the heads file records)."""
    from crat_ft.analysis.diagnostics import fisher_neighbors as run

    click.echo(run(heads, class_name=class_name, top=top, branch=branch))


@cli.command()
@click.option(
    "--work-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Where every stage writes.  [default: work_dirs/demo; work_dirs/demo-e2e with --e2e]",
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--e2e",
    is_flag=True,
    help="CRAT end to end instead: the detector trained plain and with CRAT's plugin heads, compared with "
    "intervals (about 8 min on 2 CPU cores).",
)
@click.option(
    "--detector-iters",
    type=POSITIVE,
    default=None,
    help="Stage-1 training iterations (default: the config's; with --e2e 300, warm-up and steps scaled).",
)
@click.option(
    "--heads-iters", type=POSITIVE, default=None, help="retrain-heads iterations (default: the fine-tune configs')."
)
@click.option(
    "--variant",
    type=click.Choice(["families", "colour-shapes"]),
    default=None,
    help="The synthetic benchmark's variant (see make-demo-data).  [default: families; colour-shapes with --e2e]",
)
@SHARING
@click.option("--train-images", default=800, show_default=True, type=POSITIVE, help="Training images of the data.")
@click.option("--val-images", default=200, show_default=True, type=POSITIVE, help="Validation images of the data.")
def demo(work_dir, seed, e2e, detector_iters, heads_iters, variant, sharing, train_images, val_images):
    """Run the whole pipeline on the embedded synthetic long-tailed benchmark (CPU).

    A stage done before is reused only when it was made with this invocation's settings; otherwise it
    is redone, with every stage after it that depends on it, and the console says why.
    """
    from crat_ft.pipeline.demo import E2E_ITERS, E2E_VARIANT, run_demo, run_demo_e2e

    data = dict(seed=seed, sharing=sharing, train_images=train_images, val_images=val_images)
    if e2e:
        if heads_iters is not None:
            raise click.UsageError("--heads-iters: the end-to-end demo retrains no heads; drop it or --e2e")
        run_demo_e2e(
            work_dir or "work_dirs/demo-e2e",
            detector_iters=detector_iters or E2E_ITERS,
            variant=variant or E2E_VARIANT,
            **data,
        )
        return
    run_demo(
        work_dir or "work_dirs/demo",
        detector_iters=detector_iters,
        heads_iters=heads_iters,
        variant=variant or "families",
        **data,
    )


@cli.command()
@click.argument("arms", type=click.Path())
@click.option("--cache", required=True, type=click.Path(), help="Feature cache (directory or index.h5).")
@click.option("--work-dir", required=True, type=click.Path(file_okay=False),
              help="s<seed>/<arm>/ per run, ablation.md / .json / .png, ablate.log.")  # fmt: skip
@click.option("--seeds", default="0,1,2", show_default=True, metavar="S1,S2,...",
              help="Retraining seeds (train.seed): every arm runs once per seed, and the intervals pool them.")  # fmt: skip
@click.option(
    "--data-root",
    type=click.Path(),
    default=None,
    help="LVIS-format data holding the val split (default: the config's).",
)
@click.option(
    "--reference", default=None, metavar="NAME", help="The arm the others are compared with (default: the ARMS file's)."
)
def ablate(arms, cache, work_dir, seeds, data_root, reference):
    """Does a recipe help on this detector? Retrain and evaluate every arm of ARMS (a Python file: see
    configs/ablate/) once per seed from the cache, and compare each with the reference, with intervals.

    A rerun with the same command continues a killed ablation; an arm whose definition changed is refused.
    """
    from crat_ft.pipeline.ablate import run_ablation

    run_ablation(arms, cache, work_dir, seeds=_int_list(seeds, "--seeds"), data_root=data_root, reference=reference)


def main():
    """The console script: every failure, click's own usage errors included, is one ``crat-ft: error:`` line."""
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker runs in a session of its own: end with torchrun
        from crat_ft.pipeline.evaluate_jobs import die_with_parent

        die_with_parent(os.getppid())
    try:
        code = cli.main(prog_name="crat-ft", standalone_mode=False)
    except click.UsageError as exc:  # a bad option value, a missing argument, an unknown command
        where = exc.ctx.command_path if exc.ctx is not None else "crat-ft"
        _fail(f"{exc.format_message()} (see `{where} --help`)", exc.exit_code)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except click.Abort:
        _fail("aborted", 1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
