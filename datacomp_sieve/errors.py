"""One exception for user mistakes: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """A problem with the user's input (paths, flags, data) that they can fix."""
