"""CRAT variants on finished demo runs: retrain the heads from their caches with other settings.

For each work dir of ``crat-ft demo`` (its ``cache/``, ``stage1/detector.pth``,
``data/`` and ``baseline/metrics.json``), retrains the class-wise layers with
the demo's CRAT config plus each variant's ``--cfg-options``, evaluates with
the LVIS protocol, and prints the APr/AP changes over that run's baseline and
over its CRAT run (paper settings). Results are kept in
``WORK/variants/<name>/`` and reused.

    .venv/bin/python benchmarks/crat_variants.py work_dirs/sharing/s0.5-seed2 \\
        --variant reference-fisher crat.fisher=reference \\
        --variant mask-statistics crat.mask_weights=mask \\
        --variant family-donors 'crat.donor_groups={work}/family_groups.json'

Use it to try an idea on seeds that are not the reported ones, then confirm on
the reported seeds without changing anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KEYS = ("AP", "APr")


def run_variant(work: Path, name: str, options: list[str], seed: int) -> dict:
    from crat_ft.common.paths import demo_config
    from crat_ft.pipeline.evaluate import evaluate_detector
    from crat_ft.pipeline.retrain import retrain_heads
    from crat_ft.pipeline.retrain_record import HEADS_FILE

    out = work / "variants" / name
    metrics = out / "metrics.json"
    if metrics.is_file():
        return json.loads(metrics.read_text())
    # the demo data's families as a crat.donor_groups file: pass crat.donor_groups={work}/family_groups.json
    cats = json.loads((work / "data" / "annotations" / "lvis_v1_train.json").read_text())["categories"]
    (work / "family_groups.json").write_text(json.dumps({c["name"]: c.get("family", "") for c in cats}))
    options = [o.format(work=work) for o in options]
    retrain_heads(
        demo_config("crat_synthetic.py"),
        work / "cache" / "index.h5",
        out,
        cfg_options=[*options, f"train.seed={seed}"],
        resume=True,  # a variant killed half-way continues
    )
    return evaluate_detector(
        demo_config(), work / "stage1" / "detector.pth", metrics, data_root=work / "data", heads=out / HEADS_FILE,
        extra_protocols=(),
    )  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work_dirs", type=Path, nargs="+")
    ap.add_argument("--variant", nargs="+", action="append", required=True, metavar=("NAME", "KEY=VALUE"))
    args = ap.parse_args()
    print(
        f"{'work dir':30s} {'variant':18s} "
        + " ".join(f"{t} {k} vs base / vs CRAT" for t in ("bbox", "segm") for k in KEYS)
    )
    for work in args.work_dirs:
        summary = json.loads((work / "summary.json").read_text())
        seed = int(str(work).rsplit("seed", 1)[-1]) if "seed" in work.name else 0
        for name, *options in args.variant:
            m = run_variant(work, name, options, seed)
            cells = []
            for iou in ("bbox", "segm"):
                for k in KEYS:
                    vb = 100 * (m[iou][k] - summary["baseline"][iou][k])
                    vc = 100 * (m[iou][k] - summary["crat"][iou][k])
                    cells.append(f"{vb:+14.1f} / {vc:+5.1f}")
            print(f"{str(work):30s} {name:18s} " + " ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
