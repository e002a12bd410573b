"""The one exception type for a user's mistake.

A `VlmkitError` carries a single line: what was wrong, where (file, line, field) and what to do. The
CLI prints it without a traceback and exits non-zero; anything else that escapes is a bug.
"""


class VlmkitError(Exception):
    """A user-facing error: bad input, an unknown name, a missing file."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (or its type's name): what a one-line error quotes."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
