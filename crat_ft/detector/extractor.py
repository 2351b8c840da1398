"""The frozen detector's side of extraction: what is cached for one batch of images.

Shape legend: ``R`` candidate RoIs of an image (its gt boxes first, then the
RPN proposals), ``n`` selected RoIs, ``m`` of them with a cached mask.
Labels: foreground ``0..C-1``, background ``C`` (mmdet).

RoIs are selected per training image *as training sees them*: RPN proposals
made with the detector's ``train_cfg.rpn_proposal``, plus the gt boxes,
assigned by the detector's own ``train_cfg.rcnn.assigner``, then chosen by the
:class:`crat_ft.detector.roi_policy.RoIPolicy`. Features are the inputs of ``fc_reg``
and ``conv_logits`` (levels ``fc``/``logits``, caught by forward hooks) or the
pooled RoI features (level ``roi``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from crat_ft.common.errors import UserError
from crat_ft.detector.roi_policy import RoIPolicy, select_rois

BOX_LEVELS = ("fc", "roi")
MASK_LEVELS = ("logits", "roi")


def _box_tensor(bboxes):
    """The (G, 4) tensor of mmdet boxes (a ``BaseBoxes`` or a tensor)."""
    return bboxes.tensor if hasattr(bboxes, "tensor") else bboxes


class FeatureTap:
    """Forward hooks that keep the inputs of each stage's ``fc_reg`` and ``conv_logits``."""

    def __init__(self, heads: list) -> None:
        from functools import partial

        self.box_in = [None] * len(heads)
        self.mask_in = [None] * len(heads)
        self._handles = []
        for s, (bbox_head, mask_head) in enumerate(heads):
            self._handles.append(bbox_head.fc_reg.register_forward_hook(partial(self._keep, self.box_in, s)))
            if mask_head is not None:
                self._handles.append(mask_head.conv_logits.register_forward_hook(partial(self._keep, self.mask_in, s)))

    @staticmethod
    def _keep(store: list, stage: int, module, args, out) -> None:
        store[stage] = args[0]

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
            return dict(
                type="Resize", scale=max(scales, key=lambda s: s[0] * s[1]), keep_ratio=t.get("keep_ratio", True)
            )
        if kind == "RandomResize":
            scale = t["scale"]
            big = max(scale, key=lambda s: s[0] * s[1]) if isinstance(scale[0], (list, tuple)) else scale
            return dict(type="Resize", scale=tuple(big), keep_ratio=t.get("keep_ratio", True))
    raise UserError(
        "train pipeline has no Resize/RandomChoiceResize/RandomResize transform; crat-ft needs one to fix the input scale"
    )


def extraction_pipeline(train_pipeline: list, flip: bool) -> list:
    """Deterministic version of the train pipeline: load, annotations, resize, [flip], pack."""
    load = next((t for t in train_pipeline if t.get("type") == "LoadImageFromFile"), dict(type="LoadImageFromFile"))
    steps = [
        dict(load),
        dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
        _resize_transform(train_pipeline),
    ]
    if flip:
        steps.append(dict(type="RandomFlip", prob=1.0, direction="horizontal"))
    steps.append(
        dict(
            type="PackDetInputs",
            meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor", "flip", "flip_direction"),
        )
    )
    return steps


