"""The pieces of ``retrain-heads``, each usable on its own (tests and benchmarks use them):
:func:`open_cache_and_detector` (the cache and the detector it was extracted from),
:func:`build_cache_loader` (the DataLoader over cached RoIs),
:func:`build_heads` (the :class:`crat_ft.heads.classwise.ClasswiseHeads`, initialised from
the detector) and :func:`build_runner` (the Runner with its schedule, hooks
and DDP); :func:`heads_meta` (what ``heads.pth`` records).
"""

from __future__ import annotations

import os
from pathlib import Path

from crat_ft.common.errors import UserError


def build_cache_loader(reader, sampler_cfg: dict, seed: int, num_workers: int, rank: int = 0):
    """The retraining DataLoader over a cache: a :class:`crat_ft.heads.sampling.RoIBatchSampler` of whole batches.

    Args:
        reader: the :class:`crat_ft.cache.RoIReader`, or a Cascade R-CNN's list
            of them (one per stage: each step yields a batch of every stage).
        sampler_cfg: the fine-tune config's ``sampler`` section.
        seed: the training seed (each rank draws its own batches from ``seed * 1000 + rank``,
            stage ``s`` of a cascade from that plus ``500 s``).
        num_workers: DataLoader worker processes.
        rank: this process's rank.
    """
    import torch

    from crat_ft.heads.sampling import CachedBatchDataset, RoIBatchSampler, StageBatchDataset, StageBatchSampler

    readers = reader if isinstance(reader, (list, tuple)) else [reader]
    samplers = [
        RoIBatchSampler.from_reader(
            r,
            strategy=sampler_cfg["strategy"],
            mask_strategy=sampler_cfg["mask_strategy"],
            rois_per_batch=sampler_cfg["rois_per_batch"],
            pos_fraction=sampler_cfg["pos_fraction"],
            masks_per_batch=sampler_cfg["masks_per_batch"],
            mask_group=sampler_cfg["mask_group"],
            seed=seed * 1000 + rank + 500 * s,
            rfs_t=sampler_cfg["rfs_t"],
        )
        for s, r in enumerate(readers)
    ]
    if isinstance(reader, (list, tuple)):
        dataset, sampler = StageBatchDataset(readers), StageBatchSampler(samplers)
    else:
        dataset, sampler = CachedBatchDataset(reader), samplers[0]
    return torch.utils.data.DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),  # float16 batches cross to the GPU from pinned memory
    )


def build_heads(ft: dict, reader, detector_cfg, detector_state: dict, donor_groups: dict[str, str] | None = None):
    """The heads for a cache, initialised from the detector.

    Args:
        reader: the :class:`crat_ft.cache.RoIReader` of a single-stage
            detector's cache (gives a :class:`crat_ft.heads.classwise.ClasswiseHeads`), or
            a Cascade R-CNN's list of them, one per stage (gives a
            :class:`crat_ft.heads.classwise.CascadeHeads`).
        donor_groups: the content of ``crat.donor_groups`` as the run recorded it
            (:func:`run_record`'s ``files``); None without groups.

    From a cache at box level ``roi`` (mask level ``roi``) the detector's bbox
    (mask) head trunk is built and retrained too (see :func:`crat_ft.heads.classwise.build_trunk`).
    """
    from crat_ft.heads.classwise import CascadeHeads

    if not isinstance(reader, (list, tuple)):
        return _stage_heads(ft, reader, detector_cfg, detector_state, 0, 1, donor_groups)
    stages = [
        _stage_heads(ft, r, detector_cfg, detector_state, s, len(reader), donor_groups) for s, r in enumerate(reader)
    ]
    return CascadeHeads(stages, detector_cfg.model.roi_head.get("stage_loss_weights", [1.0] * len(stages)))


