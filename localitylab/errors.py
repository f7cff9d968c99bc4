"""The one exception type for user mistakes.

Anything the user can fix (an unknown model name, a missing data file, a checkpoint from
another tool) raises `UserError`. The library speaks Python: a message names a setting as
the keyword a Python caller passes (`batch_size must be at least 1, got 0`) and lists it in
`settings`; the CLI alone turns those names into its flags (`--batch-size`) and the error
into one line on stderr with exit status 2. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input, with a message that says what is valid.

    `setting` / `settings`: the settings the message names, by their Python names, so that
    a front end can say them its own way (the CLI: `--batch-size`)."""

    def __init__(self, message: str = "", *, setting: str | None = None, settings: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.settings: tuple[str, ...] = ((setting,) if setting else ()) + tuple(settings)


class RunStopped(Exception):
    """A training run stopped on request (SIGINT/SIGTERM) after writing its checkpoint. Not
    an error: the front end says so and exits with the signal's conventional status (130 for
    SIGINT, 143 for SIGTERM); resuming the run continues it."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
