"""Runner set-up: stage-1 detector training and evaluation through mmengine.

Both go through mmengine's ``Runner`` built from an mmdet config, so logging,
checkpoints, distributed launch and hooks behave as every mmdet user expects.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterable

from crat_ft.errors import UserError
from crat_ft.files import atomic_torch_save

DETECTOR_FILE = "detector.pth"


def _prepare_cfg(config, cfg_options, data_root, splits):
    from crat_ft.config import load_config, set_data_root, sync_dataset_classes

    cfg = load_config(config, cfg_options)
    if data_root is not None:
        if not Path(data_root).is_dir():
            raise UserError(f"--data-root {data_root} does not exist; make it with `crat-ft make-demo-data {data_root}`")
        set_data_root(cfg, data_root)
    sync_dataset_classes(cfg, splits)
    return cfg


def _register_all() -> None:
    import mmdet.utils

    import crat_ft.evaluation  # noqa: F401  (registers CratLVISMetric)
    import crat_ft.losses  # noqa: F401  (registers GroupSoftmaxLoss, DualSoftmaxScores)
    from crat_ft.checkpoint import allow_mmengine_pickles

    mmdet.utils.register_all_modules(init_default_scope=True)
    allow_mmengine_pickles()


def _unique_names(cfg, prefix: str) -> None:
    """Unique experiment and visualizer names: mmengine keeps them as process-wide
    singletons, and a second Runner in one process (the demo) must not reuse the
    first one's (possibly deleted) log directory."""
    import uuid

    tag = f"{prefix}-{uuid.uuid4().hex[:8]}"
    cfg.experiment_name = tag
    if cfg.get("visualizer") is not None:
        cfg.visualizer["name"] = tag


