"""What makes two stage-1 trainings bit-identical on a CPU, and what determinism would cost.

Trains the demo detector (``crat-ft train-detector``, demo config and data, seed 0) for
``--iters`` iterations under each setting below, each in a fresh process, one at a time, and
prints its speed relative to the default and the largest weight difference from the default run:

- ``default``: as the demo runs (2 threads here);
- ``default again``: the same command again (same machine, same thread count);
- ``1 thread``: ``OMP_NUM_THREADS=1`` (another thread count reorders float reductions);
- ``AVX2 kernels``: ``ATEN_CPU_CAPABILITY=avx2``, what a machine without AVX-512 runs (this one has it);
- ``deterministic``: ``--cfg-options randomness.deterministic=True`` (mmengine: torch's deterministic
  algorithms, cuDNN settings);
- ``portable``: scalar ATen kernels, MKL's conditional numerical reproducibility and oneDNN capped
  at SSE4.1 (``ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE DNNL_MAX_CPU_ISA=SSE41``), 1 thread
  and ``deterministic``: the settings under which two x86 machines may agree (not verifiable on one).

    .venv/bin/python benchmarks/bench_reproducibility.py [--iters 100] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = [
    ("default", {}, ()),
    ("default again", {}, ()),
    ("1 thread", {"OMP_NUM_THREADS": "1"}, ()),
    ("AVX2 kernels", {"ATEN_CPU_CAPABILITY": "avx2"}, ()),
    ("deterministic", {}, ("randomness.deterministic=True",)),
    ("portable", {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "DNNL_MAX_CPU_ISA": "SSE41",
                  "OMP_NUM_THREADS": "1"}, ("randomness.deterministic=True",)),
]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    import torch

    from crat_ft.common.paths import demo_config

    exe = str(Path(sys.executable).with_name("crat-ft"))
    work = args.work or Path(tempfile.mkdtemp(prefix="crat-ft-repro-"))
    data = work / "data"
    if not data.exists():
        subprocess.run([exe, "make-demo-data", str(data)], check=True, capture_output=True)
    ref, base_time = None, None
    print(f"stage-1 training, {args.iters} iterations, demo config, seed 0 ({work})")
    for name, env, options in SETTINGS:
        out = work / name.replace(" ", "_")
        cmd = [exe, "train-detector", str(demo_config()), "--work-dir", str(out), "--data-root", str(data),
               "--seed", "0", "--cfg-options", f"train_cfg.max_iters={args.iters}", *options]  # fmt: skip
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, **env})
        seconds = time.perf_counter() - t0
        state = torch.load(out / "detector.pth", weights_only=True)["state_dict"]
        if ref is None:
            ref, base_time = state, seconds
        diff = max(float((state[k].float() - ref[k].float()).abs().max()) for k in ref if ref[k].is_floating_point())
        print(f"{name:<14} {seconds:6.1f} s  {base_time / seconds:5.2f}x the default's speed  "
              f"max weight difference from default {diff:.2e}" + ("  (bit-identical)" if diff == 0 else ""), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
