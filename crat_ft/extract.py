"""extract-features: cache a frozen detector's RoI features (DESIGN §6).

Shape legend: ``G`` ground-truth boxes of an image, ``R`` candidate RoIs
(``G`` gt boxes first, then the RPN proposals, as mmdet's sampler with
``add_gt_as_proposals`` sees them), ``n`` selected RoIs, ``m`` of them with a
cached mask. Labels: foreground ``0..C-1``, background ``C`` (mmdet).

RoIs are selected per training image *as training sees them*: RPN proposals
made with the detector's ``train_cfg.rpn_proposal``, plus the gt boxes,
assigned by the detector's own ``train_cfg.rcnn.assigner``. The policy keeps:

- per gt box of class c, an expected ``box_pos_per_class / instance_count(c)``
  of its positives (all of them for rare classes; frequent classes are
  capped, DESIGN §6); at most ``max_pos_per_image`` positives per image;
- per gt box, an expected ``mask_pos_per_class / instance_count(c)`` of those
  with mask features (mask features are ~200x larger than box features);
- ``neg_per_image`` random background RoIs (the classifier needs them).

Every random choice is seeded by ``(seed, image_id, view)``, so an image's
block does not depend on sharding, batching or resumption.

Work is split in segments of consecutive images, each written to its own
file under a temporary name and renamed when complete: a run killed at any
moment and restarted with ``--resume`` redoes at most one segment per rank
and ends with the same cache.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from crat_ft.cache import config_hash
from crat_ft.errors import UserError

BOX_LEVELS = ("fc", "roi")
MASK_LEVELS = ("logits", "roi")
INDEX_FILE = "index.h5"


@dataclass(frozen=True)
class RoIPolicy:
    """Which RoIs of an image are cached (see the module docstring)."""

    max_pos_per_image: int = 64
    neg_per_image: int = 16
    box_pos_per_class: int = 2000
    mask_pos_per_class: int = 64
    seed: int = 0
    flip: bool = False

    def validate(self) -> None:
        for name in ("max_pos_per_image", "neg_per_image", "box_pos_per_class", "mask_pos_per_class"):
            if getattr(self, name) < 0:
                raise UserError(f"RoI policy {name}: expected >= 0, got {getattr(self, name)}")


def _quota_pick(rng: np.random.Generator, candidates: np.ndarray, quota: float) -> np.ndarray:
    """Pick an expected ``quota`` of ``candidates``: ceil(quota) of them if quota >= 1, else one with probability quota."""
    if len(candidates) == 0:
        return candidates
    if quota >= 1:
        k = min(len(candidates), math.ceil(quota))
        return np.sort(rng.choice(candidates, size=k, replace=False))
    if rng.random() < quota:
        return candidates[[int(rng.integers(len(candidates)))]]
    return candidates[:0]


def select_rois(
    gt_inds: np.ndarray,
    gt_labels: np.ndarray,
    instance_count: np.ndarray,
    policy: RoIPolicy,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Choose cached RoIs of one image.

    Args:
        gt_inds: (R,) assigner output: 0 background, -1 ignored, g > 0 matched to gt g-1.
        gt_labels: (G,) class of each gt.
        instance_count: (C,) training instances per class (sets the per-class caps).
        policy: the RoI policy.
        rng: the image's generator.

    Returns:
        ``(rows, mask_rows)``: sorted indices into R of the selected RoIs
        (positives then negatives), and the subset of ``rows`` positions that
        get a cached mask.
    """
    pos_by_gt = []
    mask_by_gt = []
    for g in range(len(gt_labels)):
        cand = np.nonzero(gt_inds == g + 1)[0]
        c = int(gt_labels[g])
        box_q = policy.box_pos_per_class / max(1, int(instance_count[c]))
        picked = _quota_pick(rng, cand, box_q)
        mask_q = policy.mask_pos_per_class / max(1, int(instance_count[c]))
        pos_by_gt.append(picked)
        mask_by_gt.append(_quota_pick(rng, picked, mask_q))
    pos = np.concatenate(pos_by_gt) if pos_by_gt else np.zeros(0, np.int64)
    masked = np.concatenate(mask_by_gt) if mask_by_gt else np.zeros(0, np.int64)
    if len(pos) > policy.max_pos_per_image:
        pos = np.sort(rng.choice(pos, size=policy.max_pos_per_image, replace=False))
        masked = np.intersect1d(masked, pos)
    neg_cand = np.nonzero(gt_inds == 0)[0]
    neg = np.sort(rng.choice(neg_cand, size=min(policy.neg_per_image, len(neg_cand)), replace=False)) if len(neg_cand) else neg_cand
    rows = np.concatenate([np.sort(pos), neg]).astype(np.int64)
    mask_rows = np.nonzero(np.isin(rows, masked))[0].astype(np.int64)
    return rows, mask_rows


