"""``crat-ft ablate``: the table equals ``compare`` by hand, a killed ablation continues to the same rows, a
changed arm is refused, torchrun gives one process's table, and a bad ARMS file changes nothing.

The tiny detector (4 iterations) scores no true positive on the 10 val images, so its AP differences are
0; the comparisons are still checked entry for entry, their class-oracle AP is not 0.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import crat_ft_exe, run_cli, start_cli
from crat_ft.common.paths import demo_config

# both arms: 8 steps, a checkpoint every 2 (a killed run has one to continue from)
FAST = (
    '{"train.max_iters": 8, "train.milestones": [], "train.warmup_iters": 1, "train.checkpoint_interval": 2, '
    '"train.log_interval": 1, "sampler.rois_per_batch": 64, "sampler.masks_per_batch": 8}'
)


def _arms(path: Path, crat_extra: str = "") -> Path:
    """A 2-arm ARMS file: plain and CRAT (``crat_extra``: more of its options, e.g. ``, "crat.box_lambda": 0.002``)."""
    path.write_text(
        f"_fast = {FAST}\n"
        "arms = [\n"
        f"    dict(name='plain', ft_config='{demo_config('baseline_synthetic.py')}', cfg_options=_fast),\n"
        f"    dict(name='crat', ft_config='{demo_config('crat_synthetic.py')}', cfg_options={{**_fast{crat_extra}}}),\n"
        "]\n"
    )
    return path


def _ablate_args(arms: Path, cache: Path, work: Path, data: Path) -> list:
    return ["ablate", arms, "--cache", cache.parent, "--work-dir", work, "--data-root", data, "--seeds", "0,1"]


def _run(args, nproc: int = 1) -> subprocess.CompletedProcess:
    """``crat-ft args`` with one thread, in one process or under torchrun in ``nproc`` (as tests/test_distributed.py)."""
    import socket

    if nproc == 1:
        return run_cli(*args, env={"OMP_NUM_THREADS": "1"})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [str(Path(sys.executable).parent / "torchrun"), f"--nproc-per-node={nproc}", f"--master-port={port}",
               *crat_ft_exe(), *map(str, args)]  # fmt: skip
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)


def _rows(work: Path) -> list[dict]:
    """The comparisons of ``W/ablation.json`` without their times."""
    return [
        {k: v for k, v in row.items() if k != "seconds"}
        for row in json.loads((work / "ablation.json").read_text())["rows"]
    ]


@pytest.fixture(scope="module")
def ablated(tiny_data, tiny_cache, tmp_path_factory):
    """An uninterrupted 2-arm x 2-seed ablation: its ARMS file, work dir and console output."""
    base = tmp_path_factory.mktemp("ablate")
    arms, work = _arms(base / "arms.py"), base / "W"
    r = run_cli(*_ablate_args(arms, tiny_cache, work, tiny_data))
    assert r.returncode == 0, r.stderr[-3000:]
    return arms, work, r.stdout


@pytest.mark.slow
def test_the_table_equals_compare_by_hand(ablated, tiny_data, tmp_path):
    arms, work, stdout = ablated
    table = json.loads((work / "ablation.json").read_text())
    assert [(r["a"], r["b"]) for r in table["rows"]] == [("plain", "crat")] and table["seeds"] == [0, 1]
    md = (work / "ablation.md").read_text()
    assert md.count("| crat − plain |") == 2 and (work / "ablation.png").stat().st_size > 0  # the table, the errors
    assert "crat - plain rare bbox AP +0.0 [+0.0, +0.0]: not distinguishable from zero on the mean of 2 seeds" in stdout
    gt = tiny_data / "annotations" / "lvis_v1_val.json"
    out = tmp_path / "compare.json"
    r = run_cli("compare", gt, work / "s{seed}" / "plain", work / "s{seed}" / "crat", "--seeds", "0,1", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    by_hand = json.loads(out.read_text())
    row = table["rows"][0]
    assert row["images"] == by_hand["images"] == 10
    for iou in ("bbox", "segm"):
        assert row["delta"][iou] == {k: by_hand[iou][k] for k in ("APr", "APc", "APf", "AP") if k in by_hand[iou]}
        assert row["oracle"][iou]["AP"]["a"] > 0  # the class-oracle AP is measured
    for arm in ("plain", "crat"):
        for s in (0, 1):
            assert (
                table["runs"][arm][str(s)]["metrics"]["bbox"]
                == json.loads((work / f"s{s}" / arm / "metrics.json").read_text())["bbox"]
            )


@pytest.mark.slow
def test_a_killed_ablation_continues_to_the_rows_of_an_uninterrupted_one(ablated, tiny_data, tiny_cache, tmp_path):
    """SIGKILL once the second arm has a checkpoint; the rerun reuses the first arm and continues the second."""
    arms, uninterrupted, _ = ablated
    work = tmp_path / "W"
    proc = start_cli(*_ablate_args(arms, tiny_cache, work, tiny_data))
    deadline = time.time() + 600
    while not (work / "s0" / "crat" / "iter_2.pth").exists():
        assert proc.poll() is None, "the ablation ended before its second arm was killed"
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (work / "s0" / "crat" / "heads.pth").exists()  # killed inside the second arm's retraining
    first = work / "s0" / "plain" / "heads.pth"
    stamp = first.stat().st_mtime_ns
    r = run_cli(*_ablate_args(arms, tiny_cache, work, tiny_data))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"seed 0 plain: retrained before, reusing {first}" in r.stdout and first.stat().st_mtime_ns == stamp
    assert _rows(work) == _rows(uninterrupted)


@pytest.mark.slow
def test_a_changed_arm_is_refused(ablated, tiny_data, tiny_cache, tmp_path):
    arms, work, _ = ablated
    before = {p: p.stat().st_mtime_ns for p in work.rglob("*")}
    changed = _arms(tmp_path / "arms.py", ', "crat.box_lambda": 0.002')
    r = run_cli(*_ablate_args(changed, tiny_cache, work, tiny_data))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(
        f"crat-ft: error: arm 'crat' (seed 0): {work / 's0' / 'crat'} was run with crat.box_lambda=0.001, this run "
        "has crat.box_lambda=0.002; restore the arm's definition"
    ), r.stderr
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*")} == before


@pytest.mark.slow
def test_a_second_ablation_of_the_work_dir_is_refused(ablated, tiny_data, tiny_cache):
    """While one ablation holds W's lock, another is one line naming its pid, and W is unchanged."""
    from crat_ft.common.files import RunLock
    from crat_ft.pipeline.ablate import LOCK_FILE

    arms, work, _ = ablated
    before = {p: p.stat().st_mtime_ns for p in work.rglob("*")}
    with RunLock(work / LOCK_FILE, "the test"):
        r = run_cli(*_ablate_args(arms, tiny_cache, work, tiny_data))
        after = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.name != LOCK_FILE}
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr == (
        f"crat-ft: error: another crat-ft run (pid {os.getpid()}) is using --work-dir {work}; wait for it to finish "
        "or choose another output\n"
    )
    assert after == before


