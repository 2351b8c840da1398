"""When does CRAT help? The decoupled baseline and CRAT against the sharing knob s.

For each ``s`` and seed, runs (or reuses) ``crat-ft demo --sharing s --seed N``
on the families variant of the synthetic benchmark, then the oracle probe of
``transfer_headroom.py`` on its baseline heads (rare classes' slices replaced
by the mean of their family's non-rare donors). Writes

- ``ROOT/sharing_table.md``: per s, baseline APr, CRAT - baseline and the
  oracle's headroom (bbox and segm), mean over seeds with each seed in brackets;
- ``ROOT/crat_vs_sharing.png``: CRAT - baseline APr against s (bbox, segm),
  every seed as a point, with the oracle's headroom beside it.

    .venv/bin/python benchmarks/bench_sharing.py [--root work_dirs/sharing] [--sharing 0 0.5 1] [--seeds 0 1]
    .venv/bin/python benchmarks/bench_sharing.py --finished   # tabulate what is there

CRAT's settings are the demo config's (the paper's λ_box 0.001, λ_mask 0.01,
τ 0.05, α 0.01); nothing here is tuned.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from transfer_headroom import class_families, headroom  # noqa: E402

IOUS = (("bbox", "box"), ("segm", "mask"))


def run_dir(root: Path, s: float, seed: int) -> Path:
    return root / f"s{s:g}-seed{seed}"


def family_share(work: Path, tau: float = 0.05) -> tuple[float, float]:
    """How much of the rare classes' transfused box signal comes from their own family, and by chance.

    From the CRAT heads' final box Fisher statistics Φ: a donor class d sends
    its positives' signal to class c with weight ``softmax_c(cos(Φ_d, Φ_c) / τ)``
    over the seen classes c ≠ d (the class-level form of CRAT's per-sample
    weights), scaled by its positive count. Returns the share of what the rare
    classes receive that comes from same-family donors, and that share if the
    weights were uniform (the donors' positive counts alone).
    """
    import torch

    heads = torch.load(work / "crat" / "heads.pth", weights_only=True)
    sd, meta = heads["state_dict"], heads["meta"]
    phi = torch.nn.functional.normalize(sd["box_stats.fisher"].flatten(1).double(), dim=1)
    seen = sd["box_stats.seen"].bool()
    counts = torch.tensor(meta["class_instance_count"], dtype=torch.float64)
    logits = (phi @ phi.T / tau).masked_fill(~seen[None, :], float("-inf"))
    logits.fill_diagonal_(float("-inf"))
    w = torch.softmax(logits, dim=1) * (counts * seen)[:, None]  # (donor, receiver)
    uniform = (seen[None, :] & ~torch.eye(len(seen), dtype=torch.bool)).double()
    uniform = uniform / uniform.sum(1, keepdim=True) * (counts * seen)[:, None]
    family = class_families(work)
    same = torch.tensor([[a == b for b in family] for a in family])
    rare = [c for c, f in enumerate(meta["class_frequency"]) if f == "r" and seen[c]]
    share = lambda m: float((m[:, rare] * same[:, rare]).sum() / m[:, rare].sum())  # noqa: E731
    return share(w), share(uniform)


def collect(root: Path, sharing: list[float], seeds: list[int]) -> dict:
    """``{s: {seed: {"summary": ..., "headroom": ...}}}``, running what is missing."""
    from crat_ft.pipeline.demo import run_demo

    rows: dict = {}
    for s in sharing:
        for seed in seeds:
            work = run_dir(root, s, seed)
            summary_file = work / "summary.json"
            if summary_file.is_file():
                summary = json.loads(summary_file.read_text())
            else:
                print(f"bench_sharing: s={s:g} seed {seed}: running the demo in {work}", flush=True)
                summary = run_demo(work, seed=seed, sharing=s)
            print(f"bench_sharing: s={s:g} seed {seed}: oracle probe", flush=True)
            share, chance = family_share(work)
            rows.setdefault(s, {})[seed] = {
                "summary": summary,
                "headroom": headroom(work),
                "family_share": 100 * share,
                "family_chance": 100 * chance,
            }
    return rows


def gain(run: dict, iou: str, key: str) -> float:
    """CRAT − baseline of one run's ``iou`` metric ``key``, in points."""
    summary = run["summary"]
    return 100 * (summary["crat"][iou][key] - summary["baseline"][iou][key])


def _cell(values: list[float], signed: bool = True) -> str:
    fmt = "{:+.1f}" if signed else "{:.1f}"
    mean = sum(values) / len(values)
    return fmt.format(mean) + " (" + "/".join(fmt.format(v) for v in values) + ")"


def table(rows: dict) -> str:
    head = (
        "| s (seeds) | baseline bbox APr | CRAT − baseline bbox APr | "
        "oracle box headroom APr | baseline segm APr | CRAT − baseline segm APr | oracle mask headroom APr | "
        "CRAT − baseline bbox AP | CRAT − baseline segm AP | rare classes' box signal from their family, % |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s, by_seed in rows.items():
        seeds = sorted(by_seed)
        cells = [f"{s:g} ({'/'.join(map(str, seeds))})"]
        for iou, branch in IOUS:
            base = [100 * by_seed[k]["summary"]["baseline"][iou]["APr"] for k in seeds]
            delta = [gain(by_seed[k], iou, "APr") for k in seeds]
            oracle = [by_seed[k]["headroom"]["family"][branch]["APr"] for k in seeds]
            cells += [_cell(base, signed=False), _cell(delta), _cell(oracle)]
        cells += [_cell([gain(by_seed[k], iou, "AP") for k in seeds]) for iou, _ in IOUS]
        share = [by_seed[k]["family_share"] for k in seeds]
        chance = sum(by_seed[k]["family_chance"] for k in seeds) / len(seeds)
        cells.append(
            f"{sum(share) / len(share):.0f} (" + "/".join(f"{v:.0f}" for v in share) + f"; uniform {chance:.0f})"
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    xs = sorted(rows)
    for ax, (iou, branch) in zip(axes, IOUS):
        for what, key, colour, dx in (
            ("CRAT − baseline", None, "tab:blue", -0.012),
            ("oracle headroom", "family", "tab:gray", 0.012),
        ):
            per_seed = []
            for s in xs:
                seeds = sorted(rows[s])
                if key is None:
                    vals = [gain(rows[s][k], iou, "APr") for k in seeds]
                else:
                    vals = [rows[s][k]["headroom"][key][branch]["APr"] for k in seeds]
                per_seed.append(vals)
                ax.scatter([s + dx] * len(vals), vals, color=colour, s=14, alpha=0.6)
            ax.plot([s + dx for s in xs], [sum(v) / len(v) for v in per_seed], "-o", color=colour, label=what)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_title(f"{iou} APr (points)")
        ax.set_xlabel("sharing knob s")
        ax.set_xticks(xs)
    axes[0].set_ylabel("change over the decoupled baseline")
    axes[0].legend(fontsize=8)
    runs = ", ".join(f"s={s:g}: seeds {'/'.join(map(str, sorted(rows[s])))}" for s in xs)
    fig.suptitle(f"CRAT vs geometry sharing (synthetic families; {runs})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path("work_dirs/sharing"))
    ap.add_argument("--sharing", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument(
        "--finished",
        action="store_true",
        help="run nothing new: tabulate every finished ROOT/s<s>-seed<N> run, whatever its seed",
    )
    args = ap.parse_args()
    if args.finished:
        runs = {s: sorted(int(d.name.rsplit("seed", 1)[1]) for d in args.root.glob(f"s{s:g}-seed*")
                          if (d / "summary.json").is_file()) for s in args.sharing}  # fmt: skip
        rows = {s: collect(args.root, [s], seeds)[s] for s, seeds in runs.items() if seeds}
    else:
        rows = collect(args.root, args.sharing, args.seeds)
    text = table(rows)
    (args.root / "sharing_table.md").write_text(text + "\n")
    plot(rows, args.root / "crat_vs_sharing.png")
    print(text)
    print(f"bench_sharing: wrote {args.root / 'sharing_table.md'} and {args.root / 'crat_vs_sharing.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
