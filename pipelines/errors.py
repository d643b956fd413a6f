"""Errors caused by the user's input. The CLI prints them as one line and exits non-zero."""


class InputError(Exception):
    """Bad input: a missing file, an unknown format, a missing column, an unparsable line.

    The message must name the field, file or line at fault; it is shown to the user as is.
    """
