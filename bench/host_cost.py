"""Host cost of the stepwise recurrences' launches, measured on a machine without a GPU.

    python -m fused_rnn.bench.host_cost                  # LSTM, LSTM with proj_size, GRU
    python -m fused_rnn.bench.host_cost --out bench/results   # also host-cost-<date>.{json,log}

A stepwise layer launches one kernel per time step (two with proj_size), so the Python that each
launch costs before the GPU sees it is paid T times per layer and direction. cuDNN's whole step is
~2 µs forward, ~5 µs forward+backward at B=16, H=768 (DESIGN.md's target figures).

This runs the real launchers (`fused_rnn.kernels.lstm.lstm_fwd/lstm_bwd`,
`fused_rnn.kernels.gru.gru_fwd/gru_bwd`) with the real Triton launch path, compiled for sm_90,
on CPU tensors, under a stub CUDA driver (`stub_cuda_driver`): a `CudaDriver` subclass installed
with `triton.runtime.driver.set_active` that reports device 0 of compute capability 9.0, "loads"
binaries without a GPU and whose launcher is Triton's own `CudaLauncher.__call__` in front of a
raw launch that does nothing. Everything Python does per launch is timed; what the raw (C)
launch does is not: parsing the arguments, and for tensors passed as such (the plain path)
`data_ptr()` plus a driver query each, then cuLaunchKernel.

Two paths, the same launchers: "plain" launches every step with `kernel[grid](**kwargs)`
(`fused_rnn.kernels._launch.lean_launches(False)`); "lean" is the default `step_launcher`, which
resolves everything but the step index once per loop. Reported per case and path: µs per step and
per launch, forward and forward+backward, the median of --repeat calls after warm-up, as wall
clock and as this process's CPU time (on a shared machine the latter leaves out the time spent
waiting for a core; the two agree on an idle one). The backward
is asked for dgx, dh0 (and dc0) only: the weight-gradient GEMMs run once per call, not per step,
and on the CPU they would be real matrix products where a GPU queues them asynchronously.

Before timing, the lean launches are checked against the plain ones: for a short sequence both
paths run with the raw launch recording its arguments, and the two records must match call for
call (kernel, grid, metadata, every argument; tensors by which buffer they are).

The first run compiles the kernels for sm_90 (Triton's cache keeps them): about a minute on two
cores; later runs take seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import gc
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

CASES = ("lstm", "lstm-proj", "gru")


# --------------------------------------------------------------------------- the stub driver


class StubLaunches:
    """What the stub driver saw: `raw` launches reached the (no-op) raw launch function, `plain`
    of them came through `CudaLauncher.__call__` (the path of `kernel[grid](...)`); the lean path
    calls the raw launch directly. With `record` set, each raw launch's arguments are appended."""

    def __init__(self):
        self.raw = 0
        self.plain = 0
        self.record: list | None = None

    def reset(self):
        self.raw = self.plain = 0


@contextlib.contextmanager
def stub_cuda_driver(capability=(9, 0)):
    """Installs a CUDA driver stub for the body: Triton compiles for `capability` and runs its
    whole launch path, except that the raw launch does nothing (it counts, or records). Yields
    the `StubLaunches`. Kernels must be JITFunctions: TRITON_INTERPRET must be off when triton is
    first imported."""
    import triton
    from triton.backends.nvidia.driver import CudaDriver, CudaLauncher
    from triton.runtime import driver

    seen = StubLaunches()

    def raw_launch(*args):
        seen.raw += 1
        if seen.record is not None:
            seen.record.append(args)

    class Launcher(CudaLauncher):
        # Triton's own __call__ (scratch allocation, argument order) in front of a no-op launch;
        # nothing compiled or loaded here
        def __init__(self, src, metadata):
            self.num_ctas = getattr(metadata, "num_ctas", 1)
            for name in ("global_scratch", "profile_scratch"):
                setattr(self, name + "_size", getattr(metadata, name + "_size", 0))
                setattr(self, name + "_align", getattr(metadata, name + "_align", 1))
            self.launch_cooperative_grid = getattr(metadata, "launch_cooperative_grid", False)
            self.launch_pdl = getattr(metadata, "launch_pdl", False)
            self.gsan_enabled = False
            self.arg_annotations = self.kernel_signature = None  # read by 3.9's __call__
            self.launch = raw_launch

        def __call__(self, *args):
            if self.launch is raw_launch:  # not the lean path's recording copy
                seen.plain += 1
            return super().__call__(*args)

    class Utils:
        def load_binary(self, name, kernel, shared, device):
            return 1, 1, 0, 0, 1024  # module, function, registers, spills, max threads

        def unload_module(self, module):
            pass

        def get_device_properties(self, device):
            return {"max_shared_mem": 227 * 1024, "multiprocessor_count": 132, "warpSize": 32}

    class Driver(CudaDriver):
        def __init__(self):  # no CudaUtils: it would build a module linked against libcuda
            self.utils = Utils()
            self.launcher_cls = Launcher

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_device_capability(self, device=None):
            return capability

    previous = getattr(driver, "_active", None)
    triton.runtime.driver.set_active(Driver())
    try:
        yield seen
    finally:
        driver.set_active(previous)


