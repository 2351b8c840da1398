"""Commands under ``torchrun``: two CPU processes (gloo) give what one process gives.

torchrun starts each process with ``OMP_NUM_THREADS=1``; the one-process runs here use one
thread too, since the thread count moves a score in its last bits and the comparison is exact.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_TRAIN_OPTIONS, crat_ft_exe, demo_config_path, extract_args, run_cli

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, nproc: int = 1, timeout: int = 900, env=None) -> subprocess.CompletedProcess:
    """``crat-ft args`` in one process, or under torchrun in ``nproc``, with one thread each."""
    if nproc == 1:
        return run_cli(*args, timeout=timeout, env={"OMP_NUM_THREADS": "1", **(env or {})})
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), f"--nproc-per-node={nproc}", f"--master-port={_free_port()}", *crat_ft_exe(),
               *map(str, args)]  # fmt: skip
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def _detections_evaluated(log: Path) -> int:
    """How many detections the metric evaluated, from the line it logs (the last run's, if several)."""
    import re

    counts = re.findall(r"LVIS metrics \((\d+) detections\)", log.read_text())
    assert counts, log.read_text()[-2000:]
    return int(counts[-1])


def _evaluate(nproc: int, detector, data, out: Path) -> Path:
    """``crat-ft evaluate`` in ``nproc`` processes, checked for what every evaluation must do; ``out``."""
    r = _run(["evaluate", demo_config_path(), detector, "--data-root", data, "--out", out], nproc)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert r.stdout.count("LVIS v1 metrics (%)") == 1, r.stdout  # rank 0 alone reports
    # every image's 300 detections reached rank 0's evaluation
    assert _detections_evaluated(out.with_suffix(".log")) == 3000
    kept = ("m.json", "m_per_class.csv", "m.log", "m_matches_bbox.npz", "m_matches_segm.npz")
    leftovers = [p.name for p in out.parent.iterdir() if p.name not in kept]
    assert leftovers == [], leftovers
    return out


@pytest.fixture(scope="module")
def one_process_metrics(tiny_data, tiny_detector, tmp_path_factory) -> Path:
    """``crat-ft evaluate`` of the tiny detector in one process (one thread): its metrics JSON."""
    return _evaluate(1, tiny_detector, tiny_data, tmp_path_factory.mktemp("np1") / "m.json")


def test_evaluate_under_torchrun_equals_one_process(tiny_data, tiny_detector, one_process_metrics, tmp_path):
    outs = {1: one_process_metrics, 2: _evaluate(2, tiny_detector, tiny_data, tmp_path / "np2" / "m.json")}
    one, two = (json.loads(outs[n].read_text()) for n in (1, 2))
    assert set(one) == {"bbox", "segm", "fixed", "matches"} and set(one["matches"]) == {"bbox", "segm"}
    # the metrics are equal; the matches' detection ids are not (two ranks move scores in their last bits)
    assert {k: v for k, v in one.items() if k != "matches"} == {k: v for k, v in two.items() if k != "matches"}
    assert outs[1].with_name("m_per_class.csv").read_text() == outs[2].with_name("m_per_class.csv").read_text()
    from crat_ft.evaluation.matching import MatchTable

    for iou in ("bbox", "segm"):  # the matches crat-ft compare resamples are the same too
        a, b = (MatchTable.load(outs[n].with_name(f"m_matches_{iou}.npz")) for n in (1, 2))
        assert np.array_equal(a.tp, b.tp) and np.allclose(a.score, b.score, rtol=0, atol=1e-6) and len(a.score) > 0


def test_a_killed_distributed_evaluation_reruns_to_the_same_metrics(
    tiny_data, tiny_detector, one_process_metrics, tmp_path
):
    """SIGKILL to torchrun and both ranks while they spill detections; the rerun cleans what they left."""
    import signal
    import time

    out = tmp_path / "killed" / "m.json"
    args = ["evaluate", demo_config_path(), tiny_detector, "--data-root", tiny_data, "--out", out]
    command = [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node=2", f"--master-port={_free_port()}",
               *crat_ft_exe(), *[str(a) for a in args]]  # fmt: skip
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True
    )
    deadline = time.time() + 300
    while not list(out.parent.glob(".m.detections/run-*/part-*")) and proc.poll() is None:
        assert time.time() < deadline, "the evaluation never started spilling"
        time.sleep(0.1)
    assert proc.poll() is None, "the evaluation ended before it could be killed"
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun alone: its workers run in sessions of their own
    proc.wait()
    deadline = time.time() + 10
    while any(_alive(w) for w in workers):
        assert time.time() < deadline, "the workers outlived the killed torchrun"
        time.sleep(0.05)
    assert list(out.parent.glob(".m.detections/run-*/part-*")) and not out.exists()  # what the killed run left
    # a pid that is alive again (pids repeat across container starts) does not keep a dead run's detections
    for lock in out.parent.glob(".m.detections/run-*.lock"):
        lock.write_text(str(os.getpid()))
    _evaluate(2, tiny_detector, tiny_data, out)  # checks that nothing but m.json, the CSV and the log is left
    rerun, clean = (json.loads(p.read_text()) for p in (out, one_process_metrics))
    assert rerun.pop("matches").keys() == clean.pop("matches").keys() and rerun == clean


