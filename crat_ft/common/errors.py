"""The exception types for bad input and failed outputs.

A :class:`UserError` carries a one-line message of the form
"what: expected X, got Y; how to fix". The CLI prints it without a traceback
and exits with its ``exit_code``: 2 for bad input, 1 for an output that could
not be written (:class:`StorageError`); library callers can catch both as a
``ValueError``.
"""


class UserError(ValueError):
    """Bad input from the user (file, option, config); the message says the fix."""

    exit_code = 2


class StorageError(UserError):
    """An output could not be written (disk full, read-only, no permission): exit code 1."""

    exit_code = 1


def sha_mismatch(subject: str, recorded_sha: str, checkpoint: str, sha: str, fix: str) -> UserError:
    """The error for files made from another checkpoint than the one given.

    Args:
        subject: what was made from a checkpoint, e.g. ``"feature cache X"``.
        recorded_sha: the sha256 it records.
        checkpoint: the given checkpoint (its path, or a description).
        sha: the given checkpoint's sha256.
        fix: how to fix it.
    """
    return UserError(
        f"{subject} was made from checkpoint sha256 {str(recorded_sha)[:12]}..., not {checkpoint} ({sha[:12]}...); {fix}"
    )