def _stage_heads(ft: dict, reader, detector_cfg, detector_state: dict, stage: int, stages: int, donor_groups=None):
    """The :class:`crat_ft.heads.classwise.ClasswiseHeads` of one stage."""
    from crat_ft.detector.frozen import classwise_layers, predictor_cfgs, stage_cfgs
    from crat_ft.heads.classwise import ClasswiseHeads, build_trunk
    from crat_ft.heads.ft_config import CratConfig, heads_loss_cls

    meta = reader.meta
    if int(meta.get("stage", 0)) != stage or int(meta.get("num_stages", 1)) != stages:
        raise UserError(
            f"{reader.path} is stage {meta.get('stage', 0)} of {meta.get('num_stages', 1)}, expected stage {stage} of "
            f"{stages}; pass the cache directory extract-features wrote"
        )
    layers = classwise_layers(stages)[stage]
    has_mask = bool(int(meta["mask_size"]))
    roi_cfg = detector_cfg.model.roi_head
    bbox_cfg = stage_cfgs(roi_cfg.bbox_head, stages)[stage]
    mask_cfg = stage_cfgs(roi_cfg.get("mask_head"), stages)[stage] if has_mask else None
    agnostic = bool(bbox_cfg.get("reg_class_agnostic", False))
    box_trunk = mask_trunk = None
    if meta["box_level"] == "roi":
        box_trunk = build_trunk(
            dict(bbox_cfg), detector_state, layers["fc_cls"].rsplit(".", 1)[0], ("fc_cls", "fc_reg")
        )
    if has_mask and meta["mask_level"] == "roi":
        mask_trunk = build_trunk(
            dict(mask_cfg), detector_state, layers["conv_logits"].rsplit(".", 1)[0], ("conv_logits",)
        )
    # widths of the class-wise layers' inputs, as the checkpoint has them
    box_dim = int(detector_state[layers["fc_cls"] + ".weight"].shape[1])
    mask_channels = int(detector_state[layers["conv_logits"] + ".weight"].shape[1]) if has_mask else 0
    if box_trunk is None and int(meta["box_shape"][0]) != box_dim:
        raise UserError(
            f"the cache's box features have width {meta['box_shape'][0]} but the detector's fc_cls takes {box_dim}; re-extract the cache"
        )
    if mask_trunk is None and has_mask and int(meta["mask_shape"][0]) != mask_channels:
        raise UserError(
            f"the cache's mask features have {meta['mask_shape'][0]} channels but the detector's conv_logits "
            f"takes {mask_channels}; re-extract the cache"
        )
    predictors = predictor_cfgs(bbox_cfg, mask_cfg)
    heads = ClasswiseHeads(
        cls_predictor_cfg=predictors["classifier"],
        reg_predictor_cfg=predictors.get("box regressor"),
        mask_predictor_cfg=predictors.get("mask predictor"),
        reg_class_agnostic=agnostic,
        num_classes=reader.num_classes,
        box_feat_dim=box_dim,
        mask_channels=mask_channels,
        bbox_coder=dict(bbox_cfg.bbox_coder),
        loss_cls=heads_loss_cls(ft, meta),
        loss_bbox_weight=ft["heads"]["loss_bbox_weight"],
        loss_mask_weight=ft["heads"]["loss_mask_weight"],
        crat=CratConfig.from_dict(ft["crat"]),
        class_instance_count=meta["class_instance_count"],
        class_names=list(meta["class_names"]),
        reinit_cls=ft["heads"]["reinit_cls"],
        box_trunk=box_trunk,
        mask_trunk=mask_trunk,
        donor_groups=donor_groups,
    )
    heads.load_from_detector(detector_state, layers)
    return heads


def open_cache_and_detector(ft: dict, cache, trust_checkpoint: bool):
    """The cache reader and the detector it was made from (checked by sha256).

    Returns:
        ``(reader, detector config path, checkpoint path, detector config, detector state dict, its sha256)``;
        for a Cascade R-CNN's cache, ``reader`` is a list with one reader per stage.
    """
    from crat_ft.cache import RoIReader, stage_indexes
    from crat_ft.common.errors import sha_mismatch
    from crat_ft.common.files import sha256_file
    from crat_ft.engine.checkpoint import load_checkpoint_file, state_dict_of
    from crat_ft.engine.config import load_config

    indexes = stage_indexes(cache)
    # 8 GiB of box features in RAM per node, shared out among the node's ranks; beyond it, block reads
    budget = (8 << 30) // len(indexes) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    readers = [RoIReader(index, in_memory=ft["train"]["in_memory"], box_memory_bytes=budget) for index in indexes]
    reader = readers[0]
    stages = int(reader.meta.get("num_stages", 1))
    if stages != len(readers):
        raise UserError(
            f"{cache} holds {len(readers)} stage cache(s) of a {stages}-stage detector; pass the cache directory "
            "extract-features wrote (it holds stage-0/ ... ), after every stage finished (rerun it with --resume)"
        )
    det_config = ft["detector"]["config"] or reader.meta.get("config_path")
    det_ckpt = ft["detector"]["checkpoint"] or reader.meta.get("checkpoint_path")
    if not det_config or not det_ckpt:
        raise UserError(
            "the detector config/checkpoint are unknown: set detector.config and detector.checkpoint in the fine-tune config"
        )
    ckpt = load_checkpoint_file(det_ckpt, trust=trust_checkpoint)
    sha = sha256_file(det_ckpt)
    if sha != reader.meta["checkpoint_sha256"]:
        raise sha_mismatch(
            f"feature cache {cache}",
            reader.meta["checkpoint_sha256"],
            det_ckpt,
            sha,
            "re-extract features with this checkpoint or pass the matching one",
        )
    for r in readers[1:]:
        if r.meta["checkpoint_sha256"] != sha:
            raise UserError(f"{r.path} was made from another checkpoint than {readers[0].path}; re-extract the cache")
    detector_cfg = load_config(det_config)
    from crat_ft.detector.frozen import num_stages

    if num_stages(detector_cfg) != stages:
        raise UserError(
            f"the cache was made for a {stages}-stage detector but {det_config} has {num_stages(detector_cfg)} stage(s); "
            "pass the config the cache was made with"
        )
    return (readers if stages > 1 else reader), det_config, det_ckpt, detector_cfg, state_dict_of(ckpt), sha


