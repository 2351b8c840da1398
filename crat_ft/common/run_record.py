"""What decides an output, recorded with it: every run of crat-ft is exact or refused.

A command that writes a model or a stage (``train-detector``, ``retrain-heads``,
``extract-features``, each stage of ``crat-ft demo``, each run of
``benchmarks/bench_ablation.py``) builds a *run record* of what decides the
output's tensors and writes it with the output (:data:`RECORD_FILE` in a work
dir, and in the output file's meta where there is one):

- ``settings``: the resolved config after ``--cfg-options`` as flat
  ``{"dotted.key": JSON value}`` (:func:`flat_settings`), the seed included and
  the command's :data:`OPERATIONAL_KEYS` left out. A setting that names a file
  (``crat.donor_groups``) is recorded by value: its content's sha256 here
  (:func:`content_sha256`), the path and the content under ``files``;
- ``inputs``: the inputs' identities (the sha256 of a checkpoint, of a dataset's
  annotation files: :func:`data_identity`); ``paths`` name them in messages only;
- anything else the command adds (``world_size``).

The same three rules hold for every command:

- without ``--resume`` a work dir holding a run is refused (:func:`refuse_existing_run`);
- ``--resume`` goes on only when the recorded run matches this one entry for entry
  (:func:`check_resume`), else one line names the first entry that differs
  (:func:`first_difference`); only :data:`OPERATIONAL_KEYS` may change;
- a demo stage is reused only when its record matches what the invocation would write.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterable

from crat_ft.common.errors import UserError

RECORD_FILE = "run.json"
# what mmengine's CheckpointHook writes in a work dir: the checkpoints, and the name of the newest one
RUNNER_CHECKPOINTS = ("iter_*.pth", "epoch_*.pth")
LAST_CHECKPOINT = "last_checkpoint"
UNSET = "<unset>"

# Settings that cannot change an output's tensors, per command: a --resume may change them and a demo stage
# is reused across them; every other setting must match. A key covers everything under it; "*.name" is any
# key whose last part is name. extract-features records its settings one by one (crat_ft.pipeline.extract_settings.run_settings)
# and leaves out only --workers, --skip-space-check and where its inputs lie.
OPERATIONAL_KEYS = {
    "retrain-heads": (
        "detector.config",  # where the detector is: its identity is its checkpoint's sha256 and its model config
        "detector.checkpoint",
        "train.checkpoint_interval",
        "train.log_interval",
        "train.num_workers",  # the sampler draws every batch in the main process; workers only read them
        "train.in_memory",
        "export",  # applied by `crat-ft export`, not by training
    ),
    "train-detector": (
        "work_dir",
        "resume",
        "load_from",  # where the initial weights are: their identity is the file's sha256 (inputs.load_from)
        "launcher",
        "experiment_name",
        "log_level",
        "log_processor",
        "visualizer",
        "vis_backends",
        "env_cfg.mp_cfg",
        "env_cfg.dist_cfg",
        "default_hooks.timer",
        "default_hooks.logger",
        "default_hooks.checkpoint",
        "default_hooks.visualization",
        "train_cfg.val_interval",  # validation reads the weights, it never changes them
        "train_cfg.val_begin",
        "val_dataloader",
        "val_evaluator",
        "val_cfg",
        "test_dataloader",
        "test_evaluator",
        "test_cfg",
        "*.data_root",  # where the data is: its identity is its annotation files' sha256 (inputs.data)
    ),
}


def is_operational(key: str, operational: Iterable[str]) -> bool:
    """Whether the dotted ``key`` is, or lies under, one of ``operational`` (``"*.name"``: any key ending in name)."""
    for op in operational:
        if op.startswith("*."):
            if key.rsplit(".", 1)[-1] == op[2:]:
                return True
        elif key == op or key.startswith(op + "."):
            return True
    return False


def flat_settings(tree: dict, operational: Iterable[str] = ()) -> dict:
    """A resolved config as flat ``{"dotted.key": JSON value}`` in its own order, less ``operational`` keys.

    Dicts are walked key by key, lists holding dicts item by item (``param_scheduler.1.milestones``);
    other lists are one value. Values become what JSON keeps (tuples as lists, objects as their ``str``).
    """
    operational = tuple(operational)
    flat: dict = {}

    def walk(prefix: str, node) -> None:
        if prefix and is_operational(prefix, operational):
            return
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, (list, tuple)) and any(isinstance(v, dict) for v in node):
            for i, v in enumerate(node):
                walk(f"{prefix}.{i}", v)
        else:
            flat[prefix] = json.loads(json.dumps(node, sort_keys=True, default=str))

    walk("", tree)
    return flat


def content_sha256(value) -> str:
    """``"sha256:<hex>"`` of a JSON value's canonical text (a settings file's content, whatever its layout)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def data_identity(files: Iterable[str | os.PathLike]) -> str:
    """``"sha256:<hex>"`` of a dataset's annotation files: each file's name and bytes, in the given order."""
    from crat_ft.common.files import sha256_file

    h = hashlib.sha256()
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise UserError(f"annotation file {path} does not exist; check --data-root and the config's ann_file")
        h.update(f"{path.name}\0{sha256_file(path)}\0".encode())
    return "sha256:" + h.hexdigest()


def read_record(path: Path) -> dict | None:
    """The record at ``path``; None when there is none.

    Raises:
        UserError: the file exists but is not a JSON object.
    """
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} cannot be read ({exc}); choose a new --work-dir") from None
    if not isinstance(record, dict):
        raise UserError(
            f"{path}: expected a JSON object (a run record), got {type(record).__name__}; choose a new --work-dir"
        )
    return record


