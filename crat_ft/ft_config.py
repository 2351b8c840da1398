"""The fine-tune config of ``crat-ft retrain-heads``: its schema, defaults and validation.

A fine-tune config is an mmengine-style Python file with the sections of
:data:`FT_SECTIONS` (``detector``, ``heads``, ``crat``, ``sampler``, ``train``,
``export``); every key has a default here, and an unknown section or key is an
error naming the file and the key. ``crat`` is :class:`CratConfig`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Iterable

from crat_ft.errors import UserError

FISHER_MODES = ("sample", "reference")
MASK_WEIGHTS = ("mask", "box")


@dataclass(frozen=True)
class CratConfig:
    """CRAT settings (docs/architecture.md#crat-as-implemented); ``enable=False`` is the decoupled baseline."""

    enable: bool = True
    box_lambda: float = 0.001
    mask_lambda: float = 0.01
    box_tau: float = 0.05
    mask_tau: float = 0.05
    momentum: float = 0.01
    fisher: str = "sample"
    top_k: int | None = None
    frequency_gate: bool = False
    # "mask": mask transfusion weights from the mask Fisher statistics;
    # "box": from the box statistics and the box Fisher of the mask's RoI, as the reference does
    mask_weights: str = "mask"
    # a JSON file {class name: group}: transfuse only between classes of one group (e.g. the
    # families of the synthetic benchmark, or LVIS synsets under one hypernym); None: all classes
    donor_groups: str | None = None

    @classmethod
    def from_dict(cls, d: dict | None, source: str = "crat") -> "CratConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"{source}: unknown key(s) {unknown}; known keys are {sorted(known)}")
        cfg = cls(**d)
        if cfg.mask_weights not in MASK_WEIGHTS:
            raise UserError(f"{source}.mask_weights: expected one of {MASK_WEIGHTS}, got {cfg.mask_weights!r}")
        if cfg.fisher not in FISHER_MODES:
            raise UserError(f"{source}.fisher: expected one of {FISHER_MODES}, got {cfg.fisher!r}")
        for name in ("box_tau", "mask_tau"):
            if getattr(cfg, name) <= 0:
                raise UserError(f"{source}.{name}: expected > 0, got {getattr(cfg, name)}")
        return cfg


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
            raise UserError(
                f"fine-tune config {path}: unknown key(s) {bad} in '{section}'; known keys are {sorted(defaults)}"
            )
        out[section] = {**defaults, **given}
    return out


def heads_loss_cls(ft: dict, meta: dict) -> dict:
    """The classifier loss config of a fine-tune config, completed with what the cache knows."""
    loss_cls = dict(ft["heads"]["loss_cls"])
    if loss_cls.get("type") in ("SeesawLoss", "EQLV2Loss", "GroupSoftmaxLoss"):
        loss_cls.setdefault("num_classes", len(meta["class_names"]))
    if loss_cls.get("type") == "GroupSoftmaxLoss":
        loss_cls.setdefault("class_instance_count", [int(n) for n in meta["class_instance_count"]])
    return loss_cls
