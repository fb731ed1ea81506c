"""The one exception type whose message the CLI shows the user as a single line."""


class UserError(Exception):
    """Bad input from the user: the message says what is wrong, where, and what to do.

    The CLI prints ``autosplit: <message>`` and exits with status 2; no traceback.
    """
