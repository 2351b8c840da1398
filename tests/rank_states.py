"""A test instrument for tests/test_distributed.py: ``SaveRankStateHook`` saves every rank's model
parameters at the end of training (mmengine's CheckpointHook saves rank 0's only), so the test can
check that DDP kept them equal. Buffers (BatchNorm's running statistics) stay each rank's own under
mmengine's DDP (``broadcast_buffers=False``, as mmdet trains), so they are left out."""

from pathlib import Path

import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from crat_ft.engine.runner import unwrap


@HOOKS.register_module()
class SaveRankStateHook(Hook):
    def after_train(self, runner) -> None:
        state = {k: v.detach().cpu() for k, v in unwrap(runner.model).named_parameters()}
        torch.save(state, Path(runner.work_dir) / f"rank{runner.rank}_state.pth")
