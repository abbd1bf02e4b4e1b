"""Exceptions that the CLI maps to exit codes (2: bad input, 1: a check failed)."""


class GradprobeError(Exception):
    """Bad input or usage: the CLI prints the message on one line and exits with 2."""


class CheckFailed(Exception):
    """A check ran and failed: exit code 1."""