def build_runner(
    heads, loader, train_cfg: dict, work_dir: Path, *, resume_from: Path | None = None, name: str = "retrain-heads"
):
    """The mmengine ``Runner`` that retrains ``heads``: SGD, linear warm-up then steps, checkpoints, NaN guard.

    Under torchrun (``WORLD_SIZE`` > 1) it trains with DDP: NCCL on GPUs, and on
    CPUs gloo set up by :func:`crat_ft.engine.runner.cpu_ddp`.

    Args:
        heads: the model (:func:`build_heads`).
        loader: the DataLoader (:func:`build_cache_loader`).
        train_cfg: the fine-tune config's ``train`` section.
        work_dir: logs and checkpoints.
        resume_from: a Runner checkpoint to resume (:func:`crat_ft.engine.runner.resume_point`).
        name: experiment name prefix.
    """
    import uuid

    import torch
    from mmengine.runner import Runner

    from crat_ft.common.dist import init_distributed
    from crat_ft.engine.runner import cpu_ddp
    from crat_ft.heads.hooks import ConsoleProgressHook, NonFiniteGuardHook

    tr = train_cfg
    # default: one step at 3/4 of the schedule; [] is no step (a schedule shorter than 2 iterations has none)
    milestones = tr["milestones"]
    if milestones is None:
        milestones = [m for m in [int(tr["max_iters"] * 0.75)] if m >= 1]
    warmup = [dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=tr["warmup_iters"])]
    distributed = init_distributed()  # the process group with crat-ft's timeout (and GPU LOCAL_RANK)
    model = cpu_ddp(heads) if distributed and not torch.cuda.is_available() else heads
    runner = Runner(
        model=model,
        work_dir=str(work_dir),
        train_dataloader=loader,
        train_cfg=dict(by_epoch=False, max_iters=tr["max_iters"], val_interval=10**9),
        optim_wrapper=dict(
            optimizer=dict(type="SGD", lr=tr["lr"], momentum=tr["momentum"], weight_decay=tr["weight_decay"])
        ),
        param_scheduler=warmup * (tr["warmup_iters"] > 0)
        + [dict(type="MultiStepLR", by_epoch=False, begin=0, end=tr["max_iters"], milestones=milestones, gamma=0.1)],
        default_hooks=dict(
            timer=dict(type="IterTimerHook"),
            logger=dict(type="LoggerHook", interval=tr["log_interval"]),
            param_scheduler=dict(type="ParamSchedulerHook"),
            checkpoint=dict(
                type="CheckpointHook", by_epoch=False, interval=tr["checkpoint_interval"], max_keep_ckpts=2
            ),
        ),
        custom_hooks=[NonFiniteGuardHook(work_dir=work_dir), ConsoleProgressHook("retrain-heads")],
        log_processor=dict(by_epoch=False, window_size=tr["log_interval"]),
        randomness=dict(seed=tr["seed"]),
        resume=resume_from is not None,
        load_from=str(resume_from) if resume_from is not None else None,
        launcher="pytorch" if distributed else "none",
        env_cfg=dict(dist_cfg=dict(backend="nccl" if torch.cuda.is_available() else "gloo")),
        default_scope="mmdet",
        experiment_name=f"{name}-{uuid.uuid4().hex[:8]}",
    )
    if distributed:
        import torch.distributed as dist

        runner.logger.info(
            f"DDP: world size {runner.world_size}, backend {dist.get_backend()}; "
            "Fisher statistics are all-reduced every step"
        )
    return runner


def heads_meta(
    ft: dict, cache_meta: dict, det_config, det_ckpt, iteration: int, donor_groups: dict[str, str] | None = None
) -> dict:
    """The provenance a heads file records (export, evaluate and fisher-neighbors read it).

    ``donor_groups``: ``{class name: group}`` of the cache's classes as the run recorded and trained with
    them (None without groups): ``fisher-neighbors`` and ``export`` read them here, never from the file.
    """
    from crat_ft.heads.ft_config import heads_loss_cls

    return {
        "crat_ft_stage": "heads",
        "checkpoint_sha256": cache_meta["checkpoint_sha256"],
        "detector_config": str(det_config),
        "detector_checkpoint": str(det_ckpt),
        "class_names": cache_meta["class_names"],
        "class_frequency": cache_meta["class_frequency"],
        "class_instance_count": cache_meta["class_instance_count"],
        "crat": dict(ft["crat"]),
        "loss_cls": heads_loss_cls(ft, cache_meta),
        "levels": {"box": cache_meta["box_level"], "mask": cache_meta["mask_level"]},
        "sampler": dict(ft["sampler"]),
        "export": dict(ft["export"]),
        "iter": iteration,
        "donor_groups": None if donor_groups is None else {n: donor_groups[n] for n in cache_meta["class_names"]},
    }
