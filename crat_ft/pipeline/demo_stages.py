"""The demo's stages (:mod:`crat_ft.pipeline.demo`): each reused on a rerun only when its output exists and
its run record (:mod:`crat_ft.common.run_record`) matches what this invocation would write, otherwise redone
or continued, the console saying why in one line; the evaluations run side by side, each with its record.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from crat_ft.synthetic.variants import DemoDataSpec


def say(msg: str) -> None:
    print(f"[crat-ft demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def plan_stage(
    what: str, out: Path, done, wanted: dict, recorded: dict | None, *, differ=None, clear=None, say_new: bool = True
):
    """Decide one stage of a chain: reuse it, continue it, or (re)make it. Exact or redone.

    - the record matches ``wanted`` and every ``done`` file exists: reused (said);
    - the record matches and the output is missing: a run killed with these settings, continued;
    - ``out`` holds anything else (another record, or none): ``clear`` (default ``out``) is removed
      and the stage redone, the console saying why in one line;
    - nothing there: made.

    Args:
        out: what the stage writes (a directory, or its main file).
        done: the file, or files, that exist once the stage finished.
        wanted: the record this invocation would write.
        recorded: the record found (None: none).
        differ: ``f(recorded, wanted)``: the first difference in words, or None
            (default :func:`crat_ft.common.run_record.difference_text`).
        clear: what to remove before a redo (default ``[out]``).
        say_new: say ``what`` when the stage is made where nothing was (the caller may say it for several).

    Returns:
        None (reuse), ``"resume"`` or ``"run"``.
    """
    import shutil

    from crat_ft.common.run_record import difference_text

    done = [done] if isinstance(done, Path) else list(done)
    why = None if recorded is None else (differ or difference_text)(recorded, wanted)
    if recorded is not None and why is None:
        if all(p.exists() for p in done):
            say(f"{what}: done before, reusing {done[0]}")
            return None
        say(f"{what}: continuing the unfinished run in {out}")
        return "resume"
    holds = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if not holds and recorded is None:
        if say_new:
            say(what)
        return "run"
    say(f"{what}: redoing, {out} " + (f"was made with {why}" if why else "holds no record of what made it"))
    for path in clear if clear is not None else [out]:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    return "run"


def run_stage(what: str, out: Path, done, wanted: dict, recorded: dict | None, fn, *, differ=None, log=None) -> bool:
    """One stage of a chain: :func:`plan_stage`, then ``fn(resume)`` unless reused. Returns whether it ran.

    With ``log`` (an open text file), what the stage prints on stdout goes
    there: mmengine's loggers write their console output to ``sys.stdout`` as
    it is when they are created, so a Runner built inside the stage logs to the
    file. Progress bars (stderr) and this function's lines stay on the console.
    """
    action = plan_stage(what, out, done, wanted, recorded, differ=differ)
    if action is None:
        return False
    t0 = time.time()
    with contextlib.redirect_stdout(log) if log is not None else contextlib.nullcontext():
        fn(action == "resume")
    say(f"{what}: done in {time.time() - t0:.0f} s")
    return True


def data_record(spec: DemoDataSpec) -> dict:
    """The run record of the demo's data: the generator's spec (the data is a function of it)."""
    from dataclasses import asdict

    return {"command": "make-demo-data", "settings": asdict(spec)}


EVALUATION_RECORD = "evaluation.json"


def evaluation_record(config, options, checkpoint, heads, data: Path) -> dict:
    """The run record of one evaluation: the config and its options, and by sha256 the config file, the
    detector, the heads (if any) and the val annotations."""
    from crat_ft.common.files import sha256_file
    from crat_ft.common.run_record import data_identity

    return {
        "command": "evaluate",
        "settings": {"config": Path(config).name, "cfg_options": list(options)},
        "inputs": {
            "config": "sha256:" + sha256_file(config),
            "checkpoint": "sha256:" + sha256_file(checkpoint),
            "heads": None if heads is None else "sha256:" + sha256_file(heads),
            "data": data_identity([data / "annotations" / "lvis_v1_val.json"]),
        },
        "paths": {"checkpoint": str(checkpoint), "heads": None if heads is None else str(heads)},
    }


def evaluate_stages(jobs: dict[str, dict], data: Path, log) -> None:
    """Evaluate each job (``evaluate_jobs``' keyword arguments) whose output and record are not this
    invocation's, side by side; write each one's record (:data:`EVALUATION_RECORD`) beside its metrics."""
    from crat_ft.common.run_record import read_record, write_record
    from crat_ft.pipeline.evaluate_jobs import evaluate_jobs

    todo, records = {}, {}
    for name, job in jobs.items():
        out = Path(job["out"])
        record_file = out.with_name(EVALUATION_RECORD)
        wanted = evaluation_record(
            job["config"], job.get("cfg_options") or [], job["checkpoint"], job.get("heads"), data
        )
        action = plan_stage(
            f"evaluating {name}", out, (out, out.with_name("results.segm.json")), wanted, read_record(record_file),
            clear=[record_file], say_new=False,
        )  # fmt: skip
        if action is not None:
            todo[name], records[name] = job, wanted
    if not todo:
        return
    what = f"evaluating {', '.join(todo)} (LVIS protocol, val split)"
    say(what)
    t0 = time.time()
    with contextlib.redirect_stdout(log):
        evaluate_jobs(todo, log=log)
    for name, job in todo.items():
        write_record(Path(job["out"]).with_name(EVALUATION_RECORD), records[name])
    say(f"{what}: done in {time.time() - t0:.0f} s")


def load_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)
