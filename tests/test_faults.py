"""Fault injection: SIGKILL at random moments, full and read-only disks, concurrent runs, bad resumes.

Every killed run is followed by the resume (or rerun) a user would type; the
result must equal an uninterrupted run's and leave no temporary file, segment
directory or lock behind.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_extract import _assert_same, _tables

from conftest import crat_ft_exe, demo_config_path, extract_args, kill_cli_after, retrain_args, run_cli
from crat_ft.common.paths import demo_config

pytestmark = pytest.mark.slow

KILLS = 3  # per command (seeded moments spread over the run; the suite's time allows three)
HEADS_OPTIONS = [
    "train.max_iters=6",
    "train.milestones=[]",
    "train.checkpoint_interval=1",
    "train.log_interval=1",
    "train.warmup_iters=2",
    "sampler.rois_per_batch=64",
    "sampler.masks_per_batch=8",
]


def _timed(*args) -> float:
    t0 = time.time()
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    return time.time() - t0


def _kill_times(seed: int, duration: float) -> list[float]:
    """Seeded moments spread over a run's duration (timed as the killed runs start: in the test server)."""
    return sorted(np.random.default_rng(seed).uniform(0.1, 1.0, KILLS) * duration)


def _leftovers(root: Path) -> list[str]:
    """Temporary files, segment directories and locks under ``root``."""
    bad = [p for p in root.rglob("*") if ".tmp" in p.name or p.name == ".segments" or p.name.endswith(".lock")]
    return sorted(str(p.relative_to(root)) for p in bad)


