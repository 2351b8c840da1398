"""Options and helpers shared by crat-ft's commands."""

from __future__ import annotations

import os
import sys

import click

from crat_ft.common.errors import UserError

COUNT = click.IntRange(min=0)
POSITIVE = click.IntRange(min=1)


class GreedyOption(click.Option):
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
    cls=GreedyOption,
    multiple=True,
    metavar="KEY=VALUE",
    help="Override config keys (mmengine syntax, repeatable or space-separated); unknown keys are an error.",
)
TRUST = click.option(
    "--trust-checkpoint",
    is_flag=True,
    help="Allow the checkpoint to unpickle arbitrary Python objects (only for files you trust).",
)
RESUME_RUN = click.option(
    "--resume",
    is_flag=True,
    help="Continue the run in --work-dir from the checkpoint its last_checkpoint names (same settings only).",
)
VERBOSE = click.option(
    "--verbose", is_flag=True, help="Show mmengine's and mmdet's own output on the console instead of the log file."
)


def rank() -> int:
    """torchrun's rank of this process (0 without torchrun)."""
    return int(os.environ.get("RANK", 0))


def peak_gpu_memory() -> str:
    """`` (peak GPU memory X GiB)`` after a command that ran on CUDA (this process's device), else ``""``."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return ""
    return f" (peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB)"


def split_options(options: tuple[str, ...]) -> list[str]:
    return [part for opt in options for part in opt.split()]


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


def int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{option}: expected integers separated by commas, got {text!r}") from None
    if not values:
        raise UserError(f"{option}: expected integers separated by commas, got {text!r}")
    return values
