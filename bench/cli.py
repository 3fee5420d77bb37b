"""``fused-rnn-bench`` / ``python -m fused_rnn.bench``: fused_rnn vs torch.nn, row by row.

Every row times fused_rnn and torch.nn (cuDNN on CUDA) in the same process, on the same device,
with the same input and (variant ``none``) the same weights, and checks their outputs agree.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from collections.abc import Sequence

from .suites import CELLS, MODES, SUITES, Suite, custom_suite, default_suite_names

__all__ = ["build_parser", "default_dtypes", "main", "selection"]

PROG = "fused-rnn-bench"
_DTYPE_NAMES = ("fp32", "tf32", "fp16", "bf16")
_VARIANT_NAMES = (
    "none", "peephole", "cifg", "peephole-cifg", "zoneout", "recurrent-dropout", "layernorm"
)  # fmt: skip
_BACKEND_NAMES = ("auto", "torch", "stepwise", "persistent")
# (warmup runs, max timed runs, time budget per side in seconds)
_TIMING_DEFAULTS = {"cuda": (10, 100, 2.0), "cpu": (2, 30, 1.0)}

_EPILOG = """\
ratio = torch_ms / fused_ms: above 1, fused_rnn is faster than torch.nn.
Each side: the median of its timed runs and their IQR (p75 - p25). A row is marked '~' (within
noise) when the two sides' p25..p75 ranges overlap.
List options (--suite, --cell, --dtype, --mode, --backend, --variant) repeat or take commas.
Without --suite or size flags: cpu-default on CPU; fastrnns and flashrnn in bf16 on CUDA.
Any size flag (--seq-len ... --proj-size) adds a 'custom' suite built from the flags.
On CPU, timing uses 1 thread unless --threads says otherwise.

examples:
  fused-rnn-bench --list
  fused-rnn-bench --suite flashrnn --cell lstm --dtype fp16,bf16 --backend stepwise,persistent
  fused-rnn-bench --suite all --out bench/out/ --plot bench/out/ratios.png
  fused-rnn-bench --device cpu --seq-len 20 --batch 4 --hidden-size 64 --mode fwdbwd
