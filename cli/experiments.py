"""The synthetic benchmark and the experiments on it: ``make-demo-data``, ``demo``, ``ablate``."""

from __future__ import annotations

import click

from crat_ft.cli.options import POSITIVE, SHARING, VARIANT, int_list


@click.command("make-demo-data")
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


@click.command()
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


@click.command()
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

    run_ablation(arms, cache, work_dir, seeds=int_list(seeds, "--seeds"), data_root=data_root, reference=reference)
