"""Build the policy of backend="auto" (fused_rnn/policy.json) from GPU benchmark results.

    python -m fused_rnn.bench.build_policy bench/results/<run>.json [...] [--out PATH]

Reads the JSON files `fused-rnn-bench --out` writes (metadata + rows, bench/report.py) and,
for every key of fused_rnn.dispatch (cell, dtype, compute capability, fwd/fwdbwd, size class),
keeps the median time of each candidate at each measured shape:

- "torch": torch.nn's time (the row's torch_ms: cuDNN) for the standard cells; for an LSTM
  variant, which torch.nn lacks, the time of fused_rnn's torch path (rows with backend "torch").
- "stepwise", "persistent": the rows of those backends (fused_ms).

Only rows with status "ok" count: a backend whose outputs disagreed with torch.nn (mismatch),
failed or was unavailable is no candidate. "auto" rows are skipped (they time one of the
others). Runs on anything but a CUDA device are refused: the policy is for GPUs.

An entry keeps every measured shape; fused_rnn.dispatch.choose picks the winner when a call is
resolved (a fused backend must beat torch by --min-gain at every shape of the class), and
the entry's "backend" is that winner with all candidates allowed, for people reading the file.
With no input files the policy is empty: "source": "no GPU measurement yet".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fused_rnn.dispatch import CANDIDATES, MIN_GAIN, NO_MEASUREMENT, Problem, choose

__all__ = ["build", "main", "row_problem", "DEFAULT_OUT"]

# the repository's copy: bench/ sits beside fused_rnn/ in the source tree
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "fused_rnn" / "policy.json"

_MODES = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN_TANH"}  # the bench's nn.RNN is tanh
_VARIANTS = {  # (peephole, coupled, regularised)
    "none": (False, False, False),
    "peephole": (True, False, False),
    "cifg": (False, True, False),
    "peephole-cifg": (True, True, False),
    "zoneout": (False, False, True),
    "recurrent-dropout": (False, False, True),
    "layernorm": (False, False, True),
}
SIZE_CLASSES = (
    "T, B, H and layers in powers of two (T1024 holds T = 513..1024); uni or bi; "
    "cell for *Cell calls"
)


class PolicyError(ValueError):
    pass


def _arch(meta: dict, name: str) -> str:
    cap = meta.get("compute_capability")
    if not str(meta.get("device", "")).startswith("cuda") or not cap:
        raise PolicyError(f"{name}: not a CUDA run (device {meta.get('device')!r}); the policy "
                          "is built from GPU measurements only")  # fmt: skip
    major, minor = str(cap).split(".")
    return f"sm_{int(major)}{int(minor)}"


def row_problem(row: dict) -> Problem:
    """The dispatch Problem a bench row measured."""
    peephole, coupled, regularised = _VARIANTS[row["variant"]]
    return Problem(mode=_MODES[row["cell"]], dtype=row["dtype"], steps=row["seq_len"],
                   batch=row["batch"], input_size=row["input_size"], hidden=row["hidden_size"],
                   proj=row.get("proj_size") or 0, layers=row["num_layers"],
                   bidirectional=bool(row["bidirectional"]), peephole=peephole, coupled=coupled,
                   grad=row["mode"] == "fwdbwd", regularised=regularised)  # fmt: skip


def _run_source(name: str, meta: dict, arch: str) -> dict:
    return {
        "file": name,
        "device_name": meta.get("device_name"),
        "arch": arch,
        "git_commit": meta.get("git_commit"),
        "date_utc": meta.get("date_utc"),
        "torch_version": meta.get("torch_version"),
        "triton_version": meta.get("triton_version"),
        "cudnn_version": meta.get("cudnn_version"),
        "command": meta.get("command"),
    }


def _describe(run: dict) -> str:
    commit = (run.get("git_commit") or "unknown commit")[:12]
    return (f"{run['file']}: {run['device_name']} ({run['arch']}), commit {commit}, "
            f"{run.get('date_utc') or 'undated'}")  # fmt: skip


def build(results: list[tuple[str, dict]], min_gain: float = MIN_GAIN) -> dict:
    """The policy document from (name, parsed results JSON) pairs."""
    runs, shapes = [], {}  # shapes: key -> {(run, label): {backend: ms}}
    for i, (name, doc) in enumerate(results):
        meta = doc.get("metadata", {})
        arch = _arch(meta, name)
        runs.append(_run_source(name, meta, arch))
        for row in doc.get("rows", []):
            if row.get("status") != "ok" or row.get("backend") not in CANDIDATES:
                continue
            if _VARIANTS[row["variant"]][2]:
                # one key ("+regularised") holds zoneout, recurrent dropout and layer norm
                # alike: their rows would overwrite each other; auto runs them stepwise
                continue
            p = row_problem(row)
            times = shapes.setdefault(p.key(arch), {}).setdefault((i, p.label()), {})
            if not p.variant and row.get("torch_ms") is not None:
                times["torch"] = row["torch_ms"]
            if row.get("fused_ms") is not None and (p.variant or row["backend"] != "torch"):
                times[row["backend"]] = row["fused_ms"]
    entries = {}
    for key in sorted(shapes):
        groups = [{"shape": label, "run": run, "ms": {b: ms[b] for b in sorted(ms)}}
                  for (run, label), ms in sorted(shapes[key].items())]  # fmt: skip
        variant = any(f"+{tag}" in key for tag in ("peephole", "coupled", "regularised"))
        default = "stepwise" if variant else "torch"
        won = choose([g["ms"] for g in groups], CANDIDATES, default, min_gain)
        if won is not None:
            entries[key] = {"backend": won, "shapes": groups}
    return {
        "format": 1,
        "source": "; ".join(_describe(r) for r in runs) or NO_MEASUREMENT,
        "built_by": "python -m fused_rnn.bench.build_policy",
        "min_gain": min_gain,
        "size_classes": SIZE_CLASSES,
        "runs": runs,
        "entries": entries,
    }


def dumps(policy: dict) -> str:
    return json.dumps(policy, indent=1, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fused_rnn.bench.build_policy",
                                 description=__doc__.split("\n\n")[0])  # fmt: skip
    ap.add_argument(
        "results", nargs="*", help="bench JSON files (fused-rnn-bench --out) of GPU runs"
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default: {DEFAULT_OUT}")
    gain = "how many times faster than torch a fused backend must be (default %(default)s)"
    ap.add_argument("--min-gain", type=float, default=MIN_GAIN, help=gain)
    args = ap.parse_args(argv)
    if args.min_gain < 1:
        ap.error("--min-gain must be >= 1")
    docs = []
    for name in args.results:
        try:
            docs.append((name, json.loads(Path(name).read_text())))
        except (OSError, ValueError) as e:
            print(f"build_policy: cannot read {name}: {e}", file=sys.stderr)
            return 2
    try:
        policy = build(docs, args.min_gain)
    except PolicyError as e:
        print(f"build_policy: {e}", file=sys.stderr)
        return 2
    args.out.write_text(dumps(policy))
    wins = {}
    for e in policy["entries"].values():
        wins[e["backend"]] = wins.get(e["backend"], 0) + 1
    summary = ", ".join(f"{b} {n}" for b, n in sorted(wins.items())) or "none"
    print(f"{args.out}: {len(policy['entries'])} keys (winners: {summary}); {policy['source']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
