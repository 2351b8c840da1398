"""Helpers around mmengine's ``Runner`` shared by stage-1 training, evaluation and retraining.

Unique experiment names per Runner, CPU DDP over gloo under torchrun,
unwrapping DDP-wrapped models, and choosing the checkpoint a resume starts from.
"""

from __future__ import annotations

from pathlib import Path


def unwrap(model):
    """The module inside an mmengine/torch DDP wrapper (the model itself otherwise)."""
    from mmengine.model import is_model_wrapper

    return model.module if is_model_wrapper(model) else model


def unique_names(cfg, prefix: str) -> None:
    """Unique experiment and visualizer names: mmengine keeps them as process-wide
    singletons, and a second Runner in one process (the demo) must not reuse the
    first one's (possibly deleted) log directory."""
    import uuid

    tag = f"{prefix}-{uuid.uuid4().hex[:8]}"
    cfg.experiment_name = tag
    if cfg.get("visualizer") is not None:
        cfg.visualizer["name"] = tag


def cpu_ddp(module):
    """DDP over gloo for CPU-only torchrun launches.

    mmengine's launcher assumes GPUs (it calls ``torch.cuda.set_device`` and
    gives DDP ``device_ids``); on CPU the process group is initialised here
    from torchrun's environment and the module wrapped without device ids,
    which the Runner then takes as is.
    """
    from crat_ft.dist import CratDistributedDataParallel, init_distributed

    init_distributed()
    return CratDistributedDataParallel(module=module, broadcast_buffers=False, find_unused_parameters=False)


def resume_point(work_dir: Path) -> Path | None:
    """The newest Runner checkpoint in ``work_dir`` that loads; newer unreadable ones are removed.

    mmengine writes ``iter_N.pth`` in place, so a run killed while saving
    leaves a truncated file; resuming continues from the one before it.
    """
    from crat_ft.checkpoint import load_checkpoint_file
    from crat_ft.errors import UserError

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