def _state(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_extract_killed_at_random_moments_resumes_to_the_same_cache(tiny_data, tiny_detector, tmp_path):
    args = [*extract_args(tiny_detector, tiny_data), "--max-images", 8, "--segment-images", 2]
    duration = _timed(*args, "--out", tmp_path / "full")
    reference = _tables(tmp_path / "full" / "index.h5")
    for k, t in enumerate(_kill_times(11, duration)):
        out = tmp_path / f"killed{k}"
        kill_cli_after([*args, "--out", out], t)
        r = run_cli(*args, "--out", out, "--resume")
        assert r.returncode == 0, f"kill at {t:.1f}s: {r.stderr[-2000:]}"
        _assert_same(reference, _tables(out / "index.h5"))
        assert _leftovers(out) == [], f"kill at {t:.1f}s"


def test_retrain_killed_at_random_moments_resumes_to_the_same_heads(tiny_cache, tmp_path):
    args = ["retrain-heads", demo_config("crat_synthetic.py"), "--cache", tiny_cache, "--cfg-options", *HEADS_OPTIONS]
    duration = _timed(*args[:4], "--work-dir", tmp_path / "full", *args[4:])
    reference = _state(tmp_path / "full" / "heads.pth")
    for k, t in enumerate(_kill_times(12, duration)):
        work = tmp_path / f"killed{k}"
        kill_cli_after([*args[:4], "--work-dir", work, *args[4:]], t)
        r = run_cli(*args[:4], "--work-dir", work, "--resume", *args[4:])
        assert r.returncode == 0, f"kill at {t:.1f}s: {r.stderr[-2000:]}"
        _assert_same_state(reference, _state(work / "heads.pth"))
        assert _leftovers(work) == [], f"kill at {t:.1f}s"
        for ckpt in work.glob("iter_*.pth"):  # what the resume kept is loadable
            torch.load(ckpt, weights_only=False)


@pytest.fixture(scope="module")
def heads_file(tiny_cache, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("faults-heads")
    r = run_cli(*retrain_args(tiny_cache, work), "--cfg-options", *HEADS_OPTIONS)
    assert r.returncode == 0, r.stderr[-3000:]
    return work / "heads.pth"


def test_export_killed_at_random_moments_reruns_to_the_same_checkpoint(tiny_detector, heads_file, tmp_path):
    args = ["export", demo_config_path(), tiny_detector, heads_file]
    duration = _timed(*args, "--out", tmp_path / "full" / "merged.pth")
    reference = _state(tmp_path / "full" / "merged.pth")
    for k, t in enumerate(_kill_times(13, duration)):
        out = tmp_path / f"killed{k}" / "merged.pth"
        kill_cli_after([*args, "--out", out], t)
        r = run_cli(*args, "--out", out)
        assert r.returncode == 0, f"kill at {t:.1f}s: {r.stderr[-2000:]}"
        _assert_same_state(reference, _state(out))
        assert _leftovers(out.parent) == [], f"kill at {t:.1f}s"


# --------------------------------------------------------------------------- full and read-only disks


@pytest.fixture
def small_fs(tmp_path):
    """Mount tmpfs file systems of a given size (root only); unmounted afterwards."""
    mounts = []

    def mount(name: str, size: str, read_only: bool = False) -> Path:
        point = tmp_path / name
        point.mkdir()
        opts = f"size={size}" + (",ro" if read_only else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the disk-fault tests need root")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], check=False)


def _one_line_exit_1(r) -> str:
    """The one error line of a run that ended with exit code 1 (progress lines may precede it)."""
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    lines = [line for line in r.stderr.strip().splitlines() if not line.startswith("extract-features shard")]
    assert len(lines) == 1 and lines[0].startswith("crat-ft: error: "), r.stderr[-3000:]
    return lines[0]


def test_disk_full_during_extraction_ends_in_one_line(tiny_data, tiny_detector, small_fs):
    disk = small_fs("full", "600k")
    out = disk / "cache"
    r = run_cli(
        *extract_args(tiny_detector, tiny_data),
        "--out",
        out,
        "--max-images",
        8,
        "--segment-images",
        2,
        "--mask-pos-per-class",
        400,
        "--skip-space-check",
    )
    line = _one_line_exit_1(r)
    assert line.startswith("crat-ft: error: cannot write ") and "No space left on device" in line, line
    assert [p.name for p in disk.rglob("*") if ".tmp" in p.name] == []
    assert not (out / "shard-00000-of-00001.h5").exists()


def test_space_check_stops_early_when_the_projection_does_not_fit(tiny_data, tiny_detector, tiny_cache, small_fs):
    shard_bytes = (tiny_cache.parent / "shard-00000-of-00001.h5").stat().st_size  # 12 images
    disk = small_fs("tight", f"{int(shard_bytes * 0.8) // 1024}k")
    out = disk / "cache"
    r = run_cli(
        *extract_args(tiny_detector, tiny_data),
        "--out",
        out,
        "--max-images",
        12,
        "--segment-images",
        2,
        "--mask-pos-per-class",
        400,
    )
    line = _one_line_exit_1(r)
    assert "not enough free space in" in line and "pass --skip-space-check" in line, line
    assert [p.name for p in disk.rglob("*") if ".tmp" in p.name] == []


def test_read_only_outputs_fail_before_any_work(tiny_data, tiny_detector, tiny_cache, heads_file, small_fs):
    ro = small_fs("ro", "1m", read_only=True)
    config = demo_config_path()
    commands = {
        "extract-features": [
            "extract-features",
            config,
            tiny_detector,
            "--data-root",
            tiny_data,
            "--out",
            ro / "cache",
        ],
        "retrain-heads": [
            "retrain-heads",
            demo_config("crat_synthetic.py"),
            "--cache",
            tiny_cache,
            "--work-dir",
            ro / "w",
        ],
        "export": ["export", config, tiny_detector, heads_file, "--out", ro / "merged.pth"],
        "evaluate": ["evaluate", config, tiny_detector, "--data-root", tiny_data, "--out", ro / "metrics.json"],
        "evaluate-results": [
            "evaluate-results",
            tiny_data / "annotations" / "lvis_v1_val.json",
            heads_file,
            "--out",
            ro / "metrics.json",
        ],
    }
    for name, args in commands.items():
        r = run_cli(*args)
        line = _one_line_exit_1(r)
        assert "is not writable (Read-only file system); choose a writable directory" in line, (name, line)
        assert r.stdout == "", (name, r.stdout)  # no metrics printed before the failure


# --------------------------------------------------------------------------- concurrent runs and resumes


def _start_and_wait_for_lock(args, lock: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        crat_ft_exe() + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (lock.exists() and lock.read_text().strip() == str(proc.pid)):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    return proc


def test_a_second_run_on_the_same_output_is_refused(tiny_data, tiny_detector, tiny_cache, tmp_path):
    out = tmp_path / "cache"
    args = [*extract_args(tiny_detector, tiny_data), "--out", out, "--max-images", 6]
    first = _start_and_wait_for_lock(args, out / ".shard-00000-of-00001.lock")
    r = run_cli(*args)
    assert r.returncode == 2 and r.stderr.strip() == (
        f"crat-ft: error: another crat-ft run (pid {first.pid}) is using --out {out} (shard 0/1); "
        "wait for it to finish or choose another output"
    ), r.stderr
    assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
    assert _leftovers(out) == []

    work = tmp_path / "work"
    # long enough to still hold the lock when the second run (seconds of imports) reaches it
    args = [*retrain_args(tiny_cache, work), "--cfg-options", *HEADS_OPTIONS, "train.max_iters=30",
            "train.checkpoint_interval=30"]  # fmt: skip
    first = _start_and_wait_for_lock(args, work / ".crat-ft.lock")
    r = run_cli(*args)
    assert r.returncode == 2 and f"another crat-ft run (pid {first.pid}) is using --work-dir {work}" in r.stderr, (
        r.stderr
    )
    assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
    assert (work / "heads.pth").exists() and _leftovers(work) == []


def test_resume_refuses_other_settings(tiny_data, tiny_detector, tmp_path):
    args = [*extract_args(tiny_detector, tiny_data), "--max-images", 4, "--segment-images", 2]
    out = tmp_path / "cache"
    assert run_cli(*args, "--out", out).returncode == 0
    other = tmp_path / "other.pth"
    ckpt = torch.load(tiny_detector, weights_only=False)
    ckpt["meta"]["note"] = "another file"
    torch.save(ckpt, other)
    r = run_cli(*extract_args(other, tiny_data), "--max-images", 4, "--segment-images", 2, "--out", out, "--resume")
    assert r.returncode == 2 and "--resume: " in r.stderr and "was made with checkpoint_sha256=" in r.stderr, r.stderr
    assert f"delete {out} (or choose a new --out) to start over" in r.stderr
    r = run_cli(*args[:-4], "--max-images", 3, "--segment-images", 2, "--out", out, "--resume")
    assert r.returncode == 2 and "was made with max_images=4, this run has max_images=3" in r.stderr, r.stderr

    # an unfinished extraction (segments and their recorded settings) resumed with another segment size
    seg_dir = out / ".segments" / "shard-00000-of-00001"
    seg_dir.mkdir(parents=True)
    from crat_ft.cache import cache_meta, open_cache

    with open_cache(out / "shard-00000-of-00001.h5") as f:
        settings = json.loads(cache_meta(f)["run_settings"])
    shutil.copy(out / "shard-00000-of-00001.h5", seg_dir / "seg-000000.h5")
    (seg_dir / "run.json").write_text(json.dumps(settings))
    for f in ("shard-00000-of-00001.h5", "index.h5"):
        (out / f).unlink()
    r = run_cli(*args[:-2], "--segment-images", 3, "--out", out, "--resume")
    assert r.returncode == 2 and "was made with segment_images=2, this run has segment_images=3" in r.stderr, r.stderr
    assert (seg_dir / "seg-000000.h5").exists()  # a refused resume deletes nothing


def test_resume_of_a_finished_cache_removes_what_a_killed_run_left(tiny_data, tiny_detector, tmp_path):
    args = [*extract_args(tiny_detector, tiny_data), "--max-images", 4, "--out", tmp_path / "c"]
    assert run_cli(*args).returncode == 0
    out = tmp_path / "c"
    (out / ".segments" / "shard-00000-of-00001").mkdir(parents=True)  # a kill right after the shard's rename
    shutil.copy(out / "shard-00000-of-00001.h5", out / ".segments" / "shard-00000-of-00001" / "seg-000000.h5")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / f".index.tmp-{dead.pid}.h5").write_bytes(b"half an index")  # a kill during the index build
    r = run_cli(*args, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert _leftovers(out) == []


def test_exploding_training_never_checkpoints_non_finite_weights(tiny_cache, tmp_path):
    """A huge learning rate: the run stops with one line, and every checkpoint it wrote is finite."""
    work = tmp_path / "w"
    r = run_cli(
        *retrain_args(tiny_cache, work), "--cfg-options", *HEADS_OPTIONS, "train.lr=1e38", "train.warmup_iters=1"
    )
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert re.match(
        r"crat-ft: error: non-finite (loss|gradient|weights after the optimizer step) at iteration \d+ \(", line
    ), line
    assert "loss_cls=" in line, line  # the loss terms of that iteration
    assert "holds the last finite weights" in line and "resuming with the same settings repeats the same step" in line
    assert not (work / "heads.pth").exists()
    for ckpt in work.glob("iter_*.pth"):
        state = torch.load(ckpt, weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), ckpt


def test_cfg_options_reach_export_and_evaluate_with_heads(tiny_data, tiny_detector, heads_file, tmp_path):
    wrong = ["--cfg-options", "model.roi_head.bbox_head.num_classes=41", "model.roi_head.mask_head.num_classes=41"]
    expected = "has 40 classes (roi_head.bbox_head.fc_reg) but the config has roi_head.bbox_head.num_classes=41"
    r = run_cli("export", demo_config_path(), tiny_detector, heads_file, "--out", tmp_path / "m.pth", *wrong)
    assert r.returncode == 2 and expected in r.stderr, r.stderr
    r = run_cli(
        "evaluate",
        demo_config_path(),
        tiny_detector,
        "--heads",
        heads_file,
        "--data-root",
        tiny_data,
        "--out",
        tmp_path / "m.json",
        *wrong,
    )
    assert r.returncode == 2 and expected in r.stderr, r.stderr
    assert not (tmp_path / "m.pth").exists() and not (tmp_path / "m.json").exists()


def test_crafted_checkpoints_are_refused_by_every_command(tiny_data, tiny_detector, heads_file, tmp_path):
    from test_checkpoint import _exploits

    target = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "meta": {"x": _exploits(target)["rebuild_from_type_v2(open)"]}}, evil)
    config = demo_config_path()
    runs = {
        "extract-features": ["extract-features", config, evil, "--data-root", tiny_data, "--out", tmp_path / "c"],
        "evaluate": ["evaluate", config, evil, "--data-root", tiny_data, "--out", tmp_path / "m.json"],
        "export CHECKPOINT": ["export", config, evil, heads_file, "--out", tmp_path / "m.pth"],
        "export HEADS": ["export", config, tiny_detector, evil, "--out", tmp_path / "m.pth", "--trust-checkpoint"],
    }
    for name, args in runs.items():
        r = run_cli(*args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, (name, r.stderr[-2000:])
        assert "contains Python objects outside crat-ft's safe allow-list (getattr(getattr, '__self__'))" in r.stderr, (
            name
        )
        if name == "export HEADS":  # a heads file is never trusted: no advice to trust it
            assert "--trust-checkpoint" not in r.stderr and "files written by crat-ft hold only tensors" in r.stderr
        assert not target.exists(), name


def test_counts_are_validated_by_the_cli(tiny_data, tiny_detector, tmp_path):
    r = run_cli(*extract_args(tiny_detector, tiny_data), "--out", tmp_path / "c", "--max-images", -5)
    assert r.returncode == 2 and "Invalid value for '--max-images': -5 is not in the range x>=1." in r.stderr, r.stderr
    r = run_cli("extract-features", demo_config_path(), tiny_detector, "--out", tmp_path / "c", "--neg-per-image", -1)
    assert r.returncode == 2 and "'--neg-per-image': -1 is not in the range x>=0." in r.stderr, r.stderr
    r = run_cli(
        "export", demo_config_path(), tiny_detector, tiny_detector, "--out", tmp_path / "m.pth", "--tau-norm", -1
    )
    assert r.returncode == 2 and "'--tau-norm': -1.0 is not in the range x>=0." in r.stderr, r.stderr
    assert not (tmp_path / "c").exists()


def test_evaluate_cleans_a_commit_interrupted_by_a_kill(tmp_path):
    from crat_ft.common.files import commit_together, recover_journal

    out, csv = tmp_path / "m.json", tmp_path / "m_per_class.csv"
    (tmp_path / "a").write_text("csv")
    (tmp_path / "b").write_text("json")
    journal = tmp_path / ".m.json.commit"
    commit_together([(tmp_path / "a", csv), (tmp_path / "b", out)], journal)
    assert csv.read_text() == "csv" and out.read_text() == "json" and not journal.exists()
    # a kill between the two renames: the new CSV is in place, the JSON is not
    journal.write_text(f"{csv}\n{out}")
    out.unlink()
    recover_journal(journal)
    assert not csv.exists() and not journal.exists()


# --------------------------------------------------------------------------- concurrent evaluations


def _detections(directory: Path) -> dict:
    """The detections an evaluation spilled under ``directory``, in a fixed order."""
    from crat_ft.evaluation.detections import load_spilled

    (spill,) = [p for p in directory.glob(".*.detections/run-*") if p.is_dir()]  # not its lock file
    dets = load_spilled(spill)
    # scores may differ in their last bits with the thread count: sort on rounded keys
    box = np.round(dets.bbox, 2)
    order = np.lexsort((box[:, 1], box[:, 0], -np.round(dets.score, 5), dets.category_id, dets.image_id))
    rles = [bytes(dets.rle[dets.rle_offset[i] : dets.rle_offset[i + 1]]) for i in order]
    return {"image_id": dets.image_id[order], "category_id": dets.category_id[order],
            "score": dets.score[order], "bbox": dets.bbox[order], "rle": rles}  # fmt: skip


def test_evaluate_jobs_runs_detectors_with_their_own_options_side_by_side(tiny_data, tiny_detector, tmp_path):
    from crat_ft.pipeline.evaluate import evaluate_detector
    from crat_ft.pipeline.evaluate_jobs import evaluate_jobs

    config = demo_config_path()
    options = {"300 per image": [], "20 per image": ["model.test_cfg.rcnn.max_per_img=20"]}
    jobs = {
        name: dict(
            config=config,
            checkpoint=tiny_detector,
            out=tmp_path / "jobs" / str(k) / "metrics.json",
            data_root=tiny_data,
            cfg_options=opts,
            outfile_prefix=tmp_path / "jobs" / str(k) / "results",
        )  # fmt: skip
        for k, (name, opts) in enumerate(options.items())
    }
    evaluate_jobs(jobs)
    # each job got its own options: 300 and 20 detections on each of the 10 val images
    counts = [np.bincount([d["image_id"] for d in json.loads((job["out"].parent / "results.bbox.json").read_text())])
              for job in jobs.values()]  # fmt: skip
    assert [c[c > 0].tolist() for c in counts] == [[300] * 10, [20] * 10]
    for k, job in enumerate(jobs.values()):
        alone = evaluate_detector(**dict(job, out=tmp_path / "alone" / str(k) / "metrics.json", outfile_prefix=None))
        written = json.loads(job["out"].read_text())
        assert written.pop("matches").keys() == {"bbox", "segm"} and written == alone


def test_side_by_side_evaluations_equal_one_by_one_and_a_failed_job_raises_its_error(
    tiny_data, tiny_detector, heads_file, tmp_path, capfd, monkeypatch
):
    from crat_ft.common.errors import UserError
    from crat_ft.evaluation.metric import CratLVISMetric
    from crat_ft.pipeline.evaluate import evaluate_detector
    from crat_ft.pipeline.evaluate_jobs import evaluate_side_by_side

    # keep each evaluation's detections beside its metrics, to compare them (the forked jobs inherit this)
    monkeypatch.setattr(CratLVISMetric, "_remove_spill", lambda self: None)
    config = demo_config_path()
    jobs = {
        name: (heads, tmp_path / "side-by-side" / name / "metrics.json")
        for name, heads in (("stage1", None), ("retrained", heads_file), ("missing", tmp_path / "nope.pth"))
    }
    with open(tmp_path / "frameworks.log", "w") as log, pytest.raises(UserError) as failed:
        evaluate_side_by_side(config, tiny_detector, jobs, data_root=tiny_data, log=log)
    with pytest.raises(UserError) as alone:
        evaluate_detector(config, tiny_detector, tmp_path / "m.json", data_root=tiny_data, heads=tmp_path / "nope.pth")
    assert str(failed.value) == str(alone.value) and "nope.pth" in str(failed.value)
    assert not jobs["missing"][1].parent.exists() or not any(jobs["missing"][1].parent.iterdir())
    # one progress line counts the images of all three jobs (10 val images each); mmengine's logs went to the file
    err = capfd.readouterr().err
    assert "evaluate (stage1, retrained, missing): 20/30 images" in err, err
    assert "Load checkpoint from" in (tmp_path / "frameworks.log").read_text()
    # like with like: one by one at the thread count each forked job had (the thread count moves a float32
    # convolution's last bits, and with them, on torch 2.1, a mask pixel now and then)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // len(jobs)))
    try:
        for name in ("stage1", "retrained"):
            heads, out = jobs[name]
            one_by_one = tmp_path / "one-by-one" / name / "metrics.json"
            alone = evaluate_detector(config, tiny_detector, one_by_one, data_root=tiny_data, heads=heads)
            written = json.loads(out.read_text())
            assert written.pop("matches") == json.loads(one_by_one.read_text())["matches"]  # the same detections
            assert written == alone
    finally:
        torch.set_num_threads(threads)
    for name in ("stage1", "retrained"):
        heads, out = jobs[name]
        one_by_one = tmp_path / "one-by-one" / name / "metrics.json"
        assert (out.parent / "metrics_per_class.csv").read_text() == (
            one_by_one.parent / "metrics_per_class.csv"
        ).read_text()
        ours, theirs = _detections(out.parent), _detections(one_by_one.parent)
        assert len(ours["score"]) == 3000  # 300 per image
        assert ours["rle"] == theirs["rle"]
        for column in ("image_id", "category_id", "score", "bbox"):
            np.testing.assert_allclose(ours[column], theirs[column], rtol=1e-5, atol=1e-6, err_msg=f"{name} {column}")
    # the two models' detections differ: the comparison above is not between equal inputs
    assert not np.allclose(
        _detections(jobs["stage1"][1].parent)["score"], _detections(jobs["retrained"][1].parent)["score"]
    )


def _grandchild(parent: int, ready: Path) -> None:
    from crat_ft.pipeline.evaluate_jobs import die_with_parent

    die_with_parent(parent)
    ready.write_text(str(os.getpid()))
    time.sleep(120)


def _child(ready: Path) -> None:
    import multiprocessing

    proc = multiprocessing.get_context("fork").Process(target=_grandchild, args=(os.getpid(), ready))
    proc.start()
    proc.join()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in state  # a zombie nobody reaped has ended


def test_a_side_by_side_job_ends_when_its_parent_is_killed(tmp_path):
    import multiprocessing

    ready = tmp_path / "pid"
    child = multiprocessing.get_context("fork").Process(target=_child, args=(ready,))
    child.start()
    deadline = time.time() + 30
    while not ready.exists() or not ready.read_text():
        assert time.time() < deadline, "the job never started"
        time.sleep(0.05)
    job = int(ready.read_text())
    assert _alive(job)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    deadline = time.time() + 10
    while _alive(job):
        assert time.time() < deadline, "the job outlived its killed parent"
        time.sleep(0.05)
