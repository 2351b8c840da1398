"""How much can cross-class transfer of box/mask layers give the rare classes of the demo?

An upper-bound probe for CRAT on the synthetic benchmark: take the decoupled
baseline's heads, replace every rare class's class-wise slice (its rows of
``fc_reg`` and/or its ``conv_logits`` filter) by the mean slice of its donors
(the non-rare classes of the same colour, or of the same shape), merge, and
evaluate with the LVIS protocol. If even hand-picked donors do not lift rare
AP, transfusion from the same donors cannot either.

    python benchmarks/transfer_headroom.py work_dirs/demo

Needs a finished ``crat-ft demo`` work dir (``baseline/heads.pth``,
``stage1/detector.pth``, ``data/``). Prints the AP change of each variant
versus the baseline, in points.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

KEYS = ("AP", "APr", "APc", "APf")


def donor_mean_heads(heads: dict, donors_of: dict[int, list[int]], branches: set[str]) -> dict:
    """A copy of a heads checkpoint whose classes in ``donors_of`` take their donors' mean slices."""
    sd = dict(heads["state_dict"])
    c = len(heads["meta"]["class_names"])
    reg_w, reg_b = sd["fc_reg.weight"].view(c, 4, -1).clone(), sd["fc_reg.bias"].view(c, 4).clone()
    mask_w, mask_b = sd["conv_logits.weight"].clone(), sd["conv_logits.bias"].clone()
    for r, d in donors_of.items():
        if "box" in branches:
            reg_w[r], reg_b[r] = reg_w[d].mean(0), reg_b[d].mean(0)
        if "mask" in branches:
            mask_w[r], mask_b[r] = mask_w[d].mean(0), mask_b[d].mean(0)
    sd.update(
        {
            "fc_reg.weight": reg_w.view(4 * c, -1),
            "fc_reg.bias": reg_b.view(-1),
            "conv_logits.weight": mask_w,
            "conv_logits.bias": mask_b,
        }
    )
    return {"state_dict": sd, "meta": heads["meta"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work_dir", type=Path, help="a finished `crat-ft demo` work dir")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from crat_ft.paths import demo_config
    from crat_ft.stage1 import evaluate_detector

    work = args.work_dir
    heads = torch.load(work / "baseline" / "heads.pth", weights_only=True)
    base = json.loads((work / "baseline" / "metrics.json").read_text())
    names, freq = heads["meta"]["class_names"], heads["meta"]["class_frequency"]
    colour = [n.split("_")[0] for n in names]
    shape = [n.split("_", 1)[1] for n in names]
    rare = [c for c, f in enumerate(freq) if f == "r"]
    donors = {
        "colour": {r: [k for k in range(len(names)) if freq[k] != "r" and colour[k] == colour[r]] for r in rare},
        "shape": {r: [k for k in range(len(names)) if freq[k] != "r" and shape[k] == shape[r]] for r in rare},
    }
    print(f"{len(rare)} rare classes; donors = non-rare classes of the same colour / shape")
    print(f"{'donors':8s} {'slices':9s} " + " ".join(f"{t}:{k:>4s}" for t in ("bbox", "segm") for k in KEYS))
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("colour", "shape"):
            for branches in ({"box"}, {"mask"}):
                path = Path(tmp) / f"{kind}-{'-'.join(sorted(branches))}.pth"
                torch.save(donor_mean_heads(heads, donors[kind], branches), path)
                m = evaluate_detector(
                    demo_config(),
                    work / "stage1" / "detector.pth",
                    Path(tmp) / "m.json",
                    data_root=work / "data",
                    heads=path,
                )
                deltas = " ".join(f"{100 * (m[t][k] - base[t][k]):+9.1f}" for t in ("bbox", "segm") for k in KEYS)
                print(f"{kind:8s} {'/'.join(sorted(branches)):9s} {deltas}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
