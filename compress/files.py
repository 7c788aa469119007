"""Output files that appear only when complete: written under a temporary name beside the target, then renamed."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def write_generated_block(path: Path, begin: str, end: str, body: str, new_file: str = "") -> None:
    """Put `body` between the `begin` and `end` markers of a document (appended if they are absent;
    `new_file` starts a document that does not exist yet). Text outside the markers is kept, so a
    hand-written analysis survives the command that regenerates its table."""
    block = f"{begin}\n{body}\n{end}"
    text = path.read_text() if path.is_file() else new_file
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + ("\n\n" if text.strip() else "") + block + "\n"
    write_atomic(path, text.encode())
