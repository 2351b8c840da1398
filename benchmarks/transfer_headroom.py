"""Oracle probe: how much could an ideal donor transfer give the rare classes of a demo run?

The upper-bound check for CRAT on the synthetic benchmark: take the decoupled
baseline's heads and replace every rare class's class-wise slice (its four rows
of ``fc_reg``, or its ``conv_logits`` filter) by the mean slice of its donors,
merge, and evaluate with the LVIS protocol. Donors:

- ``family``: the non-rare classes of the rare class's geometry family (the
  same shape in the ``colour-shapes`` variant), the donors CRAT should find;
- ``other`` (``--control``): as many non-rare classes of other families.

The box swap is scored by bbox AP, the mask swap by segm AP. If the family
donors lift APr, the benchmark holds knowledge a transfer can use; if even
they do not, transfusion from them cannot either.

    python benchmarks/transfer_headroom.py work_dirs/demo [work_dirs/demo-seed1 ...]

Needs finished ``crat-ft demo`` work dirs (``baseline/heads.pth``,
``stage1/detector.pth``, ``data/``). Prints, per work dir, the bbox / segm AP
changes over the baseline in points, and stores them in ``headroom.json``
there (reused on a rerun).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

KEYS = ("AP", "APr", "APc", "APf")
# the probe's swaps: (donor kind, branch, metric that scores it); CONTROL_SWAPS with --control
SWAPS = (("family", "box", "bbox"), ("family", "mask", "segm"))
CONTROL_SWAPS = (("other", "box", "bbox"), ("other", "mask", "segm"))


def donor_mean_heads(heads: dict, donors_of: dict[int, list[int]], branch: str) -> dict:
    """A copy of a heads checkpoint whose classes in ``donors_of`` take their donors' mean ``branch`` slices."""
    sd = dict(heads["state_dict"])
    c = len(heads["meta"]["class_names"])
    if branch == "box":
        reg_w, reg_b = sd["fc_reg.weight"].view(c, 4, -1).clone(), sd["fc_reg.bias"].view(c, 4).clone()
        for r, d in donors_of.items():
            reg_w[r], reg_b[r] = reg_w[d].mean(0), reg_b[d].mean(0)
        sd.update({"fc_reg.weight": reg_w.view(4 * c, -1), "fc_reg.bias": reg_b.view(-1)})
    else:
        mask_w, mask_b = sd["conv_logits.weight"].clone(), sd["conv_logits.bias"].clone()
        for r, d in donors_of.items():
            mask_w[r], mask_b[r] = mask_w[d].mean(0), mask_b[d].mean(0)
        sd.update({"conv_logits.weight": mask_w, "conv_logits.bias": mask_b})
    return {"state_dict": sd, "meta": heads["meta"]}


def class_families(work: Path) -> list[str]:
    """Geometry family of each class, from the demo data's categories (by id)."""
    cats = json.loads((work / "data" / "annotations" / "lvis_v1_train.json").read_text())["categories"]
    cats = sorted(cats, key=lambda c: c["id"])
    return [c.get("family", c["name"].split("_", 1)[-1]) for c in cats]


def donors(freq: list[str], family: list[str]) -> dict[str, dict[int, list[int]]]:
    """Family and control donors of every rare class."""
    rare = [c for c, f in enumerate(freq) if f == "r"]
    rng = np.random.default_rng(0)
    out: dict[str, dict[int, list[int]]] = {"family": {}, "other": {}}
    for r in rare:
        same = [k for k in range(len(freq)) if freq[k] != "r" and family[k] == family[r]]
        others = [k for k in range(len(freq)) if freq[k] != "r" and family[k] != family[r]]
        out["family"][r] = same
        out["other"][r] = sorted(int(k) for k in rng.choice(others, size=min(len(same), len(others)), replace=False))
    return out


def headroom(work: Path, control: bool = False) -> dict:
    """``{"family"[, "other"]: {"box"|"mask": {AP key: change in points}}}`` for one demo work dir."""
    out_file = work / "headroom.json"
    swaps = SWAPS + (CONTROL_SWAPS if control else ())
    done = json.loads(out_file.read_text()) if out_file.is_file() else {}
    if all(branch in done.get(kind, {}) for kind, branch, _ in swaps):
        return done
    from crat_ft.common.files import atomic_write_text
    from crat_ft.common.paths import demo_config
    from crat_ft.pipeline.evaluate import evaluate_detector

    heads = torch.load(work / "baseline" / "heads.pth", weights_only=True)
    base = json.loads((work / "baseline" / "metrics.json").read_text())
    freq = heads["meta"]["class_frequency"]
    donors_of = donors(freq, class_families(work))
    result: dict = done
    with tempfile.TemporaryDirectory() as tmp:
        for kind, branch, iou in swaps:
            if branch in result.get(kind, {}):
                continue
            path = Path(tmp) / f"{kind}-{branch}.pth"
            torch.save(donor_mean_heads(heads, donors_of[kind], branch), path)
            m = evaluate_detector(
                demo_config(),
                work / "stage1" / "detector.pth",
                Path(tmp) / "m.json",
                data_root=work / "data",
                heads=path,
                extra_protocols=(),
            )
            result.setdefault(kind, {})[branch] = {k: 100 * (m[iou][k] - base[iou][k]) for k in KEYS}
    atomic_write_text(out_file, json.dumps(result, indent=2))
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work_dirs", type=Path, nargs="+", help="finished `crat-ft demo` work dirs")
    ap.add_argument("--control", action="store_true", help="also swap in as many non-rare classes of other families")
    args = ap.parse_args()
    print(f"{'work dir':32s} {'donors':7s} {'swap':5s} " + " ".join(f"{k:>6s}" for k in KEYS))
    for work in args.work_dirs:
        r = headroom(work, args.control)
        for kind, branch, iou in SWAPS + (CONTROL_SWAPS if args.control else ()):
            cells = " ".join(f"{r[kind][branch][k]:+6.1f}" for k in KEYS)
            print(f"{str(work):32s} {kind:7s} {branch:5s} {cells}  ({iou} AP change, points)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
