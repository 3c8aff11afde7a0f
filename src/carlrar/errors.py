"""One exception type for every failure a user can fix: the CLI prints its message as one line, no traceback."""


class CarlrarError(Exception):
    """A problem with the user's input, data or environment, explained in the message."""