def train_detector(
    config: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    cfg_options: Iterable[str] | dict = (),
    data_root: str | os.PathLike | None = None,
    seed: int | None = None,
    resume: bool = False,
) -> Path:
    """Train an mmdet detector end to end with mmengine's Runner.

    Args:
        config: mmdet config file.
        work_dir: where logs and checkpoints go.
        cfg_options: validated ``key=value`` overrides.
        data_root: LVIS-format data directory (overrides the config's).
        seed: training seed (overrides ``randomness.seed``).
        resume: continue from the last checkpoint in ``work_dir``.

    Returns:
        ``work_dir/detector.pth``: the final weights with class names in its
        meta, written only when training finished.
    """
    from mmengine.runner import Runner

    from crat_ft.files import check_writable_dir
    from crat_ft.hooks import NonFiniteGuardHook

    _register_all()
    cfg = _prepare_cfg(config, cfg_options, data_root, ("train_dataloader", "val_dataloader", "test_dataloader"))
    work_dir = check_writable_dir(work_dir, "--work-dir")
    cfg.work_dir = str(work_dir)
    # resume from the newest loadable checkpoint of the work dir; without one, start
    # afresh (from the config's own load_from, if any)
    start = resume_point(work_dir) if resume else None
    cfg.resume = start is not None
    if start is not None:
        cfg.load_from = str(start)
    if seed is not None:
        cfg.randomness = dict(seed=seed, deterministic=False)
    _unique_names(cfg, "train-detector")
    runner = Runner.from_cfg(cfg)
    runner.register_hook(NonFiniteGuardHook(), "VERY_HIGH")
    runner.train()
    model = runner.model.module if hasattr(runner.model, "module") else runner.model
    out = work_dir / DETECTOR_FILE
    meta = {
        "crat_ft_stage": "stage1",
        "dataset_meta": {"classes": list(runner.train_dataloader.dataset.metainfo["classes"])},
        "iter": runner.iter,
        "cfg": cfg.pretty_text,
    }
    atomic_torch_save({"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "meta": meta}, out)
    runner.logger.info(f"final detector weights: {out}")
    return out


def evaluate_detector(
    config: str | os.PathLike,
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    cfg_options: Iterable[str] | dict = (),
    data_root: str | os.PathLike | None = None,
    trust_checkpoint: bool = False,
    per_class_csv: str | os.PathLike | None = None,
    heads: str | os.PathLike | None = None,
) -> dict:
    """Evaluate a detector checkpoint on the config's test split with the LVIS protocol.

    Writes ``out`` as ``{"bbox": {...}, "segm": {...}}`` (keys of
    :data:`crat_ft.evaluation.METRIC_KEYS`) and the per-class CSV beside it
    (``<out stem>_per_class.csv`` unless ``per_class_csv`` is given).

    With ``heads``, the retrained class-wise layers are merged into the
    checkpoint in a temporary directory first (nothing is written beside
    ``out``); ``cfg_options`` apply to that merge too.

    The output directories are checked for writability before the model is
    built; the JSON and the CSV are renamed into place together at the end
    (a run killed in between leaves a journal that the next run cleans).

    Returns:
        The metrics dict written to ``out``.
    """
    from crat_ft.files import check_writable_dir, clean_stale_temps, owned_tempdir, recover_journal, temp_pattern

    out = Path(out)
    csv_path = Path(per_class_csv) if per_class_csv else out.with_name(out.stem + "_per_class.csv")
    for path, what in ((out, "the directory of --out"), (csv_path, "the directory of --per-class-csv")):
        check_writable_dir(path.parent, what)
        clean_stale_temps(path.parent, temp_pattern(path))
    journal = out.with_name(f".{out.name}.commit")
    recover_journal(journal)
    if heads is not None:
        from crat_ft.detector import export_checkpoint

        with owned_tempdir("crat-ft-merged") as tmp:
            merged, merged_cfg = export_checkpoint(
                str(config), str(checkpoint), str(heads), str(tmp / "merged.pth"), trust_checkpoint=trust_checkpoint,
                cfg_options=cfg_options,
            )
            return evaluate_detector(
                merged_cfg or config, merged, out, cfg_options=cfg_options, data_root=data_root, per_class_csv=csv_path
            )
    from mmengine.runner import Runner

    from crat_ft.checkpoint import load_checkpoint_file, state_dict_of, trusted_loading
    from crat_ft.detector import check_checkpoint_classes
    from crat_ft.files import commit_together, storage_errors, temp_name

    _register_all()
    cfg = _prepare_cfg(config, cfg_options, data_root, ("test_dataloader",))
    ckpt = load_checkpoint_file(checkpoint, trust=trust_checkpoint)
    check_checkpoint_classes(cfg, state_dict_of(ckpt), str(checkpoint))
    evaluator = cfg.get("test_evaluator")
    evaluators = evaluator if isinstance(evaluator, list) else [evaluator]
    lvis = [e for e in evaluators if isinstance(e, dict) and e.get("type") == "CratLVISMetric"]
    if not lvis:
        raise UserError(
            f"config {config}: test_evaluator should be a CratLVISMetric, got {evaluator!r}; "
            "set test_evaluator = dict(type='CratLVISMetric', ann_file=..., metric=['bbox', 'segm'])"
        )
    lvis[0]["per_class_csv"] = str(temp_name(csv_path))
    if not lvis[0].get("ann_file"):
        from crat_ft.config import ann_file_of

        lvis[0]["ann_file"] = str(ann_file_of(cfg.test_dataloader.dataset))

    cfg.load_from = str(checkpoint)
    cfg.resume = False
    cfg.pop("train_dataloader", None)
    cfg.pop("train_cfg", None)
    cfg.pop("optim_wrapper", None)
    cfg.pop("param_scheduler", None)
    _unique_names(cfg, "evaluate")
    try:
        with owned_tempdir("crat-ft-eval") as tmp:
            cfg.work_dir = str(tmp)
            with trusted_loading(trust_checkpoint):
                runner = Runner.from_cfg(cfg)
                runner.test()
            from crat_ft.evaluation import CratLVISMetric

            metric = next(m for m in runner.test_evaluator.metrics if isinstance(m, CratLVISMetric))
            results = metric.last_results["metrics"]
        with storage_errors(out):
            temp_name(out).write_text(json.dumps(results, indent=2))
        commit_together([(temp_name(csv_path), csv_path), (temp_name(out), out)], journal)
    finally:
        temp_name(csv_path).unlink(missing_ok=True)
        temp_name(out).unlink(missing_ok=True)
    return results


# --------------------------------------------------------------------------- retrain-heads

HEADS_FILE = "heads.pth"
FT_SECTIONS = {
    "detector": {"config": None, "checkpoint": None},
    "heads": {
        "loss_cls": dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
        "loss_bbox_weight": 1.0,
        "loss_mask_weight": 1.0,
        "reinit_cls": False,
    },
    "crat": {},
    "sampler": {
        "strategy": "class_balanced",
        "mask_strategy": None,
        "rois_per_batch": 512,
        "pos_fraction": 0.25,
        "masks_per_batch": 32,
        "mask_group": 4,
        "rfs_t": 1e-3,
    },
    "train": {
        "max_iters": 1000,
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "warmup_iters": 50,
        "milestones": None,
        "checkpoint_interval": 250,
        "log_interval": 50,
        "seed": 0,
        "num_workers": 0,
        "in_memory": False,
    },
    "export": {"tau_norm": None, "logit_adjust": None, "combine_original": None},
}


def load_ft_config(path: str | os.PathLike, cfg_options: Iterable[str] | dict = ()) -> dict:
    """Read a fine-tune config and fill defaults; unknown sections or keys are errors naming the file and key."""
    from crat_ft.config import load_config
    from crat_ft.heads import CratConfig

    cfg = load_config(path, cfg_options)
    known_top = set(FT_SECTIONS) | {"_base_"}
    unknown = sorted(k for k in cfg.keys() if k not in known_top)
    if unknown:
        raise UserError(f"fine-tune config {path}: unknown key(s) {unknown}; known sections are {sorted(FT_SECTIONS)}")
    out = {}
    for section, defaults in FT_SECTIONS.items():
        given = dict(cfg.get(section, {}) or {})
        if section == "crat":
            CratConfig.from_dict(given, f"{path}: crat")
            out[section] = given
            continue
        bad = sorted(set(given) - set(defaults))
        if bad:
            raise UserError(f"fine-tune config {path}: unknown key(s) {bad} in '{section}'; known keys are {sorted(defaults)}")
        out[section] = {**defaults, **given}
    return out


class _CacheLoader:
    """Factory of the retraining DataLoader (kept small so tests can build it without a Runner)."""

    @staticmethod
    def build(reader, sampler_cfg: dict, seed: int, num_workers: int, rank: int = 0):
        import torch

        from crat_ft.sampling import CachedBatchDataset, RoIBatchSampler

        sampler = RoIBatchSampler(
            labels=reader.labels,
            roi_images=reader.roi_image,
            mask_labels=reader.mask_labels,
            mask_images=reader.mask_image,
            num_classes=reader.num_classes,
            strategy=sampler_cfg["strategy"],
            mask_strategy=sampler_cfg["mask_strategy"],
            rois_per_batch=sampler_cfg["rois_per_batch"],
            pos_fraction=sampler_cfg["pos_fraction"],
            masks_per_batch=sampler_cfg["masks_per_batch"],
            mask_group=sampler_cfg["mask_group"],
            seed=seed * 1000 + rank,
            rfs_t=sampler_cfg["rfs_t"],
        )
        return torch.utils.data.DataLoader(
            CachedBatchDataset(reader), sampler=sampler, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0
        )


def heads_loss_cls(ft: dict, meta: dict) -> dict:
    """The classifier loss config of a fine-tune config, completed with what the cache knows."""
    loss_cls = dict(ft["heads"]["loss_cls"])
    if loss_cls.get("type") in ("SeesawLoss", "EQLV2Loss", "GroupSoftmaxLoss"):
        loss_cls.setdefault("num_classes", len(meta["class_names"]))
    if loss_cls.get("type") == "GroupSoftmaxLoss":
        loss_cls.setdefault("class_instance_count", [int(n) for n in meta["class_instance_count"]])
    return loss_cls


def build_heads(ft: dict, reader, detector_cfg, detector_state: dict):
    """The :class:`crat_ft.heads.ClasswiseHeads` for a cache, initialised from the detector.

    From a cache at box level ``roi`` (mask level ``roi``) the detector's bbox
    (mask) head trunk is built and retrained too (see :func:`crat_ft.heads.build_trunk`).
    """
    from crat_ft.detector import CLASSWISE_LAYERS
    from crat_ft.heads import ClasswiseHeads, CratConfig, build_trunk

    meta = reader.meta
    has_mask = bool(int(meta["mask_size"]))
    box_trunk = mask_trunk = None
    roi_cfg = detector_cfg.model.roi_head
    if meta["box_level"] == "roi":
        box_trunk = build_trunk(dict(roi_cfg.bbox_head), detector_state, CLASSWISE_LAYERS["fc_cls"].rsplit(".", 1)[0], ("fc_cls", "fc_reg"))
    if has_mask and meta["mask_level"] == "roi":
        mask_trunk = build_trunk(dict(roi_cfg.mask_head), detector_state, CLASSWISE_LAYERS["conv_logits"].rsplit(".", 1)[0], ("conv_logits",))
    # widths of the class-wise layers' inputs, as the checkpoint has them
    box_dim = int(detector_state[CLASSWISE_LAYERS["fc_reg"] + ".weight"].shape[1])
    mask_channels = int(detector_state[CLASSWISE_LAYERS["conv_logits"] + ".weight"].shape[1]) if has_mask else 0
    if box_trunk is None and int(meta["box_shape"][0]) != box_dim:
        raise UserError(f"the cache's box features have width {meta['box_shape'][0]} but the detector's fc_reg takes {box_dim}; re-extract the cache")
    if mask_trunk is None and has_mask and int(meta["mask_shape"][0]) != mask_channels:
        raise UserError(
            f"the cache's mask features have {meta['mask_shape'][0]} channels but the detector's conv_logits takes {mask_channels}; re-extract the cache"
        )
    heads = ClasswiseHeads(
        num_classes=reader.num_classes,
        box_feat_dim=box_dim,
        mask_channels=mask_channels,
        bbox_coder=dict(detector_cfg.model.roi_head.bbox_head.bbox_coder),
        loss_cls=heads_loss_cls(ft, meta),
        loss_bbox_weight=ft["heads"]["loss_bbox_weight"],
        loss_mask_weight=ft["heads"]["loss_mask_weight"],
        crat=CratConfig.from_dict(ft["crat"]),
        class_instance_count=meta["class_instance_count"],
        reinit_cls=ft["heads"]["reinit_cls"],
        box_trunk=box_trunk,
        mask_trunk=mask_trunk,
    )
    heads.load_from_detector(detector_state, CLASSWISE_LAYERS)
    return heads


def _cpu_ddp(module):
    """DDP over gloo for CPU-only torchrun launches.

    mmengine's launcher assumes GPUs (it calls ``torch.cuda.set_device`` and
    gives DDP ``device_ids``); on CPU the process group is initialised here
    from torchrun's environment and the module wrapped without device ids,
    which the Runner then takes as is.
    """
    import torch.distributed as dist
    from mmengine.model import MMDistributedDataParallel

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return MMDistributedDataParallel(module=module, broadcast_buffers=False, find_unused_parameters=False)


def retrain_heads(
    ft_config: str | os.PathLike,
    cache: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    cfg_options: Iterable[str] | dict = (),
    resume: bool = False,
    trust_checkpoint: bool = False,
) -> Path:
    """Retrain the class-wise layers from a feature cache with mmengine's Runner.

    Returns:
        ``work_dir/heads.pth``: retrained layers, Fisher statistics and provenance.
    """
    from crat_ft.files import RunLock, check_writable_dir, clean_stale_temps, temp_pattern

    work_dir = check_writable_dir(work_dir, "--work-dir")
    rank = int(os.environ.get("RANK", 0))
    # one run per work dir; under torchrun rank 0 holds the lock for all ranks
    lock = RunLock(work_dir / ".crat-ft.lock", f"--work-dir {work_dir}") if rank == 0 else contextlib.nullcontext()
    with lock:
        clean_stale_temps(work_dir, temp_pattern(work_dir / HEADS_FILE))
        return _retrain_locked(ft_config, cache, work_dir, rank=rank, cfg_options=cfg_options, resume=resume,
                               trust_checkpoint=trust_checkpoint)


def resume_point(work_dir: Path) -> Path | None:
    """The newest Runner checkpoint in ``work_dir`` that loads; newer unreadable ones are removed.

    mmengine writes ``iter_N.pth`` in place, so a run killed while saving
    leaves a truncated file; resuming continues from the one before it.
    """
    from crat_ft.checkpoint import load_checkpoint_file

    def iteration(p: Path) -> int:
        tail = p.stem.split("_")[-1]
        return int(tail) if tail.isdigit() else -1

    for ckpt in sorted(work_dir.glob("iter_*.pth"), key=iteration, reverse=True):
        try:
            load_checkpoint_file(ckpt)
        except UserError:
            ckpt.unlink(missing_ok=True)  # every rank looks; one removes it
            continue
        return ckpt
    return None


def _retrain_locked(ft_config, cache, work_dir: Path, *, rank: int, cfg_options, resume: bool, trust_checkpoint: bool) -> Path:
    import uuid

    import torch
    from mmengine.runner import Runner

    from crat_ft.cache import RoIReader
    from crat_ft.checkpoint import load_checkpoint_file, state_dict_of
    from crat_ft.config import load_config
    from crat_ft.extract import INDEX_FILE
    from crat_ft.hooks import NonFiniteGuardHook

    _register_all()
    ft = load_ft_config(ft_config, cfg_options)
    cache = Path(cache)
    if cache.is_dir():
        cache = cache / INDEX_FILE
    reader = RoIReader(cache, in_memory=ft["train"]["in_memory"])
    det_config = ft["detector"]["config"] or reader.meta.get("config_path")
    det_ckpt = ft["detector"]["checkpoint"] or reader.meta.get("checkpoint_path")
    if not det_config or not det_ckpt:
        raise UserError("the detector config/checkpoint are unknown: set detector.config and detector.checkpoint in the fine-tune config")
    ckpt = load_checkpoint_file(det_ckpt, trust=trust_checkpoint)
    from crat_ft.cache import sha256_file

    sha = sha256_file(det_ckpt)
    if sha != reader.meta["checkpoint_sha256"]:
        raise UserError(
            f"feature cache {cache} was made from checkpoint sha256 {reader.meta['checkpoint_sha256'][:12]}..., not {det_ckpt} ({sha[:12]}...); "
            "re-extract features with this checkpoint or pass the matching one"
        )
    detector_cfg = load_config(det_config)
    heads = build_heads(ft, reader, detector_cfg, state_dict_of(ckpt))

    tr = ft["train"]
    loader = _CacheLoader.build(reader, ft["sampler"], tr["seed"], tr["num_workers"], rank)
    milestones = tr["milestones"] or [int(tr["max_iters"] * 0.75)]
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    load_from = resume_point(work_dir) if resume else None
    model = heads
    if distributed and not torch.cuda.is_available():
        model = _cpu_ddp(heads)
    runner = Runner(
        model=model,
        work_dir=str(work_dir),
        train_dataloader=loader,
        train_cfg=dict(by_epoch=False, max_iters=tr["max_iters"], val_interval=10**9),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=tr["lr"], momentum=tr["momentum"], weight_decay=tr["weight_decay"])),
        param_scheduler=[
            dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=max(1, tr["warmup_iters"])),
            dict(type="MultiStepLR", by_epoch=False, begin=0, end=tr["max_iters"], milestones=milestones, gamma=0.1),
        ],
        default_hooks=dict(
            timer=dict(type="IterTimerHook"),
            logger=dict(type="LoggerHook", interval=tr["log_interval"]),
            param_scheduler=dict(type="ParamSchedulerHook"),
            checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=tr["checkpoint_interval"], max_keep_ckpts=2),
        ),
        custom_hooks=[NonFiniteGuardHook(work_dir=work_dir)],
        log_processor=dict(by_epoch=False, window_size=tr["log_interval"]),
        randomness=dict(seed=tr["seed"]),
        resume=load_from is not None,
        load_from=str(load_from) if load_from is not None else None,
        launcher="pytorch" if distributed else "none",
        env_cfg=dict(dist_cfg=dict(backend="nccl" if torch.cuda.is_available() else "gloo")),
        default_scope="mmdet",
        experiment_name=f"retrain-heads-{Path(ft_config).stem}-{uuid.uuid4().hex[:8]}",
    )
    if distributed:
        import torch.distributed as dist

        runner.logger.info(f"DDP: world size {runner.world_size}, backend {dist.get_backend()}; Fisher statistics are all-reduced every step")
    runner.train()
    model = runner.model.module if hasattr(runner.model, "module") else runner.model
    out = work_dir / HEADS_FILE
    meta = {
        "crat_ft_stage": "heads",
        "checkpoint_sha256": reader.meta["checkpoint_sha256"],
        "detector_config": str(det_config),
        "detector_checkpoint": str(det_ckpt),
        "class_names": reader.meta["class_names"],
        "class_frequency": reader.meta["class_frequency"],
        "class_instance_count": reader.meta["class_instance_count"],
        "crat": dict(ft["crat"]),
        "loss_cls": heads_loss_cls(ft, reader.meta),
        "levels": {"box": reader.meta["box_level"], "mask": reader.meta["mask_level"]},
        "sampler": dict(ft["sampler"]),
        "export": dict(ft["export"]),
        "iter": runner.iter,
    }
    if rank == 0:
        atomic_torch_save({"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "meta": meta}, out)
    return out