@dataclass
class Extractor:
    """Computes the cached fields of a batch of images with a frozen detector.

    A Cascade R-CNN is extracted stage by stage as mmdet trains it: stage 0
    sees the gt boxes and the RPN proposals; stage ``s + 1`` sees the gt boxes
    and the RoIs mmdet's sampler draws from stage ``s``'s candidates
    (:meth:`training_sample`), regressed by stage ``s``'s box head (with the gt
    label for positives and the top-scoring class otherwise, mmdet's
    ``refine_bboxes``), each assigned by its own stage's assigner. The
    :class:`crat_ft.detector.roi_policy.RoIPolicy` selects the cached RoIs of every stage.
    """

    model: object
    policy: RoIPolicy
    instance_count: np.ndarray
    box_level: str = "fc"
    mask_level: str = "logits"

    def __post_init__(self):
        from crat_ft.detector.frozen import shared_box_features, stage_cfgs, stage_heads

        if self.box_level not in BOX_LEVELS:
            raise UserError(f"--box-level: expected one of {BOX_LEVELS}, got {self.box_level!r}")
        if self.mask_level not in MASK_LEVELS:
            raise UserError(f"--mask-level: expected one of {MASK_LEVELS}, got {self.mask_level!r}")
        roi = self.model.roi_head
        self.heads = stage_heads(self.model)
        self.stages = len(self.heads)
        self.cascade = type(roi).__name__ == "CascadeRoIHead"
        for head, _ in self.heads:
            if self.box_level == "fc" and not shared_box_features(head):
                raise UserError(
                    f"{type(head).__name__} has separate cls/reg branches, so there is no single fc feature; use --box-level roi"
                )
        self.tap = FeatureTap(self.heads)
        self.rcnn_cfgs = stage_cfgs(self.model.train_cfg.rcnn, self.stages)
        self.assigners = list(roi.bbox_assigner) if self.cascade else [roi.bbox_assigner]
        self.proposal_cfg = self.model.train_cfg.get("rpn_proposal", self.model.test_cfg.rpn)
        self.with_mask = bool(roi.with_mask)

    def mask_size(self, stage: int = 0) -> int:
        return int(self.rcnn_cfgs[stage].get("mask_size", 28)) if self.with_mask else 0

    def __call__(self, data: dict, view: int = 0) -> list[list]:
        """Blocks (:class:`crat_ft.cache.ImageBlock`) for one collated batch: one list per image, one block per stage."""
        import torch

        with torch.no_grad():
            data = self.model.data_preprocessor(data, True)
            samples = data["data_samples"]
            x = self.model.extract_feat(data["inputs"])
            proposals = self.propose(x, samples)
            return [
                self.image_blocks(tuple(f[i : i + 1] for f in x), s, proposals[i].bboxes, view)
                for i, s in enumerate(samples)
            ]

    def propose(self, x: tuple, samples: list) -> list:
        """RPN proposals of every image, made with the training proposal settings."""
        rpn = self.model.rpn_head
        metas = [s.metainfo for s in samples]
        return rpn.predict_by_feat(*rpn(x), batch_img_metas=metas, cfg=self.proposal_cfg, rescale=False)

    def image_blocks(self, feats: tuple, sample, candidates, view: int) -> list:
        """One image, each stage: assign → select → box block → mask block (→ refine for the next stage)."""
        from crat_ft.cache import ImageBlock

        img_id = int(sample.metainfo["img_id"])
        gt = sample.gt_instances
        scale = np.asarray(sample.metainfo.get("scale_factor", (1.0, 1.0)), np.float32)[:2]
        blocks = []
        for s in range(self.stages):
            rng = np.random.default_rng([self.policy.seed, img_id, view] + ([s] if s else []))
            priors, gt_inds, ious, ng = self.assign(s, sample, candidates)
            rows, mask_rows = select_rois(
                gt_inds.cpu().numpy(), gt.labels.cpu().numpy(), self.instance_count, self.policy, rng
            )
            box = self.box_block(s, feats, gt, priors, gt_inds, ious, rows)
            mask = self.mask_block(s, feats, gt, box["boxes"], box["gidx"], mask_rows)
            blocks.append(
                ImageBlock(
                    image_id=img_id,
                    scale_factor=scale,
                    box=box["boxes"].cpu().numpy().astype(np.float32),
                    gt_index=box["gidx"].cpu().numpy().astype(np.int32),
                    label=box["label"].cpu().numpy().astype(np.int32),
                    iou=box["iou"].cpu().numpy().astype(np.float32),
                    gt_box=box["gt_box"].cpu().numpy(),
                    box_feat=box["feat"].reshape(len(rows), *self.box_shape(s)).cpu().numpy().astype(np.float16),
                    **mask,
                )
            )
            if s + 1 < self.stages:
                import torch

                drawn = self.training_sample(s, gt_inds, np.random.default_rng([self.policy.seed, img_id, view, s, 1]))
                drawn_t = torch.as_tensor(drawn, dtype=torch.long, device=priors.device)
                refined = self.refine(s, feats, sample, priors[drawn_t], gt_inds[drawn_t])
                candidates = refined[torch.as_tensor(drawn >= ng, device=priors.device)]  # mmdet drops the gt rows
        return blocks

    def training_sample(self, stage: int, gt_inds, rng: np.random.Generator) -> np.ndarray:
        """Rows mmdet's sampler would draw from this stage's candidates: the RoIs it refines for the next stage.

        For ``RandomSampler`` (every cascade config of mmdet's LVIS zoo): up to ``num · pos_fraction``
        positives, then negatives up to ``num`` (``neg_pos_ub`` bounding them by the positives when
        set), drawn uniformly without replacement, positives first, as mmdet orders them. Other
        samplers: every candidate.
        """
        inds = gt_inds.cpu().numpy()
        cfg = self.rcnn_cfgs[stage].get("sampler", {})
        if cfg.get("type") != "RandomSampler":
            return np.arange(len(inds))
        num = int(cfg.get("num", 512))
        pos, neg = np.nonzero(inds > 0)[0], np.nonzero(inds == 0)[0]
        n_pos = min(len(pos), int(num * float(cfg.get("pos_fraction", 0.25))))
        n_neg = num - n_pos
        ub = cfg.get("neg_pos_ub", -1)
        if ub is not None and ub >= 0:
            n_neg = min(n_neg, int(ub * max(1, n_pos)))
        n_neg = min(len(neg), n_neg)
        return np.concatenate([rng.choice(pos, n_pos, replace=False), rng.choice(neg, n_neg, replace=False)])

    def bbox_forward(self, stage: int, feats: tuple, rois):
        roi = self.model.roi_head
        return roi._bbox_forward(stage, feats, rois) if self.cascade else roi._bbox_forward(feats, rois)

    def mask_forward(self, stage: int, feats: tuple, rois):
        roi = self.model.roi_head
        return roi._mask_forward(stage, feats, rois) if self.cascade else roi._mask_forward(feats, rois)

    def assign(self, stage: int, sample, candidates):
        """Candidate RoIs (gt boxes first, as mmdet's sampler adds them) assigned by the stage's rcnn assigner.

        Returns:
            ``(priors (R, 4), gt_inds (R,), ious (R,), number of gt rows)``: ``gt_inds``
            0 background, -1 ignored, g > 0 matched to gt g-1; the gt boxes match
            themselves with IoU 1.
        """
        import torch
        from mmengine.structures import InstanceData

        gt = sample.gt_instances
        gt_boxes = _box_tensor(gt.bboxes)
        add_gt = bool(self.rcnn_cfgs[stage].get("sampler", {}).get("add_gt_as_proposals", True))
        ng = len(gt) if add_gt else 0
        priors = torch.cat([gt_boxes[:ng], candidates])
        assign = self.assigners[stage].assign(InstanceData(priors=priors), gt, sample.get("ignored_instances", None))
        gt_inds = assign.gt_inds.clone()
        ious = assign.max_overlaps.clone()
        gt_inds[:ng] = torch.arange(1, ng + 1, device=gt_boxes.device)
        ious[:ng] = 1.0
        return priors, gt_inds, ious, ng

    def refine(self, stage: int, feats: tuple, sample, priors, gt_inds):
        """``priors`` regressed by the stage's box head, as mmdet's ``refine_bboxes`` does in training."""
        from mmdet.structures.bbox import bbox2roi

        head = self.heads[stage][0]
        out = self.bbox_forward(stage, feats, bbox2roi([priors]))
        scores = out["cls_score"]
        if getattr(head, "custom_activation", False):
            scores = head.loss_cls.get_activation(scores)
        labels = scores[:, : head.num_classes].argmax(1)
        pos = gt_inds > 0
        labels[pos] = sample.gt_instances.labels[gt_inds[pos] - 1]
        return head.regress_by_class(priors, labels, out["bbox_pred"], sample.metainfo)

    def box_block(self, stage: int, feats: tuple, gt, priors, gt_inds, ious, rows: np.ndarray) -> dict:
        """Box fields of the selected RoIs: boxes, gt index, label, IoU, gt box and box features."""
        import torch
        from mmdet.structures.bbox import bbox2roi

        rows_t = torch.as_tensor(rows, dtype=torch.long, device=priors.device)
        boxes = priors[rows_t]
        gidx = gt_inds[rows_t] - 1
        bbox_out = self.bbox_forward(stage, feats, bbox2roi([boxes]))
        feat = self.tap.box_in[stage] if self.box_level == "fc" else bbox_out["bbox_feats"]
        head = self.heads[stage][0]
        label = torch.full((len(rows),), head.num_classes, dtype=torch.long, device=priors.device)
        pos = gidx >= 0
        label[pos] = gt.labels[gidx[pos]]
        gt_box = torch.zeros(len(rows), 4, device=priors.device)
        gt_box[pos] = _box_tensor(gt.bboxes)[gidx[pos]].float()
        return {"boxes": boxes, "gidx": gidx, "label": label, "iou": ious[rows_t], "gt_box": gt_box, "feat": feat}

    def mask_block(self, stage: int, feats: tuple, gt, boxes, gidx, mask_rows: np.ndarray) -> dict:
        """Mask fields of the selected RoIs that keep a mask: rows, features and targets (empty without masks)."""
        import torch
        from mmdet.structures.bbox import bbox2roi
        from mmdet.structures.mask import mask_target

        size = self.mask_size(stage)
        if not (self.with_mask and len(mask_rows)):
            return {
                "mask_rows": np.zeros(0, np.int64),
                "mask_feat": np.zeros((0, *self.mask_shape(stage)), np.float16),
                "mask_target": np.zeros((0, size, size), bool),
            }
        mrows_t = torch.as_tensor(mask_rows, dtype=torch.long, device=boxes.device)
        mboxes = boxes[mrows_t]
        mask_out = self.mask_forward(stage, feats, bbox2roi([mboxes]))
        feat = self.tap.mask_in[stage] if self.mask_level == "logits" else mask_out["mask_feats"]
        targets = mask_target([mboxes], [gidx[mrows_t]], [gt.masks], self.rcnn_cfgs[stage])
        return {
            "mask_rows": mask_rows,
            "mask_feat": feat.cpu().numpy().astype(np.float16),
            "mask_target": targets.cpu().numpy() > 0.5,
        }

    def _extractor(self, name: str, stage: int):
        ext = getattr(self.model.roi_head, name)
        return ext[stage] if self.cascade else ext

    def box_shape(self, stage: int = 0) -> tuple:
        head = self.heads[stage][0]
        if self.box_level == "fc":
            return (int(head.fc_reg.in_features),)
        ext = self._extractor("bbox_roi_extractor", stage)
        size = ext.roi_layers[0].output_size
        size = size if isinstance(size, tuple) else (size, size)
        return (int(ext.out_channels), *map(int, size))

    def mask_shape(self, stage: int = 0) -> tuple:
        if not self.with_mask:
            return (1,)
        mh = self.heads[stage][1]
        if self.mask_level == "logits":
            return (int(mh.conv_logits.in_channels), self.mask_size(stage), self.mask_size(stage))
        ext = self._extractor("mask_roi_extractor", stage)
        size = ext.roi_layers[0].output_size
        size = size if isinstance(size, tuple) else (size, size)
        return (int(ext.out_channels), *map(int, size))