# --------------------------------------------------------------------------- the model side


class FeatureTap:
    """Forward hooks that keep the inputs of ``fc_reg`` and ``conv_logits``."""

    def __init__(self, model) -> None:
        self.box_in = None
        self.mask_in = None
        roi = model.roi_head
        self._handles = [roi.bbox_head.fc_reg.register_forward_hook(self._box)]
        if roi.with_mask:
            self._handles.append(roi.mask_head.conv_logits.register_forward_hook(self._mask))

    def _box(self, module, args, out):
        self.box_in = args[0]

    def _mask(self, module, args, out):
        self.mask_in = args[0]

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _resize_transform(pipeline: list) -> dict:
    """A deterministic Resize equivalent to the train pipeline's (largest scale of a random choice)."""
    for t in pipeline:
        kind = t.get("type")
        if kind == "Resize":
            return dict(type="Resize", scale=t["scale"], keep_ratio=t.get("keep_ratio", True))
        if kind == "RandomChoiceResize":
            scales = [tuple(s) for s in t["scales"]]
            return dict(type="Resize", scale=max(scales, key=lambda s: s[0] * s[1]), keep_ratio=t.get("keep_ratio", True))
        if kind == "RandomResize":
            scale = t["scale"]
            big = max(scale, key=lambda s: s[0] * s[1]) if isinstance(scale[0], (list, tuple)) else scale
            return dict(type="Resize", scale=tuple(big), keep_ratio=t.get("keep_ratio", True))
    raise UserError("train pipeline has no Resize/RandomChoiceResize/RandomResize transform; crat-ft needs one to fix the input scale")


