"""What decides the heads of ``retrain-heads`` (:mod:`crat_ft.common.run_record`): the run record, the refusal
of a rerun or of a resume with other settings, and the record a run would write (:func:`planned_record`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from crat_ft.pipeline.retrain_builders import open_cache_and_detector

HEADS_FILE = "heads.pth"


RUN_FILE = "run.json"  # crat_ft.common.run_record.RECORD_FILE


def run_artifacts(work_dir: Path) -> list[str]:
    """The files in ``work_dir`` that belong to a retrain-heads run (finished or not)."""
    from crat_ft.common.run_record import run_artifacts as artifacts

    return artifacts(work_dir, (HEADS_FILE,))


def refuse_existing_run(work_dir: Path) -> None:
    """Without ``--resume`` a work dir must hold no run: its heads and checkpoints would be replaced or mixed."""
    from crat_ft.common.run_record import refuse_existing_run as refuse

    refuse(work_dir, "retrain-heads", (HEADS_FILE,))


def run_record(ft: dict, reader, cache, detector_cfg, detector_sha: str, world_size: int) -> dict:
    """What decides a run's heads (a :mod:`crat_ft.common.run_record` record): the fine-tune settings, the
    donor groups by content, the cache, the detector and the world size.

    ``crat.donor_groups`` is read here, once: the settings hold its content's sha256 and ``files`` its
    path and content, which the run trains with (:func:`build_heads`). A resume must match every entry
    (:func:`check_resume`); ``cache_path`` is kept for the message only.
    """
    from crat_ft.cache import cache_identity, config_hash
    from crat_ft.engine.config import model_cfg_text
    from crat_ft.heads.ft_config import read_donor_groups, run_settings

    path = ft["crat"].get("donor_groups")
    groups = read_donor_groups(path)
    settings = run_settings(ft, groups)
    files = {}
    if groups is not None:
        files["crat.donor_groups"] = {"path": str(Path(path).resolve()), "content": groups}
    return {
        "command": "retrain-heads",
        "settings": settings,
        "files": files,
        "ft_config_hash": config_hash(json.dumps(settings, sort_keys=True)),
        "cache_identity": cache_identity(reader),
        "cache_path": str(Path(cache).resolve()),
        "detector_sha256": detector_sha,
        "detector_config_hash": config_hash(model_cfg_text(detector_cfg)),
        "world_size": world_size,
    }


def recorded_donor_groups(record: dict) -> dict[str, str] | None:
    """The donor groups a run record holds (the content of ``crat.donor_groups``); None without groups."""
    entry = (record.get("files") or {}).get("crat.donor_groups")
    return entry["content"] if entry else None


# the words of a resume check for the entries beside the settings (crat_ft.common.run_record.check_resume)
_DESCRIBE = {
    "cache_identity": lambda old, new: (
        f"another feature cache ({old.get('cache_path')}) than --cache {new['cache_path']}"
    ),
    "detector_sha256": lambda old, new: "another detector checkpoint than the one this cache was made from",
    "detector_config_hash": lambda old, new: "another detector config (its model section differs)",
    "world_size": lambda old, new: f"{old.get('world_size')} process(es), this run has {new['world_size']}",
}
# not compared: the path is named in messages only, the settings' hash follows the settings
NOT_COMPARED = ("cache_path", "ft_config_hash")


def record_difference(recorded: dict, record: dict) -> str | None:
    """The first difference between two records of retrain-heads, in the words of :func:`check_resume`;
    None when the heads of both would be the same."""
    from crat_ft.common.run_record import difference_text, first_difference

    found = first_difference(recorded, record, NOT_COMPARED)
    if found is None:
        return None
    what = _DESCRIBE.get(found[0])
    return what(recorded, record) if what else difference_text(recorded, record, NOT_COMPARED)


def check_resume(work_dir: Path, record: dict) -> None:
    """Refuse a ``--resume`` whose settings, donor groups, cache or detector differ from the run recorded
    in ``work_dir`` (:func:`crat_ft.common.run_record.check_resume`).

    A work dir without any run starts afresh; one with a run but no record (an
    older crat-ft, or a copied checkpoint) is refused, since nothing says what
    its checkpoints were trained with.
    """
    from crat_ft.common.run_record import check_resume as check

    check(work_dir, record, (HEADS_FILE,), ignore=NOT_COMPARED, describe=_DESCRIBE)


def planned_record(
    ft_config: str | os.PathLike,
    cache: str | os.PathLike,
    *,
    cfg_options: Iterable[str] | dict = (),
    trust_checkpoint: bool = False,
) -> dict:
    """The run record :func:`retrain_heads` with these arguments would write (:func:`run_record`); the demo
    reuses a work dir's heads only when its ``run.json`` has no difference from it (:func:`record_difference`)."""
    from crat_ft.common.dist import world_size
    from crat_ft.heads.ft_config import load_ft_config
    from crat_ft.heads.registry import register_all

    register_all()
    ft = load_ft_config(ft_config, cfg_options)
    reader, _, _, detector_cfg, _, sha = open_cache_and_detector(ft, cache, trust_checkpoint)
    return run_record(ft, reader, cache, detector_cfg, sha, world_size())
