"""Runner set-up: stage-1 detector training and evaluation through mmengine.

Both go through mmengine's ``Runner`` built from an mmdet config, so logging,
checkpoints, distributed launch and hooks behave as every mmdet user expects.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

from crat_ft.errors import UserError

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
    from crat_ft.checkpoint import allow_mmengine_pickles

    mmdet.utils.register_all_modules(init_default_scope=True)
    allow_mmengine_pickles()


def _atomic_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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

    _register_all()
    cfg = _prepare_cfg(config, cfg_options, data_root, ("train_dataloader", "val_dataloader", "test_dataloader"))
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    cfg.work_dir = str(work_dir)
    cfg.resume = resume
    if seed is not None:
        cfg.randomness = dict(seed=seed, deterministic=False)
    runner = Runner.from_cfg(cfg)
    runner.train()
    model = runner.model.module if hasattr(runner.model, "module") else runner.model
    out = work_dir / DETECTOR_FILE
    meta = {
        "crat_ft_stage": "stage1",
        "dataset_meta": {"classes": list(runner.train_dataloader.dataset.metainfo["classes"])},
        "iter": runner.iter,
        "cfg": cfg.pretty_text,
    }
    _atomic_save({"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "meta": meta}, out)
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
) -> dict:
    """Evaluate a detector checkpoint on the config's test split with the LVIS protocol.

    Writes ``out`` as ``{"bbox": {...}, "segm": {...}}`` (keys of
    :data:`crat_ft.evaluation.METRIC_KEYS`) and the per-class CSV beside it
    (``<out stem>_per_class.csv`` unless ``per_class_csv`` is given).

    Returns:
        The metrics dict written to ``out``.
    """
    from mmengine.runner import Runner

    from crat_ft.checkpoint import load_checkpoint_file, state_dict_of, trusted_loading
    from crat_ft.detector import check_checkpoint_classes

    _register_all()
    cfg = _prepare_cfg(config, cfg_options, data_root, ("test_dataloader",))
    ckpt = load_checkpoint_file(checkpoint, trust=trust_checkpoint)
    check_checkpoint_classes(cfg, state_dict_of(ckpt), str(checkpoint))

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path = Path(per_class_csv) if per_class_csv else out.with_name(out.stem + "_per_class.csv")
    evaluator = cfg.get("test_evaluator")
    evaluators = evaluator if isinstance(evaluator, list) else [evaluator]
    lvis = [e for e in evaluators if isinstance(e, dict) and e.get("type") == "CratLVISMetric"]
    if not lvis:
        raise UserError(
            f"config {config}: test_evaluator should be a CratLVISMetric, got {evaluator!r}; "
            "set test_evaluator = dict(type='CratLVISMetric', ann_file=..., metric=['bbox', 'segm'])"
        )
    lvis[0]["per_class_csv"] = str(csv_path)
    if not lvis[0].get("ann_file"):
        from crat_ft.config import ann_file_of

        lvis[0]["ann_file"] = str(ann_file_of(cfg.test_dataloader.dataset))

    cfg.load_from = str(checkpoint)
    cfg.resume = False
    cfg.pop("train_dataloader", None)
    cfg.pop("train_cfg", None)
    cfg.pop("optim_wrapper", None)
    cfg.pop("param_scheduler", None)
    with tempfile.TemporaryDirectory(prefix="crat-ft-eval-") as tmp:
        cfg.work_dir = tmp
        with trusted_loading(trust_checkpoint):
            runner = Runner.from_cfg(cfg)
            runner.test()
        from crat_ft.evaluation import CratLVISMetric

        metric = next(m for m in runner.test_evaluator.metrics if isinstance(m, CratLVISMetric))
        results = metric.last_results["metrics"]
    tmp_out = out.with_name(f".{out.name}.tmp")
    with open(tmp_out, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp_out, out)
    return results