"""


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def _nonneg_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Benchmark fused_rnn LSTM/GRU/RNN against torch.nn (cuDNN on CUDA).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--list", action="store_true", help="print the suites and exit")
    sel = p.add_argument_group("what to run")
    sel.add_argument("--suite", action="append", metavar="NAME", help=f"{', '.join(SUITES)} or all")
    sel.add_argument("--cell", action="append", metavar="CELL", help="lstm, gru, rnn")
    sel.add_argument(
        "--dtype",
        action="append",
        metavar="DTYPE",
        help="fp32 (TF32 off), tf32 (fp32 with TF32 on), fp16, bf16; "
        "default bf16 on CUDA, fp32 on CPU",
    )
    sel.add_argument("--mode", action="append", metavar="MODE", help="fwd, fwdbwd; default both")
    sel.add_argument(
        "--backend",
        action="append",
        metavar="NAME",
        help="fused_rnn backend(s) to time against torch.nn: auto, torch, stepwise, persistent; "
        "default auto",
    )
    sel.add_argument(
        "--variant",
        action="append",
        metavar="NAME",
        help="variant: none; the LSTM's peephole, cifg, peephole-cifg; zoneout (0.1) and "
        "recurrent-dropout (0.25) of every cell; layernorm (LSTM, GRU). Timed against the "
        "plain torch.nn module of the same size, no output comparison; default none",
    )
    sel.add_argument("--device", help="cpu or cuda[:N]; default cuda when available")

    size = p.add_argument_group("custom sizes (any of these adds the 'custom' suite)")
    size.add_argument("--seq-len", type=_positive_int, metavar="T", help="default 100")
    size.add_argument("--batch", type=_positive_int, metavar="B", help="default 16")
    size.add_argument("--input-size", type=_positive_int, metavar="I", help="default H")
    size.add_argument("--hidden-size", type=_positive_int, metavar="H", help="default 256")
    size.add_argument("--layers", type=_positive_int, metavar="L", help="default 1")
    size.add_argument("--bidirectional", action="store_true")
    size.add_argument("--proj-size", type=_nonneg_int, metavar="P", help="LSTM only")

    tm = p.add_argument_group("timing")
    tm.add_argument(
        "--warmup",
        type=_nonneg_int,
        help="untimed runs before timing (default 10 on CUDA, 2 on CPU)",
    )
    tm.add_argument(
        "--reps", type=_positive_int, help="most timed runs per side (default 100 CUDA, 30 CPU)"
    )
    tm.add_argument(
        "--threads",
        type=_nonneg_int,
        metavar="N",
        help="torch CPU threads while timing; 0 = torch's default. Default 1 on CPU (as "
        "torch.utils.benchmark does: thread pools on a shared or small machine make timings "
        "swing by 10x or more), torch's default on CUDA",
    )
    tm.add_argument(
        "--time-budget",
        type=_nonneg_float,
        metavar="S",
        help="seconds per side; fewer runs when the warm-up says reps would take longer "
        "(at least 10 still run; 0 = no budget; default 2 on CUDA, 1 on CPU)",
    )

    out = p.add_argument_group("output")
    out.add_argument(
        "--out",
        metavar="PATH",
        help="write PATH.json (rows and the run's metadata: device, versions, commit, date) and "
        "PATH.csv (the rows only); in a folder: files named after the date",
    )
    out.add_argument("--plot", metavar="PNG", help="bar chart of the ratios (needs matplotlib)")
    out.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def _split(parser, values, allowed, flag) -> list[str]:
    out: list[str] = []
    for value in values or ():
        for item in value.split(","):
            item = item.strip().lower()
            if not item:
                continue
            if item not in allowed:
                parser.error(f"{flag}: unknown value {item!r} (choose from {', '.join(allowed)})")
            if item not in out:
                out.append(item)
    return out


def _resolve_device(parser, name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device: unknown device {name!r} (use cpu or cuda[:N])")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device: only cpu and cuda are supported, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def _suites(parser, args, device) -> list[Suite]:
    names = _split(parser, args.suite, (*SUITES, "all"), "--suite")
    if "all" in names:
        names = list(SUITES)
    size_flags = (
        args.seq_len,
        args.batch,
        args.input_size,
        args.hidden_size,
        args.layers,
        args.proj_size,
    )
    has_custom = args.bidirectional or any(v is not None for v in size_flags)
    if not names and not has_custom:
        names = list(default_suite_names(device.type))
    suites = [SUITES[n] for n in names]
    if has_custom:
        try:
            suites.append(
                custom_suite(
                    args.seq_len,
                    args.batch,
                    args.input_size,
                    args.hidden_size,
                    args.layers,
                    args.bidirectional,
                    args.proj_size,
                )
            )
        except ValueError as exc:
            parser.error(f"custom sizes: {exc}")
    return suites


def _plan(parser, args, suites, cells, variants, dtypes, modes):
    """[(Config, variants for it)], in suite, shape, dtype, mode order."""
    from .runner import VARIANT_CELLS, Config

    plan = []
    for suite in suites:
        for shape in suite.shapes:
            if cells and shape.cell not in cells:
                continue
            vs = [v for v in variants if shape.cell in VARIANT_CELLS[v]]
            if not vs:
                continue
            for dtype in dtypes:
                for mode in modes or suite.modes:
                    plan.append((Config(suite.name, shape, dtype, mode), vs))
    missing = [c for c in cells if not any(cfg.shape.cell == c for cfg, _ in plan)]
    if missing:
        why = []
        for c in missing:
            only = [v for v in variants if c not in VARIANT_CELLS[v]]
            if only and len(only) == len(variants):
                lstm = all(VARIANT_CELLS[v] == ("lstm",) for v in only)
                why.append("variants other than none apply to LSTM only" if lstm else
                           f"variants {', '.join(only)} do not apply to {c}")  # fmt: skip
        if args.proj_size:
            why.append("--proj-size makes the custom suite LSTM only")
        suite_names = ", ".join(s.name for s in suites)
        why.append(f"suites: {suite_names}")
        parser.error(f"nothing to run for cell(s) {', '.join(missing)} ({'; '.join(why)})")
    if not plan:
        parser.error("nothing to run")
    return plan


def default_dtypes(device_type: str) -> list[str]:
    """Without --dtype: bf16 on CUDA (the dtype the fused kernels are tuned for), fp32 on CPU."""
    return ["bf16"] if device_type == "cuda" else ["fp32"]


def _print_list(file=None) -> None:
    file = file or sys.stdout
    for suite in SUITES.values():
        print(f"{suite.name}: {suite.description}", file=file)
        for s in suite.shapes:
            print(f"  {s.cell:<4} {s.label()}  modes: {','.join(suite.modes)}", file=file)
    print(
        "custom: from --seq-len/--batch/--input-size/--hidden-size/--layers/--bidirectional/"
        "--proj-size",
        file=file,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit status: 0 ok, 1 a row failed (error, or outputs that
    disagree with torch.nn), 2 bad arguments."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # argparse's --help (0) or usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    if args.list:
        _print_list()
        return 0
    import torch

    threads = torch.get_num_threads()
    try:
        return _run(parser, args, args_list)
    except SystemExit as exc:  # parser.error() during validation
        return exc.code if isinstance(exc.code, int) else 2
    finally:
        torch.set_num_threads(threads)


def selection(parser, args) -> tuple[list[str], ...]:
    """The list options, checked (parser.error on an unknown value) and defaulted:
    (suites, cells, dtypes, modes, backends, variants); an empty list means "the default"
    for suites, cells, dtypes and modes, which depend on the device."""
    suites_ = _split(parser, args.suite, (*SUITES, "all"), "--suite")
    cells = _split(parser, args.cell, CELLS, "--cell")
    dtypes = _split(parser, args.dtype, _DTYPE_NAMES, "--dtype")
    modes = _split(parser, args.mode, MODES, "--mode")
    backends = _split(parser, args.backend, _BACKEND_NAMES, "--backend") or ["auto"]
    variants = _split(parser, args.variant, _VARIANT_NAMES, "--variant") or ["none"]
    return suites_, cells, dtypes, modes, backends, variants


def _run(parser, args, args_list) -> int:
    import torch

    _, cells, dtypes, modes, backends, variants = selection(parser, args)

    if args.plot:
        from .plot import PlotUnavailable, require_matplotlib

        try:
            require_matplotlib()
        except PlotUnavailable as exc:
            parser.error(str(exc))

    device = _resolve_device(parser, args.device)
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)  # main() puts the old value back
    suites = _suites(parser, args, device)
    dtypes = dtypes or default_dtypes(device.type)
    plan = _plan(parser, args, suites, cells, variants, dtypes, modes)

    from . import report
    from .runner import TimingOptions, run_config

    warmup, reps, budget = _TIMING_DEFAULTS[device.type]
    budget = budget if args.time_budget is None else args.time_budget
    opts = TimingOptions(
        warmup=warmup if args.warmup is None else args.warmup,
        reps=reps if args.reps is None else args.reps,
        budget_s=budget or None,
    )
    if device.type == "cpu" and "tf32" in dtypes:
        print(f"{PROG}: note: tf32 only changes CUDA matmuls; on CPU it is fp32", file=sys.stderr)

    meta = report.metadata(
        device,
        [PROG, *args_list],
        {
            "suites": [s.name for s in suites],
            "cells": cells or "suite default",
            "dtypes": dtypes,
            "modes": modes or "suite default",
            "backends": backends,
            "variants": variants,
            "warmup": opts.warmup,
            "reps": opts.reps,
            "time_budget_s": opts.budget_s,
        },
    )
    total = sum(len(vs) * len(backends) for _, vs in plan)
    progress = report.Progress(total, enabled=not args.quiet)

    def label(row):
        v = "" if row.variant == "none" else f"/{row.variant}"
        return (
            f"{row.suite} {row.cell}{v} {row.shape.label()} {row.dtype} {row.mode} "
            f"{report.backend_label(row)}"
        )

    rows = []
    interrupted = False
    try:
        for cfg, vs in plan:
            progress.start(f"{cfg.suite} {cfg.shape.cell} {cfg.dtype} {cfg.mode} torch.nn")
            rows += run_config(
                cfg,
                vs,
                backends,
                device,
                opts,
                on_row_start=lambda row: progress.start(label(row)),
                on_row_done=lambda row: progress.advance(),
            )
    except KeyboardInterrupt:  # keep what finished: report and write it
        interrupted = True
        meta["interrupted"] = f"after {len(rows)} of {total} rows"
    progress.close()

    header = f"{PROG} on {meta['device_name']} ({device}), torch {meta['torch_version']}"
    print(report.format_table(rows, header=header))

    if args.out:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        json_path, csv_path = report.output_paths(args.out, stamp)
        report.write_json(json_path, meta, rows)
        report.write_csv(csv_path, rows)
        print(f"wrote {json_path} and {csv_path}", file=sys.stderr)
    if args.plot:
        from .plot import plot_ratios

        path = plot_ratios(rows, args.plot, title=header)
        print(f"wrote {path}", file=sys.stderr)

    if interrupted:
        print(f"{PROG}: interrupted {meta['interrupted']}", file=sys.stderr)
        return 130
    failed = [r for r in rows if r.status in ("error", "mismatch")]
    if failed:
        print(
            f"{PROG}: {len(failed)} of {len(rows)} rows failed (error or mismatch)",
            file=sys.stderr,
        )
        return 1
    return 0
