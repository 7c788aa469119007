"""Output files that appear only when complete and checked: temp name beside the target, then rename."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from compress.errors import CompressError


def temp_beside(out: Path) -> Path:
    """Reserve a temporary file in `out`'s directory (so the final rename is atomic); fails early if unwritable."""
    if out.is_dir():
        raise CompressError(f"--out {out} is a directory; give a file name such as {out / 'model.onnx'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as exc:
        raise CompressError(f"cannot write to --out {out}: {exc.strerror or exc}") from None
    os.close(fd)
    return Path(name)


def failed_path(out: Path) -> Path:
    return out.with_name(out.name + ".failed")


def keep_failed(tmp: Path, out: Path) -> Path:
    """Move a file that failed its check to `<out>.failed`.

    A stale file at `out` would be mistaken for this export's output, so it is removed.
    """
    failed = failed_path(out)
    os.replace(tmp, failed)
    out.unlink(missing_ok=True)
    return failed


def print_note(message: str) -> None:
    """Status lines go to stderr, keeping stdout for the result table."""
    from compress.progress import console

    console.print(message, highlight=False, markup=False)
