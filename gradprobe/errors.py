"""Exceptions that the CLI maps to exit codes (2: bad input, 1: a check failed, 4: interrupted)."""


class GradprobeError(Exception):
    """Bad input or usage: the CLI prints the message on one line and exits with 2."""


class CheckFailed(Exception):
    """A check ran and failed: exit code 1."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived (a batch scheduler's preemption, Ctrl-C): write what was done, then exit 4."""

    def __init__(self, signame: str = "SIGINT"):
        super().__init__(signame)
        self.signame = signame
