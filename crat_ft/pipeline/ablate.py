"""``crat-ft ablate``: does a long-tail recipe help on this detector? Arms x seeds from one feature cache.

For each seed, in the ARMS file's order (:mod:`crat_ft.pipeline.ablate_arms`): each arm's class-wise layers are
retrained from the cache (:func:`crat_ft.pipeline.retrain.retrain_heads`, ``train.seed`` = the seed) in
``W/s<seed>/<arm>/``; then the seed's arms are evaluated on the val split with their heads merged in
(:func:`crat_ft.pipeline.evaluate.evaluate_detector`, as ``evaluate --heads``; side by side on a CPU), and each
one's errors analysed (class-oracle AP and TIDE's decomposition, :func:`analyze_arm`). Last, rank 0
compares every arm with the reference and each contrast, pooled over the seeds
(:mod:`crat_ft.pipeline.ablate_table`), and writes ``W/ablation.md``, ``.json`` and ``.png``.

Exact or refused, as every crat-ft run (:mod:`crat_ft.common.run_record`):

- ``arm.json`` records an arm's definition: its resolved fine-tune settings with the seed, and its
  export options. A rerun whose arm differs is refused in one line naming the arm and the first
  setting, as is one whose ``run.json`` (retrain-heads' record: settings, cache identity, detector,
  processes) differs; all arms are checked before any work (one using a measured value, once it is known);
- a finished retraining is reused, an unfinished one continued (``retrain-heads --resume``); an
  evaluation is reused only when ``evaluation.json`` (the export options, and the sha256 of the heads,
  detector, config and val annotations) matches, else redone;
- an arm whose retraining equals an earlier arm's of the seed (same ``run.json`` record and ``export``
  section) evaluates that arm's heads with its own export options: an export-only arm costs no retraining;
- ``W`` is locked against a second ablation (:class:`crat_ft.common.files.RunLock`).

Under ``torchrun`` each retraining (DDP) and evaluation runs on every process; rank 0 alone checks,
writes the records, analyses the errors and writes the tables (the other ranks get its answers).

A run directory holds ``arm.json``, ``run.json``, ``heads.pth`` with the Runner's checkpoints and logs,
``metrics.json`` (with its per-class CSV and matches), ``results.{bbox,segm}.json``, ``errors.json``,
``oracle_matches_<iou>.npz``, ``evaluation.json`` and, for an arm logging CRAT's gradient-mass ratio,
``mass.json``. The frameworks' own output goes to ``W/ablate.log``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from crat_ft.common.dist import rank
from crat_ft.common.errors import UserError
from crat_ft.evaluation.lvis import IOU_TYPES
from crat_ft.pipeline.ablate_arms import ARM_FILE, ERRORS_FILE, MEASURED, Ablation, Arm, load_arms, say

EVALUATION_FILE = "evaluation.json"
MASS_FILE = "mass.json"
LOCK_FILE = ".crat-ft-ablate.lock"
_NOT_COMPARED = ("arm", "seconds")  # arm.json entries that name and time a run, not define it


@dataclass(frozen=True)
class Detector:
    """What every run of one ablation shares: the cache, the detector it was made from, the val split."""

    cache: Path
    reader: object
    detector_cfg: object
    config: str
    checkpoint: str
    sha: str
    gt: Path
    data_root: str | None
    trust_checkpoint: bool


@dataclass(frozen=True)
class Planned:
    """One arm x seed as this invocation would run it."""

    arm: Arm
    seed: int
    work: Path
    options: dict
    ft: dict
    record: dict  # retrain-heads' run record (crat_ft.pipeline.retrain_record.run_record)
    arm_record: dict  # arm.json

    @property
    def retraining(self) -> str:
        """What decides the retrained heads: two arms with equal keys share them."""
        run = {k: v for k, v in self.record.items() if k != "cache_path"}
        return json.dumps([run, self.ft["export"]], sort_keys=True, default=str)


def open_detector(spec: Ablation, cache, data_root=None, trust_checkpoint: bool = False) -> Detector:
    """The cache and its detector (checked by sha256), and the val annotations ``--data-root`` gives."""
    from crat_ft.engine.config import ann_file_of, base_dataset_cfg, prepare_config
    from crat_ft.heads.ft_config import load_ft_config
    from crat_ft.heads.registry import register_all
    from crat_ft.pipeline.retrain_builders import open_cache_and_detector

    register_all()
    fts = [load_ft_config(a.ft_config, a.options({b.name: dict.fromkeys(MEASURED, 1.0) for b in spec.arms}, 0))
           for a in spec.arms]  # fmt: skip
    for arm, ft in zip(spec.arms[1:], fts[1:]):
        if ft["detector"] != fts[0]["detector"]:
            raise UserError(
                f"ARMS file {spec.path}: arm {arm.name!r} names detector {ft['detector']}, arm {spec.arms[0].name!r} "
                f"{fts[0]['detector']}; an ablation compares heads of one detector, so give every arm the same"
            )
    reader, config, checkpoint, detector_cfg, _, sha = open_cache_and_detector(fts[0], cache, trust_checkpoint)
    cfg = prepare_config(config, (), data_root, ("test_dataloader",))
    gt = ann_file_of(base_dataset_cfg(cfg, "test_dataloader"))
    return Detector(Path(cache), reader, detector_cfg, str(config), str(checkpoint), sha, gt,
                    None if data_root is None else str(data_root), trust_checkpoint)  # fmt: skip


def plan(spec: Ablation, arm: Arm, seed: int, det: Detector, work_dir: Path, measured: dict) -> Planned:
    """One arm x seed: its options (measured values filled in), fine-tune config, run record and arm record."""
    from crat_ft.common.dist import world_size
    from crat_ft.heads.ft_config import load_ft_config
    from crat_ft.pipeline.retrain_record import run_record

    options = arm.options(measured, seed)
    ft = load_ft_config(arm.ft_config, options)
    record = run_record(ft, det.reader, det.cache, det.detector_cfg, det.sha, world_size())
    export = {**ft["export"], **{k: v for k, v in arm.export.items() if v is not None}}
    arm_record = {
        "command": "ablate",
        "arm": arm.name,
        "settings": {**record["settings"], **{f"export.{k}": v for k, v in export.items()}},
        "paths": {"arms": str(spec.path), "ft_config": str(arm.ft_config)},
    }
    return Planned(arm, seed, work_dir / f"s{seed}" / arm.name, options, ft, record, arm_record)


def refuse_changed(p: Planned, arms_file: Path) -> None:
    """Refuse an arm x seed whose directory holds a run of another definition (``arm.json``) or another
    retraining (``run.json``: settings, cache, detector, processes), naming the arm and the first difference."""
    from crat_ft.common.run_record import difference_text, read_record
    from crat_ft.pipeline.retrain_record import RUN_FILE, record_difference

    recorded = read_record(p.work / ARM_FILE)
    if recorded is not None and recorded.get("command") == "ablate":
        why = difference_text(recorded, p.arm_record, _NOT_COMPARED)
        if why:
            raise UserError(
                f"arm {p.arm.name!r} (seed {p.seed}): {p.work} was run with {why}; restore the arm's definition in "
                f"{arms_file}, or choose a new --work-dir"
            )
    ran = read_record(p.work / RUN_FILE)
    why = record_difference(ran, p.record) if ran is not None else None
    if why:
        raise UserError(
            f"arm {p.arm.name!r} (seed {p.seed}): {p.work} was trained with {why}; rerun with the recorded inputs "
            "and number of processes, or choose a new --work-dir"
        )


def _check_all(spec: Ablation, det: Detector, seeds: Sequence[int], work_dir: Path) -> None:
    """:func:`refuse_changed` for every arm x seed whose measured inputs are known now (before any work)."""
    for seed in seeds:
        measured: dict = {}
        for arm in spec.arms:
            if any(used not in measured for used, _ in arm.uses):
                continue  # checked once its inputs are measured
            p = plan(spec, arm, seed, det, work_dir, measured)
            refuse_changed(p, spec.path)
            if (p.work / MASS_FILE).is_file():
                measured[arm.name] = json.loads((p.work / MASS_FILE).read_text())


def run_ablation(
    arms_file: str | os.PathLike,
    cache: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    data_root: str | os.PathLike | None = None,
    reference: str | None = None,
    trust_checkpoint: bool = False,
    tables: bool = True,
    log=None,
) -> dict | None:
    """Run (or continue) an ablation and, with ``tables``, compare its arms (module docstring).

    Args:
        arms_file: the ARMS file (:func:`crat_ft.pipeline.ablate_arms.load_arms`).
        cache: the feature cache (directory or ``index.h5``).
        work_dir: ``W``: ``s<seed>/<arm>/`` per run, the tables, ``ablate.log``.
        seeds: the retraining seeds (``train.seed``); each arm runs once per seed.
        data_root: the data holding the val split (default: the detector config's).
        reference: the arm every other is compared with (default: the ARMS file's).
        tables: write and print the tables (False: the runs only, e.g. one seed of a benchmark).
        log: an open text file for the frameworks' output (default: ``W/ablate.log``).

    Returns:
        The tables' content on rank 0 (:func:`crat_ft.pipeline.ablate_table.tabulate`); None without tables or on
        another rank.
    """
    from crat_ft.common.files import RunLock, output_dir
    from crat_ft.common.progress import Progress
    from crat_ft.engine.runner import on_rank0

    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UserError(f"--seeds: expected distinct integers >= 0, got {seeds}")
    spec = load_arms(arms_file, reference)
    det = open_detector(spec, cache, data_root, trust_checkpoint)
    with output_dir(work_dir, "--work-dir") as work_dir:
        lock = RunLock(work_dir / LOCK_FILE, f"--work-dir {work_dir}") if rank() == 0 else contextlib.nullcontext()
        with lock:
            on_rank0(lambda: _check_all(spec, det, seeds, work_dir))
            log = log or open(work_dir / "ablate.log", "a")  # left open: mmengine's loggers keep writing to it
            say(f"{len(spec.arms)} arms x {len(seeds)} seeds from {det.cache}; framework logs: {log.name}")
            bar = Progress(len(spec.arms) * len(seeds), "ablate", unit="runs") if rank() == 0 else None
            for seed in seeds:
                runs: dict[str, tuple[Path, Planned]] = {}
                measured: dict = {}  # {arm: {quantity: value}} of this seed's runs
                owners: dict[str, str] = {}  # {retraining: the first arm with it}
                for arm in spec.arms:
                    p = plan(spec, arm, seed, det, work_dir, measured)
                    runs[arm.name] = (_retrain(spec, p, det, measured, owners, log), p)
                _evaluate_seed(det, runs, log, bar)
            if not tables or rank() != 0:
                return None
            from crat_ft.pipeline.ablate_table import report

            return report(spec, work_dir, seeds, det.gt)


def _retrain(spec: Ablation, p: Planned, det: Detector, measured: dict, owners: dict, log) -> Path:
    """Retrain one arm x seed, continue it, or reuse it (or an earlier arm's equal retraining); its heads."""
    from crat_ft.common.files import atomic_write_text
    from crat_ft.common.run_record import read_record, write_record
    from crat_ft.engine.runner import on_rank0
    from crat_ft.pipeline.retrain import retrain_heads
    from crat_ft.pipeline.retrain_record import HEADS_FILE, RUN_FILE

    name, seed = p.arm.name, p.seed
    on_rank0(lambda: refuse_changed(p, spec.path))
    owner = owners.setdefault(p.retraining, name)
    heads = p.work.parent / owner / HEADS_FILE
    old = on_rank0(lambda: read_record(p.work / ARM_FILE) or {})
    seconds = dict(old.get("seconds") or {}) if old.get("command") == "ablate" else {}
    if owner != name:
        say(f"seed {seed} {name}: the retraining of {owner}, evaluated with {name}'s export options")
        seconds["retrain"] = 0.0
    elif on_rank0(lambda: heads.is_file() and (p.work / RUN_FILE).is_file()):  # the record matched above
        say(f"seed {seed} {name}: retrained before, reusing {heads}")
    else:

        def begin() -> None:
            p.work.mkdir(parents=True, exist_ok=True)
            (p.work / MASS_FILE).unlink(missing_ok=True)
            write_record(p.work / ARM_FILE, {**p.arm_record, "seconds": {}})

        on_rank0(begin)
        say(f"seed {seed} {name}: retraining the class-wise layers ({p.arm.ft_config.name})")
        t0 = time.time()
        with contextlib.redirect_stdout(log):
            retrain_heads(p.arm.ft_config, det.cache, p.work, cfg_options=p.options, resume=True,
                          trust_checkpoint=det.trust_checkpoint)  # fmt: skip
        seconds = {"retrain": round(time.time() - t0, 1)}
        say(f"seed {seed} {name}: retrained in {seconds['retrain']:.0f} s")

    def finish() -> dict | None:
        p.work.mkdir(parents=True, exist_ok=True)
        write_record(p.work / ARM_FILE, {**p.arm_record, "seconds": seconds})
        if owner != name or not p.ft["crat"].get("log_mass"):
            return None
        if not (p.work / MASS_FILE).is_file():
            atomic_write_text(p.work / MASS_FILE, json.dumps(measured_mass(p.work)))
        return json.loads((p.work / MASS_FILE).read_text())

    mass = on_rank0(finish)
    if mass is not None:
        measured[name] = mass
    elif owner != name and owner in measured:
        measured[name] = measured[owner]
    return heads


def measured_mass(work: Path) -> dict[str, float]:
    """The mean of the ``mass_box`` / ``mass_mask`` windows a run logged (``crat.log_mass``), from mmengine's
    scalars; a window logged again by a resumed run counts once (the later one)."""
    windows: dict[tuple[str, int], float] = {}
    for path in sorted(work.glob("*/vis_data/scalars.json")):  # one per run, by start time
        for i, line in enumerate(path.read_text().splitlines()):
            rec = json.loads(line)
            step = rec.get("iter", rec.get("step", i))
            for key, value in rec.items():
                if key.endswith("mass_box") or key.endswith("mass_mask"):
                    windows[key.split(".")[-1], step] = value
    if not windows:
        raise UserError(f"{work}: no mass_box / mass_mask in its logs; log them with crat.log_mass=True")
    names = sorted({k for k, _ in windows})
    return {n: sum(v for (k, _), v in windows.items() if k == n) / sum(k == n for k, _ in windows) for n in names}


def evaluation_record(p: Planned, det: Detector, heads: Path) -> dict:
    """What decides one arm's evaluation: its export options and, by sha256, the heads, the detector, its
    config and the val annotations (the metrics do not depend on the number of processes)."""
    from crat_ft.common.files import sha256_file
    from crat_ft.common.run_record import data_identity

    export = {k[7:]: v for k, v in p.arm_record["settings"].items() if k.startswith("export.")}
    return {
        "command": "evaluate",
        "settings": {"export": export},
        "inputs": {
            "config": "sha256:" + sha256_file(det.config),
            "checkpoint": "sha256:" + det.sha,
            "heads": "sha256:" + sha256_file(heads),
            "data": data_identity([det.gt]),
        },  # fmt: skip
        "paths": {"heads": str(heads)},
    }


def _evaluate_seed(det: Detector, runs: dict[str, tuple[Path, Planned]], log, bar) -> None:
    """Evaluate the seed's arms whose evaluation is missing or stale (side by side on a CPU), analyse their
    errors and record them; one console line per run."""
    from crat_ft.common.files import owned_tempdir
    from crat_ft.common.run_record import first_difference, read_record
    from crat_ft.engine.runner import on_rank0

    def stale() -> dict[str, dict]:  # rank 0: the records of the evaluations to do; their old ones removed
        todo = {}
        for name, (heads, p) in runs.items():
            wanted = evaluation_record(p, det, heads)
            recorded = read_record(p.work / EVALUATION_FILE)
            if recorded is not None and first_difference(recorded, wanted) is None:
                if (p.work / ERRORS_FILE).is_file():
                    say(f"seed {p.seed} {name}: evaluated before, reusing {p.work / 'metrics.json'}")
                    bar.update(1)
                    continue
            (p.work / EVALUATION_FILE).unlink(missing_ok=True)
            (p.work / ERRORS_FILE).unlink(missing_ok=True)
            todo[name] = wanted
        return todo

    todo = on_rank0(stale)
    if not todo:
        return
    say(f"seed {runs[next(iter(todo))][1].seed}: evaluating {', '.join(todo)} (LVIS protocol, val split)")
    t0 = time.time()
    with owned_tempdir("crat-ft-ablate") as tmp, contextlib.redirect_stdout(log):
        jobs = {name: _job(runs[name][1], runs[name][0], det, tmp) for name in todo}
        _evaluate(jobs, log)
    share = round((time.time() - t0) / len(todo), 1)
    if rank() == 0:
        _record_evaluations(det, {name: runs[name][1] for name in todo}, todo, share, bar)


def _job(p: Planned, heads: Path, det: Detector, tmp: Path) -> dict:
    """The keyword arguments of :func:`crat_ft.pipeline.evaluate.evaluate_detector` for one arm: its heads merged in by
    the evaluation itself, or, with export options, merged with them into ``tmp`` first."""
    job = dict(config=det.config, checkpoint=det.checkpoint, out=p.work / "metrics.json", data_root=det.data_root,
               outfile_prefix=p.work / "results", trust_checkpoint=det.trust_checkpoint)  # fmt: skip
    if not any(v is not None for v in p.arm.export.values()):
        return {**job, "heads": heads}
    from crat_ft.heads.export import export_checkpoint

    merged, config = export_checkpoint(det.config, det.checkpoint, str(heads), str(tmp / f"{p.arm.name}.pth"),
                                       trust_checkpoint=det.trust_checkpoint, **p.arm.export)  # fmt: skip
    return {**job, "config": config or det.config, "checkpoint": merged}


def _evaluate(jobs: dict[str, dict], log) -> None:
    """The evaluations: under torchrun one after another, each on every process; else side by side on a CPU."""
    from crat_ft.common.dist import world_size
    from crat_ft.pipeline.evaluate import evaluate_detector
    from crat_ft.pipeline.evaluate_jobs import evaluate_jobs

    if world_size() > 1:
        for kwargs in jobs.values():
            evaluate_detector(**kwargs)
    else:
        evaluate_jobs(jobs, log=log)


def _record_evaluations(det: Detector, runs: dict[str, Planned], records: dict, share: float, bar) -> None:
    """Rank 0, after evaluating: each run's errors, its time and evaluation record (written last: done)."""
    from crat_ft.common.lvis_json import load_lvis_json
    from crat_ft.common.run_record import read_record, write_record

    gt_doc = load_lvis_json(det.gt)
    for name, p in runs.items():
        metrics = json.loads((p.work / "metrics.json").read_text())
        analyze_arm(p.work, gt_doc, [iou for iou in IOU_TYPES if iou in metrics])
        old = read_record(p.work / ARM_FILE) or {}
        write_record(p.work / ARM_FILE, {**old, "seconds": {**old.get("seconds", {}), "evaluate": share}})
        write_record(p.work / EVALUATION_FILE, records[name])
        shown = "  ".join(f"{iou} AP {100 * metrics[iou]['AP']:.1f} APr {100 * metrics[iou]['APr']:.1f}"
                          for iou in IOU_TYPES if iou in metrics)  # fmt: skip
        say(f"seed {p.seed} {name}: {shown}")
        bar.update(1)


def analyze_arm(out: Path, gt_doc: dict, ious: Sequence[str] = IOU_TYPES) -> None:
    """``errors.json`` and the class-oracle matches (``oracle_matches_<iou>.npz``) of one evaluated run,
    from its detections (``results.segm.json``, or ``results.bbox.json`` without masks)."""
    from crat_ft.analysis.error_analysis import analyze_errors
    from crat_ft.common.files import atomic_write_text
    from crat_ft.evaluation.detections import Detections
    from crat_ft.evaluation.results import load_results_file

    masks = "segm" in ious
    dets = Detections.from_dicts(load_results_file(out / f"results.{'segm' if masks else 'bbox'}.json"), masks=masks)
    errors = {}
    for iou in ious:
        tables: dict = {}
        errors[iou] = analyze_errors(gt_doc, dets, iou, tables=tables)
        tables["oracle"].save(out / f"oracle_matches_{iou}.npz")
    atomic_write_text(out / ERRORS_FILE, json.dumps(errors, indent=1))
