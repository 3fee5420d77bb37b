"""Run metadata, the text table, JSON/CSV output and the stderr progress bar."""

from __future__ import annotations

import csv
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import torch

from .runner import Row

__all__ = [
    "NOISE_NOTE",
    "RATIO_NOTE",
    "backend_label",
    "noise_mark",
    "metadata",
    "format_table",
    "output_paths",
    "write_json",
    "write_csv",
    "Progress",
]

RATIO_NOTE = "ratio = torch_ms / fused_ms (> 1: fused_rnn is faster than torch.nn)"
NOISE_NOTE = (
    "ms: median of the timed runs; IQR: p75 - p25 of them. noise '~': the two sides' p25..p75 "
    "ranges overlap, so the difference is within run-to-run noise; '?': too few runs to say"
)


def _version(dist: str) -> str | None:
    # Read from the installed distribution: importing triton here would break the
    # "no triton at import" rule and cost seconds.
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _git_commit() -> str | None:
    """The checkout's commit (with "+dirty" for uncommitted changes), if this runs from one."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=5)  # fmt: skip
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=5)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "device_name": torch.cuda.get_device_name(device),
            "compute_capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        }
    return {
        "device_name": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def metadata(device: torch.device, argv: list[str], options: dict) -> dict:
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "tool": "fused-rnn-bench",
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "command": shlex.join(argv),
        "device": str(device),
        **device_info(device),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "torch_version": torch.__version__,
        "triton_version": _version("triton"),
        "cuda_version": torch.version.cuda,
        "cudnn_version": cudnn,
        "fused_rnn_version": _version("fused-rnn"),
        "git_commit": _git_commit(),
        "ratio": RATIO_NOTE,
        "options": options,
    }


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.2e}"
        return f"{v:.{digits}f}"
    return str(v)


def backend_label(r: Row) -> str:
    """The backend as asked, and what it ran as where that differs: ``auto->torch``."""
    if r.resolved_backend and r.resolved_backend != r.backend:
        return f"{r.backend}->{r.resolved_backend}"
    return r.backend


def noise_mark(r: Row) -> str:
    """'~' within noise (bench.timing.within_noise), '' a clear difference, '?' too few runs to
    say, '-' no ratio."""
    if r.ratio is None:
        return "-"
    return {True: "~", False: "", None: "?"}[r.within_noise]


_COLUMNS = [
    # header, row -> cell, right-aligned
    ("suite", lambda r: r.suite, False),
    ("cell", lambda r: r.cell + ("" if r.variant == "none" else f"/{r.variant}"), False),
    ("size", lambda r: r.shape.label(), False),
    ("dtype", lambda r: r.dtype, False),
    ("mode", lambda r: r.mode, False),
    ("backend", backend_label, False),
    ("torch ms", lambda r: _fmt(r.torch_ms), True),
    ("IQR", lambda r: _fmt(r.torch_iqr_ms), True),
    ("fused ms", lambda r: _fmt(r.fused_ms), True),
    ("IQR", lambda r: _fmt(r.fused_iqr_ms), True),
    ("ratio", lambda r: _fmt(r.ratio, 2), True),
    ("noise", noise_mark, False),
    ("torch µs/step", lambda r: _fmt(r.torch_us_per_step, 1), True),
    ("fused µs/step", lambda r: _fmt(r.fused_us_per_step, 1), True),
    ("max|Δ| out", lambda r: _fmt(r.max_abs_diff), True),
    ("max|Δ| grad", lambda r: _fmt(r.grad_max_abs_diff), True),
    ("status", lambda r: r.status, False),
]


def format_table(rows: list[Row], header: str = "") -> str:
    cells = [[get(r) for _, get, _ in _COLUMNS] for r in rows]
    heads = [h for h, _, _ in _COLUMNS]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]
    right = [r for _, _, r in _COLUMNS]

    def line(values):
        cols = zip(values, widths, right, strict=True)
        parts = [v.rjust(w) if rj else v.ljust(w) for v, w, rj in cols]
        return "  ".join(parts).rstrip()

    out = []
    if header:
        out.append(header)
    out.append(RATIO_NOTE)
    out.append(NOISE_NOTE)
    out.append(line(heads))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(c) for c in cells)
    # one note per distinct unavailability (a backend that cannot run here misses every row)
    unavailable: dict[str, list[int]] = {}
    notes = []
    for i, r in enumerate(rows, 1):
        if r.status == "unavailable":
            unavailable.setdefault(r.error, []).append(i)
        elif r.error:
            notes.append(f"row {i} ({r.cell} {r.mode} {r.dtype} {r.backend}) {r.status}: {r.error}")
    for why, ids in unavailable.items():
        notes.append(f"unavailable ({_row_span(ids)}): {why}")
    if notes:
        out.append("")
        out.extend(notes)
    return "\n".join(out)


def _row_span(ids: list[int]) -> str:
    if len(ids) == 1:
        return f"row {ids[0]}"
    if ids == list(range(ids[0], ids[-1] + 1)):
        return f"rows {ids[0]}-{ids[-1]}"
    return "rows " + ", ".join(map(str, ids))


def output_paths(path: str | os.PathLike, stamp: str) -> tuple[Path, Path]:
    """``--out PATH``: PATH.json and PATH.csv, or files named after ``stamp`` inside a folder.

    A folder is a path that exists as one or ends with a separator. A trailing .json/.csv on
    PATH is dropped rather than doubled.
    """
    raw = str(path)
    p = Path(raw)
    if p.is_dir() or raw.endswith(("/", os.sep)):
        base = p / f"fused_rnn_bench_{stamp}"
    elif p.suffix.lower() in (".json", ".csv"):
        base = p.with_suffix("")
    else:
        base = p
    base.parent.mkdir(parents=True, exist_ok=True)
    return base.with_name(base.name + ".json"), base.with_name(base.name + ".csv")


def _jsonable(v):
    # JSON has no NaN: a NaN difference becomes "nan", kept apart from null (not measured).
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def write_json(path: Path, meta: dict, rows: list[Row]) -> None:
    doc = {
        "metadata": meta,
        "rows": [{k: _jsonable(v) for k, v in r.as_dict().items()} for r in rows],
    }
    path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")


def write_csv(path: Path, rows: list[Row]) -> None:
    """A plain table: a header of Row's fields, then one line per row; empty cells for None.

    The run's metadata (device, versions, commit, date, command) is in the JSON written beside
    it, not here, so any CSV reader takes the file as it is.
    """
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=Row.fields())
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if v is None else v for k, v in r.as_dict().items()})


class Progress:
    """A plain stderr bar: redrawn in place on a terminal, one line per step otherwise."""

    def __init__(self, total: int, stream=None, enabled: bool = True, width: int = 28):
        self.total = max(total, 1)
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.width = width
        self.done = 0
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()

    def _draw(self, label: str) -> None:
        filled = round(self.width * self.done / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        text = f"[{bar}] {self.done}/{self.total} {label}"
        if self.tty:
            self.stream.write("\r\x1b[2K" + text[:160])
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def start(self, label: str) -> None:
        if self.enabled:
            self._draw(label)

    def advance(self) -> None:
        self.done += 1

    def close(self) -> None:
        if self.enabled:
            self._draw("done")
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()