# --------------------------------------------------------------------------- the cases


@dataclasses.dataclass
class Case:
    name: str
    fwd: object  # () -> forward outputs
    bwd: object  # (forward outputs) -> None


def make_case(name: str, T: int, B: int, H: int, dtype):
    """The launcher calls of one case on CPU tensors (their contents are never computed)."""
    import torch

    def rnd(*shape):
        return torch.randn(*shape, dtype=dtype)

    if name in ("lstm", "lstm-proj"):
        from fused_rnn.kernels import lstm

        P = H // 2 if name == "lstm-proj" else 0
        R = P or H
        gx, h0, c0, w_hh = rnd(T, B, 4 * H), rnd(B, R), rnd(B, H), rnd(4 * H, R)
        w_hr = rnd(P, H) if P else None
        dy, dhT, dcT = rnd(T, B, R), rnd(B, R), rnd(B, H)
        needs = (True, True, True, False, False, False)  # dgx, dh0, dc0; no weight GEMMs

        def fwd():
            return lstm.lstm_fwd(gx, h0, c0, w_hh, w_hr, None, None, False, False, True)

        def bwd(out):
            _, hs, cs, gates, ms = out
            lstm.lstm_bwd(
                dy, dhT, dcT, hs, cs, gates, ms, w_hh, w_hr, None, None, False, False, needs
            )

        return Case(name, fwd, bwd)
    if name == "gru":
        from fused_rnn.kernels import gru

        gx, h0, w_hh, b_hn = rnd(T, B, 3 * H), rnd(B, H), rnd(3 * H, H), rnd(H)
        dy, dhT = rnd(T, B, H), rnd(B, H)
        needs = (True, True, False, False)  # dgx, dh0; no weight GEMMs

        def fwd():
            return gru.gru_fwd(gru.CELL_GRU, gx, h0, w_hh, b_hn, None, False, True)

        def bwd(out):
            _, hs, ws = out
            gru.gru_bwd(gru.CELL_GRU, dy, dhT, hs, ws, w_hh, None, False, needs)

        return Case(name, fwd, bwd)
    raise ValueError(f"unknown case {name!r}; known: {', '.join(CASES)}")


# --------------------------------------------------------------------------- lean == plain


def _flat(call) -> list:
    """A raw launch's arguments with nested tuples (3.9's kernel arguments) flattened."""
    out = []
    for x in call:
        if isinstance(x, (tuple, list)):
            out += _flat(x)
        else:
            out.append(x)
    return out


def compare_records(plain, lean) -> str | None:
    """None when the two launch records agree call for call, else what differs. A position that
    holds a tensor in the plain record must hold the same buffer (by order of first appearance)
    in the lean one, as a tensor or as its address."""
    import torch

    if len(plain) != len(lean):
        return f"{len(plain)} plain launches, {len(lean)} lean"
    cp, cl = [_flat(c) for c in plain], [_flat(c) for c in lean]
    ptr_p: dict[int, int] = {}
    ptr_l: dict[int, int] = {}
    for n, (a, b) in enumerate(zip(cp, cl)):
        if len(a) != len(b):
            return f"launch {n}: {len(a)} arguments plain, {len(b)} lean"
        for i, (x, y) in enumerate(zip(a, b)):
            if isinstance(x, torch.Tensor):
                px = ptr_p.setdefault(x.data_ptr(), len(ptr_p))
                yv = y.data_ptr() if isinstance(y, torch.Tensor) else y
                if not isinstance(yv, int):
                    return f"launch {n}, argument {i}: a tensor plain, {y!r} lean"
                py = ptr_l.setdefault(yv, len(ptr_l))
                if px != py:
                    return f"launch {n}, argument {i}: buffer {px} plain, {py} lean"
                continue
            x, y = _norm_value(x), _norm_value(y)
            if type(x) is not type(y) or x != y:
                return f"launch {n}, argument {i}: {x!r} plain, {y!r} lean"
    return None


def _norm_value(x):
    if getattr(x, "calls", None) == [] or type(x).__name__ == "LazyDict":
        return None  # an empty launch-hook chain, or the metadata only hooks read
    return x


