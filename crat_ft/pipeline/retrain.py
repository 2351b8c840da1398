"""``retrain-heads``: the class-wise layers retrained from a feature cache with mmengine's ``Runner``.

:func:`retrain_heads` joins the builders of :mod:`crat_ft.pipeline.retrain_builders` under a lock and the
run record of :mod:`crat_ft.pipeline.retrain_record`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterable

from crat_ft.common.files import atomic_torch_save
from crat_ft.pipeline.retrain_builders import (
    build_cache_loader,
    build_heads,
    build_runner,
    heads_meta,
    open_cache_and_detector,
)
from crat_ft.pipeline.retrain_record import (
    HEADS_FILE,
    RUN_FILE,
    check_resume,
    recorded_donor_groups,
    refuse_existing_run,
    run_record,
)


def retrain_heads(
    ft_config: str | os.PathLike,
    cache: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    cfg_options: Iterable[str] | dict = (),
    resume: bool = False,
    trust_checkpoint: bool = False,
) -> Path:
    """Retrain the class-wise layers from a feature cache with mmengine's Runner.

    Steps: read and check the fine-tune config (nothing is created before that)
    → check the work dir (a run in it needs ``--resume``) → open the cache and
    the detector it was made from → check a resume against the work dir's
    :data:`RUN_FILE` and pick the checkpoint named by ``last_checkpoint`` → record
    this run's settings there → train → write ``heads.pth``. A refused run leaves
    the work dir as it found it. ``trust_checkpoint`` unpickles the detector
    checkpoint and the work dir's Runner checkpoints beyond the allow-list.

    Returns:
        ``work_dir/heads.pth``: retrained layers, Fisher statistics and provenance.
    """
    from crat_ft.common.dist import rank as dist_rank
    from crat_ft.common.files import RunLock, clean_stale_temps, output_dir, temp_pattern
    from crat_ft.engine.runner import on_rank0
    from crat_ft.heads.ft_config import load_ft_config
    from crat_ft.heads.registry import register_all

    register_all()
    ft = load_ft_config(ft_config, cfg_options)
    rank = dist_rank()
    with output_dir(work_dir, "--work-dir") as work_dir:
        # one run per work dir; under torchrun rank 0 holds the lock, checks the work dir and records the run
        lock = RunLock(work_dir / ".crat-ft.lock", f"--work-dir {work_dir}") if rank == 0 else contextlib.nullcontext()
        with lock:

            def clean_and_refuse() -> None:
                for name in (HEADS_FILE, RUN_FILE):
                    clean_stale_temps(work_dir, temp_pattern(work_dir / name))
                if not resume:
                    refuse_existing_run(work_dir)

            on_rank0(clean_and_refuse)
            return _retrain_locked(
                ft, ft_config, cache, work_dir, rank=rank, resume=resume, trust_checkpoint=trust_checkpoint
            )


def _retrain_locked(ft: dict, ft_config, cache, work_dir: Path, *, rank: int, resume: bool, trust_checkpoint: bool):
    from crat_ft.common.dist import world_size
    from crat_ft.common.progress import output_begins
    from crat_ft.common.run_record import write_record
    from crat_ft.engine.checkpoint import load_checkpoint_file, trusted_loading
    from crat_ft.engine.runner import on_rank0, resume_point, unwrap

    reader, det_config, det_ckpt, detector_cfg, detector_state, sha = open_cache_and_detector(
        ft, cache, trust_checkpoint
    )
    record = run_record(ft, reader, cache, detector_cfg, sha, world_size())
    groups = recorded_donor_groups(record)  # trained with what is recorded, never read again
    heads = build_heads(ft, reader, detector_cfg, detector_state, groups)
    loader = build_cache_loader(reader, ft["sampler"], ft["train"]["seed"], ft["train"]["num_workers"], rank)

    def checks() -> Path | None:  # rank 0 checks the work dir; every rank gets its answer
        if not resume:
            return None
        check_resume(work_dir, record)
        return resume_point(work_dir, trust=trust_checkpoint, command="retrain-heads")

    start = on_rank0(checks)
    if rank == 0:
        output_begins()
        write_record(work_dir / RUN_FILE, record)
    if isinstance(reader, list) and any(h.fc_reg is None for h in heads.stages):
        print(
            "retrain-heads: the box regressors are class-agnostic, so they stay as they are and CRAT's box branch "
            "does not apply; retraining every stage's classifier and mask predictor (CRAT on the masks)",
            file=sys.stderr,
            flush=True,
        )
    if start is not None:  # mmengine's loop skips the done steps by drawing them: they are not read
        done = load_checkpoint_file(start, trust=trust_checkpoint)["meta"]["iter"]
        loader.sampler.skip_steps(int(done))
    runner = build_runner(
        heads, loader, ft["train"], work_dir, resume_from=start, name=f"retrain-heads-{Path(ft_config).stem}"
    )
    with trusted_loading(trust_checkpoint):  # the Runner loads the checkpoint it resumes
        runner.train()
    out = work_dir / HEADS_FILE
    if rank == 0:
        state = {k: v.detach().cpu() for k, v in unwrap(runner.model).state_dict().items()}
        first = reader[0] if isinstance(reader, list) else reader
        meta = heads_meta(ft, first.meta, det_config, det_ckpt, runner.iter, groups)
        meta["num_stages"] = len(reader) if isinstance(reader, list) else 1
        meta["run"] = record
        atomic_torch_save({"state_dict": state, "meta": meta}, out)
    return out
