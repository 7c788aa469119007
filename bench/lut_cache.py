"""The on-disk cache of latency lookup tables, keyed by everything a measurement depends on.

One JSON file per measured thing (a layer's table, a whole network): its name is a hash of the key —
backend, library versions, host (name, CPU, GPUs), batch size, threads, precision and the layer's
signature and grid — and the key is stored inside, so a file copied from another machine or
left by another version is recognised as foreign, not trusted. A corrupt or foreign file is
measured again (one line says so) and replaced atomically; nothing half-written is ever read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from compress.errors import CompressError
from compress.files import write_atomic

CACHE_FORMAT = 2
ENV_DIR = "COMPRESS_CACHE_DIR"


def default_cache_dir() -> Path:
    """$COMPRESS_CACHE_DIR/latency, else $XDG_CACHE_HOME/compress/latency, else ~/.cache/compress/latency."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]) / "latency"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "compress" / "latency"


@dataclass(frozen=True)
class TableTarget:
    """Where latency is measured: a bench backend, its threads, batch size and precision."""

    backend: str
    threads: int
    batch_size: int = 1
    precision: str = "fp32"
    clock: str = "wall"          # "cpu": the calling thread's CPU time (one thread; immune to preemption)

    def describe(self) -> str:
        return (f"{self.backend}, {self.threads} thread(s), batch {self.batch_size}"
                + (f", {self.precision}" if self.precision != "fp32" else "")
                + (", thread CPU time" if self.clock == "cpu" else ""))

    def environment(self) -> dict[str, Any]:
        """What else a measurement depends on: host and library versions (part of every key)."""
        from bench.host import cpu_name

        versions = {"torch": _version("torch")}
        if self.backend.startswith("ort") or self.backend == "onnxruntime":
            versions["onnxruntime"] = _version("onnxruntime") or _version("onnxruntime-gpu")
        if "tensorrt" in self.backend or self.backend == "ort-trt":
            versions["tensorrt"] = _version("tensorrt")
        host = {"hostname": socket.gethostname(), "cpu": cpu_name()}
        if "cuda" in self.backend or "tensorrt" in self.backend or "trt" in self.backend:
            import torch

            host["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
            versions["cuda"] = torch.version.cuda
        return {"format": CACHE_FORMAT, "backend": self.backend, "threads": self.threads,
                "batch_size": self.batch_size, "precision": self.precision, "clock": self.clock, "host": host,
                "versions": versions}


class TableCache:
    """get/put of JSON payloads by key; `notices` collects the one-line reports of files not trusted."""

    def __init__(self, root: str | os.PathLike | None = None, say=None):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.say = say or (lambda line: None)
        self.hits = 0
        self.misses = 0

    def path(self, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(_canonical(key).encode()).hexdigest()[:32]
        return self.root / f"{key.get('kind', 'entry')}-{digest}.json"

    def get(self, key: dict[str, Any], check=None) -> dict[str, Any] | None:
        """The payload stored for `key`, or None (absent, corrupt or foreign: then measured again).
        `check(payload)` returns why a payload is unusable, or None."""
        path = self.path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            doc = json.loads(path.read_text())
            if not isinstance(doc, dict) or "key" not in doc or "payload" not in doc:
                raise ValueError("not a latency-table cache entry")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            self.say(f"latency cache file {path} is corrupt ({_first_line(exc)}); measuring it again")
            self.misses += 1
            return None
        if _canonical(doc["key"]) != _canonical(key):
            self.say(f"latency cache file {path} was measured for another target "
                     f"({_difference(doc['key'], key)}); measuring it again")
            self.misses += 1
            return None
        problem = check(doc["payload"]) if check else None
        if problem:
            self.say(f"latency cache file {path} is corrupt ({problem}); measuring it again")
            self.misses += 1
            return None
        self.hits += 1
        return doc["payload"]

    def put(self, key: dict[str, Any], payload: dict[str, Any]) -> Path:
        path = self.path(key)
        try:
            write_atomic(path, (json.dumps({"key": key, "payload": payload}, indent=1) + "\n").encode())
        except OSError as exc:
            raise CompressError(f"cannot write the latency cache under {self.root}: {exc.strerror or exc}") from None
        return path


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def check_grid(payload: dict[str, Any], rows: int, cols: int) -> str | None:
    """Why a table payload is unusable (wrong shape, non-positive or non-finite values), or None."""
    ms = payload.get("ms") if isinstance(payload, dict) else None
    if not isinstance(ms, list) or len(ms) != rows or any(not isinstance(r, list) or len(r) != cols for r in ms):
        return f"expected a {rows}×{cols} table of latencies"
    if any(not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0 for r in ms for v in r):
        return "latencies must be finite and positive"
    return None


def _canonical(key: Any) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def _difference(stored: Any, wanted: dict[str, Any]) -> str:
    if not isinstance(stored, dict):
        return "unreadable key"
    for name in ("backend", "threads", "batch_size", "precision", "clock", "host", "versions", "format"):
        if stored.get(name) != wanted.get(name):
            return f"{name} {stored.get(name)!r}, here {wanted.get(name)!r}"
    return "another layer or grid"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
