"""One child process of the zoo sweep, measured: exit code, one-line error, peak resident memory, wall time.

Each step of a sweep entry (prune, reload, export) runs the real `compress` command line in a fresh
process, exactly as a user would. The parent polls the child's resident memory and kills it above a
hard cap or past a time limit (a safety net: the engine's own guard should refuse long before), and
reads the child's peak resident set from the kernel when it exits (ru_maxrss).

The command runs under a small launcher process (no torch loaded) that reports the command's
ru_maxrss: a child forked straight from this process would count this process's own memory in its
peak (ru_maxrss survives exec, and a vfork child shares its parent's memory until then).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TRACEBACK = "Traceback (most recent call last)"
POLL_S = 0.1
# argv[1]: file for the command's peak resident KiB; argv[2:]: the command. Exit code: the command's.
_LAUNCHER = ("import resource, subprocess, sys\n"
             "rc = subprocess.call(sys.argv[2:])\n"
             "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
             "sys.exit(rc if rc >= 0 else 128 - rc)\n")


@dataclass
class Outcome:
    """What one child did: `rc` is its exit code (negative: killed by a signal)."""

    rc: int
    seconds: float
    peak_rss_gb: float
    stdout: str
    stderr: str
    killed: str | None = None   # why the parent killed it ("memory", "time"), or None

    @property
    def traceback(self) -> bool:
        return TRACEBACK in self.stderr or TRACEBACK in self.stdout

    def error_line(self) -> str:
        """The child's one-line error ("error: …" from the CLI), else the last line it wrote to stderr."""
        if self.killed:
            return self.killed
        lines = [ln.strip() for ln in self.stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("error:")]
        return (errors[-1] if errors else lines[-1] if lines else f"exit code {self.rc}").removeprefix("error: ")


def compress_cli(*args: str) -> list[str]:
    """The argv that runs `compress ARGS…` with this interpreter (and this checkout's code)."""
    return [sys.executable, "-c", "from cli import main; main()", *args]


def run_measured(argv: list[str], *, max_rss_gb: float, timeout_s: float, env: dict[str, str] | None = None,
                 cwd: str | None = None) -> Outcome:
    """Run `argv`, killing it (its whole process group) above `max_rss_gb` resident or after `timeout_s`."""
    started = time.perf_counter()
    out_path, err_path, peak_path = _scratch_files()
    polled = 0.0
    try:
        with open(out_path, "w+") as out, open(err_path, "w+") as err:
            proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, peak_path, *argv], stdout=out, stderr=err,
                                    env=env, cwd=cwd, start_new_session=True)
            killed = None
            try:
                while proc.poll() is None:
                    rss = _group_rss_gb(proc.pid)
                    polled = max(polled, rss)
                    if rss > max_rss_gb:
                        killed = f"killed by the sweep: resident memory reached {rss:.1f} GB (cap {max_rss_gb:g} GB)"
                    elif time.perf_counter() - started > timeout_s:
                        killed = f"killed by the sweep: still running after {timeout_s:.0f} s"
                    if killed:
                        _kill_group(proc.pid)
                        proc.wait()
                        break
                    time.sleep(POLL_S)
            except BaseException:
                _kill_group(proc.pid)
                proc.wait()
                raise
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
        reported = Path(peak_path).read_text().strip()
        peak = int(reported) / 1024**2 if reported.isdigit() else polled
    finally:
        for path in (out_path, err_path, peak_path):
            os.unlink(path)
    return Outcome(rc=proc.returncode, seconds=round(time.perf_counter() - started, 2), peak_rss_gb=round(peak, 3),
                   stdout=stdout, stderr=stderr, killed=killed)


def _scratch_files() -> tuple[str, str, str]:
    import tempfile

    paths = []
    for suffix in (".out", ".err", ".peak"):
        fd, path = tempfile.mkstemp(prefix="compress-zoo-", suffix=suffix)
        os.close(fd)
        paths.append(path)
    return paths[0], paths[1], paths[2]


def _group_rss_gb(group: int) -> float:
    """Resident memory of every process in process group `group` (the launcher and the command)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 21 and int(fields[2]) == group:     # fields after the name: state ppid pgrp … rss
            total += int(fields[21])
    return total * os.sysconf("SC_PAGE_SIZE") / 1024**3


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
