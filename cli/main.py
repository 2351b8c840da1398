"""``crat-ft``: a thin click front end; each command calls one library function.

This module only dispatches: the commands live in one module per group (:mod:`~crat_ft.cli.train`,
:mod:`~crat_ft.cli.extract`, :mod:`~crat_ft.cli.evaluate`, :mod:`~crat_ft.cli.experiments`,
:mod:`~crat_ft.cli.env`), their shared options in :mod:`~crat_ft.cli.options`, the group's error
handling in :mod:`~crat_ft.cli.group`. torch, mmdet and mmengine are imported inside command bodies so that
``crat-ft --help`` is instant. Bad input raises :class:`crat_ft.common.errors.UserError`,
printed here as one line (``crat-ft: error: ...``) with exit code 2.
"""

from __future__ import annotations

import os
import sys

import click

from crat_ft.cli import env, evaluate, experiments, extract, train
from crat_ft.cli.group import CratGroup, fail


@click.group(cls=CratGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="crat-ft")
def cli():
    """crat-ft: decoupled fine-tuning of mmdet detectors for long-tailed detection, with CRAT."""


for command in (
    env.env,
    experiments.make_demo_data,
    train.train_detector,
    evaluate.evaluate,
    extract.extract_features,
    extract.inspect_cache,
    train.retrain_heads,
    train.export,
    evaluate.evaluate_results,
    evaluate.compare,
    evaluate.analyze_errors,
    train.export_plain,
    evaluate.fisher_neighbors,
    experiments.demo,
    experiments.ablate,
):
    cli.add_command(command)


def main():
    """The console script: every failure, click's own usage errors included, is one ``crat-ft: error:`` line."""
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker runs in a session of its own: end with torchrun
        from crat_ft.pipeline.evaluate_jobs import die_with_parent

        die_with_parent(os.getppid())
    try:
        code = cli.main(prog_name="crat-ft", standalone_mode=False)
    except click.UsageError as exc:  # a bad option value, a missing argument, an unknown command
        where = exc.ctx.command_path if exc.ctx is not None else "crat-ft"
        fail(f"{exc.format_message()} (see `{where} --help`)", exc.exit_code)
    except click.ClickException as exc:
        fail(exc.format_message(), exc.exit_code)
    except click.Abort:
        fail("aborted", 1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