def write_record(path: Path, record: dict) -> None:
    """Write ``record`` to ``path`` atomically."""
    from crat_ft.common.files import atomic_write_text

    atomic_write_text(path, json.dumps(record, indent=1))


# entries a record carries for messages and for use, never compared: ``settings`` hold what they decide
NOT_COMPARED = ("command", "paths", "files")


def first_difference(recorded: dict, record: dict, ignore: Iterable[str] = ()) -> tuple[str, object, object] | None:
    """The first entry where two records differ, as ``(name, recorded value, this run's value)``; None if none.

    ``settings`` are compared key by key in this run's order (then keys only the recorded run has), a key
    missing on one side being :data:`UNSET`; then every other entry in this run's order (a dict entry key
    by key, as ``"inputs.data"``), except :data:`NOT_COMPARED` and ``ignore``.
    """
    skip = {"settings", *NOT_COMPARED, *ignore}

    def pairs(old: dict, new: dict, prefix: str = ""):
        for key in [*new, *(k for k in old if k not in new)]:
            if key in skip and not prefix:
                continue
            a, b = old.get(key, UNSET), new.get(key, UNSET)
            if prefix == "" and isinstance(a, dict) and isinstance(b, dict):
                yield from pairs(a, b, f"{key}.")
            elif a != b:
                yield f"{prefix}{key}", a, b

    old_settings, new_settings = recorded.get("settings") or {}, record.get("settings") or {}
    for key in [*new_settings, *(k for k in old_settings if k not in new_settings)]:
        a, b = old_settings.get(key, UNSET), new_settings.get(key, UNSET)
        if a != b:
            return key, a, b
    return next(pairs(recorded, record), None)


def show(value, limit: int = 100) -> str:
    """A recorded value as a message shows it: JSON, a sha256 cut to 12 hex digits, long values cut."""
    if isinstance(value, str) and value.startswith("sha256:"):
        return f"sha256:{value[7:19]}..."
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return f"{value[:12]}..."
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def difference_text(recorded: dict, record: dict, ignore: Iterable[str] = ()) -> str | None:
    """``"key=recorded, this run has key=new"`` for the first difference (:func:`first_difference`); None if none.

    A setting recorded by value names its file: ``crat.donor_groups=groups.json (sha256:1a2b...)``.
    """
    found = first_difference(recorded, record, ignore)
    if found is None:
        return None
    key, a, b = found

    def side(rec: dict, value) -> str:
        entry = (rec.get("files") or {}).get(key)
        if entry and value not in (None, UNSET):
            return f"{entry.get('path')} ({show(value)})"
        paths = rec.get("paths") or {}
        name = key.split(".", 1)[1] if key.startswith("inputs.") else None
        if name in paths:
            where = paths[name]
            return f"{show(value)} ({', '.join(map(str, where)) if isinstance(where, list) else where})"
        return show(value)

    return f"{key}={side(recorded, a)}, this run has {key}={side(record, b)}"


def runner_checkpoints(work_dir: Path) -> list[Path]:
    """The checkpoints mmengine's CheckpointHook wrote in ``work_dir`` (:data:`RUNNER_CHECKPOINTS`), by name."""
    return sorted((p for pattern in RUNNER_CHECKPOINTS for p in work_dir.glob(pattern)), key=lambda p: p.name)


def run_artifacts(work_dir: Path, outputs: Iterable[str]) -> list[str]:
    """The files of ``work_dir`` that belong to a run (finished or not): its record, its ``outputs``,
    ``last_checkpoint`` and the Runner's checkpoints."""
    names = [RECORD_FILE, *outputs, LAST_CHECKPOINT]
    return [n for n in names if (work_dir / n).exists()] + [p.name for p in runner_checkpoints(work_dir)]


def refuse_existing_run(work_dir: Path, command: str, outputs: Iterable[str]) -> None:
    """Without ``--resume`` a work dir must hold no run: its outputs and checkpoints would be replaced or mixed."""
    found = run_artifacts(work_dir, outputs)
    if found:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise UserError(
            f"--work-dir {work_dir} holds a {command} run ({shown}); pass --resume, or choose a new --work-dir"
        )


def check_resume(
    work_dir: Path,
    record: dict,
    outputs: Iterable[str],
    *,
    ignore: Iterable[str] = (),
    describe: dict[str, Callable[[dict, dict], str]] | None = None,
) -> None:
    """Refuse a ``--resume`` whose record differs from the one in ``work_dir``, naming the first difference.

    A work dir without a run starts afresh; one with a run but no record (an older crat-ft, copied
    checkpoints) is refused: nothing says what its checkpoints were trained with.

    Args:
        outputs: the command's output files (they count as a run).
        ignore: top-level entries that are not compared (they name things for messages).
        describe: ``{entry: f(recorded, record)}``: the words for a difference in that entry
            (default ``"key=recorded, this run has key=new"``).
    """
    found = run_artifacts(work_dir, outputs)
    if not found:
        return
    recorded = read_record(work_dir / RECORD_FILE)
    if recorded is None:
        raise UserError(
            f"--resume: {work_dir} holds {', '.join(found[:3])} but no {RECORD_FILE} saying what they were "
            "trained with; choose a new --work-dir"
        )
    found = first_difference(recorded, record, ignore)
    if found is None:
        return
    key = found[0]
    what = (describe or {}).get(key)
    said = what(recorded, record) if what else difference_text(recorded, record, ignore)
    raise UserError(
        f"--resume: {work_dir} was trained with {said}; rerun with the recorded settings, or choose a new --work-dir"
    )
