"""compress: prune vision models (PASS, VPNs, DepGraph, L1), slim them, export and benchmark them."""

__version__ = "0.1.0"

from compress.errors import CheckFailed, CompressError  # noqa: E402
from compress.runs import load  # noqa: E402

__all__ = ["CheckFailed", "CompressError", "__version__", "load"]
