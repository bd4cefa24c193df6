"""One error type for bad user input: a single line naming the file/node/tensor and the fix."""


class LLCError(Exception):
    """Bad input or an unrecoverable condition the user can fix. The CLI prints ``error: <message>``
    on one line and exits with :attr:`exit_code` (2)."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line
