"""One exception type for mistakes a user can fix; the CLIs print it as one line, never a traceback."""


class UserError(Exception):
    """Bad input, a mismatch, or a refusal that the user can act on.

    The message must name the offending input (a path, a flag, a value) and fit on one line.
    """