def _children(parent: int) -> list[int]:
    """Pids of the processes whose parent is ``parent``."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            if f"PPid:\t{parent}\n" in status.read_text():
                found.append(int(status.parent.name))
        except OSError:
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def _mmdet_style_eval(nproc: int, detector, data, work: Path) -> tuple[dict, Path]:
    """``tests/mmdet_style_eval.py`` in ``nproc`` processes: its metrics and the (kept) spill directory."""
    script = Path(__file__).with_name("mmdet_style_eval.py")
    command = [str(script)] if nproc > 1 else [sys.executable, str(script)]
    if nproc > 1:
        command = [str(Path(sys.executable).parent / "torchrun"), f"--nproc-per-node={nproc}",
                   f"--master-port={_free_port()}", *command]  # fmt: skip
    out = work / "metrics.json"
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    r = subprocess.run([*command, str(demo_config_path()), str(detector), str(data), str(work / "runner"), str(out),
                        "--keep-detections"], capture_output=True, text=True, timeout=900, env=env)  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    spills = {Path(f"{out}.rank{k}").read_text() for k in range(nproc)}
    assert len(spills) == 1, spills  # one directory, made by rank 0 and sent to the others
    spill = Path(spills.pop())
    assert spill.parent.name == "crat-ft-detections" and spill.name.startswith("run-") and spill.is_dir()
    log = next((work / "runner").glob("*/*.log"))
    assert _detections_evaluated(log) == 3000
    return json.loads(out.read_text()), spill


def test_mmdet_style_test_script_without_spill_dir_equals_one_process(
    tiny_data, tiny_detector, one_process_metrics, tmp_path
):
    """What mmdet's tools/test.py does, with the config's own CratLVISMetric and no spill_dir: two
    processes evaluate exactly the detections one process evaluates, and report crat-ft's metrics."""
    import shutil

    one, spill = _mmdet_style_eval(1, tiny_detector, tiny_data, tmp_path / "np1")
    # moved aside: the next run removes the run directories whose lock nobody holds
    spill_one = Path(shutil.move(spill, tmp_path / "spill-np1"))
    two, spill_two = _mmdet_style_eval(2, tiny_detector, tiny_data, tmp_path / "np2")
    assert not spill_one.with_name(spill.name).exists()
    assert one == two
    a, b = (_detections_in(s) for s in (spill_one, spill_two))
    assert len(a["score"]) == 3000 and a["rle"] == b["rle"]
    assert np.array_equal(a["image_id"], b["image_id"]) and np.array_equal(a["category_id"], b["category_id"])
    # a batch holds 4 images, grouped otherwise when two ranks share the split: the float32 convolutions
    # then differ in their last bit (measured: scores by up to 7e-9, box corners at 128 px by 1.5e-5)
    np.testing.assert_allclose(a["score"], b["score"], rtol=1e-6, atol=0)
    np.testing.assert_allclose(a["bbox"], b["bbox"], rtol=0, atol=1e-4)
    shutil.rmtree(spill_two)
    metrics = json.loads(one_process_metrics.read_text())
    assert two == {f"lvis/{iou}_{k}": v for iou in ("bbox", "segm") for k, v in metrics[iou].items()}


def _detections_in(spill: Path) -> dict:
    """The spilled detections, sorted by (image, category, score, box)."""
    from crat_ft.evaluation.detections import load_spilled

    dets = load_spilled(spill)
    order = np.lexsort((dets.bbox[:, 1], dets.bbox[:, 0], -dets.score, dets.category_id, dets.image_id))
    rles = [bytes(dets.rle[dets.rle_offset[i] : dets.rle_offset[i + 1]]) for i in order]
    return {"image_id": dets.image_id[order], "category_id": dets.category_id[order],
            "score": dets.score[order], "bbox": dets.bbox[order], "rle": rles}  # fmt: skip


def test_extract_features_under_torchrun_equals_one_process(tiny_data, tiny_detector, tmp_path):
    """Two ranks, one shard each, give the merged cache of a one-process extraction (one thread each)."""
    from test_extract import _assert_same, _tables

    caches = {}
    for nproc in (1, 2):
        out = tmp_path / f"cache-np{nproc}"
        r = _run([*extract_args(tiny_detector, tiny_data), "--out", out, "--max-images", 8, "--segment-images", 4,
                  "--mask-pos-per-class", 400], nproc)  # fmt: skip
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        caches[nproc] = out
    shards = sorted(p.name for p in caches[2].glob("shard-*.h5"))
    assert shards == ["shard-00000-of-00002.h5", "shard-00001-of-00002.h5"]
    _assert_same(_tables(caches[1] / "index.h5"), _tables(caches[2] / "index.h5"))


