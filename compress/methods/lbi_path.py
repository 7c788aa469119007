"""The DessiLBI regularisation path: what report.json records each epoch, and its plot.

Each epoch of Split LBI adds one point: how many units are in the support of Γ, the FLOPs ratio
of the Γ-support network (every group keeping exactly its units with Γ ≠ 0, by the FLOPs model),
and validation accuracy of the full weights W and of that support network. A support network
much smaller than the dense one that already matches its accuracy is the over-parameterisation
the seed report (§3.3, Table 10) reads off the path.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from compress.pruning.flops_model import FlopsModel
from compress.pruning.lbi import SplitLBI, support_share


def path_point(opt: SplitLBI, flops_model: FlopsModel | None, epoch: float, accuracy: float | None = None,
               support_accuracy: float | None = None) -> dict[str, Any]:
    """One point of the path (after `epoch` epochs of the iteration)."""
    support = opt.support()
    point = {"epoch": round(epoch, 4), "step": opt.steps,
             "support_units": sum(int(m.sum()) for m in support.values()),
             "units": sum(int(m.numel()) for m in support.values()),
             "support_share": round(support_share(support), 6),
             "groups_in_support": sum(1 for m in support.values() if m.any()),
             "per_group": {gid: int(m.sum()) for gid, m in support.items()}}
    if flops_model is not None:
        point["flops_ratio"] = round(float(flops_model.ratio_of_masks(support)), 6)
    if accuracy is not None:
        point["val_acc"] = round(accuracy, 5)
    if support_accuracy is not None:
        point["support_val_acc"] = round(support_accuracy, 5)
    return point


def entry_epochs(opt: SplitLBI, steps_per_epoch: int) -> dict[str, list[float | None]]:
    """Per group, the epoch (fractional) at which each unit first entered the support; None: never."""
    return {gid: [round(int(s) / steps_per_epoch, 4) if s > 0 else None for s in e.tolist()]
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
    if all("flops_ratio" in p for p in path):
        ax.plot(epochs, [100 * p["flops_ratio"] for p in path], marker="s", label="FLOPs of the Γ-support network")
    ax.set_ylim(-2, 102)
    ax.set_xlabel("epoch of Split LBI")
    ax.set_ylabel("% of dense")
    ax.set_title("support of Γ along the path")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[1]
    for key, label, marker in (("val_acc", "full weights W", "o"), ("support_val_acc", "Γ-support network", "s")):
        pts = [(p["epoch"], 100 * p[key]) for p in path if p.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=marker, label=label)
    ax.set_xlabel("epoch of Split LBI")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("accuracy along the path")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[2]
    ids = list(widths)
    share = torch.tensor([[p["per_group"].get(g, 0) / max(1, widths[g]) for p in path] for g in ids])
    im = ax.imshow(share.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest",
                   extent=(epochs[0] - 0.5, epochs[-1] + 0.5, len(ids) - 0.5, -0.5))
    ax.set_yticks(range(len(ids)))
    ax.set_yticklabels([f"{g} ({widths[g]})" for g in ids], fontsize=6 if len(ids) > 20 else 7)
    ax.set_xlabel("epoch of Split LBI")
    ax.set_title("share of each group's units in the support")
    fig.colorbar(im, ax=ax, fraction=0.04)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


__all__ = ["entry_epochs", "path_png", "path_point"]
