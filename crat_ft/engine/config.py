"""Loading mmengine configs at crat-ft's boundary, with validation.

``--cfg-options key=value`` follows mmengine's syntax (dotted keys, values
parsed as int/float/bool/None/list/tuple), but unlike mmengine an unknown key
is an error naming the key: a typo must not silently add a setting that
nothing reads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from crat_ft.common.errors import UserError

DATALOADERS = ("train_dataloader", "val_dataloader", "test_dataloader")
EVALUATORS = ("val_evaluator", "test_evaluator")


def parse_cfg_options(options: Iterable[str]) -> dict:
    """Parse ``key=value`` strings into a dict of dotted keys to Python values."""
    from mmengine.config import DictAction

    parsed = {}
    for opt in options:
        if "=" not in opt:
            raise UserError(
                f"--cfg-options: expected key=value, got {opt!r}; e.g. --cfg-options train_cfg.max_iters=100"
            )
        key, value = opt.split("=", 1)
        if not key:
            raise UserError(f"--cfg-options: empty key in {opt!r}")
        parsed[key] = DictAction._parse_iterable(value)
    return parsed


def _check_key(tree: dict, key: str, source: str) -> None:
    node = tree
    walked = []
    for part in key.split("."):
        if isinstance(node, (list, tuple)):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(
                    f"unknown --cfg-options key {key!r}: {'.'.join(walked)} is a list of {len(node)} items, "
                    f"so {part!r} is not an index; check it against {source}"
                )
            node = node[int(part)]
        elif isinstance(node, dict):
            if part not in node:
                where = ".".join(walked) or "the top level"
                raise UserError(
                    f"unknown --cfg-options key {key!r}: {where} of {source} has no key {part!r}; check the spelling"
                )
            node = node[part]
        else:
            raise UserError(f"unknown --cfg-options key {key!r}: {'.'.join(walked)} in {source} is a value, not a dict")
        walked.append(part)


def load_config(path: str | os.PathLike, cfg_options: Iterable[str] | dict | None = None):
    """Read an mmengine config and apply validated overrides.

    Args:
        path: the config file.
        cfg_options: ``key=value`` strings or a dict of dotted keys.

    Raises:
        UserError: missing or unparsable file, or an override of a key that
            the config does not have.
    """
    from mmengine.config import Config

    path = Path(path)
    if not path.is_file():
        raise UserError(f"config {path} does not exist; check the path (demo configs are in configs/demo/)")
    try:
        cfg = Config.fromfile(str(path))
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"config {path} could not be parsed ({first}); fix the file") from None
    if cfg_options:
        options = parse_cfg_options(cfg_options) if not isinstance(cfg_options, dict) else dict(cfg_options)
        tree = cfg.to_dict()
        for key in options:
            _check_key(tree, key, str(path))
        cfg.merge_from_dict(options)
    return cfg


def _datasets(cfg):
    """The dataset dicts of the config's dataloaders (unwrapping RepeatDataset/ClassBalancedDataset)."""
    for name in DATALOADERS:
        loader = cfg.get(name)
        if not loader:
            continue
        ds = loader.get("dataset")
        while ds is not None and "dataset" in ds and "ann_file" not in ds:
            ds = ds["dataset"]
        if ds is not None:
            yield name, ds


def set_data_root(cfg, data_root: str | os.PathLike) -> None:
    """Point every dataloader and LVIS evaluator of ``cfg`` at ``data_root``."""
    root = str(data_root).rstrip("/") + "/"
    for _, ds in _datasets(cfg):
        ds["data_root"] = root
    for name in EVALUATORS:
        ev = cfg.get(name)
        if isinstance(ev, dict) and "ann_file" in ev:
            ev["ann_file"] = root + "annotations/" + Path(ev["ann_file"]).name


def ann_file_of(ds) -> Path:
    ann = Path(ds.get("ann_file", ""))
    return ann if ann.is_absolute() else Path(ds.get("data_root") or "") / ann


def head_num_classes(cfg) -> dict[str, int]:
    """``num_classes`` of each class-wise RoI head in the model config (per stage for a cascade),
    and of each classifier loss that has one (Seesaw's)."""
    roi = cfg.model.get("roi_head") or {}
    found = {}
    for head in ("bbox_head", "mask_head"):
        h = roi.get(head)
        stages = {f"model.roi_head.{head}": h} if isinstance(h, dict) else {}
        if isinstance(h, (list, tuple)):  # a cascade: one head per stage
            stages = {f"model.roi_head.{head}.{i}": s for i, s in enumerate(h) if isinstance(s, dict)}
        for key, s in stages.items():
            if "num_classes" in s:
                found[f"{key}.num_classes"] = s["num_classes"]
            if isinstance(s.get("loss_cls"), dict) and "num_classes" in s["loss_cls"]:
                found[f"{key}.loss_cls.num_classes"] = s["loss_cls"]["num_classes"]
    return found


