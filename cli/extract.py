"""The feature cache's commands: ``extract-features``, ``inspect-cache``."""

from __future__ import annotations

import click

from crat_ft.cli.options import CFG_OPTIONS, COUNT, POSITIVE, TRUST, VERBOSE, peak_gpu_memory, split_options


@click.command("extract-features")
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
        cfg_options=split_options(cfg_options),
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
    click.echo(f"feature cache: {path}{peak_gpu_memory()}")


@click.command("inspect-cache")
@click.argument("cache", type=click.Path())
def inspect_cache(cache):
    """Summarise a feature cache: RoIs, positives per class and group, levels, bytes, provenance."""
    from pathlib import Path

    from crat_ft.cache import stage_indexes, summarize

    click.echo("\n".join(summarize(index) for index in stage_indexes(Path(cache))))
