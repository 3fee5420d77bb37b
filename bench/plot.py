"""PNG bar chart of the speed ratios, one bar per row. matplotlib is imported only here."""

from __future__ import annotations

from pathlib import Path

from .runner import Row

__all__ = ["PlotUnavailable", "require_matplotlib", "plot_ratios"]


class PlotUnavailable(RuntimeError):
    pass


def require_matplotlib():
    """Import matplotlib with a file-only backend, or raise PlotUnavailable saying what to do."""
    try:
        import matplotlib
    except ImportError as exc:
        raise PlotUnavailable(
            "--plot needs matplotlib, which is not installed: "
            "pip install matplotlib (or the project's extra: pip install 'fused-rnn[plot]')"
        ) from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _label(r: Row) -> str:
    cell = r.cell if r.variant == "none" else f"{r.cell}/{r.variant}"
    return f"{r.suite} {cell} {r.shape.label()} {r.dtype} {r.mode} [{r.backend}]"


def plot_ratios(rows: list[Row], path: str | Path, title: str = "") -> Path:
    """Horizontal bars of torch_ms / fused_ms; the line at 1 is parity, right of it fused wins.

    Rows without a ratio (unavailable, error) are listed with their status and no bar.
    """
    plt = require_matplotlib()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    backends = list(dict.fromkeys(r.backend for r in rows))
    cmap = plt.get_cmap("tab10")
    colors = {b: cmap(i % 10) for i, b in enumerate(backends)}

    n = max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.32 * n))
    ys = list(range(n))[::-1]
    labels = []
    for y, r in zip(ys, rows, strict=True):
        if r.ratio is not None:
            ax.barh(y, r.ratio, color=colors[r.backend], height=0.7)
            ax.text(r.ratio, y, f" {r.ratio:.2f}", va="center", fontsize=7)
            labels.append(_label(r))
        else:
            labels.append(f"{_label(r)} ({r.status})")
    ax.set_yticks(ys[: len(rows)])
    ax.set_yticklabels(labels, fontsize=7)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel("torch.nn time / fused_rnn time  (> 1: fused_rnn faster)")
    ax.set_xlim(left=0)
    if title:
        ax.set_title(title, fontsize=9)
    if len(backends) > 1:
        handles = [plt.Rectangle((0, 0), 1, 1, color=colors[b]) for b in backends]
        ax.legend(handles, backends, title="backend", fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
