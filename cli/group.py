"""The ``crat-ft`` click group's error handling: a stack outside the tested range, a :class:`crat_ft.common.errors.UserError`
or a storage fault ends as one ``crat-ft: error:`` line.
"""

from __future__ import annotations

import os
import sys

import click

from crat_ft.common.errors import UserError


class CratGroup(click.Group):
    def invoke(self, ctx):
        try:
            protected = ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args  # click < 8.2
            args = [*protected, *ctx.args]
            if args and args[0] != "env" and not {"-h", "--help"} & set(args):
                from crat_ft.common.envinfo import check_supported_stack

                check_supported_stack()  # an mmcv or mmdet outside the tested range: one line, before any work
            return super().invoke(ctx)
        except UserError as exc:
            fail(str(exc), getattr(exc, "exit_code", 2))
        except OSError as exc:
            from crat_ft.common.files import storage_error

            # a full or read-only disk anywhere; permission errors may concern inputs: those keep their traceback
            err = storage_error(exc, getattr(exc, "filename", None) or "an output file", permission=False)
            if err is None:
                raise
            fail(str(err), err.exit_code)


def fail(message: str, code: int) -> None:
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
