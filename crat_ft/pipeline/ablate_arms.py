"""The ARMS file of ``crat-ft ablate``: its arms, reference and contrasts, checked when it is read.

An ARMS file is an mmengine-style Python file (``configs/ablate/``) with

- ``arms``: a list of dicts, each with ``name`` (letters, digits, ``_``, ``+``, ``-``), ``ft_config`` (a
  fine-tune config; a relative path is relative to the ARMS file), ``cfg_options`` (``{dotted key: value}``,
  or ``["key=value", ...]`` as ``--cfg-options`` takes them) and ``export`` (``tau_norm``,
  ``logit_adjust``, ``combine_original``: applied when the arm is evaluated, as ``crat-ft export`` folds
  them in);
- ``reference`` (default: the first arm), which every other arm is compared with;
- ``contrasts``: pairs ``(A, B)`` of arms, each compared as B - A (e.g. CRAT against a control).

Names starting with ``_`` are the file's own helpers. A string value of ``cfg_options`` may hold
``{arm.quantity}``, a number measured in an earlier arm's run of the same seed (:data:`MEASURED`),
inside an arithmetic expression: ``"1 + {crat.mass_box}"`` is one plus the ``crat`` arm's mean
gradient-mass ratio of the box branch. ``train.seed`` comes from ``--seeds`` and ``export.*`` from the
arm's ``export``, so neither may be set in ``cfg_options``.

Also here, for :mod:`crat_ft.pipeline.ablate` and :mod:`crat_ft.pipeline.ablate_table`: the names of what a run directory
``W/s<seed>/<arm>/`` holds beside retrain-heads' and evaluate's outputs, and the console line.
"""

from __future__ import annotations

import ast
import copy
import operator
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from crat_ft.common.errors import UserError

# what a run measures that a later arm may use: CRAT's gradient-mass ratios (crat.log_mass=True)
MEASURED = ("mass_box", "mass_mask")
ARM_KEYS = ("name", "ft_config", "cfg_options", "export")
FILE_KEYS = ("arms", "reference", "contrasts")
EXPORT_KEYS = ("tau_norm", "logit_adjust", "combine_original")
ARM_FILE = "arm.json"  # the arm's definition as run, and its times (crat_ft.pipeline.ablate.plan)
ERRORS_FILE = "errors.json"  # the error decomposition and class-oracle AP (crat_ft.pipeline.ablate.analyze_arm)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+-]*\Z")
_USE = re.compile(r"\{([^{}]*)\}")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def say(msg: str) -> None:
    """A console line of the ablation (rank 0 only under torchrun)."""
    from crat_ft.common.dist import rank

    if rank() == 0:
        print(f"[crat-ft ablate {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass(frozen=True)
class Arm:
    """One arm: a fine-tune config, its overrides, and the export options it is evaluated with.

    Args:
        name: the arm's name (its run directories are ``s<seed>/<name>``).
        ft_config: the fine-tune config file.
        cfg_options: ``{dotted key: value}``; a string holding ``{arm.quantity}`` is resolved per seed.
        export: ``{tau_norm|logit_adjust|combine_original: value}`` (the keys given).
    """

    name: str
    ft_config: Path
    cfg_options: dict = field(default_factory=dict)
    export: dict = field(default_factory=dict)

    @property
    def uses(self) -> list[tuple[str, str]]:
        """``(arm, quantity)`` of every measured value the arm's options hold, in order."""
        found = []
        for value in self.cfg_options.values():
            if isinstance(value, str):
                found += [tuple(m.split(".", 1)) if "." in m else (m, "") for m in _USE.findall(value)]
        return found

    def options(self, measured: dict[str, dict[str, float]], seed: int) -> dict:
        """The arm's ``cfg_options`` for one seed: each ``{arm.quantity}`` replaced by ``measured[arm][quantity]``
        (the expression evaluated), and ``train.seed``. A fresh copy (mmengine's merge consumes ``_delete_``)."""
        out = {}
        for key, value in self.cfg_options.items():
            if isinstance(value, str) and _USE.search(value):
                value = evaluate_expression(value, lambda arm, qty: _measured(measured, self.name, arm, qty))
            out[key] = copy.deepcopy(value)
        out["train.seed"] = seed
        return out


def _measured(measured: dict, user: str, arm: str, quantity: str) -> float:
    if quantity not in measured.get(arm, {}):
        raise UserError(
            f"arm {user!r} uses {arm}.{quantity}, which arm {arm!r} did not measure; "
            f"log it there (cfg_options crat.log_mass=True) or drop it from arm {user!r}"
        )
    return measured[arm][quantity]


def evaluate_expression(text: str, lookup) -> float:
    """The value of ``text``: numbers, ``{arm.quantity}`` (``lookup(arm, quantity)``), ``+ - * /`` and brackets.

    Each quantity enters as the float it is (its ``repr`` is exact), so ``"1 + {crat.mass_box}"`` is
    ``1 + mass_box`` to the last bit.

    Raises:
        ValueError: anything else in ``text``.
    """

    def put(m: re.Match) -> str:
        arm, _, quantity = m.group(1).partition(".")
        return repr(float(lookup(arm, quantity)))

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            return value(node.operand) if isinstance(node.op, ast.UAdd) else -value(node.operand)
        raise ValueError(f"{ast.dump(node)} is not arithmetic")

    try:
        return float(value(ast.parse(_USE.sub(put, text), mode="eval").body))
    except SyntaxError as exc:
        raise ValueError(str(exc)) from None


@dataclass(frozen=True)
class Ablation:
    """An ARMS file as read: its arms in order, the reference arm and the contrasts ``(A, B)``."""

    path: Path
    arms: tuple[Arm, ...]
    reference: str
    contrasts: tuple[tuple[str, str], ...] = ()

    def rows(self) -> list[tuple[str, str]]:
        """The comparisons ``(A, B)``, each B - A: every arm against the reference, then the contrasts."""
        rows = [(self.reference, a.name) for a in self.arms if a.name != self.reference]
        return rows + [c for c in self.contrasts if c not in rows]

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)


