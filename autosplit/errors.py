"""The one exception type whose message the CLI shows the user as a single line."""


class UserError(Exception):
    """Bad input from the user: the message says what is wrong, where, and what to do.

    The CLI prints ``autosplit: <message>`` and exits with status 2; no traceback.
    """


def redact_url(url: str) -> str:
    """``url`` with its password hidden, for messages (database and tracking URLs)."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        if ":" in creds:
            return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url
