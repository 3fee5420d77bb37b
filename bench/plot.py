"""PNG bar chart of the speed ratios, one bar per row. matplotlib is imported only here."""

from __future__ import annotations

from pathlib import Path

from .report import backend_label, noise_mark
from .runner import Row

__all__ = ["PlotUnavailable", "require_matplotlib", "plot_ratios", "row_label"]


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


def row_label(r: Row) -> str:
    """A row's name on the chart, with the backend as the table writes it (``auto->torch``)."""
    cell = r.cell if r.variant == "none" else f"{r.cell}/{r.variant}"
    return f"{r.suite} {cell} {r.shape.label()} {r.dtype} {r.mode} {backend_label(r)}"


def plot_ratios(rows: list[Row], path: str | Path, title: str = "") -> Path:
    """Horizontal bars of torch_ms / fused_ms; the line at 1 is parity, right of it fused wins.

    A whisker spans the ratio's range over the two sides' interquartile ranges (torch p25 /
    fused p75 .. torch p75 / fused p25); a row within noise (the whisker crosses 1) has a pale,
    hatched bar and "~" after its value, as the table marks it. Rows without a ratio
    (unavailable, error) are listed with their status and no bar.
    """
    plt = require_matplotlib()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    backends = list(dict.fromkeys(backend_label(r) for r in rows))
    cmap = plt.get_cmap("tab10")
    colors = {b: cmap(i % 10) for i, b in enumerate(backends)}

    n = max(len(rows), 1)
    # the axis follows the ratios, not the whiskers: one very noisy row must not squash the rest
    x_max = 1.3 * max([1.0, *(r.ratio for r in rows if r.ratio is not None)])
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.32 * n))
    ys = list(range(n))[::-1]
    labels = []
    for y, r in zip(ys, rows, strict=True):
        if r.ratio is None:
            labels.append(f"{row_label(r)} ({r.status})")
            continue
        noisy = r.within_noise is True
        ax.barh(y, r.ratio, color=colors[backend_label(r)], height=0.7,
                alpha=0.45 if noisy else 1.0, hatch="//" if noisy else None)  # fmt: skip
        right = r.ratio
        if r.ratio_lo is not None and r.ratio_hi is not None:
            err = [[r.ratio - r.ratio_lo], [r.ratio_hi - r.ratio]]
            ax.errorbar(r.ratio, y, xerr=err, fmt="none", ecolor="black", elinewidth=0.8,
                        capsize=2)  # fmt: skip
            right = min(r.ratio_hi, 0.9 * x_max)
        mark = noise_mark(r)
        ax.text(right, y, f" {r.ratio:.2f}{' ' + mark if mark else ''}", va="center", fontsize=7,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})  # fmt: skip
        labels.append(row_label(r))
    ax.set_yticks(ys[: len(rows)])
    ax.set_yticklabels(labels, fontsize=7)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel(
        "torch.nn time / fused_rnn time  (> 1: fused_rnn faster); whiskers: the IQR range, "
        "~: within noise"
    )
    ax.set_xlim(0, x_max)
    if title:
        ax.set_title(title, fontsize=9)
    if len(backends) > 1:
        handles = [plt.Rectangle((0, 0), 1, 1, color=colors[b]) for b in backends]
        ax.legend(handles, backends, title="backend", fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