def check_case(case_name: str, seen: StubLaunches, T: int = 6, B: int = 3, H: int = 20, dtype=None):
    """Runs a case's forward and backward on both paths, recording the raw launches; returns
    (number of launches, None or what differs). With the timed run's B, H and dtype it needs no
    kernel compiled for it alone."""
    import torch

    from fused_rnn.kernels._launch import lean_launches

    records = {}
    for lean in (False, True):
        torch.manual_seed(0)
        case = make_case(case_name, T, B, H, dtype or torch.float32)
        seen.record = records[lean] = []
        try:
            with lean_launches(lean):
                case.bwd(case.fwd())
        finally:
            seen.record = None
    return len(records[True]), compare_records(records[False], records[True])


# --------------------------------------------------------------------------- timing


def _median_us(fn, repeat: int) -> tuple[float, float]:
    """Medians over `repeat` calls of fn: (wall-clock µs, CPU µs of this process). On a shared
    machine the CPU time leaves out the time the process waited for a core."""
    wall, cpu = [], []
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        c1, w1 = time.process_time(), time.perf_counter()
        wall.append(w1 - w0)
        cpu.append(c1 - c0)
    return statistics.median(wall) * 1e6, statistics.median(cpu) * 1e6


def measure(case: Case, seen: StubLaunches, T: int, repeat: int, warmup: int):
    """The figures of one case on the current path."""
    from fused_rnn.kernels._launch import STATS

    for _ in range(warmup):
        case.bwd(case.fwd())
    before = STATS.copy()
    seen.reset()
    out = case.fwd()
    n_fwd, plain_fwd = seen.raw, seen.plain
    seen.reset()
    case.bwd(out)
    n_bwd, plain_bwd = seen.raw, seen.plain
    loops = STATS - before
    fwd_us, fwd_cpu = _median_us(case.fwd, repeat)
    both_us, both_cpu = _median_us(lambda: case.bwd(case.fwd()), repeat)
    n = n_fwd + n_bwd
    return {
        "T": T,
        "launches_fwd": n_fwd,
        "launches_bwd": n_bwd,
        # of one forward and one backward call: launches through kernel[grid](...), and the
        # loops that launched the lean or the plain way
        "plain_launches": plain_fwd + plain_bwd,
        "lean_loops": loops["lean"],
        "plain_loops": loops["plain"],
        # wall clock (perf_counter) and CPU time (process_time), medians
        "fwd_us_per_step": fwd_us / T,
        "fwd_us_per_launch": fwd_us / n_fwd,
        "fwdbwd_us_per_step": both_us / T,
        "fwdbwd_us_per_launch": both_us / n,
        "fwd_cpu_us_per_step": fwd_cpu / T,
        "fwd_cpu_us_per_launch": fwd_cpu / n_fwd,
        "fwdbwd_cpu_us_per_step": both_cpu / T,
        "fwdbwd_cpu_us_per_launch": both_cpu / n,
    }


def per_call(single: Case, row: dict, T: int, repeat: int) -> dict:
    """What a call costs whatever its length and what each step adds, CPU µs: the marginal cost
    of a step from calls of 2 and of T steps (the T-step figures in `row`); 2, not 1, so that
    both calls set up every loop (a backward of 1 step runs only its first-step variant), and
    the fixed cost of a call = (call of 2 steps) - 2 x (marginal step)."""
    single.bwd(single.fwd())
    _, fwd2 = _median_us(single.fwd, repeat)
    _, both2 = _median_us(lambda: single.bwd(single.fwd()), repeat)
    fwd_t, both_t = row["fwd_cpu_us_per_step"] * T, row["fwdbwd_cpu_us_per_step"] * T
    fwd_step = (fwd_t - fwd2) / max(T - 2, 1)
    both_step = (both_t - both2) / max(T - 2, 1)
    return {
        "fwd_cpu_us_per_call": fwd2 - 2 * fwd_step,
        "fwdbwd_cpu_us_per_call": both2 - 2 * both_step,
        "fwd_cpu_us_per_marginal_step": fwd_step,
        "fwdbwd_cpu_us_per_marginal_step": both_step,
    }


