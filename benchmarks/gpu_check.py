"""Check crat-ft on this machine's GPUs: every command on one GPU and on all GPUs under torchrun.

What a person with one or more GPUs runs after `bash scripts/setup.sh` (with mmcv's CUDA ops):

    .venv/bin/python benchmarks/gpu_check.py [--work-dir work_dirs/gpu_check] [--gpus N]

Two detectors, nothing downloaded:

- ``demo``: the demo Mask R-CNN (``configs/demo/``), trained here for ``--detector-iters`` on the
  synthetic data (so its metrics are not all zero);
- ``lvis-r50``: mmdet's LVIS v1 Mask R-CNN R50 config at its own 800 px pipeline, random weights,
  on the synthetic images relabelled into LVIS's 1203 categories (speed and memory at LVIS scale;
  its metrics are those of random weights).

For each, ``extract-features``, ``retrain-heads`` (CRAT) and ``evaluate`` run as the CLI runs
them, once in one process on GPU 0 and once under ``torchrun --nproc-per-node N``. It prints
images/s and iterations/s of each run (wall time, start-up included), the peak GPU memory its
rank 0 reports, and the all-GPU minus one-GPU difference of the main metrics (CUDA's kernels
are not deterministic: expect differences in the last digits, not in the first). The LVIS R50
is evaluated through a config written beside its outputs: mmdet's with ``CratLVISMetric``.
``--device-less`` runs the same on the CPU (gloo) to check the script itself: slow at 800 px,
so give it small ``--images`` and ``--val-images``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

CRAT_FT = [str(Path(sys.executable).parent / "crat-ft")]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
PEAK = re.compile(r"peak GPU memory ([0-9.]+) GiB")


def run(args: list, nproc: int, env: dict) -> tuple[float, str]:
    """``crat-ft args`` in one process or under torchrun; (seconds, what it printed)."""
    command = CRAT_FT + [str(a) for a in args]
    if nproc > 1:
        command = [TORCHRUN, f"--nproc-per-node={nproc}", *command]
    t0 = time.perf_counter()
    r = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(command)}\n{r.stderr[-3000:]}")
    return seconds, r.stdout + r.stderr


def peak(stderr: str) -> str:
    found = [float(x) for x in PEAK.findall(stderr)]
    return f"{max(found):.2f} GiB" if found else "n/a"


def lvis_1203(data: Path, root: Path) -> Path:
    """The synthetic data relabelled into a 1203-category LVIS layout (extra categories without instances)."""
    if (root / "annotations" / "lvis_v1_val.json").exists():
        return root
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split in ("train2017", "val2017"):
        if not (root / split).exists():
            (root / split).symlink_to(data / split)
    for split in ("train", "val"):
        doc = json.loads((data / "annotations" / f"lvis_v1_{split}.json").read_text())
        top = max(c["id"] for c in doc["categories"])
        doc["categories"] += [
            {"id": i, "name": f"pad_{i}", "frequency": "r", "image_count": 0, "instance_count": 0,
             "synset": f"pad_{i}.n.01", "synonyms": [], "def": ""}
            for i in range(top + 1, 1204)
        ]  # fmt: skip
        (root / "annotations" / f"lvis_v1_{split}.json").write_text(json.dumps(doc))
    return root


def random_checkpoint(config: Path, out: Path) -> Path:
    import torch
    from mmdet.registry import MODELS

    from crat_ft.engine.config import load_config
    from crat_ft.heads.registry import register_all

    if not out.exists():
        register_all()
        torch.manual_seed(0)
        torch.save({"state_dict": MODELS.build(load_config(config).model).state_dict(), "meta": {}}, out)
    return out


def lvis_eval_config(r50: Path, out: Path) -> Path:
    """mmdet's LVIS config with crat-ft's metric as its test evaluator (crat-ft evaluate needs it)."""
    out.write_text(
        f"_base_ = {str(r50)!r}\n"
        "custom_imports = dict(imports=['crat_ft.metric'], allow_failed_imports=False)\n"
        "test_evaluator = dict(_delete_=True, type='CratLVISMetric', ann_file='annotations/lvis_v1_val.json',\n"
        "                      metric=['bbox', 'segm'])\n"
    )
    return out


def check(name: str, config: Path, detector: Path, data: Path, ft: Path, work: Path, args, env) -> None:
    heads_opts = ["train.max_iters=%d" % args.heads_iters, "train.milestones=[]", "train.warmup_iters=0",
                  "train.checkpoint_interval=%d" % args.heads_iters, "train.log_interval=10"]  # fmt: skip
    metrics = {}
    for nproc in sorted({1, args.gpus}):
        tag = f"{name}, {nproc} {'process' if nproc == 1 else 'processes'}"
        out = work / f"{name}-np{nproc}"
        t, err = run(["extract-features", config, detector, "--out", out / "cache", "--data-root", data,
                      "--max-images", args.images], nproc, env)  # fmt: skip
        print(f"{tag}: extract-features {args.images / t:7.2f} img/s (wall, with start-up), peak {peak(err)}")
        t, err = run(["retrain-heads", ft, "--cache", out / "cache", "--work-dir", out / "heads", "--cfg-options",
                      *heads_opts], nproc, env)  # fmt: skip
        print(f"{tag}: retrain-heads    {args.heads_iters / t:7.2f} it/s  (wall, with start-up), peak {peak(err)}")
        t, err = run(["evaluate", config, detector, "--heads", out / "heads" / "heads.pth", "--data-root", data,
                      "--out", out / "metrics.json"], nproc, env)  # fmt: skip
        n_val = len(json.loads((data / "annotations" / "lvis_v1_val.json").read_text())["images"])
        print(f"{tag}: evaluate         {n_val / t:7.2f} img/s (wall, with start-up), peak {peak(err)}")
        metrics[nproc] = json.loads((out / "metrics.json").read_text())
    if args.gpus > 1:
        diffs = {
            f"{iou} {k}": 100 * (metrics[args.gpus][iou][k] - metrics[1][iou][k])
            for iou in ("bbox", "segm")
            for k in ("AP", "APr", "APc", "APf")
        }
        print(f"{name}: all GPUs - one GPU (points): " + ", ".join(f"{k} {v:+.3f}" for k, v in diffs.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", type=Path, default=Path("work_dirs/gpu_check"))
    ap.add_argument("--gpus", type=int, default=None, help="processes for the torchrun runs (default: every GPU)")
    ap.add_argument("--images", type=int, default=400, help="training images to extract")
    ap.add_argument("--val-images", type=int, default=200, help="validation images of the synthetic data")
    ap.add_argument("--heads-iters", type=int, default=200)
    ap.add_argument("--detector-iters", type=int, default=300, help="demo detector training iterations")
    ap.add_argument("--device-less", action="store_true", help="run on the CPU (gloo), to check the script")
    args = ap.parse_args()

    import mmdet
    import torch

    from crat_ft.common.paths import config_root, demo_config
    from crat_ft.synthetic.dataset import make_demo_data
    from crat_ft.synthetic.variants import DemoDataSpec

    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if args.device_less:
        env["CUDA_VISIBLE_DEVICES"] = ""
        args.gpus = args.gpus or 2
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: install mmcv with CUDA ops (see the README), or pass --device-less")
    args.gpus = args.gpus or torch.cuda.device_count()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not (data / "annotations" / "lvis_v1_val.json").exists():
        make_demo_data(data, DemoDataSpec(val_images=args.val_images), progress=False)
    print(
        f"{args.gpus} processes for the torchrun runs; {'CPU' if args.device_less else torch.cuda.get_device_name(0)}"
    )

    detector = work / "demo-stage1" / "detector.pth"
    if not detector.exists():
        run(["train-detector", demo_config(), "--work-dir", detector.parent, "--data-root", data, "--cfg-options",
             f"train_cfg.max_iters={args.detector_iters}"], 1, env)  # fmt: skip
    check("demo", demo_config(), detector, data, demo_config("crat_synthetic.py"), work, args, env)

    r50 = Path(mmdet.__file__).parent / ".mim" / "configs" / "lvis" / "mask-rcnn_r50_fpn_sample1e-3_ms-1x_lvis-v1.py"
    lvis = lvis_1203(data, work / "data-lvis1203")
    ft = config_root() / "lvis" / "crat_mask-rcnn_r50_fpn_lvis-v1.py"
    r50_eval = lvis_eval_config(r50, work / "mask-rcnn_r50_fpn_lvis-v1_crat-metric.py")
    check("lvis-r50", r50_eval, random_checkpoint(r50, work / "r50_random.pth"), lvis, ft, work, args, env)


if __name__ == "__main__":
    main()
