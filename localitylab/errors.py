"""The one exception type for user mistakes.

Anything the user can fix (an unknown model name, a missing data file, a checkpoint from
another tool) raises `UserError`. The CLI turns it into one line on stderr and exit
status 2; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input, with a message that says what is valid."""


class RunStopped(Exception):
    """A training run stopped on request (SIGINT/SIGTERM) after writing its checkpoint. Not
    an error: the CLI prints the message and exits with the signal's conventional status
    (130 for SIGINT, 143 for SIGTERM), and `--resume` continues the run."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
