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


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA, MPS), Python's MemoryError, or an allocator's RuntimeError: exit 5."""
    if type(exc).__name__ in ("OutOfMemoryError", "MemoryError"):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
