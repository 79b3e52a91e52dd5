"""The one exception type that means "the user's input is wrong" (printed as one line, no traceback)."""


class UserError(Exception):
    """Bad input from the user: a missing file, a wrong flag, a malformed config.

    The message must name the file, key or flag, say what is wrong and what to do. Entry scripts print it as a
    single line and exit non-zero; the traceback is shown only with ``--debug``.
    """
