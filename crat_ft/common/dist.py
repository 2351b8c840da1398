"""Distributed runs under ``torchrun``: one process group per command, set up by crat-ft itself.

mmengine's ``pytorch`` launcher assumes GPUs (it calls ``torch.cuda.set_device`` and gives DDP
``device_ids``), so crat-ft initialises the process group before any Runner is built:
NCCL on GPUs (after ``torch.cuda.set_device(LOCAL_RANK)``), gloo on CPUs. mmengine's Runner
then finds the group initialised and uses it; :class:`CratDistributedDataParallel` is the
model wrapper it builds, which leaves ``device_ids`` out for CPU modules.

The group's timeout covers rank 0's LVIS evaluation while the other ranks wait in a
collective (379 s for LVIS val's standard protocol, more with AP-fixed; torch's default is
10 minutes): :data:`DEFAULT_TIMEOUT_S`, or ``CRAT_FT_DIST_TIMEOUT`` seconds.
"""

from __future__ import annotations

import os

from mmengine.model import MMDistributedDataParallel
from mmengine.registry import MODEL_WRAPPERS

DEFAULT_TIMEOUT_S = 3 * 3600
TIMEOUT_ENV = "CRAT_FT_DIST_TIMEOUT"


def world_size() -> int:
    """Processes of this run (torchrun's ``WORLD_SIZE``; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    """This process's rank (torchrun's ``RANK``; 0 without torchrun)."""
    return int(os.environ.get("RANK", 0))


def timeout_s() -> int:
    """The collective timeout in seconds (``CRAT_FT_DIST_TIMEOUT``, else :data:`DEFAULT_TIMEOUT_S`)."""
    from crat_ft.common.errors import UserError

    value = os.environ.get(TIMEOUT_ENV)
    if value is None:
        return DEFAULT_TIMEOUT_S
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{TIMEOUT_ENV}: expected a whole number of seconds >= 1, got {value!r}")
    return int(value)


def init_distributed() -> bool:
    """Join torchrun's process group (once per process); False when not under torchrun.

    On CUDA the process first takes GPU ``LOCAL_RANK``, so no CUDA work lands on GPU 0 by mistake.
    """
    import datetime

    import torch
    import torch.distributed as dist

    if world_size() <= 1:
        return False
    if not dist.is_initialized():
        seconds = timeout_s()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(
            "nccl" if torch.cuda.is_available() else "gloo", timeout=datetime.timedelta(seconds=seconds)
        )
    return True


def distributed_runner_cfg(cfg) -> None:
    """Set up an mmengine config for this process: under torchrun, the initialised group, launcher
    ``pytorch`` and :class:`CratDistributedDataParallel`; else launcher ``none``."""
    if not init_distributed():
        cfg.launcher = "none"
        return
    cfg.launcher = "pytorch"
    wrapper = dict(cfg.get("model_wrapper_cfg") or {})
    if wrapper.get("type", "MMDistributedDataParallel") == "MMDistributedDataParallel":
        wrapper["type"] = "CratDistributedDataParallel"
    cfg.model_wrapper_cfg = wrapper


def broadcast_from_rank0(value):
    """``value`` as rank 0 has it, on every rank (the value itself without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@MODEL_WRAPPERS.register_module()
class CratDistributedDataParallel(MMDistributedDataParallel):
    """mmengine's DDP wrapper without ``device_ids`` for a module on the CPU (gloo), as torch's DDP
    requires; on CUDA it is ``MMDistributedDataParallel`` itself. Registered in mmengine's
    ``MODEL_WRAPPERS``; :func:`distributed_runner_cfg` names it."""

    def __init__(self, module, device_ids=None, **kwargs) -> None:
        on_cuda = any(p.is_cuda for p in module.parameters())
        kwargs.setdefault("broadcast_buffers", False)
        super().__init__(module=module, device_ids=device_ids if on_cuda else None, **kwargs)
