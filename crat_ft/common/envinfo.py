"""The software stack, for bug reports (``crat-ft env``), and the range crat-ft is tested on.

Two stacks are tested (CI runs the whole test suite on both): Python 3.11 with torch 2.14.1 and mmcv
2.1.0 built from source (``scripts/setup.sh``), and the stack LVIS labs run: Python 3.10, torch 2.1.2,
torchvision 0.16.2, numpy 1.26 and mmcv 2.1.0 (OpenMMLab's prebuilt wheels exist for torch <= 2.1).
:data:`SUPPORTED` is the range between them; every command refuses an mmcv or mmdet outside it
(:func:`check_supported_stack`), since a model built by another mmdet or mmcv is not what crat-ft
checked against.
"""

from __future__ import annotations

import importlib
import platform
import sys

from crat_ft.common.errors import UserError

# distribution -> (lowest version, first version past the range), as tuples of ints
SUPPORTED = {
    "python": ((3, 10), (3, 12)),
    "torch": ((2, 1), (2, 15)),
    "numpy": ((1, 22), (2, 0)),
    "mmcv": ((2, 0), (2, 2)),
    "mmengine": ((0, 10), (0, 11)),
    "mmdet": ((3, 3), (3, 4)),
}
REFUSED_OUTSIDE = ("mmcv", "mmdet")  # every command refuses these outside the range: they build the models

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


def _parse(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _installed(name: str) -> str | None:
    """The installed version of a distribution, without importing it (None if absent)."""
    from importlib.metadata import PackageNotFoundError, version

    if name == "python":
        return platform.python_version()
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _range_text(name: str) -> str:
    low, high = SUPPORTED[name]
    return f">={'.'.join(map(str, low))}, <{'.'.join(map(str, high))}"


def outside_range() -> dict[str, str]:
    """``{name: installed version}`` of what is installed outside :data:`SUPPORTED`."""
    found = {}
    for name, (low, high) in SUPPORTED.items():
        v = _installed(name)
        if v is not None and not (low <= _parse(v) < high):
            found[name] = v
    return found


def check_supported_stack() -> None:
    """Refuse an mmcv or mmdet outside the tested range, in one line (what every command runs first)."""
    for name, v in outside_range().items():
        if name in REFUSED_OUTSIDE:
            raise UserError(
                f"{name} {v} is outside the range crat-ft is tested with ({name}{_range_text(name)}); "
                f"install a {name} in that range (`crat-ft env` shows the whole stack)"
            )


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
        if "undefined symbol" in str(exc):  # built against another torch's C++ library
            rows.append(("mmcv compiled ops", "BUILT FOR ANOTHER TORCH (undefined symbol)"))
            problems.append(
                f"mmcv {mmcv_v}'s compiled ops were built for another torch than the installed {torch_v}; rebuild "
                "them for this torch (`bash scripts/setup.sh` takes or builds the wheel for it), or reinstall the "
                "torch that mmcv was built for"
            )
        else:
            rows.append(("mmcv compiled ops", f"MISSING ({type(exc).__name__})"))
            problems.append(f"mmcv's compiled ops do not load; {MMCV_FIX}")
    for name in ("mmengine", "mmdet", "h5py", "faster_coco_eval", "lvis", "numpy", "click"):
        v = _version(name)
        rows.append((name.replace("_", "-"), v))
        if v.startswith("not importable"):
            problems.append(
                f"{name} is not importable; run `bash scripts/setup.sh` (or pip install {name.replace('_', '-')})"
            )
    outside = outside_range()
    if outside:
        rows.append(("tested range", "OUTSIDE: " + ", ".join(f"{n} {v}" for n, v in outside.items())))
        problems.extend(  # the others may work: the row says they were not tested
            f"{n} {v} is outside the tested range ({n}{_range_text(n)}); crat-ft's commands refuse to run with it"
            for n, v in outside.items()
            if n in REFUSED_OUTSIDE
        )
    else:
        rows.append(("tested range", "inside (" + ", ".join(f"{n}{_range_text(n)}" for n in SUPPORTED) + ")"))
    return rows, problems


def format_rows(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
