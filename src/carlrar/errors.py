"""One exception type for every failure a user can fix: the CLI prints its message as one line, no traceback."""


class CarlrarError(Exception):
    """A problem with the user's input, data or environment, explained in the message."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), for one-line error messages."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class TrainingDiverged(CarlrarError):
    """A loss, gradient or weight became NaN or infinite: the run stops before it writes anything of it."""
