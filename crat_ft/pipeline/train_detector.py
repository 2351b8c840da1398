"""``train-detector``: stage-1 training of a whole detector through mmengine's ``Runner``.

Built from an mmdet config, so logging, checkpoints, distributed launch and hooks behave as every
mmdet user expects.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from crat_ft.common.errors import UserError
from crat_ft.common.files import atomic_torch_save

DETECTOR_FILE = "detector.pth"


def demo_schedule(iters: int) -> list[str]:
    """``--cfg-options`` that train the demo detector ``iters`` iterations on its own schedule's proportions
    (the config's 600: linear warm-up over the first sixth, learning-rate steps at 3/4 and 11/12)."""
    if iters < 12:
        raise UserError(f"--detector-iters: the demo schedule needs at least 12 iterations, got {iters}")
    return [f"train_cfg.max_iters={iters}", f"param_scheduler.0.end={iters // 6}", f"param_scheduler.1.end={iters}",
            f"param_scheduler.1.milestones=[{iters * 3 // 4},{iters * 11 // 12}]"]  # fmt: skip


def train_detector(
    config: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    cfg_options: Iterable[str] | dict = (),
    data_root: str | os.PathLike | None = None,
    seed: int | None = None,
    resume: bool = False,
    trust_checkpoint: bool = False,
) -> Path:
    """Train an mmdet detector end to end with mmengine's Runner.

    Steps: resolve the config (``cfg_options``, ``data_root``, ``seed``) and its run record
    (:func:`detector_record`) → without ``resume``, refuse a work dir holding a run; with it, refuse
    another record and take the checkpoint ``last_checkpoint`` names → write the record
    (``run.json``) → train → write ``detector.pth``. A refused run leaves the work dir as it found it.

    Args:
        config: mmdet config file.
        work_dir: where logs and checkpoints go.
        cfg_options: validated ``key=value`` overrides.
        data_root: LVIS-format data directory (overrides the config's).
        seed: training seed (overrides ``randomness.seed``).
        resume: continue the run in ``work_dir`` (its settings must be this run's).
        trust_checkpoint: unpickle the work dir's checkpoints (and ``load_from``) beyond the allow-list.

    Returns:
        ``work_dir/detector.pth``: the final weights with class names and the run record in its
        meta, written only when training finished.
    """
    from crat_ft.common.files import output_dir
    from crat_ft.heads.registry import register_all

    register_all()
    cfg = detector_train_config(config, cfg_options, data_root, seed)
    with output_dir(work_dir, "--work-dir") as work_dir:
        return _train_in(cfg, work_dir, resume, trust_checkpoint)


def detector_train_config(config, cfg_options=(), data_root=None, seed: int | None = None):
    """The config ``train-detector`` trains with: ``cfg_options`` and ``data_root`` applied, class names
    filled in, ``randomness.seed`` set to ``seed`` (when given)."""
    from crat_ft.engine.config import prepare_config

    cfg = prepare_config(config, cfg_options, data_root, ("train_dataloader", "val_dataloader", "test_dataloader"))
    if seed is not None:  # randomness.deterministic (mmengine: torch's deterministic algorithms) as configured
        cfg.randomness = dict(seed=seed, deterministic=bool((cfg.get("randomness") or {}).get("deterministic", False)))
    return cfg


def detector_record(cfg) -> dict:
    """What decides a stage-1 detector's weights (a :mod:`crat_ft.common.run_record` record).

    ``settings``: the resolved config (:func:`detector_train_config`) less
    ``OPERATIONAL_KEYS["train-detector"]``; ``inputs``: the training data's annotation files and the
    ``load_from`` checkpoint by sha256 (their paths under ``paths``); ``world_size``: the processes
    (each takes its own batch).
    """
    from crat_ft.common.dist import world_size
    from crat_ft.common.files import sha256_file
    from crat_ft.common.run_record import OPERATIONAL_KEYS, data_identity, flat_settings
    from crat_ft.engine.config import ann_file_of

    tree = cfg.to_dict()
    settings = flat_settings(tree, OPERATIONAL_KEYS["train-detector"])
    annotations = [str(ann_file_of(ds)) for ds in _datasets_of(cfg.train_dataloader.dataset)]
    load_from = cfg.get("load_from")
    local = load_from if load_from and "://" not in str(load_from) else None
    inputs = {"data": data_identity(annotations), "load_from": load_from}
    if local is not None:
        if not Path(local).is_file():
            raise UserError(f"load_from: {local} does not exist; check the config's load_from")
        inputs["load_from"] = "sha256:" + sha256_file(local)
    return {
        "command": "train-detector",
        "settings": settings,
        "inputs": inputs,
        "paths": {"data": annotations, "load_from": load_from},
        "world_size": world_size(),
    }


def _datasets_of(ds) -> list:
    """The dataset dicts that hold an ``ann_file`` under a dataset config (wrappers and concatenations walked)."""
    if "ann_file" in ds:
        return [ds]
    inner = ds.get("datasets") or ([ds["dataset"]] if "dataset" in ds else [])
    return [d for sub in inner for d in _datasets_of(sub)]


def _train_in(cfg, work_dir: Path, resume: bool, trust_checkpoint: bool) -> Path:
    from mmengine.runner import Runner

    from crat_ft.common.dist import distributed_runner_cfg, rank
    from crat_ft.common.files import clean_stale_temps, temp_pattern
    from crat_ft.common.progress import output_begins
    from crat_ft.common.run_record import RECORD_FILE, check_resume, refuse_existing_run, write_record
    from crat_ft.engine.checkpoint import trusted_loading
    from crat_ft.engine.runner import on_rank0, resume_point, unique_names, unwrap
    from crat_ft.heads.hooks import ConsoleProgressHook, NonFiniteGuardHook

    record = detector_record(cfg)

    def checks() -> Path | None:  # rank 0 checks the work dir; every rank gets its answer
        for name in (DETECTOR_FILE, RECORD_FILE):
            clean_stale_temps(work_dir, temp_pattern(work_dir / name))
        if not resume:
            refuse_existing_run(work_dir, "train-detector", (DETECTOR_FILE,))
            return None
        check_resume(work_dir, record, (DETECTOR_FILE,))
        return resume_point(work_dir, trust=trust_checkpoint, command="train-detector")

    start = on_rank0(checks)
    cfg.work_dir = str(work_dir)
    # resume from the checkpoint last_checkpoint names; without one, start afresh (from the config's own
    # load_from, if any)
    cfg.resume = start is not None
    if start is not None:
        cfg.load_from = str(start)
    unique_names(cfg, "train-detector")
    distributed_runner_cfg(cfg)  # under torchrun: DDP over every rank, mmengine's samplers split the data
    output_begins()
    if rank() == 0:
        write_record(work_dir / RECORD_FILE, record)
    with trusted_loading(trust_checkpoint):  # the Runner loads load_from, or the checkpoint it resumes
        runner = Runner.from_cfg(cfg)
        runner.register_hook(NonFiniteGuardHook(), "VERY_HIGH")
        runner.register_hook(ConsoleProgressHook("train-detector"))
        runner.train()
    model = unwrap(runner.model)
    out = work_dir / DETECTOR_FILE
    if runner.rank != 0:  # DDP keeps every rank's weights equal; rank 0 writes them
        return out
    meta = {
        "crat_ft_stage": "stage1",
        "dataset_meta": {"classes": list(runner.train_dataloader.dataset.metainfo["classes"])},
        "iter": runner.iter,
        "cfg": cfg.pretty_text,
        "run": record,
    }
    atomic_torch_save({"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "meta": meta}, out)
    runner.logger.info(f"final detector weights: {out}")
    return out
