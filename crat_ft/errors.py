"""The one exception type for bad user input.

A :class:`UserError` carries a one-line message of the form
"what: expected X, got Y; how to fix". The CLI prints it without a traceback
and exits with code 2; library callers can catch it as a ``ValueError``.
"""


class UserError(ValueError):
    """Bad input from the user (file, option, config); the message says the fix."""
