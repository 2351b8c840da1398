"""CRAT diagnostics (docs/architecture.md#crat-as-implemented): Fisher neighbours, a 2-D embedding, AP-change plots.

Shape legend: ``C`` classes, ``F`` flattened Fisher width (4·D for the box
branch, K for the mask branch).
"""

from __future__ import annotations

import os

import numpy as np

from crat_ft.common.errors import UserError

GROUP_COLOURS = {"r": "tab:red", "c": "tab:orange", "f": "tab:blue"}
GROUP_NAMES = {"r": "rare", "c": "common", "f": "frequent"}


def _load_heads(path: str | os.PathLike) -> dict:
    from crat_ft.engine.checkpoint import load_checkpoint_file

    ckpt = load_checkpoint_file(path, trust_hint=False)
    if ckpt.get("meta", {}).get("crat_ft_stage") != "heads":
        raise UserError(f"{path} is not a crat-ft heads file (written by `crat-ft retrain-heads` as heads.pth)")
    return ckpt


def _stats_prefix(meta: dict, branch: str) -> str:
    """State-dict prefix of a branch's Fisher statistics (a cascade's: its last stage's)."""
    name = {"box": "box_stats", "mask": "mask_stats"}[branch]
    stages = int(meta.get("num_stages", 1))
    return name if stages == 1 else f"stages.{stages - 1}.{name}"


def fisher_similarity(fisher: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """(C, C) cosine similarity of class Fisher statistics; NaN for unseen classes.

    Args:
        fisher: (C, ...) class statistics Φ.
        seen: (C,) bool.
    """
    flat = fisher.reshape(fisher.shape[0], -1).astype(np.float64)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    unit = flat / np.maximum(norms, 1e-30)
    sim = unit @ unit.T
    sim[~seen, :] = np.nan
    sim[:, ~seen] = np.nan
    return sim


def neighbours(sim: np.ndarray, c: int, top: int, allowed: np.ndarray | None = None) -> list[tuple[int, float]]:
    """The ``top`` classes most similar to class ``c`` (itself excluded, unseen skipped).

    Args:
        allowed: (C,) bool, the classes that may be neighbours (e.g. ``c``'s donor group); None: all.
    """
    row = sim[c].copy()
    row[c] = np.nan
    if allowed is not None:
        row[~allowed] = np.nan
    order = [int(j) for j in np.argsort(-np.nan_to_num(row, nan=-np.inf)) if not np.isnan(row[j])]
    return [(j, float(row[j])) for j in order[:top]]


def fisher_neighbors(
    heads: str | os.PathLike, *, class_name: str | None = None, top: int = 5, branch: str = "box"
) -> str:
    """Text table of Fisher neighbours: one class, or every rare class.

    Heads trained with ``crat.donor_groups`` transfused only within a class's group, so its neighbours
    are looked for in its own group: the groups the heads file records (its meta), never the groups file.
    """
    ckpt = _load_heads(heads)
    meta, sd = ckpt["meta"], ckpt["state_dict"]
    prefix = _stats_prefix(ckpt["meta"], branch)
    if f"{prefix}.fisher" not in sd:
        raise UserError(f"{heads} has no {branch} Fisher statistics (trained without a {branch} branch)")
    names, freq = meta["class_names"], meta["class_frequency"]
    sim = fisher_similarity(sd[f"{prefix}.fisher"].numpy(), sd[f"{prefix}.seen"].numpy().astype(bool))
    if class_name is not None:
        if class_name not in names:
            raise UserError(f"--class {class_name!r} is not a class of {heads}; e.g. {names[:3]}")
        targets = [names.index(class_name)]
    else:
        targets = [i for i, g in enumerate(freq) if g == "r"]
    groups = recorded_groups(meta, str(heads))
    lines = []
    for c in targets:
        allowed = None if groups is None else np.array([g == groups[c] for g in groups])
        nb = neighbours(sim, c, top, allowed)
        text = ", ".join(f"{names[j]} ({freq[j]}, {s:.3f})" for j, s in nb)
        if not text:
            seen = not np.isnan(sim[c, c])
            text = "(no class of its donor group seen)" if seen else "(no statistics: class never seen)"
        lines.append(f"{names[c]} ({freq[c]}): {text}")
    return "\n".join(lines)


def recorded_groups(meta: dict, source: str) -> list[str] | None:
    """(C,) each class's donor group as a heads file's meta records it; None for heads trained without groups.

    Raises:
        UserError: the heads were trained with ``crat.donor_groups`` by a crat-ft that did not record them.
    """
    groups = meta.get("donor_groups")
    if groups is None:
        if (meta.get("crat") or {}).get("donor_groups") is not None:
            raise UserError(
                f"{source} was trained with crat.donor_groups but does not record the groups (an older crat-ft wrote "
                "it); retrain the heads with this crat-ft"
            )
        return None
    return [str(groups[n]) for n in meta["class_names"]]


def pca_2d(x: np.ndarray) -> np.ndarray:
    """(C, F) -> (C, 2) principal-component projection of the rows."""
    x = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:2].T


