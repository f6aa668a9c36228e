"""Errors the command line reports as one line (no traceback).

UserError: a config, data or workdir problem the user fixes; exit status 2.
RunStopped: the run stopped itself to lose nothing (diverged, disk full, no readable
checkpoint); exit status 1.
"""


class UserError(ValueError):
    """A config, data or workdir problem; the message names the problem and the fix."""

    exit_code = 2


class ConfigError(UserError):
    """A config value or combination the user fixes on the command line."""


class RunStopped(UserError):
    """The run cannot go on without losing work; the message says what happened and what to do."""

    exit_code = 1
