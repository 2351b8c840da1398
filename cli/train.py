"""The commands that make weights: ``train-detector``, ``retrain-heads``, ``export``, ``export-plain``."""

from __future__ import annotations

import click

from crat_ft.cli.options import CFG_OPTIONS, RESUME_RUN, TRUST, VERBOSE, peak_gpu_memory, rank, split_options


@click.command("train-detector")
@click.argument("config", type=click.Path())
@click.option("--work-dir", required=True, type=click.Path(file_okay=False), help="Logs and checkpoints go here.")
@click.option(
    "--data-root", type=click.Path(), default=None, help="LVIS-format data directory (overrides the config's)."
)
@click.option("--seed", type=int, default=None, help="Training seed (overrides randomness.seed).")
@RESUME_RUN
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
            cfg_options=split_options(cfg_options),
            data_root=data_root,
            seed=seed,
            resume=resume,
            trust_checkpoint=trust_checkpoint,
        )
    if rank() == 0:  # under torchrun rank 0 writes and reports
        click.echo(f"detector weights: {path}{peak_gpu_memory()}")


@click.command("retrain-heads")
@click.argument("ft_config", type=click.Path())
@click.option("--cache", required=True, type=click.Path(), help="Feature cache (directory or index.h5).")
@click.option("--work-dir", required=True, type=click.Path(file_okay=False))
@RESUME_RUN
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
            cfg_options=split_options(cfg_options),
            resume=resume,
            trust_checkpoint=trust_checkpoint,
        )
    if rank() == 0:  # under torchrun only rank 0 writes heads.pth
        click.echo(f"retrained heads: {path}{peak_gpu_memory()}")


@click.command()
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
        cfg_options=split_options(cfg_options),
    )
    click.echo(f"merged checkpoint: {path}")
    if cfg_path:
        click.echo(
            f"config for it: {cfg_path} (its classifier differs from the one {config} builds; use this config with the checkpoint)"
        )


@click.command("export-plain")
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
        config, checkpoint, out, cfg_options=split_options(cfg_options), trust_checkpoint=trust_checkpoint
    )
    click.echo(f"plain mmdet checkpoint: {path}\nconfig for it: {cfg_path}")
