"""The one exception type for mistakes a user can fix (bad config, missing data, bad resume).

The CLI turns it into a single line on stderr and exit code 2; anything else is a bug and
keeps its traceback.
"""

import difflib


class UserError(ValueError):
    """A problem with the user's input; the message says what is wrong and how to fix it."""


def suggest(name: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""
