"""Exceptions the CLI turns into one-line messages and exit codes (design.md: 2 bad input, 1 failed check)."""


class CompressError(Exception):
    """Bad usage or bad input: the CLI prints the message on one line and exits with code 2."""

    exit_code = 2


class CheckFailed(CompressError):
    """A check that ran and failed (parity, latency gate): exit code 1."""

    exit_code = 1
