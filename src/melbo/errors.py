"""One exception type for everything a user can fix.

The CLI prints a `MelboError` as one line and exits with status 2; every message names the fix.
"""


class MelboError(Exception):
    """A problem with the user's input or environment, explained in one line that names the fix."""
