"""The one exception type for mistakes a user can fix.

It lives in ``cluster`` because that is the bottom of the import graph
(flows → tasks → cluster): every layer can raise it, and the CLI prints it as
one line instead of a traceback.
"""


class UserError(ValueError):
    """An input the user gave cannot work; the message names it and the fix."""
