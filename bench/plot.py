"""Latency against FLOPs, one point per target × backend × batch size: how far latency follows FLOPs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from bench.measure import Result
from compress.errors import CompressError

MARKERS = "osD^v<>P*X"


def plot_latency_vs_flops(results: list[Result], path: str | os.PathLike, title: str = "") -> Path:
    """Scatter of median latency (p90 as the upper whisker) against FLOPs; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in results if r.flops]
    if not points:
        raise CompressError("--plot needs FLOPs, and no measured target records them (ONNX files without "
                            "export metadata and engines have none)")
    backends = sorted({r.backend for r in points})
    sizes = sorted({r.batch_size for r in points})
    colors = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(backends)}
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for r in points:
        s = r.summary
        ax.errorbar(r.flops / 1e6, s.median_ms, yerr=[[0], [s.p90_ms - s.median_ms]], fmt=MARKERS[
            sizes.index(r.batch_size) % len(MARKERS)], color=colors[r.backend], capsize=3, markersize=6)
        ax.annotate(r.target, (r.flops / 1e6, s.median_ms), textcoords="offset points", xytext=(5, 4), fontsize=7)
    for b in backends:
        ax.plot([], [], "o", color=colors[b], label=b)
    for i, n in enumerate(sizes):
        ax.plot([], [], MARKERS[i % len(MARKERS)], color="gray", label=f"batch {n}")
    ax.set_xlabel("FLOPs (fvcore MACs, batch 1) [M]")
    ax.set_ylabel("median latency per batch [ms]")
    if max(r.summary.median_ms for r in points) > 20 * min(r.summary.median_ms for r in points):
        ax.set_yscale("log")
    ax.set_title(title or "latency vs FLOPs (whisker: p90)")
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.2)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".png", dir=out.parent if str(out.parent) else ".")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return out
