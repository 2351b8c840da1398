"""Safe loading of mmdet/mmengine checkpoints under torch >= 2.6.

torch >= 2.6 loads with ``weights_only=True`` by default, and mmengine 0.10.7
calls ``torch.load`` without the argument. A checkpoint saved by mmengine's
Runner holds more than tensors (the message hub's ``HistoryBuffer`` objects,
numpy arrays and scalars in its meta), so ``init_detector`` and Runner resume
fail on the project's own checkpoints. We keep the safe loader and allow-list
exactly the known mmengine and numpy types (:func:`allow_mmengine_pickles`);
arbitrary pickles are loaded only when the user opts in with
``--trust-checkpoint`` (:func:`trusted_loading`), since unpickling can run
arbitrary code.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from crat_ft.errors import UserError

_TRUST_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def _known_safe_globals() -> list:
    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer

    # HistoryBuffer pickles its statistics methods as getattr(HistoryBuffer, "min"):
    # getattr only fetches attributes; the safe unpickler still refuses to
    # call anything that is not allow-listed, so this opens no code path.
    safe = [HistoryBuffer, getattr, np.ndarray, np.dtype, np.core.multiarray._reconstruct, np.core.multiarray.scalar]
    # numpy >= 1.25 pickles dtypes as instances of numpy.dtypes.*DType classes
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        safe += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    safe += [type(np.dtype(t)) for t in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1")]
    return safe


def allow_mmengine_pickles() -> None:
    """Allow-list mmengine's and numpy's checkpoint types for ``torch.load(weights_only=True)``.

    Idempotent. Affects only what the safe loader accepts; it never enables
    arbitrary unpickling.
    """
    import torch

    if hasattr(torch.serialization, "add_safe_globals"):
        torch.serialization.add_safe_globals(_known_safe_globals())


@contextlib.contextmanager
def trusted_loading(trust: bool):
    """Within this context, ``torch.load`` unpickles anything if ``trust`` is set.

    Use only for checkpoints the user vouches for (``--trust-checkpoint``).
    """
    if not trust:
        yield
        return
    old = os.environ.get(_TRUST_ENV)
    os.environ[_TRUST_ENV] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_TRUST_ENV, None)
        else:
            os.environ[_TRUST_ENV] = old


def load_checkpoint_file(path: str | os.PathLike, *, trust: bool = False) -> dict:
    """Load a checkpoint dict on the CPU, safely unless ``trust``.

    Raises:
        UserError: missing file, unreadable or truncated file, or a file that
            needs unpickling beyond the allow-list (the message says to pass
            ``--trust-checkpoint`` if the file is trusted).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; check the path or train one with `crat-ft train-detector`")
    allow_mmengine_pickles()
    try:
        with trusted_loading(trust):
            ckpt = torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as exc:  # torch raises many types for corrupt files
        msg = str(exc)
        unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg)
        if unsafe:
            raise UserError(
                f"checkpoint {path} contains Python objects outside crat-ft's safe allow-list ({unsafe.group(1)}); "
                "if you trust this file, rerun with --trust-checkpoint"
            ) from None
        detail = re.search(r"WeightsUnpickler error: \s*(.+)", msg)
        text = detail.group(1).strip() if detail else (msg.splitlines()[0] if msg else type(exc).__name__)
        raise UserError(f"checkpoint {path} could not be read ({text}); the file is corrupt or truncated: re-download or re-train it") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"checkpoint {path}: expected a dict (state_dict or mmengine checkpoint), got {type(ckpt).__name__}")
    return ckpt


def state_dict_of(ckpt: dict) -> dict:
    """The model weights of a checkpoint (mmengine's ``state_dict`` or a bare state dict)."""
    sd = ckpt.get("state_dict", ckpt)
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
