"""The one exception type for user mistakes.

Anything the user can fix (an unknown model name, a missing data file, a checkpoint from
another tool) raises `UserError`. The CLI turns it into one line on stderr and exit
status 2; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input, with a message that says what is valid."""
