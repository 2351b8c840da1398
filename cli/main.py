"""``crat-ft``: a thin click front end; each command calls one library function.

torch, mmdet and mmengine are imported inside command bodies so that
``crat-ft --help`` is instant. Bad input raises :class:`crat_ft.errors.UserError`,
printed here as one line (``crat-ft: error: ...``) with exit code 2.
"""

from __future__ import annotations

import sys

import click

from crat_ft.errors import UserError

CFG_OPTIONS = click.option(
    "--cfg-options",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override config keys (mmengine syntax, repeatable or space-separated); unknown keys are an error.",
)
TRUST = click.option(
    "--trust-checkpoint",
    is_flag=True,
    help="Allow the checkpoint to unpickle arbitrary Python objects (only for files you trust).",
)


def _split_options(options: tuple[str, ...]) -> list[str]:
    return [part for opt in options for part in opt.split()]


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"crat-ft: error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="crat-ft")
def cli():
    """crat-ft: decoupled fine-tuning of mmdet detectors for long-tailed detection, with CRAT."""


@cli.command()
def env():
    """Print the software stack; exit 1 with the fix if mmcv's compiled ops are missing."""
    from crat_ft.envinfo import collect, format_rows

    rows, problems = collect()
    click.echo(format_rows(rows))
    for p in problems:
        click.echo(f"crat-ft: problem: {p}", err=True)
    sys.exit(1 if problems else 0)


@cli.command("make-demo-data")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, help="Seed of every random choice (same seed, same bytes).")
@click.option("--train-images", default=800, show_default=True)
@click.option("--val-images", default=200, show_default=True)
@click.option("--classes", default=40, show_default=True, help="Number of shape x colour classes (2..64).")
def make_demo_data(out, seed, train_images, val_images, classes):
    """Write the synthetic long-tailed LVIS-v1-format dataset to OUT."""
    from crat_ft.synthetic import DemoDataSpec, make_demo_data as run

    run(out, DemoDataSpec(seed=seed, train_images=train_images, val_images=val_images, classes=classes))


@cli.command("train-detector")
@click.argument("config", type=click.Path())
@click.option("--work-dir", required=True, type=click.Path(file_okay=False), help="Logs and checkpoints go here.")
@click.option("--data-root", type=click.Path(), default=None, help="LVIS-format data directory (overrides the config's).")
@click.option("--seed", type=int, default=None, help="Training seed (overrides randomness.seed).")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in --work-dir.")
@CFG_OPTIONS
def train_detector(config, work_dir, data_root, seed, resume, cfg_options):
    """Train an mmdet detector (stage 1) with mmengine's Runner."""
    from crat_ft.train import train_detector as run

    path = run(config, work_dir, cfg_options=_split_options(cfg_options), data_root=data_root, seed=seed, resume=resume)
    click.echo(f"detector weights: {path}")


@cli.command()
@click.argument("config", type=click.Path())
@click.argument("checkpoint", type=click.Path())
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Metrics JSON: {\"bbox\": {...}, \"segm\": {...}}.")
@click.option("--data-root", type=click.Path(), default=None, help="LVIS-format data directory (overrides the config's).")
@click.option("--per-class-csv", type=click.Path(dir_okay=False), default=None, help="Default: <out>_per_class.csv.")
@TRUST
@CFG_OPTIONS
def evaluate(config, checkpoint, out, data_root, per_class_csv, trust_checkpoint, cfg_options):
    """Evaluate CHECKPOINT on the config's test split with the LVIS v1 protocol."""
    from crat_ft.evaluation import format_table
    from crat_ft.train import evaluate_detector

    metrics = evaluate_detector(
        config,
        checkpoint,
        out,
        cfg_options=_split_options(cfg_options),
        data_root=data_root,
        trust_checkpoint=trust_checkpoint,
        per_class_csv=per_class_csv,
    )
    click.echo(format_table(metrics, title="LVIS v1 metrics (%)"))
    click.echo(f"metrics: {out}")


@cli.command()
@click.option("--work-dir", default="work_dirs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True)
@click.option("--detector-iters", type=int, default=None, help="Stage-1 training iterations (default: the config's).")
def demo(work_dir, seed, detector_iters):
    """Run the whole pipeline on the embedded synthetic long-tailed benchmark (CPU)."""
    from crat_ft.demo import run_demo

    run_demo(work_dir, seed=seed, detector_iters=detector_iters)


def main():
    cli(prog_name="crat-ft")


if __name__ == "__main__":
    main()
