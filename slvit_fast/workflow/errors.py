"""The one error type the command line turns into a one-line message with exit code 2."""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """Bad input from the user (a data path, a file format, an option combination): not a bug.

    ``slvit-fast`` prints ``slvit-fast <command>: error: <message>`` on stderr and exits with 2;
    library callers get an ordinary ``ValueError`` subclass.
    """
