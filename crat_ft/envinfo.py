"""The software stack, for bug reports (``crat-ft env``)."""

from __future__ import annotations

import importlib
import platform
import sys

MMCV_FIX = (
    "build mmcv 2.1.0 with its compiled ops: run `bash scripts/setup.sh` (CPU), "
    "or on GPU machines `pip install -U openmim && mim install mmcv==2.1.0`"
)


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # any import failure is a finding to report
        return f"not importable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return str(getattr(mod, "__version__", "unknown"))


def collect() -> tuple[list[tuple[str, str]], list[str]]:
    """Rows ``(name, value)`` describing the stack, and the problems found (each with its fix)."""
    import crat_ft

    rows = [("crat-ft", crat_ft.__version__), ("python", sys.version.split()[0]), ("platform", platform.platform())]
    problems = []
    torch_v = _version("torch")
    rows.append(("torch", torch_v))
    try:
        import torch

        cuda = torch.cuda.is_available()
        rows.append(
            (
                "CUDA available",
                f"{cuda}" + (f" ({torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda})" if cuda else ""),
            )
        )
    except Exception:
        problems.append("torch is not importable; run `bash scripts/setup.sh`")
    rows.append(("torchvision", _version("torchvision")))
    mmcv_v = _version("mmcv")
    rows.append(("mmcv", mmcv_v))
    try:
        from mmcv.ops import nms, roi_align  # noqa: F401  (compiled ops)

        rows.append(("mmcv compiled ops", "loaded (nms, roi_align)"))
    except Exception as exc:
        rows.append(("mmcv compiled ops", f"MISSING ({type(exc).__name__})"))
        problems.append(f"mmcv's compiled ops do not load; {MMCV_FIX}")
    for name in ("mmengine", "mmdet", "h5py", "faster_coco_eval", "lvis", "numpy", "click"):
        v = _version(name)
        rows.append((name.replace("_", "-"), v))
        if v.startswith("not importable"):
            problems.append(
                f"{name} is not importable; run `bash scripts/setup.sh` (or pip install {name.replace('_', '-')})"
            )
    return rows, problems


def format_rows(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