def extraction_pipeline(train_pipeline: list, flip: bool) -> list:
    """Deterministic version of the train pipeline: load, annotations, resize, [flip], pack."""
    load = next((t for t in train_pipeline if t.get("type") == "LoadImageFromFile"), dict(type="LoadImageFromFile"))
    steps = [dict(load), dict(type="LoadAnnotations", with_bbox=True, with_mask=True), _resize_transform(train_pipeline)]
    if flip:
        steps.append(dict(type="RandomFlip", prob=1.0, direction="horizontal"))
    steps.append(dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor", "flip", "flip_direction")))
    return steps


def _base_dataset_cfg(cfg):
    ds = cfg.train_dataloader.dataset
    while "dataset" in ds and "ann_file" not in ds:  # ClassBalancedDataset, RepeatDataset
        ds = ds.dataset
    return ds


@dataclass
class Extractor:
    """Computes the cached fields of a batch of images with a frozen detector."""

    model: object
    policy: RoIPolicy
    instance_count: np.ndarray
    box_level: str = "fc"
    mask_level: str = "logits"

    def __post_init__(self):
        from crat_ft.detector import shared_box_features

        if self.box_level not in BOX_LEVELS:
            raise UserError(f"--box-level: expected one of {BOX_LEVELS}, got {self.box_level!r}")
        if self.mask_level not in MASK_LEVELS:
            raise UserError(f"--mask-level: expected one of {MASK_LEVELS}, got {self.mask_level!r}")
        head = self.model.roi_head.bbox_head
        if self.box_level == "fc" and not shared_box_features(head):
            raise UserError(f"{type(head).__name__} has separate cls/reg branches, so there is no single fc feature; use --box-level roi")
        self.tap = FeatureTap(self.model)
        self.rcnn_cfg = self.model.train_cfg.rcnn
        self.add_gt = bool(self.rcnn_cfg.get("sampler", {}).get("add_gt_as_proposals", True))
        self.proposal_cfg = self.model.train_cfg.get("rpn_proposal", self.model.test_cfg.rpn)
        self.with_mask = bool(self.model.roi_head.with_mask)

    @property
    def mask_size(self) -> int:
        return int(self.rcnn_cfg.get("mask_size", 28)) if self.with_mask else 0

    def __call__(self, data: dict, view: int = 0) -> list:
        """Blocks (:class:`crat_ft.cache.ImageBlock`) for one collated batch."""
        import torch
        from mmdet.structures.bbox import bbox2roi
        from mmdet.structures.mask import mask_target
        from mmengine.structures import InstanceData

        from crat_ft.cache import ImageBlock

        model = self.model
        roi_head = model.roi_head
        with torch.no_grad():
            data = model.data_preprocessor(data, True)
            inputs, samples = data["inputs"], data["data_samples"]
            x = model.extract_feat(inputs)
            metas = [s.metainfo for s in samples]
            rpn_outs = model.rpn_head(x)
            proposals = model.rpn_head.predict_by_feat(*rpn_outs, batch_img_metas=metas, cfg=self.proposal_cfg, rescale=False)
            blocks = []
            for i, sample in enumerate(samples):
                gt = sample.gt_instances
                img_id = int(sample.metainfo["img_id"])
                rng = np.random.default_rng([self.policy.seed, img_id, view])
                gt_boxes_t = gt.bboxes.tensor if hasattr(gt.bboxes, "tensor") else gt.bboxes
                device = gt_boxes_t.device
                # gt boxes as proposals, as mmdet's sampler does with add_gt_as_proposals
                ng = len(gt) if self.add_gt else 0
                priors = torch.cat([gt_boxes_t[:ng], proposals[i].bboxes])
                assign = roi_head.bbox_assigner.assign(InstanceData(priors=priors), gt, sample.get("ignored_instances", None))
                gt_inds = assign.gt_inds.clone()
                ious = assign.max_overlaps.clone()
                gt_inds[:ng] = torch.arange(1, ng + 1, device=device)
                ious[:ng] = 1.0
                gt_labels = gt.labels.cpu().numpy()
                rows, mask_rows = select_rois(gt_inds.cpu().numpy(), gt_labels, self.instance_count, self.policy, rng)
                rows_t = torch.as_tensor(rows, dtype=torch.long, device=device)
                boxes = priors[rows_t]
                gidx = gt_inds[rows_t] - 1
                rois = bbox2roi([boxes])
                feats_i = tuple(f[i : i + 1] for f in x)
                bbox_out = roi_head._bbox_forward(feats_i, rois)
                box_feat = self.tap.box_in if self.box_level == "fc" else bbox_out["bbox_feats"]
                num_classes = roi_head.bbox_head.num_classes
                label = torch.full((len(rows),), num_classes, dtype=torch.long, device=device)
                pos = gidx >= 0
                label[pos] = gt.labels[gidx[pos]]
                gt_box = torch.zeros(len(rows), 4, device=device)
                gt_box[pos] = gt_boxes_t[gidx[pos]].float()
                m = len(mask_rows)
                if self.with_mask and m:
                    mrows_t = torch.as_tensor(mask_rows, dtype=torch.long, device=device)
                    mboxes = boxes[mrows_t]
                    mask_out = roi_head._mask_forward(feats_i, bbox2roi([mboxes]))
                    mask_feat = self.tap.mask_in if self.mask_level == "logits" else mask_out["mask_feats"]
                    targets = mask_target([mboxes], [gidx[mrows_t]], [gt.masks], self.rcnn_cfg)
                    mask_feat_np = mask_feat.cpu().numpy().astype(np.float16)
                    targets_np = targets.cpu().numpy() > 0.5
                else:
                    mask_feat_np = np.zeros((0, *self.mask_shape()), np.float16)
                    targets_np = np.zeros((0, self.mask_size, self.mask_size), bool)
                    mask_rows = np.zeros(0, np.int64)
                scale = np.asarray(sample.metainfo.get("scale_factor", (1.0, 1.0)), np.float32)[:2]
                blocks.append(
                    ImageBlock(
                        image_id=img_id,
                        scale_factor=scale,
                        box=boxes.cpu().numpy().astype(np.float32),
                        gt_index=gidx.cpu().numpy().astype(np.int32),
                        label=label.cpu().numpy().astype(np.int32),
                        iou=ious[rows_t].cpu().numpy().astype(np.float32),
                        gt_box=gt_box.cpu().numpy(),
                        box_feat=box_feat.reshape(len(rows), *self.box_shape()).cpu().numpy().astype(np.float16),
                        mask_rows=mask_rows,
                        mask_feat=mask_feat_np,
                        mask_target=targets_np,
                    )
                )
        return blocks

    def box_shape(self) -> tuple:
        head = self.model.roi_head.bbox_head
        if self.box_level == "fc":
            return (int(head.fc_reg.in_features),)
        ext = self.model.roi_head.bbox_roi_extractor
        size = ext.roi_layers[0].output_size
        size = size if isinstance(size, tuple) else (size, size)
        return (int(ext.out_channels), *map(int, size))

    def mask_shape(self) -> tuple:
        if not self.with_mask:
            return (1,)
        mh = self.model.roi_head.mask_head
        if self.mask_level == "logits":
            return (int(mh.conv_logits.in_channels), self.mask_size, self.mask_size)
        ext = self.model.roi_head.mask_roi_extractor
        size = ext.roi_layers[0].output_size
        size = size if isinstance(size, tuple) else (size, size)
        return (int(ext.out_channels), *map(int, size))


# --------------------------------------------------------------------------- the loop


class Progress:
    """A one-line progress report with images/s and ETA (stderr)."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label = total, label
        self.done = 0
        self.t0 = time.time()
        self.last = 0.0
        self.tty = sys.stderr.isatty()

    def update(self, n: int) -> None:
        self.done += n
        now = time.time()
        if now - self.last < (0.5 if self.tty else 10.0) and self.done < self.total:
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        msg = f"{self.label}: {self.done}/{self.total} images  {rate:.1f} img/s  ETA {eta:.0f}s"
        print(("\r" + msg) if self.tty else msg, end="" if self.tty else "\n", file=sys.stderr, flush=True)
        if self.tty and self.done >= self.total:
            print(file=sys.stderr)


def parse_shard(shard: str | None) -> tuple[int, int]:
    """``"I/N"`` -> (I, N); defaults to the torchrun rank/world size, else (0, 1)."""
    if shard:
        try:
            i, n = (int(v) for v in shard.split("/"))
        except ValueError:
            raise UserError(f"--shard: expected I/N such as 0/4, got {shard!r}") from None
        if not (n >= 1 and 0 <= i < n):
            raise UserError(f"--shard: expected 0 <= I < N, got {shard!r}")
        return i, n
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shard_name(i: int, n: int) -> str:
    return f"shard-{i:05d}-of-{n:05d}.h5"


SETTINGS_FILE = "run.json"
SPACE_MARGIN = 1.1


def run_settings(*, cfg, sha: str, policy: RoIPolicy, box_level: str, mask_level: str, segment_images: int,
                 batch_size: int, compression: str | None, rank: int, world: int, image_ids: list[int],
                 max_images: int | None) -> dict:
    """Everything that decides the bytes of one shard: a resume must match all of it."""
    ds = _base_dataset_cfg(cfg)
    ds_plain = ds.to_dict() if hasattr(ds, "to_dict") else dict(ds)
    return {
        "checkpoint_sha256": sha,
        "config_hash": config_hash(_model_cfg_text(cfg)),
        "dataset_hash": config_hash(json.dumps(ds_plain, sort_keys=True, default=str)),
        "policy": asdict(policy),
        "box_level": box_level,
        "mask_level": mask_level,
        "segment_images": segment_images,
        "batch_size": batch_size,
        "compression": compression,
        "shard": f"{rank}/{world}",
        "max_images": max_images,
        "num_images": len(image_ids),
        "image_ids_hash": config_hash(json.dumps(image_ids)),
    }


def check_same_settings(recorded: dict | None, current: dict, where: Path, out: Path) -> None:
    """Refuse to resume when any setting of the recorded run differs from this one."""
    start_over = f"rerun with the recorded settings, or delete {out} (or choose a new --out) to start over"
    if recorded is None:
        raise UserError(f"--resume: {where} records no run settings (an older crat-ft wrote it); {start_over}")
    for key, value in current.items():
        if recorded.get(key) != value:
            raise UserError(
                f"--resume: {where} was made with {key}={json.dumps(recorded.get(key), default=str)}, "
                f"this run has {key}={json.dumps(value, default=str)}; {start_over}"
            )


def _model_cfg_text(cfg) -> str:
    return json.dumps(cfg.model.to_dict() if hasattr(cfg.model, "to_dict") else dict(cfg.model), sort_keys=True, default=str)


def extract_features(
    config: str | os.PathLike,
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    cfg_options=(),
    data_root: str | os.PathLike | None = None,
    policy: RoIPolicy = RoIPolicy(),
    box_level: str = "fc",
    mask_level: str = "logits",
    shard: str | None = None,
    resume: bool = False,
    batch_size: int = 4,
    segment_images: int = 32,
    compression: str | None = None,
    max_images: int | None = None,
    trust_checkpoint: bool = False,
    progress: bool = True,
    space_check: bool = True,
) -> Path:
    """Extract the cache of the config's training split into directory ``out``.

    Steps: check the output and settings (cheap) → build the frozen detector
    → extract segments of images (each an atomic file; finished ones are kept
    for ``--resume``) → merge them into this shard's file → build the index
    once every shard exists. The shard is locked against a second run; a
    resume is accepted only when every setting in :func:`run_settings` matches.

    Returns:
        ``out/index.h5`` once every shard exists (the merged virtual index),
        else this shard's file.
    """
    from crat_ft.files import RunLock, check_writable_dir

    policy.validate()
    for name, value, low in (("--batch-size", batch_size, 1), ("--segment-images", segment_images, 1), ("--max-images", max_images, 1)):
        if value is not None and value < low:
            raise UserError(f"{name}: expected >= {low}, got {value}")
    if compression not in (None, "lzf", "gzip"):
        raise UserError(f"--compression: expected none, lzf or gzip, got {compression!r}")
    rank, world = parse_shard(shard)
    out = check_writable_dir(out, "--out")
    shard_path = out / shard_name(rank, world)
    with RunLock(out / f".{shard_path.stem}.lock", f"--out {out} (shard {rank}/{world})"):
        return _extract_locked(
            config, checkpoint, out, shard_path, rank=rank, world=world, cfg_options=cfg_options, data_root=data_root,
            policy=policy, box_level=box_level, mask_level=mask_level, resume=resume, batch_size=batch_size,
            segment_images=segment_images, compression=compression, max_images=max_images,
            trust_checkpoint=trust_checkpoint, progress=progress, space_check=space_check,
        )


def _extract_locked(config, checkpoint, out: Path, shard_path: Path, *, rank, world, cfg_options, data_root, policy,
                    box_level, mask_level, resume, batch_size, segment_images, compression, max_images,
                    trust_checkpoint, progress, space_check) -> Path:
    from mmdet.registry import DATASETS

    from crat_ft.cache import cache_meta, open_cache, sha256_file
    from crat_ft.files import atomic_write_text, clean_stale_temps, temp_pattern
    from crat_ft.train import _prepare_cfg, _register_all

    seg_dir = out / ".segments" / shard_path.stem
    # what killed runs left: an index or shard being written, a segment being written
    for path in (out / INDEX_FILE, shard_path):
        clean_stale_temps(out, temp_pattern(path))
    clean_stale_temps(seg_dir)
    if shard_path.exists() and not resume:
        raise UserError(f"{shard_path} already exists; pass --resume to reuse it or choose a new --out")
    if seg_dir.exists() and any(seg_dir.iterdir()) and not resume:
        raise UserError(f"{out} holds an unfinished extraction; pass --resume to continue it or delete {out}")

    _register_all()
    cfg = _prepare_cfg(config, cfg_options, data_root, ("train_dataloader",))
    if not Path(checkpoint).is_file():
        raise UserError(f"checkpoint {checkpoint} does not exist; check the path or train one with `crat-ft train-detector`")
    sha = sha256_file(checkpoint)
    ds_cfg = _base_dataset_cfg(cfg).copy()
    ds_cfg["pipeline"] = extraction_pipeline(ds_cfg.get("pipeline", []), flip=False)
    dataset = DATASETS.build(ds_cfg)
    n_total = len(dataset) if max_images is None else min(len(dataset), max_images)
    mine = list(range(rank, n_total, world))
    settings = run_settings(
        cfg=cfg, sha=sha, policy=policy, box_level=box_level, mask_level=mask_level, segment_images=segment_images,
        batch_size=batch_size, compression=compression, rank=rank, world=world, max_images=max_images,
        image_ids=[int(dataset.get_data_info(k)["img_id"]) for k in mine],
    )
    if shard_path.exists():  # --resume of a finished shard
        with open_cache(shard_path) as f:
            recorded = cache_meta(f).get("run_settings")
        check_same_settings(json.loads(recorded) if recorded else None, settings, shard_path, out)
        _remove_segments(out, seg_dir)  # left by a run killed right after the shard's rename
        return _finish_index(out, world, shard_path)
    if seg_dir.exists() and any(seg_dir.iterdir()):
        settings_file = seg_dir / SETTINGS_FILE
        recorded = json.loads(settings_file.read_text()) if settings_file.is_file() else None
        if recorded is None and not any(seg_dir.glob("seg-*.h5")):
            _remove_segments(out, seg_dir)  # killed before anything was recorded: nothing to keep
        else:
            check_same_settings(recorded, settings, seg_dir, out)
    seg_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(seg_dir / SETTINGS_FILE, json.dumps(settings, sort_keys=True))

    extractor, attrs = _build_extractor(cfg, config, checkpoint, policy, box_level, mask_level, trust_checkpoint, settings)
    views = [0, 1] if policy.flip else [0]
    datasets = [dataset]
    if policy.flip:
        flip_cfg = ds_cfg.copy()
        flip_cfg["pipeline"] = extraction_pipeline(_base_dataset_cfg(cfg).get("pipeline", []), flip=True)
        datasets.append(DATASETS.build(flip_cfg))
    segments = [mine[j : j + segment_images] for j in range(0, len(mine), segment_images)]
    bar = Progress(len(mine) * len(views), f"extract-features shard {rank}/{world}") if progress else None
    t0 = time.time()
    space = _SpaceCheck(out, seg_dir, len(segments)) if space_check else None
    try:
        for j, seg in enumerate(segments):
            seg_path = seg_dir / f"seg-{j:06d}.h5"
            if not _segment_done(seg_path, sha):
                _write_segment(seg_path, seg, extractor, attrs, views, datasets, batch_size, compression, bar)
                if space:
                    space.after_write()
            elif bar:
                bar.update(len(seg) * len(views))
        _merge_segments(shard_path, seg_dir, len(segments), extractor, attrs, compression)
    finally:
        extractor.tap.close()
    _remove_segments(out, seg_dir)
    if progress:
        _report_shard(shard_path, rank, world, len(mine) * len(views), len(json.loads(attrs["class_names"])), time.time() - t0)
    return _finish_index(out, world, shard_path)


def _build_extractor(cfg, config, checkpoint, policy, box_level, mask_level, trust_checkpoint, settings):
    """The frozen detector's :class:`Extractor` and the cache attributes of its files."""
    import torch

    from crat_ft.cache import base_attrs
    from crat_ft.detector import build_frozen_detector

    model, sha = build_frozen_detector(cfg, str(checkpoint), trust_checkpoint=trust_checkpoint)
    if torch.cuda.is_available():
        model = model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    doc_cats = _categories(cfg)
    counts = np.array([int(c.get("instance_count", 0)) for c in doc_cats])
    extractor = Extractor(model, policy, counts, box_level, mask_level)
    attrs = base_attrs(
        config_text=_model_cfg_text(cfg),
        checkpoint_sha=sha,
        class_names=[c["name"] for c in doc_cats],
        class_frequency=[c["frequency"] for c in doc_cats],
        class_instance_count=counts.tolist(),
        policy=asdict(policy),
        box_level=box_level,
        mask_level=mask_level,
        box_shape=extractor.box_shape(),
        mask_shape=extractor.mask_shape(),
        mask_size=extractor.mask_size,
        bbox_coder=dict(cfg.model.roi_head.bbox_head.bbox_coder),
    )
    attrs["shard"] = settings["shard"]
    attrs["run_settings"] = json.dumps(settings, sort_keys=True)
    attrs["config_path"] = str(Path(config).resolve())
    attrs["checkpoint_path"] = str(Path(checkpoint).resolve())
    return extractor, attrs


def _segment_done(seg_path: Path, sha: str) -> bool:
    """Whether a segment file of an earlier run is complete and valid (an invalid one is removed)."""
    from crat_ft.cache import open_cache

    if not seg_path.exists():
        return False
    try:
        open_cache(seg_path, checkpoint_sha256=sha).close()
        return True
    except UserError:
        seg_path.unlink()
        return False


def _write_segment(seg_path, seg, extractor, attrs, views, datasets, batch_size, compression, bar) -> None:
    from mmengine.dataset import pseudo_collate

    from crat_ft.cache import CacheWriter

    with CacheWriter(seg_path, attrs, extractor.box_shape(), extractor.mask_shape(), compression=compression) as w:
        for view, ds in zip(views, datasets):
            for b in range(0, len(seg), batch_size):
                batch = pseudo_collate([ds[k] for k in seg[b : b + batch_size]])
                for block in extractor(batch, view):
                    w.append(block)
                if bar:
                    bar.update(min(batch_size, len(seg) - b))


def _merge_segments(shard_path, seg_dir, n_segments, extractor, attrs, compression) -> None:
    from crat_ft.cache import CacheWriter

    with CacheWriter(shard_path, attrs, extractor.box_shape(), extractor.mask_shape(), compression=compression) as w:
        for j in range(n_segments):
            w.append_file(seg_dir / f"seg-{j:06d}.h5")


class _SpaceCheck:
    """Stops an extraction early when the disk cannot hold the projected cache.

    After the first segment this run writes, the mean size of the segments on
    disk projects the ones still to write plus the merged shard file (a copy of
    all segments, written before they are removed), with a margin of
    :data:`SPACE_MARGIN`.
    """

    def __init__(self, out: Path, seg_dir: Path, n_segments: int) -> None:
        self.out, self.seg_dir, self.n_segments = out, seg_dir, n_segments
        self.checked = False

    def after_write(self) -> None:
        from crat_ft.files import StorageError, free_bytes

        if self.checked:
            return
        self.checked = True
        sizes = [p.stat().st_size for p in self.seg_dir.glob("seg-*.h5")]
        per_segment = sum(sizes) / len(sizes)
        need = SPACE_MARGIN * per_segment * ((self.n_segments - len(sizes)) + self.n_segments)
        free = free_bytes(self.out)
        if need > free:
            raise StorageError(
                f"not enough free space in {self.out}: the cache needs about {need / 2**20:.1f} MiB more "
                f"(projected from {len(sizes)} segment(s), with the merged shard), {free / 2**20:.1f} MiB are free; "
                "free space or choose another --out and rerun with --resume (or pass --skip-space-check)"
            )


def _remove_segments(out: Path, seg_dir: Path) -> None:
    shutil.rmtree(seg_dir, ignore_errors=True)
    try:
        (out / ".segments").rmdir()
    except OSError:
        pass


def _report_shard(shard_path: Path, rank: int, world: int, n_images: int, n_classes: int, seconds: float) -> None:
    from crat_ft.cache import open_cache

    with open_cache(shard_path) as f:
        labels = f["rois/label"][...]
        n_masks = f["masks/roi_index"].shape[0]
    print(
        f"extract-features: shard {rank}/{world}: {n_images} images, {len(labels)} RoIs, {int((labels < n_classes).sum())} positives, "
        f"{n_masks} masks, {shard_path.stat().st_size / 2**20:.1f} MiB, {seconds:.1f} s -> {shard_path}",
        file=sys.stderr,
        flush=True,
    )


def _finish_index(out: Path, world: int, shard_path: Path) -> Path:
    from crat_ft.cache import build_index

    shards = [out / shard_name(i, world) for i in range(world)]
    if all(s.exists() for s in shards):
        return build_index(shards, out / INDEX_FILE)
    return shard_path


def _categories(cfg) -> list[dict]:
    from crat_ft.config import ann_file_of
    from crat_ft.evaluation import load_lvis_json

    doc = load_lvis_json(ann_file_of(_base_dataset_cfg(cfg)))
    cats = sorted(doc["categories"], key=lambda c: c["id"])
    if any("instance_count" not in c for c in cats):
        counts: dict[int, int] = {}
        for a in doc["annotations"]:
            counts[a["category_id"]] = counts.get(a["category_id"], 0) + 1
        cats = [dict(c, instance_count=counts.get(c["id"], 0)) for c in cats]
    return cats


ROI_META_BYTES = 8 + 16 + 4 + 4 + 4 + 16 + 4  # image_id, box, gt_index, label, iou, gt_box, mask_index


def project_size(
    *,
    n_images: int,
    instance_count: np.ndarray,
    policy: RoIPolicy,
    pos_per_gt: float,
    neg_per_image: float,
    box_bytes: int,
    mask_bytes: int,
    mask_size: int,
) -> dict:
    """Projected cache size in bytes, by part, for a whole dataset.

    Expected cached positives of class c: ``min(box_pos_per_class, n_c * pos_per_gt)``
    (n_c its instances, ``pos_per_gt`` positives per gt measured on sample
    images); masks: ``min(mask_pos_per_class, that)``; negatives:
    ``n_images * neg_per_image``. The per-class caps also give an upper bound
    that does not depend on the measurement (``bound``).
    """
    views = 2 if policy.flip else 1
    pos = np.minimum(policy.box_pos_per_class, instance_count * pos_per_gt) * views
    masks = np.minimum(policy.mask_pos_per_class, pos)
    neg = n_images * neg_per_image * views
    target_bytes = (mask_size * mask_size + 7) // 8
    parts = {
        "box features (positives)": pos.sum() * (box_bytes + ROI_META_BYTES),
        "box features (negatives)": neg * (box_bytes + ROI_META_BYTES),
        "mask features": masks.sum() * (mask_bytes + 8),
        "mask targets": masks.sum() * target_bytes,
    }
    c = len(instance_count)
    bound = (
        c * policy.box_pos_per_class * views * (box_bytes + ROI_META_BYTES)
        + n_images * policy.neg_per_image * views * (box_bytes + ROI_META_BYTES)
        + c * policy.mask_pos_per_class * views * (mask_bytes + 8 + target_bytes)
    )
    return {"parts": {k: float(v) for k, v in parts.items()}, "total": float(sum(parts.values())), "bound": float(bound)}


def dry_run(config, checkpoint, *, sample_images: int = 8, policy: RoIPolicy = RoIPolicy(), **kwargs) -> str:
    """Extract a few images to a temporary directory and print the projected size of the whole cache."""
    from dataclasses import replace

    from crat_ft.cache import RoIReader
    from crat_ft.files import owned_tempdir

    # measure positives per gt without the per-class quotas
    probe = replace(policy, box_pos_per_class=10**9, mask_pos_per_class=0)
    with owned_tempdir("crat-ft-dry-run") as tmp:
        path = extract_features(config, checkpoint, tmp, policy=probe, max_images=sample_images, progress=False, **kwargs)
        reader = RoIReader(path)
        meta = reader.meta
    from crat_ft.config import ann_file_of, load_config, set_data_root
    from crat_ft.evaluation import load_lvis_json

    # the sample extraction above validated config and data; only the annotation path is needed here
    cfg = load_config(config, kwargs.get("cfg_options", ()))
    if kwargs.get("data_root") is not None:
        set_data_root(cfg, kwargs["data_root"])
    doc = load_lvis_json(ann_file_of(_base_dataset_cfg(cfg)))
    sample_ids = set(reader.image_ids.tolist())
    n_gt = sum(1 for a in doc["annotations"] if a["image_id"] in sample_ids)
    c = reader.num_classes
    pos_per_gt = float((reader.labels < c).sum()) / max(1, n_gt)
    neg_per_image = float((reader.labels == c).sum()) / max(1, len(reader.image_ids))
    counts = np.array(meta["class_instance_count"], float)
    box_bytes = int(np.prod(meta["box_shape"])) * 2
    mask_bytes = int(np.prod(meta["mask_shape"])) * 2 if int(meta["mask_size"]) else 0
    proj = project_size(
        n_images=len(doc["images"]), instance_count=counts, policy=policy, pos_per_gt=pos_per_gt,
        neg_per_image=neg_per_image, box_bytes=box_bytes, mask_bytes=mask_bytes, mask_size=int(meta["mask_size"]),
    )
    gib = 2**30
    lines = [
        f"dry run: measured {len(reader.image_ids)} images: {pos_per_gt:.1f} positives per gt, {neg_per_image:.1f} negatives per image",
        f"  per RoI: box features {box_bytes / 1024:.1f} KiB (level {meta['box_level']} {tuple(meta['box_shape'])}), "
        f"mask features {mask_bytes / 1024:.1f} KiB per cached mask (level {meta['mask_level']} {tuple(meta['mask_shape'])})",
        f"  projected for {len(doc['images'])} images, {c} classes, policy {asdict(policy)}:",
    ]
    for k, v in proj["parts"].items():
        lines.append(f"    {k:<26} {v / gib:9.3f} GiB")
    lines.append(f"    {'total':<26} {proj['total'] / gib:9.3f} GiB   (upper bound from the caps: {proj['bound'] / gib:.3f} GiB)")
    return "\n".join(lines)
