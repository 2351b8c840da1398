"""``crat-ft demo``: the whole chain on the embedded synthetic benchmark, on a CPU.

Stages, each reused on a rerun only when its output exists and its run record
(:mod:`crat_ft.common.run_record`) matches what this invocation would write; otherwise
the stage is redone (after removing what it wrote), and so is every stage whose
inputs change with it, the console saying why in one line. A stage killed with
the same settings is continued (``--resume``). The stages:

1. ``data/``: ``make-demo-data`` (docs/architecture.md#synthetic-benchmark);
2. ``stage1/detector.pth``: a tiny Mask R-CNN trained with plain random sampling;
3. ``cache/index.h5``: its RoI features on the training split;
4. ``baseline/heads.pth`` and ``crat/heads.pth``: the class-wise layers retrained
   from the cache, class-balanced, without and with CRAT;
5. ``{stage1,baseline,crat}/metrics.json``: LVIS bbox/segm metrics on val;
6. ``summary.json`` (with the demo's settings), the three-way table with CRAT - baseline's paired bootstrap intervals
   (``crat-ft compare``), the class-oracle AP and error decomposition (``crat-ft analyze-errors``,
   ``errors_bbox.png``, ``errors_segm.png``), ``ap_change_crat_vs_baseline.png``,
   ``rare_classes_baseline_vs_crat.png`` (the rarest classes' val detections,
   baseline beside CRAT), ``fisher_embedding.png`` and ``rare_fisher_neighbors.txt``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from crat_ft.common.errors import UserError
from crat_ft.common.files import atomic_write_text
from crat_ft.common.paths import demo_config
from crat_ft.pipeline.demo_report import delta_table, what_the_run_shows
from crat_ft.pipeline.demo_stages import data_record, evaluate_stages, load_json, run_stage, say
from crat_ft.pipeline.retrain import retrain_heads
from crat_ft.pipeline.retrain_record import HEADS_FILE
from crat_ft.pipeline.train_detector import DETECTOR_FILE, train_detector
from crat_ft.synthetic.dataset import make_demo_data
from crat_ft.synthetic.variants import DEFAULT_SHARING, DemoDataSpec


def _check_reused_data(data: Path, spec: DemoDataSpec) -> None:
    """Refuse a work dir whose dataset was made with another variant or sharing knob."""
    ann = data / "annotations" / "lvis_v1_train.json"
    if not ann.is_file():
        return
    info = load_json(ann).get("info", {})
    made = (info.get("variant", "colour-shapes"), info.get("sharing"))
    wanted = (spec.variant, spec.recorded_sharing)
    if made != wanted:
        raise UserError(
            f"demo: {data} holds the {made[0]} data (sharing {made[1]}), not {wanted[0]} (sharing {wanted[1]}); "
            "pass another --work-dir"
        )


def _demo_data(data: Path, spec: DemoDataSpec) -> None:
    from crat_ft.common.run_record import RECORD_FILE, read_record, write_record

    spec.validate()
    _check_reused_data(data, spec)
    wanted = data_record(spec)

    def make(resume: bool) -> None:
        make_demo_data(data, spec)
        write_record(data / RECORD_FILE, wanted)

    run_stage(
        "making the synthetic long-tailed dataset",
        data,
        (data / "annotations" / "lvis_v1_val.json", data / RECORD_FILE),
        wanted,
        read_record(data / RECORD_FILE),
        make,
    )


def run_demo(
    work_dir: str | os.PathLike = "work_dirs/demo",
    *,
    seed: int = 0,
    detector_iters: int | None = None,
    heads_iters: int | None = None,
    variant: str = "families",
    sharing: float = DEFAULT_SHARING,
    train_images: int = DemoDataSpec.train_images,
    val_images: int = DemoDataSpec.val_images,
) -> dict:
    """Run the demo pipeline.

    Args:
        work_dir: where every stage writes.
        seed: seed of the data, of both trainings and of the RoI policy.
        detector_iters: stage-1 iterations (default: the config's).
        heads_iters: retrain-heads iterations (default: the fine-tune configs').
        variant: the synthetic benchmark's variant (``families`` or ``colour-shapes``).
        sharing: the families variant's sharing knob ``s``.
        train_images, val_images: the synthetic data's size.

    Returns:
        ``{"stage1"|"baseline"|"crat": {"bbox": {...}, "segm": {...}}, ..., "settings": {...}}``.
    """
    from crat_ft.analysis.diagnostics import fisher_neighbors, plot_ap_change, plot_fisher_embedding, read_per_class_csv
    from crat_ft.analysis.gallery import rare_class_gallery
    from crat_ft.cache import INDEX_FILE
    from crat_ft.common.lvis_json import categories_by_id
    from crat_ft.common.run_record import RECORD_FILE, difference_text, read_record
    from crat_ft.detector.roi_policy import RoIPolicy
    from crat_ft.pipeline.extract import extract_features, planned_settings
    from crat_ft.pipeline.extract_settings import recorded_settings
    from crat_ft.pipeline.retrain_record import planned_record, record_difference
    from crat_ft.pipeline.train_detector import detector_record, detector_train_config

    settings = dict(variant=variant, sharing=sharing, seed=seed, detector_iters=detector_iters,
                    heads_iters=heads_iters, train_images=train_images, val_images=val_images)  # fmt: skip
    spec = DemoDataSpec(seed=seed, variant=variant, sharing=sharing, train_images=train_images, val_images=val_images)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    data = work_dir / "data"
    config = demo_config()
    t_start = time.time()
    # the frameworks' own logs (configs, hooks, iterations) go to a file; the console keeps
    # a line per stage, progress bars and the result tables. Left open: mmengine's loggers
    # keep writing to it until the process ends.
    log = open(work_dir / "demo.log", "a")
    say(f"framework logs: {work_dir / 'demo.log'}")

    _demo_data(data, spec)

    detector = work_dir / "stage1" / DETECTOR_FILE
    options = {"train_cfg.max_iters": detector_iters} if detector_iters else {}
    with contextlib.redirect_stdout(log):
        wanted = detector_record(detector_train_config(config, options, data, seed))
    run_stage(
        f"training the stage-1 detector ({config.name})",
        detector.parent,
        detector,
        wanted,
        read_record(detector.parent / RECORD_FILE),
        lambda resume: train_detector(
            config, detector.parent, cfg_options=options, data_root=data, seed=seed, resume=resume
        ),
        log=log,
    )

    cache = work_dir / "cache" / INDEX_FILE
    policy = RoIPolicy(seed=seed, mask_pos_per_class=200)
    with contextlib.redirect_stdout(log):
        wanted = planned_settings(config, detector, data_root=data, policy=policy)
    run_stage(
        "extracting RoI features of the training split",
        cache.parent,
        cache,
        wanted,
        recorded_settings(cache.parent) if cache.parent.is_dir() else None,
        lambda resume: extract_features(config, detector, cache.parent, data_root=data, policy=policy, resume=resume),
        differ=lambda old, new: difference_text({"settings": old}, {"settings": new}),
        log=log,
    )

    heads_options = {"train.seed": seed}
    if heads_iters:  # a shorter schedule: its step at 3/4 and a warm-up of at most a quarter of it
        step = int(heads_iters * 0.75)
        heads_options.update(
            {
                "train.max_iters": heads_iters,
                "train.milestones": [step] if step >= 1 else [],
                "train.warmup_iters": min(50, heads_iters // 4),
            }
        )
    for name in ("baseline", "crat"):
        ft = demo_config(f"{name}_synthetic.py")
        out = work_dir / name / HEADS_FILE
        with contextlib.redirect_stdout(log):
            wanted = planned_record(ft, cache, cfg_options=heads_options)
        run_stage(
            f"retraining the class-wise heads ({name})",
            out.parent,
            out,
            wanted,
            read_record(out.parent / RECORD_FILE),
            lambda resume, ft=ft, out=out: retrain_heads(
                ft, cache, out.parent, cfg_options=heads_options, resume=resume
            ),
            differ=record_difference,
            log=log,
        )

    models = ("stage1", "baseline", "crat")
    jobs = {
        name: dict(
            config=config,
            checkpoint=detector,
            out=work_dir / name / "metrics.json",
            data_root=data,
            heads=None if name == "stage1" else work_dir / name / HEADS_FILE,
            outfile_prefix=work_dir / name / "results",
        )
        for name in models
    }
    evaluate_stages(jobs, data, log)
    summary = {name: load_json(work_dir / name / "metrics.json") for name in models}
    summary.update(what_the_run_shows(work_dir, data, seed))

    cats = categories_by_id(load_json(data / "annotations" / "lvis_v1_train.json"))
    plot_ap_change(
        read_per_class_csv(work_dir / "baseline" / "metrics_per_class.csv"),
        read_per_class_csv(work_dir / "crat" / "metrics_per_class.csv"),
        cats,
        work_dir / "ap_change_crat_vs_baseline.png",
        "CRAT vs decoupled baseline (synthetic long-tailed shapes)",
    )
    crat_heads = work_dir / "crat" / HEADS_FILE
    gallery = work_dir / "rare_classes_baseline_vs_crat.png"
    with contextlib.redirect_stdout(log):
        shown = rare_class_gallery(
            config, detector, {"baseline": work_dir / "baseline" / HEADS_FILE, "CRAT": crat_heads}, data, gallery
        )
    if shown:
        say(f"rare classes side by side ({', '.join(shown)}): {gallery}")
    else:
        say("no rare class has a validation instance: no rare-class picture")
    plot_fisher_embedding(crat_heads, work_dir / "fisher_embedding.png")
    (work_dir / "rare_fisher_neighbors.txt").write_text(fisher_neighbors(crat_heads, top=5) + "\n")

    summary["settings"] = settings
    atomic_write_text(work_dir / "summary.json", json.dumps(summary, indent=2))
    print(delta_table(summary))
    say(
        f"total {time.time() - t_start:.0f} s; summary {work_dir / 'summary.json'}, plots and rare_fisher_neighbors.txt in {work_dir}"
    )
    say(f"CRAT against its controls over seeds: crat-ft ablate {demo_config().parents[1] / 'ablate' / 'crat_controls.py'} "
         f"--cache {cache.parent} --data-root {data} --work-dir {work_dir / 'ablate'}")  # fmt: skip
    return summary


# the end-to-end demo: where the ablation (benchmarks/bench_ablation.py) measured CRAT's effect
E2E_VARIANT = "colour-shapes"
E2E_ITERS = 300
E2E_CONFIG = "mask-rcnn_r18_fpn_tiny_crat-e2e_synthetic.py"


def run_demo_e2e(
    work_dir: str | os.PathLike = "work_dirs/demo-e2e",
    *,
    seed: int = 0,
    detector_iters: int = E2E_ITERS,
    variant: str = E2E_VARIANT,
    sharing: float = DEFAULT_SHARING,
    train_images: int = DemoDataSpec.train_images,
    val_images: int = DemoDataSpec.val_images,
) -> dict:
    """CRAT end to end: the demo detector trained by mmdet twice on the same data and seed, plain and with
    crat-ft's plugin heads (the paper's settings; the transfusion gradient also reaches the shared trunk),
    then evaluated side by side and compared with paired bootstrap intervals.

    Writes ``data/``, ``plain/`` and ``crat/`` (each ``detector.pth``, ``metrics.json`` and its matches,
    ``results.{bbox,segm}.json``), ``errors_{bbox,segm}.png`` and ``summary.json`` under ``work_dir``;
    a stage is reused only when its record matches this invocation's (:func:`plan_stage`). Returns the
    summary: ``{"plain"|"crat": metrics, "crat_vs_plain", ..., "settings"}``.
    """
    from crat_ft.common.run_record import RECORD_FILE, read_record
    from crat_ft.pipeline.train_detector import demo_schedule, detector_record, detector_train_config

    work_dir = Path(work_dir)
    options = demo_schedule(detector_iters)
    spec = DemoDataSpec(seed=seed, variant=variant, sharing=sharing, train_images=train_images, val_images=val_images)
    spec.validate()
    work_dir.mkdir(parents=True, exist_ok=True)
    data = work_dir / "data"
    t_start = time.time()
    log = open(work_dir / "demo.log", "a")  # left open: mmengine's loggers keep writing to it
    say(f"framework logs: {work_dir / 'demo.log'}")
    _demo_data(data, spec)
    runs = {"plain": demo_config(), "crat": demo_config(E2E_CONFIG)}
    for name, config in runs.items():
        out = work_dir / name / DETECTOR_FILE
        with contextlib.redirect_stdout(log):
            wanted = detector_record(detector_train_config(config, options, data, seed))
        run_stage(
            f"training the detector end to end, {'plain' if name == 'plain' else 'with CRAT'} "
            f"({config.name}, {detector_iters} iterations)",
            out.parent,
            out,
            wanted,
            read_record(out.parent / RECORD_FILE),
            lambda resume, config=config, out=out: train_detector(
                config, out.parent, cfg_options=options, data_root=data, seed=seed, resume=resume
            ),
            log=log,
        )
    jobs = {
        name: dict(config=config, checkpoint=work_dir / name / DETECTOR_FILE, out=work_dir / name / "metrics.json",
                   data_root=data, cfg_options=options, outfile_prefix=work_dir / name / "results")
        for name, config in runs.items()
    }  # fmt: skip
    evaluate_stages(jobs, data, log)
    arms, names = ("plain", "crat"), ("plain", "CRAT e2e")
    summary = {name: load_json(work_dir / name / "metrics.json") for name in arms}
    summary.update(what_the_run_shows(work_dir, data, seed, arms=arms, names=names))
    summary["settings"] = dict(variant=variant, sharing=sharing, seed=seed, detector_iters=detector_iters,
                               train_images=train_images, val_images=val_images)  # fmt: skip
    atomic_write_text(work_dir / "summary.json", json.dumps(summary, indent=2))
    print(delta_table(summary, models=arms, arms=arms, names=names))
    say(f"total {time.time() - t_start:.0f} s; summary {work_dir / 'summary.json'}")
    return summary
