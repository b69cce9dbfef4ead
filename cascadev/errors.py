"""Errors shared by every command: the bottom of the package, importing nothing of it."""


class UserError(Exception):
    """A problem with the user's input; printed as one line, without a traceback."""