@pytest.mark.slow
def test_under_torchrun_the_table_equals_one_process(ablated, tiny_data, tiny_detector, tiny_cache, tmp_path):
    """2 gloo processes retrain with DDP (other heads than one process's) and evaluate distributed: their
    evaluation equals a one-process `evaluate --heads` of the same heads, their table `compare` by hand."""
    arms, _, _ = ablated
    work = tmp_path / "W"
    r = _run(_ablate_args(arms, tiny_cache, work, tiny_data), nproc=2)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert r.stdout.count("| crat − plain |") == 1  # rank 0 alone reports
    assert json.loads((work / "s0" / "crat" / "run.json").read_text())["world_size"] == 2
    out = tmp_path / "one" / "m.json"
    heads = work / "s1" / "crat" / "heads.pth"
    one = _run(["evaluate", demo_config(), tiny_detector, "--heads", heads, "--data-root", tiny_data, "--out", out])
    assert one.returncode == 0, one.stderr[-3000:]
    metrics = json.loads((work / "s1" / "crat" / "metrics.json").read_text())
    assert {k: v for k, v in json.loads(out.read_text()).items() if k != "matches"} == {
        k: v for k, v in metrics.items() if k != "matches"
    }
    gt = tiny_data / "annotations" / "lvis_v1_val.json"
    r = _run(["compare", gt, work / "s{seed}" / "plain", work / "s{seed}" / "crat", "--seeds", "0,1", "--out",
              tmp_path / "c.json"])  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    by_hand = json.loads((tmp_path / "c.json").read_text())
    assert _rows(work)[0]["delta"]["segm"] == {k: by_hand["segm"][k] for k in ("APr", "APc", "APf", "AP")
                                               if k in by_hand["segm"]}  # fmt: skip


@pytest.mark.parametrize(
    "arm, message",
    [
        ("dict(name='a', ft_config='{crat}', cfg_option={{}})",
         r"ARMS file \S+: arm 0: unknown key\(s\) \['cfg_option'\]; known keys are \['name', 'ft_config'"),
        ("dict(name='a', ft_config='{crat}', cfg_options={{'heads.loss_bbox_weight': '1 + {{b.mass_box}}'}})",
         r"arm 0 \(a\): \{b.mass_box\} should name an earlier arm and one of \['mass_box', 'mass_mask'\]; list arm 'b'"),
    ],
)  # fmt: skip
def test_a_bad_arms_file_is_one_line_and_writes_nothing(arm, message, tmp_path):
    import re

    arms = tmp_path / "arms.py"
    crat = demo_config("crat_synthetic.py")
    arms.write_text(f"arms = [{arm.format(crat=crat)}, dict(name='b', ft_config='{crat}')]\n")
    work = tmp_path / "W"
    r = run_cli("ablate", arms, "--cache", tmp_path / "no-cache", "--work-dir", work)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and re.search(message, r.stderr), r.stderr
    assert not work.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["arms.py"]


def test_measured_values_enter_options_exactly():
    from crat_ft.pipeline.ablate_arms import evaluate_expression

    r = 0.1234567890123456789
    assert evaluate_expression("1 + {crat.mass_box}", lambda arm, q: r) == 1 + r
    assert evaluate_expression("-(2 * {a.x}) / 4", lambda arm, q: 3.0) == -1.5
    with pytest.raises(ValueError, match="is not arithmetic"):
        evaluate_expression("__import__('os')", lambda arm, q: 0.0)


def test_a_resumed_runs_mass_windows_count_once(tmp_path):
    """crat.log_mass windows: the mean over logged iterations; a window a resumed run logs again counts once."""
    from crat_ft.pipeline.ablate import measured_mass

    runs = {"20260101_000000": [(1, 0.1, 0.5), (2, 0.3, 0.7)], "20260101_000100": [(2, 0.3, 0.7), (3, 0.5, 0.9)]}
    for name, lines in runs.items():
        (tmp_path / name / "vis_data").mkdir(parents=True)
        (tmp_path / name / "vis_data" / "scalars.json").write_text(
            "".join(json.dumps({"lr": 0.01, "mass_box": b, "mass_mask": m, "iter": i}) + "\n" for i, b, m in lines)
        )
    assert measured_mass(tmp_path) == pytest.approx({"mass_box": 0.3, "mass_mask": 0.7}, abs=1e-15)
