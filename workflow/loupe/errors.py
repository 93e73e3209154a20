"""The one exception type for problems a user can cause and fix."""


class LoupeError(Exception):
    """Bad input or configuration: the CLI prints the message as one line, no traceback."""
