"""Errors that the user fixes: the command line prints their message as one line and exits 2."""


class UserError(ValueError):
    """A config, data or workdir problem; the message names the problem and the fix."""
