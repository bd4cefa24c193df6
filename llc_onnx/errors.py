"""One error type for bad user input: a single line naming the file/node/tensor and the fix; and the first line
of another library's error, to quote inside it."""


class LLCError(Exception):
    """Bad input or an unrecoverable condition the user can fix. The CLI prints ``error: <message>``
    on one line and exits with :attr:`exit_code` (2)."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type name when the message is empty), to quote in an
    :class:`LLCError`: ``LLCError(f"{path}: cannot read ({first_line(exc)}); ...")``."""
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__