def environment() -> dict:
    import torch
    import triton

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    root = pathlib.Path(__file__).resolve().parents[1]
    commit = None
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        git = ["git", "-C", str(root)]
        commit = subprocess.run(
            git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            git + ["status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        commit += "+dirty" if dirty else ""
    return {
        "date": _dt.date.today().isoformat(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        # other work on the machine inflates wall-clock figures (and, less, CPU time)
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": commit,
    }


def run(
    cases, T: int, B: int, H: int, dtype_name: str, repeat: int, warmup: int, check: bool, log=print
) -> dict:
    import torch

    from fused_rnn.kernels._launch import lean_launches

    dtype = getattr(torch, dtype_name)
    env = environment()
    log(
        f"host cost per launch, stub CUDA driver (sm_90, no-op raw launch): T={T} B={B} H={H} "
        f"{dtype_name}, median of {repeat} after {warmup} warm-up"
    )
    log(
        f"  {env['cpu']} ({env['cpu_count']} cores, load {env['loadavg_1min']}); python "
        f"{env['python']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}"
    )
    rows = []
    checks = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc_was = gc.isenabled()
    try:
        with stub_cuda_driver() as seen:
            for name in cases:
                if check:
                    n, diff = check_case(name, seen, B=B, H=H, dtype=dtype)
                    checks[name] = {"launches": n, "identical": diff is None, "difference": diff}
                    log(
                        f"  {name}: lean launches == plain launches over {n} launches: "
                        + ("yes" if diff is None else f"NO ({diff})")
                    )
                case, single = make_case(name, T, B, H, dtype), make_case(name, 2, B, H, dtype)
                for path in ("plain", "lean"):
                    with lean_launches(path == "lean"):
                        gc.disable()
                        try:
                            row = measure(case, seen, T, repeat, warmup)
                            row.update(per_call(single, row, T, repeat))
                        finally:
                            if gc_was:
                                gc.enable()
                    rows.append(dict(row, case=name, path=path))
    finally:
        torch.set_num_threads(threads)
    log("")
    log(_table(rows))
    log("")
    log(_split_table(rows, T))
    return {
        "env": env,
        "T": T,
        "B": B,
        "H": H,
        "dtype": dtype_name,
        "repeat": repeat,
        "warmup": warmup,
        "checks": checks,
        "rows": rows,
    }


def _table(rows) -> str:
    head = [
        ("", "", "launches", "fwd µs/step", "fwd µs/launch", "f+b µs/step", "f+b µs/launch",
         "plain"),
        ("case", "path", "per step", "wall   cpu", "wall   cpu", "wall   cpu", "wall   cpu",
         "launches"),
    ]  # fmt: skip
    lines = list(head)
    for r in rows:
        per_step = (r["launches_fwd"] + r["launches_bwd"]) / r["T"]
        pair = [
            f"{r[k]:6.2f} {r[k.replace('_us', '_cpu_us')]:6.2f}"
            for k in ("fwd_us_per_step", "fwd_us_per_launch", "fwdbwd_us_per_step",
                      "fwdbwd_us_per_launch")
        ]  # fmt: skip
        lines.append((r["case"], r["path"], f"{per_step:.2f}", *pair, f"{r['plain_launches']}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)


def _split_table(rows, T: int) -> str:
    lines = [
        ("", "", "fixed per call", "fixed per call", "per step", "per step"),
        ("case", "path", "fwd", "f+b", "fwd", "f+b"),
    ]
    for r in rows:
        lines.append((
            r["case"], r["path"], f"{r['fwd_cpu_us_per_call']:.0f}",
            f"{r['fwdbwd_cpu_us_per_call']:.0f}", f"{r['fwd_cpu_us_per_marginal_step']:.2f}",
            f"{r['fwdbwd_cpu_us_per_marginal_step']:.2f}",
        ))  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)
    return f"CPU µs fixed per call and per marginal step (from calls of 2 and {T} steps):\n" + text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m fused_rnn.bench.host_cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    ap.add_argument("-T", type=int, default=512)
    ap.add_argument("-B", type=int, default=16)
    ap.add_argument("-H", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--repeat", type=int, default=15, help="timed calls per figure (median)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--no-check", dest="check", action="store_false", help="skip the lean == plain launch check"
    )
    ap.add_argument("--out", type=pathlib.Path, help="folder for host-cost-<date>.{json,log}")
    ap.add_argument("--json", type=pathlib.Path, help="write the result as JSON to this file")
    args = ap.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    for c in cases:
        if c not in CASES:
            ap.error(f"unknown case {c!r}; known: {', '.join(CASES)}")
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "0"  # compiled kernels, not the interpreter
    from fused_rnn.kernels._common import is_interpreter

    if is_interpreter():
        ap.error("TRITON_INTERPRET is on: the launch path measured here is the compiled one")

    lines = []

    def log(s=""):
        print(s, flush=True)
        lines.append(s)

    result = run(
        cases, args.T, args.B, args.H, args.dtype, args.repeat, args.warmup, args.check, log
    )
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"host-cost-{result['env']['date']}"
        stem.with_suffix(".json").write_text(text + "\n")
        stem.with_suffix(".log").write_text("\n".join(lines) + "\n")
        log(f"wrote {stem}.json, {stem}.log")
    bad = [n for n, c in result["checks"].items() if not c["identical"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
