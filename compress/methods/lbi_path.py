"""The DessiLBI regularisation path: what report.json records each epoch, and its plot.

Each epoch of Split LBI adds one point: how many units are in the support of Γ, the FLOPs ratio
of the Γ-support network (every group keeping exactly its units with Γ ≠ 0, by the FLOPs model),
validation accuracy of the full weights W and of that support network (BN statistics re-estimated
for each), and per group how many units had entered the support. A support network
much smaller than the dense one that already matches its accuracy is the over-parameterisation
the seed report (§3.3, Table 10) reads off the path.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from compress.pruning.flops_model import FlopsModel
from compress.pruning.lbi import SplitLBI, support_share


def support_summary(opt: SplitLBI, flops_model: FlopsModel | None) -> dict[str, Any]:
    """Flat figures of the support of Γ now (an entry of the loop's per-epoch history, so a resumed
    path keeps its earlier points)."""
    support = opt.support()
    out = {"step": opt.steps, "support_units": sum(int(m.sum()) for m in support.values()),
           "support_share": round(support_share(support), 6)}
    if flops_model is not None:
        out["support_flops_ratio"] = round(float(flops_model.ratio_of_masks(support)), 6)
    return out


def build_path(start: dict[str, Any], history: list[dict[str, Any]], opt: SplitLBI,
               steps_per_epoch: int) -> list[dict[str, Any]]:
    """The path for report.json: the starting point, then one point per epoch of the history, each with
    the number of units of every group that had entered the support by then (from the entry steps)."""
    keys = ("step", "support_units", "support_share", "support_flops_ratio", "val_acc", "support_val_acc")
    points = [{"epoch": 0, **start}] + [{"epoch": h["epoch"], **{k: h[k] for k in keys if k in h}} for h in history]
    for p in points:
        limit = p["epoch"] * steps_per_epoch
        p["per_group"] = {gid: int(((e > 0) & (e <= limit)).sum()) for gid, e in opt.entered.items()}
    return points


def entry_epochs(opt: SplitLBI, steps_per_epoch: int) -> dict[str, list[float | None]]:
    """Per group, the epoch (fractional) at which each unit first entered the support; None: never."""
    return {gid: [round(int(s) / steps_per_epoch, 4) if s > 0 else None for s in e.cpu().tolist()]
            for gid, e in opt.entered.items()}


def path_png(path: list[dict[str, Any]], widths: dict[str, int], title: str = "") -> bytes:
    """The path as a PNG: support share and support-network FLOPs ratio; accuracies; per-group support
    share over the epochs (groups in execution order, top = first). Bytes, so the run directory
    writer puts it in place with everything else (an interrupted run leaves nothing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [p["epoch"] for p in path]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    ax = axes[0]
    ax.plot(epochs, [100 * p["support_share"] for p in path], marker="o", label="units with Γ ≠ 0")
    if all("support_flops_ratio" in p for p in path):
        ax.plot(epochs, [100 * p["support_flops_ratio"] for p in path], marker="s",
                label="FLOPs of the Γ-support network")
    ax.set_ylim(-2, 102)
    _label(ax, "% of dense", "support of Γ along the path")

    ax = axes[1]
    for key, label, marker in (("val_acc", "full weights W", "o"), ("support_val_acc", "Γ-support network", "s")):
        pts = [(p["epoch"], 100 * p[key]) for p in path if p.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=marker, label=label)
    _label(ax, "validation accuracy (%)", "accuracy along the path")

    ax = axes[2]
    ids = list(widths)
    share = torch.tensor([[p["per_group"].get(g, 0) / max(1, widths[g]) for p in path] for g in ids])
    im = ax.imshow(share.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest",
                   extent=(epochs[0] - 0.5, epochs[-1] + 0.5, len(ids) - 0.5, -0.5))
    ax.set_yticks(range(len(ids)))
    ax.set_yticklabels([f"{g} ({widths[g]})" for g in ids], fontsize=6 if len(ids) > 20 else 7)
    ax.set_xlabel("epoch of Split LBI")
    ax.set_title("share of each group's units that entered the support")
    fig.colorbar(im, ax=ax, fraction=0.04)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _label(ax, ylabel: str, title: str) -> None:
    ax.set_xlabel("epoch of Split LBI")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


__all__ = ["build_path", "entry_epochs", "path_png", "support_summary"]