def load_arms(path: str | os.PathLike, reference: str | None = None) -> Ablation:
    """Read and check an ARMS file (module docstring); every fine-tune config is read with the arm's options.

    Args:
        reference: the arm every other is compared with (``--reference``; default: the file's, else the first arm).

    Raises:
        UserError: one line naming the file, the arm and the key, before anything is written.
    """
    from crat_ft.engine.config import load_config

    path = Path(path)
    if not path.is_file():
        raise UserError(f"ARMS file {path} does not exist; pass an arms file such as configs/ablate/crat_controls.py")
    where = f"ARMS file {path}"
    doc = {k: v for k, v in load_config(path).to_dict().items() if not k.startswith("_")}
    unknown = sorted(set(doc) - set(FILE_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}; known keys are {list(FILE_KEYS)} (helpers start with _)")
    items = doc.get("arms")
    if not isinstance(items, (list, tuple)) or len(items) < 2:
        raise UserError(f"{where}: expected `arms`, a list of two or more dicts, got {items!r}; see configs/ablate/")
    arms: list[Arm] = []
    logs_mass: set[str] = set()  # the arms whose runs measure MEASURED (crat.log_mass)
    for i, item in enumerate(items):
        arm, ft = _read_arm(item, f"{where}: arm {i}", path.parent, [a.name for a in arms])
        for used, quantity in arm.uses:
            if used not in logs_mass:
                raise UserError(
                    f"{where}: arm {arm.name!r} uses {used}.{quantity}, but arm {used!r} does not measure it; "
                    f"set crat.log_mass=True in arm {used!r}'s cfg_options"
                )
        if ft["crat"].get("log_mass"):
            logs_mass.add(arm.name)
        arms.append(arm)
    names = [a.name for a in arms]
    reference = reference if reference is not None else doc.get("reference", names[0])
    if reference not in names:
        raise UserError(f"{where}: the reference should be one of the arms {names}, got {reference!r}")
    contrasts = []
    for pair in doc.get("contrasts") or []:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and pair[0] != pair[1] and set(pair) <= set(names)):
            raise UserError(f"{where}: a contrast should be a pair (A, B) of two of the arms {names}, got {pair!r}")
        contrasts.append((pair[0], pair[1]))
    return Ablation(path, tuple(arms), reference, tuple(contrasts))


def _read_arm(item, where: str, base: Path, earlier: list[str]) -> tuple[Arm, dict]:
    """One arm of an ARMS file, checked, and its fine-tune config read with its options (measured values as 1)."""
    from crat_ft.engine.config import parse_cfg_options
    from crat_ft.heads.ft_config import load_ft_config

    if not isinstance(item, dict):
        raise UserError(f"{where}: expected a dict with keys {list(ARM_KEYS)}, got {item!r}")
    unknown = sorted(set(item) - set(ARM_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}; known keys are {list(ARM_KEYS)}")
    name = item.get("name")
    if not isinstance(name, str) or not _NAME.match(name) or name in earlier:
        why = "a name used by an earlier arm" if name in earlier else repr(name)
        raise UserError(f"{where}: `name` should be a new name of letters, digits, _, + and -, got {why}")
    where = f"{where} ({name})"
    if not isinstance(item.get("ft_config"), str):
        raise UserError(f"{where}: `ft_config` should be the path of a fine-tune config, got {item.get('ft_config')!r}")
    ft_config = (base / item["ft_config"]).resolve()
    options = item.get("cfg_options") or {}
    if isinstance(options, (list, tuple)):  # as --cfg-options, but a value using a measured quantity stays text
        parsed = {}
        for option in map(str, options):
            key, _, value = option.partition("=")
            parsed.update({key: value} if "{" in value else parse_cfg_options([option]))
        options = parsed
    if not isinstance(options, dict):
        raise UserError(f"{where}: `cfg_options` should be a dict or a list of 'key=value', got {options!r}")
    for key in options:
        if key == "train.seed" or key == "export" or key.startswith("export."):
            raise UserError(
                f"{where}: `cfg_options` sets {key}, which comes from --seeds (train.seed) or the arm's "
                "`export` (export.*); remove it there"
            )
    export = item.get("export") or {}
    if not isinstance(export, dict) or set(export) - set(EXPORT_KEYS):
        raise UserError(f"{where}: `export` should be a dict with keys among {list(EXPORT_KEYS)}, got {export!r}")
    for key, value in export.items():
        top = 1.0 if key == "combine_original" else float("inf")
        if value is not None and not (type(value) in (int, float) and 0 <= value <= top):
            raise UserError(f"{where}: export.{key} should be a number in [0, {top}], got {value!r}")
    arm = Arm(name, ft_config, dict(options), dict(export))
    for used, quantity in arm.uses:
        if used not in earlier or quantity not in MEASURED:
            raise UserError(
                f"{where}: {{{used}.{quantity}}} should name an earlier arm and one of {list(MEASURED)}; "
                f"list arm {used!r} before {name!r}, or fix the name"
            )
    try:
        options = arm.options({a: dict.fromkeys(MEASURED, 1.0) for a in earlier}, 0)
    except ValueError as exc:
        raise UserError(
            f"{where}: a cfg_options value is no arithmetic of numbers and {{arm.quantity}} ({exc})"
        ) from None
    try:
        return arm, load_ft_config(ft_config, options)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
