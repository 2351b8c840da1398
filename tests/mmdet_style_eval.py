"""What mmdet's ``tools/test.py`` does, as a script for ``tests/test_distributed.py`` (run under torchrun).

A Runner built from the detector config with its own ``CratLVISMetric`` test evaluator, which
names no ``spill_dir``; ``launcher='pytorch'``. Two steps differ from mmdet's script, both as a
user of this stack would do them: the data root and class names are set with crat-ft's
``set_data_root``/``sync_dataset_classes`` (mmdet's LVIS dataset otherwise names LVIS's 1203
classes), and the process group is set up by ``crat_ft.common.dist`` (mmengine's launcher needs CUDA).

Usage: mmdet_style_eval.py CONFIG CHECKPOINT DATA_ROOT WORK_DIR OUT_JSON [--keep-detections].
Every rank writes ``OUT_JSON.rank<r>`` with the directory of the metric's spilled detections; rank 0 writes the
metrics to OUT_JSON. ``--keep-detections`` leaves the spill directory in place, for the test to
compare the detections themselves.
"""

import json
import os
import sys
from pathlib import Path

from mmengine.runner import Runner

from crat_ft.common.dist import distributed_runner_cfg
from crat_ft.engine.config import load_config, set_data_root, sync_dataset_classes
from crat_ft.evaluation.metric import CratLVISMetric
from crat_ft.heads.registry import register_all


def main() -> None:
    config, checkpoint, data_root, work_dir, out = sys.argv[1:6]
    if "--keep-detections" in sys.argv[6:]:
        CratLVISMetric._remove_spill = lambda self: None
    register_all()
    cfg = load_config(config)
    set_data_root(cfg, data_root)
    sync_dataset_classes(cfg, ("test_dataloader",))
    for key in ("train_dataloader", "train_cfg", "optim_wrapper", "param_scheduler"):
        cfg.pop(key, None)
    cfg.work_dir, cfg.load_from = work_dir, checkpoint
    distributed_runner_cfg(cfg)  # launcher 'pytorch' under torchrun, else 'none'
    runner = Runner.from_cfg(cfg)
    metrics = runner.test()
    metric = next(m for m in runner.test_evaluator.metrics if isinstance(m, CratLVISMetric))
    Path(f"{out}.rank{runner.rank}").write_text(metric.run_dir)
    if runner.rank == 0:
        Path(out).write_text(json.dumps(metrics))
    print(f"rank {runner.rank} of {runner.world_size}, pid {os.getpid()}: done", file=sys.stderr)


if __name__ == "__main__":
    main()
