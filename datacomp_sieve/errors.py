"""One exception for user mistakes: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """A problem with the user's input (paths, flags, data) that they can fix."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when the message is empty."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def one_line(e: BaseException) -> str:
    """An exception's whole message on one line (its lines and runs of spaces joined by one space)."""
    return " ".join(str(e).split())


def error_line(e: BaseException) -> str:
    """One line naming an exception: ``Type: first line of the message``."""
    name = type(e).__name__
    return f"{name}: {first_line(e)}" if str(e).strip() else name
