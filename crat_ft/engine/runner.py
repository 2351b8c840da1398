"""Helpers around mmengine's ``Runner`` shared by stage-1 training, evaluation and retraining.

Unique experiment names per Runner, CPU DDP over gloo under torchrun,
unwrapping DDP-wrapped models, choosing the checkpoint a resume starts from
(the one ``last_checkpoint`` names; a checkpoint is never deleted), and rank 0's
checks of a work dir answered on every rank.
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
    from crat_ft.common.dist import CratDistributedDataParallel, init_distributed

    init_distributed()
    return CratDistributedDataParallel(module=module, broadcast_buffers=False, find_unused_parameters=False)


def resume_point(work_dir: Path, *, trust: bool = False, command: str = "crat-ft") -> Path | None:
    """The Runner checkpoint a ``--resume`` continues from: the one ``last_checkpoint`` names.

    mmengine writes ``last_checkpoint`` once a checkpoint is whole, so it names the newest complete one
    of this run (a checkpoint being written when the run was killed is newer, and is written again).
    Without ``last_checkpoint`` (a run killed while saving its first checkpoint) it is the newest
    checkpoint that loads. A checkpoint is never deleted: one that cannot be read (truncated, corrupt)
    is set aside as ``<name>.unreadable`` with a one-line note, and the one before it is taken.

    Args:
        work_dir: the run's work dir (``last_checkpoint`` is read there, by file name: the path in it
            may name the directory the run was copied from).
        trust: unpickle anything (``--trust-checkpoint``).
        command: the command named in the note.

    Raises:
        UserError: ``last_checkpoint`` names a file the work dir does not hold, or a checkpoint needs
            unpickling beyond the allow-list (the message names the global and ``--trust-checkpoint``).
    """
    import sys

    from crat_ft.common.errors import UserError
    from crat_ft.common.run_record import LAST_CHECKPOINT, runner_checkpoints
    from crat_ft.engine.checkpoint import UnreadableCheckpointError, load_checkpoint_file

    def iteration(p: Path) -> int:
        tail = p.stem.split("_")[-1]
        return int(tail) if tail.isdigit() else -1

    found = sorted(runner_checkpoints(work_dir), key=iteration, reverse=True)
    pointer = work_dir / LAST_CHECKPOINT
    if pointer.is_file():
        named = work_dir / Path(pointer.read_text().strip()).name
        if not named.is_file():
            raise UserError(
                f"--resume: {pointer} names {named.name}, which {work_dir} does not hold; restore it, or choose "
                "a new --work-dir"
            )
        found = [named] + [p for p in found if iteration(p) < iteration(named)]
    chosen, aside = None, []
    for ckpt in found:
        if not ckpt.is_file():  # set aside by another rank
            continue
        try:
            load_checkpoint_file(ckpt, trust=trust)
        except UnreadableCheckpointError:
            renamed = set_aside(ckpt)
            if renamed is not None:
                aside.append((ckpt, renamed))
            continue
        chosen = ckpt
        break
    for ckpt, renamed in aside:
        then = f"resuming from {chosen.name}" if chosen is not None else "none before it: starting afresh"
        print(
            f"{command}: --resume: {ckpt} cannot be read (truncated or corrupt); set aside as {renamed.name}, "
            f"not deleted; {then}",
            file=sys.stderr,
            flush=True,
        )
    return chosen


def set_aside(path: Path) -> Path | None:
    """Rename ``path`` to ``<name>.unreadable`` (``.unreadable-2``, ... if taken); None if it is gone already."""
    import os

    aside = path.with_name(path.name + ".unreadable")
    k = 1
    while aside.exists():
        k += 1
        aside = path.with_name(f"{path.name}.unreadable-{k}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return None
    return aside


def on_rank0(fn):
    """``fn()`` run by rank 0 alone (checks of a work dir, a choice of checkpoint), its answer on every rank.

    Under torchrun the other ranks get rank 0's result, or raise the :class:`crat_ft.common.errors.UserError`
    it raised, so a refusal ends every rank with the same line instead of leaving them waiting.
    """
    from crat_ft.common.dist import broadcast_from_rank0, init_distributed, rank
    from crat_ft.common.errors import UserError

    init_distributed()
    result, error = None, None
    if rank() == 0:
        try:
            result = fn()
        except UserError as exc:
            error = exc
    answer = broadcast_from_rank0((result, None if error is None else (str(error), error.exit_code)))
    if error is not None:
        raise error
    if answer[1] is not None:
        failure = UserError(answer[1][0])
        failure.exit_code = answer[1][1]
        raise failure
    return answer[0]