def plot_fisher_embedding(heads: str | os.PathLike, out_png: str | os.PathLike, branch: str = "box") -> None:
    """2-D PCA of the normalised class Fisher statistics, coloured by frequency group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ckpt = _load_heads(heads)
    meta, sd = ckpt["meta"], ckpt["state_dict"]
    prefix = _stats_prefix(ckpt["meta"], branch)
    fisher = sd[f"{prefix}.fisher"].numpy()
    seen = sd[f"{prefix}.seen"].numpy().astype(bool)
    flat = fisher.reshape(fisher.shape[0], -1)[seen]
    flat = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-30)
    xy = pca_2d(flat)
    names = [n for n, s in zip(meta["class_names"], seen) if s]
    freq = [g for g, s in zip(meta["class_frequency"], seen) if s]
    fig, ax = plt.subplots(figsize=(8, 7))
    for g in "fcr":
        idx = [i for i, f in enumerate(freq) if f == g]
        ax.scatter(xy[idx, 0], xy[idx, 1], c=GROUP_COLOURS[g], label=GROUP_NAMES[g], s=30)
    for i, n in enumerate(names):
        ax.annotate(n, xy[i], fontsize=6, alpha=0.8)
    ax.set_title(f"{branch} Fisher statistics (normalised), PCA")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def plot_ap_change(
    per_class_a: dict, per_class_b: dict, categories: list[dict], out_png: str | os.PathLike, title: str
) -> None:
    """Per-class AP change (b - a) against training instances on a log axis, bbox and segm panels.

    Args:
        per_class_a, per_class_b: ``{"bbox": {class name: AP}, "segm": {...}}`` (AP < 0: undefined, skipped).
        categories: LVIS categories (``name``, ``frequency``, ``instance_count``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, iou in zip(axes, ("bbox", "segm")):
        for g in "fcr":
            cats = [
                c
                for c in categories
                if c["frequency"] == g
                and per_class_a[iou].get(c["name"], -1) >= 0
                and per_class_b[iou].get(c["name"], -1) >= 0
            ]
            x = [max(1, c.get("instance_count", 1)) for c in cats]
            y = [100 * (per_class_b[iou][c["name"]] - per_class_a[iou][c["name"]]) for c in cats]
            ax.scatter(x, y, c=GROUP_COLOURS[g], label=GROUP_NAMES[g], s=25)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("training instances")
        ax.set_title(f"{iou}: per-class AP change")
    axes[0].set_ylabel("AP change (points)")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def read_per_class_csv(path: str | os.PathLike) -> dict:
    """``{"bbox": {class: AP}, "segm": {class: AP}}`` from an evaluate per-class CSV (missing = -1)."""
    import csv

    out = {"bbox": {}, "segm": {}}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for iou in out:
                v = row.get(f"{iou}_AP", "")
                out[iou][row["class"]] = float(v) if v not in ("", None) else -1.0
    return out