def sync_dataset_classes(cfg, splits: Iterable[str] = DATALOADERS, trained_classes=None) -> list[str]:
    """Fill each LVIS dataset's ``metainfo.classes`` from its annotation file and check the model.

    mmdet's ``LVISV1Dataset`` maps category ids to labels in sorted id order
    but carries LVIS v1's 1203 names as metainfo; for any other LVIS-format
    data the names must come from the file.

    Args:
        trained_classes: for a command given a trained detector, a callable returning
            ``(checkpoint name, number of classes it predicts or None)``; asked only on a
            mismatch, so the advice fits the checkpoint (whose class count cannot change).

    Returns:
        The class names (sorted by category id) of the last dataset checked.

    Raises:
        UserError: unreadable annotation file, datasets of one config with
            different categories, or a model whose ``num_classes`` differs
            from the dataset's number of categories.
    """
    from crat_ft.common.lvis_json import categories_by_id, load_lvis_json

    names = None
    for loader, ds in _datasets(cfg):
        if loader not in splits:
            continue
        ann = ann_file_of(ds)
        doc = load_lvis_json(ann)
        these = [c["name"] for c in categories_by_id(doc)]
        if names is not None and these != names:
            raise UserError(
                f"{loader}: categories of {ann} differ from the other splits'; all splits must share one category list"
            )
        names = these
        ds["metainfo"] = dict(classes=tuple(these))
        for key, n in head_num_classes(cfg).items():
            if n == len(these):
                continue
            name, trained = trained_classes() if trained_classes else (None, None)
            if trained is not None and trained != len(these):
                raise UserError(
                    f"{ann} has {len(these)} categories but checkpoint {name} predicts {trained} classes; "
                    "use the dataset the detector was trained on, or train one on this dataset with `crat-ft train-detector`"
                )
            if n != len(these):
                raise UserError(
                    f"{key}={n} but {ann} has {len(these)} categories; "
                    f"set --cfg-options {' '.join(f'{k}={len(these)}' for k in head_num_classes(cfg))} or use the matching dataset"
                )
    return names or []


def dataset_class_names(cfg) -> list[str]:
    """The class names :func:`sync_dataset_classes` filled in (of the first dataloader that has them)."""
    for _, ds in _datasets(cfg):
        classes = (ds.get("metainfo") or {}).get("classes")
        if classes:
            return list(classes)
    return []


def model_cfg_text(cfg) -> str:
    """The config's ``model`` section as canonical JSON (its hash identifies the detector's architecture)."""
    import json

    model = cfg.model.to_dict() if hasattr(cfg.model, "to_dict") else dict(cfg.model)
    return json.dumps(model, sort_keys=True, default=str)


def base_dataset_cfg(cfg, loader: str = "train_dataloader"):
    """The dataset config of a dataloader, unwrapped from ClassBalancedDataset/RepeatDataset wrappers."""
    ds = cfg[loader].dataset
    while "dataset" in ds and "ann_file" not in ds:
        ds = ds.dataset
    return ds


def prepare_config(config, cfg_options=(), data_root=None, splits: Iterable[str] = DATALOADERS, trained_classes=None):
    """A detector config as every crat-ft command reads it.

    Loads ``config`` with the validated ``cfg_options``, points its datasets
    and evaluators at ``data_root`` (if given) and fills the class names of the
    ``splits`` from their annotation files (checking the model's
    ``num_classes``; ``trained_classes`` as in :func:`sync_dataset_classes`).
    """
    cfg = load_config(config, cfg_options)
    if not isinstance(cfg.get("model"), dict):  # e.g. an annotation or results JSON given as CONFIG
        keys = ", ".join(list(cfg.keys())[:4]) or "none"
        raise UserError(
            f"config {config}: expected an mmdet detector config with a 'model' section, got keys {keys}; "
            "pass the detector's config file (.py)"
        )
    if data_root is not None:
        if not Path(data_root).is_dir():
            raise UserError(
                f"--data-root {data_root} does not exist; make it with `crat-ft make-demo-data {data_root}`"
            )
        set_data_root(cfg, data_root)
    sync_dataset_classes(cfg, splits, trained_classes)
    return cfg
