"""``crat-ft env``: the software stack, for bug reports."""

from __future__ import annotations

import sys

import click


@click.command()
def env():
    """Print the software stack and whether it is inside the tested range; exit 1 with the fix if mmcv's
    compiled ops are missing, or mmcv or mmdet is outside the range."""
    from crat_ft.common.envinfo import collect, format_rows

    rows, problems = collect()
    click.echo(format_rows(rows))
    for p in problems:
        click.echo(f"crat-ft: problem: {p}", err=True)
    sys.exit(1 if problems else 0)
