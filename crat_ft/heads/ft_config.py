"""The fine-tune config of ``crat-ft retrain-heads``: its schema, defaults and validation.

A fine-tune config is an mmengine-style Python file with the sections of
:data:`FT_SECTIONS` (``detector``, ``heads``, ``crat``, ``sampler``, ``train``,
``export``); every key has a default here, and an unknown section or key is an
error naming the file and the key. ``crat`` is :class:`CratConfig`.

Values are checked here too (:func:`check_values`: ``train.max_iters >= 1``,
``train.lr > 0``, milestones inside the schedule, ...), so a bad value ends
the command in one line before it creates anything. :func:`run_settings` is
the part of a resolved config that decides the retrained tensors (a settings
file, ``crat.donor_groups``, by its content: :func:`read_donor_groups`); a work
dir records it and a resume must match it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Iterable

from crat_ft.common.errors import UserError

FISHER_MODES = ("sample", "reference", "signed")
DONORS = ("fisher", "uniform", "permuted")
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
    # the ablation's controls (crat_ft.heads.transfusion.transfusion_weights): "fisher" (CRAT), "uniform"
    # (equal weights over the other seen classes, tau -> infinity), "permuted" (random receivers)
    donors: str = "fisher"
    # log mass_box / mass_mask: the norm of the transfused gradient on the class-wise layer over the own
    # loss's (crat_ft.heads.transfusion.gradient_mass_ratio; two extra autograd passes through that layer)
    log_mass: bool = False

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
        if cfg.donors not in DONORS:
            raise UserError(f"{source}.donors: expected one of {DONORS}, got {cfg.donors!r}")
        if cfg.fisher not in FISHER_MODES:
            raise UserError(f"{source}.fisher: expected one of {FISHER_MODES}, got {cfg.fisher!r}")
        for name, ok, expected in (
            ("box_tau", lambda v: _is_number(v) and v > 0, "a number > 0"),
            ("mask_tau", lambda v: _is_number(v) and v > 0, "a number > 0"),
            ("box_lambda", lambda v: _is_number(v) and v >= 0, "a number >= 0"),
            ("mask_lambda", lambda v: _is_number(v) and v >= 0, "a number >= 0"),
            ("momentum", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
            ("top_k", lambda v: v is None or (_is_int(v) and v >= 1), "None or an integer >= 1"),
            ("enable", lambda v: isinstance(v, bool), "True or False"),
            ("frequency_gate", lambda v: isinstance(v, bool), "True or False"),
            ("log_mass", lambda v: isinstance(v, bool), "True or False"),
        ):
            _require(source, name, getattr(cfg, name), ok(getattr(cfg, name)), expected)
        return cfg


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _require(source: str, key: str, value, ok: bool, expected: str) -> None:
    """One line for a bad value: where, the expected range, the value given, and how to set it.

    ``source`` ends with the section (``"fine-tune config X: train"``), ``key`` is the key in it.
    """
    if not ok:
        dotted = f"{source.rsplit(': ', 1)[-1]}.{key}"
        raise UserError(
            f"{source}.{key}: expected {expected}, got {value!r}; set it in the file or with --cfg-options {dotted}=..."
        )


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
    from crat_ft.engine.config import load_config

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
    check_values(out, str(path))
    return out


def check_values(ft: dict, source: str) -> None:
    """Check the values of a resolved fine-tune config (the keys are checked by :func:`load_ft_config`).

    Raises:
        UserError: one line naming the first bad key, e.g. ``train.max_iters: expected an integer >= 1, got 0``.
    """
    from crat_ft.heads.sampling import STRATEGIES

    def need(section: str, key: str, ok, expected: str) -> None:
        value = ft[section][key]
        _require(f"fine-tune config {source}: {section}", key, value, bool(ok(value)), expected)

    def at_least(low: int):
        return lambda v: _is_int(v) and v >= low

    train = ft["train"]
    need("train", "max_iters", at_least(1), "an integer >= 1")
    n = train["max_iters"]
    need("train", "lr", lambda v: _is_number(v) and v > 0, "a number > 0")
    need("train", "momentum", lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)")
    need("train", "weight_decay", lambda v: _is_number(v) and v >= 0, "a number >= 0")
    need(
        "train",
        "warmup_iters",
        lambda v: _is_int(v) and 0 <= v < n,
        f"an integer in [0, {n}) (shorter than train.max_iters={n})",
    )
    need(
        "train",
        "milestones",
        lambda v: (
            v is None
            or (
                isinstance(v, (list, tuple)) and all(_is_int(m) and 1 <= m < n for m in v) and list(v) == sorted(set(v))
            )
        ),
        f"None or increasing integers in [1, {n}) (inside train.max_iters={n})",
    )
    for key in ("checkpoint_interval", "log_interval"):
        need("train", key, at_least(1), "an integer >= 1")
    need("train", "seed", at_least(0), "an integer >= 0")
    need("train", "num_workers", at_least(0), "an integer >= 0")
    need("train", "in_memory", lambda v: isinstance(v, bool), "True or False")

    need("sampler", "strategy", lambda v: v in STRATEGIES, f"one of {STRATEGIES}")
    need("sampler", "mask_strategy", lambda v: v is None or v in STRATEGIES, f"None or one of {STRATEGIES}")
    need("sampler", "rois_per_batch", at_least(1), "an integer >= 1")
    need("sampler", "pos_fraction", lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]")
    need("sampler", "masks_per_batch", at_least(0), "an integer >= 0")
    need("sampler", "mask_group", at_least(1), "an integer >= 1")
    need("sampler", "rfs_t", lambda v: _is_number(v) and v > 0, "a number > 0")

    need(
        "heads",
        "loss_cls",
        lambda v: isinstance(v, dict) and isinstance(v.get("type"), str),
        "a loss dict with a 'type'",
    )
    for key in ("loss_bbox_weight", "loss_mask_weight"):
        need("heads", key, lambda v: _is_number(v) and v >= 0, "a number >= 0")
    need("heads", "reinit_cls", lambda v: isinstance(v, bool), "True or False")


def read_donor_groups(path: str | os.PathLike | None) -> dict[str, str] | None:
    """The content of ``crat.donor_groups``, ``{class name: group}`` (groups as strings); None without a file.

    Read once per run: the run records it by value (:func:`run_settings`, ``run.json``, the heads' meta)
    and trains with what it recorded.
    """
    if path is None:
        return None
    try:
        with open(path) as f:
            groups = json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"crat.donor_groups: cannot read {path} ({exc}); give a JSON file {{class name: group}}"
        ) from None
    if not isinstance(groups, dict):
        raise UserError(f"crat.donor_groups: {path} should hold a JSON object {{class name: group}}")
    return {str(name): str(group) for name, group in groups.items()}


def run_settings(ft: dict, donor_groups: dict[str, str] | None = None) -> dict:
    """The settings of a resolved fine-tune config that decide the retrained tensors, as flat
    ``{"section.key": JSON value}`` (``crat`` with every default filled in).

    Left out: ``OPERATIONAL_KEYS["retrain-heads"]`` of :mod:`crat_ft.common.run_record` (the ``export``
    section among them: it is applied by ``crat-ft export``, not by training).

    Args:
        donor_groups: the content of ``crat.donor_groups`` (:func:`read_donor_groups`): recorded by
            value, as ``"sha256:<hex>"`` of its canonical JSON, so an edited or another file differs.
    """
    from crat_ft.common.run_record import OPERATIONAL_KEYS, content_sha256, is_operational

    operational = OPERATIONAL_KEYS["retrain-heads"]
    flat = {}
    for section, values in ft.items():
        if section == "crat":
            values = asdict(CratConfig.from_dict(values))
        for key, value in values.items():
            name = f"{section}.{key}"
            if not is_operational(name, operational):
                flat[name] = json.loads(json.dumps(value, sort_keys=True, default=str))
    path = flat.get("crat.donor_groups")
    assert (path is None) == (donor_groups is None), "run_settings: pass the content of crat.donor_groups"
    if path is not None:
        flat["crat.donor_groups"] = content_sha256(donor_groups)
    return flat


def heads_loss_cls(ft: dict, meta: dict) -> dict:
    """The classifier loss config of a fine-tune config, completed with what the cache knows."""
    loss_cls = dict(ft["heads"]["loss_cls"])
    if loss_cls.get("type") in ("SeesawLoss", "EQLV2Loss", "GroupSoftmaxLoss"):
        loss_cls.setdefault("num_classes", len(meta["class_names"]))
    if loss_cls.get("type") == "GroupSoftmaxLoss":
        loss_cls.setdefault("class_instance_count", [int(n) for n in meta["class_instance_count"]])
    return loss_cls