def test_train_detector_under_torchrun_keeps_the_ranks_equal_and_writes_one_detector(tiny_data, tmp_path):
    config = tmp_path / "demo_with_rank_states.py"  # the demo config, plus a hook saving every rank's weights
    config.write_text(
        f"_base_ = {str(demo_config_path())!r}\n"
        "custom_imports = dict(imports=['crat_ft.metric', 'rank_states'])\n"
        "custom_hooks = [dict(type='SaveRankStateHook')]\n"
    )
    work = tmp_path / "ddp"
    args = ["train-detector", config, "--work-dir", work, "--data-root", tiny_data, "--seed", 0,
            "--cfg-options", *TINY_TRAIN_OPTIONS]  # fmt: skip
    r = _run(args, 2, env={"PYTHONPATH": str(Path(__file__).parent)})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert r.stdout.count("detector weights:") == 1, r.stdout
    log = next(work.glob("*/*.log")).read_text()
    assert "Distributed training: True" in log and "model_wrapper_cfg = dict(type='CratDistributedDataParallel')" in log
    ckpt = torch.load(work / "detector.pth", weights_only=True)
    assert ckpt["meta"]["iter"] == 4 and len(ckpt["meta"]["dataset_meta"]["classes"]) == 40
    # DDP kept both ranks' weights equal, and detector.pth holds them
    rank0, rank1 = (torch.load(work / f"rank{k}_state.pth", weights_only=True) for k in (0, 1))
    init = torch.load(work / "iter_4.pth", weights_only=False)["state_dict"]
    assert rank0.keys() == rank1.keys() and len(rank0) > 50
    for k in rank0:  # parameters; BatchNorm's running statistics stay each rank's own, as in mmdet's DDP
        v = ckpt["state_dict"][k]
        assert torch.equal(rank0[k], v) and torch.equal(rank1[k], v) and torch.equal(init[k], v), k
    # (the ranks drew other images, as mmengine's sampler splits the data: equal weights mean DDP averaged)


def test_a_bad_input_under_torchrun_ends_every_rank_with_its_line(tiny_data, tmp_path):
    r = _run(["evaluate", demo_config_path(), tmp_path / "missing.pth", "--data-root", tiny_data, "--out",
              tmp_path / "m" / "m.json"], 2, timeout=300)  # fmt: skip
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("crat-ft: error:")]
    assert len(lines) == 2 and all("missing.pth does not exist; check the path" in line for line in lines), r.stderr
    assert not (tmp_path / "m").exists()


def test_a_rank_that_fails_alone_ends_every_rank_within_seconds(tiny_data, tiny_detector, tmp_path):
    """Rank 1 fails while loading the config; rank 0 has gone on to the process group and is ended by torchrun."""
    import time

    config = tmp_path / "rank1_fails_config.py"
    config.write_text(
        f"_base_ = {str(demo_config_path())!r}\ncustom_imports = dict(imports=['crat_ft.metric', 'rank1_fails'])\n"
    )
    t0 = time.time()
    r = _run(["evaluate", config, tiny_detector, "--data-root", tiny_data, "--out", tmp_path / "m" / "m.json"], 2,
             timeout=300, env={"PYTHONPATH": str(Path(__file__).parent)})  # fmt: skip
    assert r.returncode != 0 and time.time() - t0 < 120
    lines = [line for line in r.stderr.splitlines() if line.startswith("crat-ft: error:")]
    assert len(lines) == 1 and "rank 1 cannot import what rank 0 can" in lines[0], r.stderr[-3000:]
    assert not (tmp_path / "m" / "m.json").exists()  # (rank 0, ended by a signal, may leave its empty --out dir)


def _failing_metric_worker(rank: int, port: int, spill: str, queue) -> None:
    import torch.distributed as dist

    from crat_ft.common.errors import UserError
    from crat_ft.evaluation.metric import CratLVISMetric

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)

    class Failing(CratLVISMetric):
        def compute_metrics(self, results):
            raise UserError("the annotation file went away")

    metric = Failing(ann_file="unused.json", spill_dir=spill)
    metric.results.append((f"rank{rank}", 0))
    try:
        metric.evaluate(2)
        queue.put((rank, "returned"))
    except Exception as exc:
        queue.put((rank, f"{type(exc).__name__}: {exc}"))
    dist.destroy_process_group()


def test_a_failed_metric_on_rank_0_ends_every_rank_instead_of_hanging(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_failing_metric_worker, args=(r, port, str(tmp_path / "spill"), queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    outcome = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert outcome == {
        0: "UserError: the annotation file went away",
        1: "UserError: rank 0 failed to compute the LVIS metrics (UserError: the annotation file went away)",
    }
    assert list((tmp_path / "spill").iterdir()) == []  # the evaluation's run directory and its lock removed
