"""The floors under a recurrence step, measured: the grid barrier alone, and a kernel launch.

A persistent kernel's step ends at a grid barrier (`fused_rnn.kernels._common._grid_barrier`):
every program adds 1 to a monotonic int32 counter (release) and spins on an acquire read until
the count reaches (step + 1) x programs. A stepwise step is a kernel launch. Both are paid once
per time step whatever the sizes, so they bound how fast a step can be; DESIGN.md gives
0.5-2 µs for the barrier and ~1.3 µs for a launch from a CUDA graph as expectations. This module
measures them on the device.

Barrier. `_barrier_kernel` is a persistent kernel that does nothing but cross the same
`_grid_barrier` (the jit function itself, imported) `steps` times, launched as the persistent
recurrences are (`PERSISTENT_WARPS` warps, a cooperative launch where Triton offers one, a fresh
zeroed counter). At each grid size (`GRIDS`: 1, 8, 32, 66 and 132 programs, the H200's SM count;
never more than the device's SMs, or the grid could not be co-resident), two readings:

- stamps: program 0 reads %globaltimer (ns) before the first crossing and after each one; the
  per-crossing time is the median of the `steps` differences (with p10, p90, the mean, and the
  smallest positive difference: the timer's resolution, which on some GPUs is coarser than a
  crossing, when the mean is the figure to read);
- slope: CUDA-event times of launches of `steps` and `2 * steps` crossings without stamps;
  (t(2S) - t(S)) / S per crossing, which leaves out the launch and the stamps. Median over reps.

After every launch the counter must read steps x programs: a barrier that lets a program through
early or late would show there (an "error" row).

Launch floor. `_empty_kernel` does nothing. Launched `n` times in a row, timed per launch as host
time (perf_counter) and device time (CUDA events around the n launches, read after one
synchronise), three ways:

- eager: `kernel[grid](...)`, Triton's generic launch path;
- lean: through `fused_rnn.kernels._launch.step_launcher`, the stepwise loops' path (its
  `STATS` say whether it was really the lean path);
- graph: n lean launches captured in one CUDA graph, the graph replayed (what the stepwise
  loops replay through fused_rnn._graphs); device time per launch.

Under Triton's interpreter (CPU) the kernels run on one program; a barrier over several programs
would wait forever there (the interpreter runs a grid's programs one after another), unless a
test executor runs them concurrently (`_common.concurrent_programs`). Times on the CPU are the
interpreter's, not a GPU's; the stamp and graph readings need CUDA.
"""

from __future__ import annotations

import statistics
import time

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import globaltimer

from fused_rnn.kernels import _common, _launch
from fused_rnn.kernels._common import _grid_barrier

__all__ = [
    "GRIDS",
    "launch_barrier",
    "measure_barrier",
    "measure_launch",
    "LAUNCH_PATHS",
    "barrier_skip_reason",
]

# programs per grid: 1 (the barrier's own cost), a few, a quarter, half and all of an H200's 132
# SMs (the persistent recurrences use up to one program per SM)
GRIDS = (1, 8, 32, 66, 132)


@triton.jit(do_not_specialize=["steps"])
def _barrier_kernel(
    cnt,  # (1,) int32, zeroed before the launch; every crossing adds num_programs to it
    stamps,  # (steps + 1,) int64: %globaltimer of program 0 before the loop and after each step
    steps,  # crossings
    STAMP: tl.constexpr,  # record the stamps (CUDA only: inline PTX)
):
    n = tl.num_programs(0)
    first = tl.program_id(0) == 0
    if STAMP:
        if first:
            tl.store(stamps, globaltimer())
    for s in tl.range(0, steps, num_stages=1):
        _grid_barrier(cnt, (s + 1) * n)
        if STAMP:
            if first:
                tl.store(stamps + s + 1, globaltimer())


@triton.jit(do_not_specialize=["t"])
def _empty_kernel(
    x,  # (1,) any dtype: an argument, never touched
    t,  # a step index, as the stepwise kernels take one
):
    pass


def barrier_skip_reason(programs: int, device: torch.device) -> str | None:
    """Why a barrier over `programs` programs cannot run on `device`, or None."""
    if device.type == "cuda":
        sms = _common.device_props(device).sm_count
        if programs > sms:
            return f"{programs} programs > {sms} SMs: the grid could not be co-resident"
        return None
    if not _common.is_interpreter():
        return "needs CUDA (or TRITON_INTERPRET=1)"
    if programs > 1 and not _common._CONCURRENT_PROGRAMS:
        return (
            "skipped on CPU: needs CUDA (the interpreter runs a grid's programs one after "
            "another, so a barrier over several would never be passed)"
        )
    return None


def launch_barrier(programs: int, steps: int, device, stamp: bool = False):
    """Launches `_barrier_kernel` on `programs` programs for `steps` crossings; returns
    (counter, stamps) tensors, not synchronised. Launch options as the persistent recurrences'
    (`_common.launch_persistent`): PERSISTENT_WARPS warps, a cooperative launch where Triton has
    the option. `stamp` needs CUDA. Refuses a grid that would hang: more programs than SMs, or
    several programs under an interpreter that runs them one after another. (CPU tensors without
    the interpreter go to Triton's active driver: a stub driver in tests.)"""
    device = torch.device(device)
    why = barrier_skip_reason(programs, device)
    if why is not None and (device.type == "cuda" or _common.is_interpreter()):
        raise RuntimeError(why)
    cnt = torch.zeros(1, dtype=torch.int32, device=device)
    stamps = torch.zeros(steps + 1 if stamp else 1, dtype=torch.int64, device=device)
    options = {"num_warps": _common.PERSISTENT_WARPS}
    if not _common.is_interpreter() and _common.cooperative_launch_available():
        options["launch_cooperative_grid"] = True
    _barrier_kernel[(programs,)](cnt, stamps, steps, STAMP=stamp, **options)
    return cnt, stamps


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _check_count(cnt, steps: int, programs: int) -> None:
    got = int(cnt.item())
    if got != steps * programs:
        raise RuntimeError(
            f"barrier counter reads {got} after {steps} crossings of {programs} programs, "
            f"expected {steps * programs}"
        )


def measure_barrier(programs: int, device, steps: int = 10000, reps: int = 5) -> dict:
    """Per-crossing cost of the grid barrier on `programs` programs (module docstring).

    Returns a row: {"what": "barrier", "programs", "steps", "reps", "status", ...}; status
    "unavailable" (with "reason") where the grid cannot run here. On CUDA the readings are in ns;
    under the interpreter only the wall time per crossing (the interpreter's, labelled)."""
    device = torch.device(device)
    row = {"what": "barrier", "id": f"barrier/p{programs}", "programs": programs,
           "steps": steps, "reps": reps, "warps": _common.PERSISTENT_WARPS,
           "status": "ok"}  # fmt: skip
    why = barrier_skip_reason(programs, device)
    if why is not None:
        row.update(status="unavailable", reason=why)
        return row
    if device.type != "cuda":  # the interpreter: the code path and the count, no GPU figure
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            cnt, _ = launch_barrier(programs, steps, device)
            times.append((time.perf_counter() - t0) / steps * 1e9)
            _check_count(cnt, steps, programs)
        row.update(timer="interpreter wall clock (not a GPU figure)",
                   interpreter_ns_per_crossing=statistics.median(times))  # fmt: skip
        return row

    row["cooperative"] = _common.cooperative_launch_available()
    for stamp in (True, False):  # compile both variants outside the timed launches
        cnt, _ = launch_barrier(programs, 4, device, stamp=stamp)
        torch.cuda.synchronize(device)
        _check_count(cnt, 4, programs)
    diffs, means, slopes, launch_ms = [], [], [], []
    for _ in range(reps):
        cnt, stamps = launch_barrier(programs, steps, device, stamp=True)
        torch.cuda.synchronize(device)
        _check_count(cnt, steps, programs)
        d = (stamps[1:] - stamps[:-1]).double()
        diffs += d.tolist()
        means.append((stamps[-1] - stamps[0]).item() / steps)
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        ev[0].record()
        c1, _ = launch_barrier(programs, steps, device)
        ev[1].record()
        ev[2].record()
        c2, _ = launch_barrier(programs, 2 * steps, device)
        ev[3].record()
        torch.cuda.synchronize(device)
        _check_count(c1, steps, programs)
        _check_count(c2, 2 * steps, programs)
        t1, t2 = ev[0].elapsed_time(ev[1]), ev[2].elapsed_time(ev[3])
        slopes.append((t2 - t1) * 1e6 / steps)
        launch_ms.append(t1)
    positive = [x for x in diffs if x > 0]
    row.update(
        timer="%globaltimer stamps of program 0; CUDA events for the slope",
        stamp_median_ns=statistics.median(diffs),
        stamp_p10_ns=_pct(diffs, 0.10),
        stamp_p90_ns=_pct(diffs, 0.90),
        stamp_mean_ns=statistics.median(means),
        stamp_resolution_ns=min(positive) if positive else None,
        slope_median_ns=statistics.median(slopes),
        slope_min_ns=min(slopes),
        launch_ms_median=statistics.median(launch_ms),
    )
    return row


def _time_launches(launch, n: int, device: torch.device) -> tuple[float, float | None]:
    """(host µs per launch, device µs per launch or None off CUDA) of `launch(i)` for i < n."""
    cuda = device.type == "cuda"
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
    t0 = time.perf_counter()
    for i in range(n):
        launch(i)
    host = (time.perf_counter() - t0) * 1e6 / n
    if not cuda:
        return host, None
    end.record()
    torch.cuda.synchronize(device)
    return host, start.elapsed_time(end) * 1e3 / n


LAUNCH_PATHS = ("eager", "lean", "graph")


def measure_launch(path: str, device, n: int = 2000, rounds: int = 5) -> dict:
    """The cost of launching the empty kernel one way (`LAUNCH_PATHS`, module docstring): a row
    {"what": "launch", "path", "launches": n, "rounds", "status", "host_us", "device_us"}, per
    launch, medians over `rounds` rounds of `n` launches. "graph" needs CUDA."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    row = {"what": "launch", "id": f"launch/{path}", "path": path, "launches": n,
           "rounds": rounds, "status": "ok"}  # fmt: skip
    if path == "graph" and not cuda:
        row.update(status="unavailable", reason="skipped on CPU: needs CUDA (CUDA graphs)")
        return row
    x = torch.zeros(1, device=device)

    def eager(i):
        _empty_kernel[(1,)](x, i)

    eager(0)  # compiles
    if path == "eager":
        launch = eager
    else:
        before = _launch.STATS.copy()
        launch = _launch.step_launcher(_empty_kernel, (1,), ("t",), x=x)
        launch(0)  # prepares the loop
        used = {k: v for k, v in (_launch.STATS - before).items() if v}
        row["launch_path"] = "lean" if used.get("lean") else "plain"
        row["stats"] = used
    if path != "graph":
        times = [_time_launches(launch, n, device) for _ in range(rounds)]
        row["timer"] = "perf_counter; CUDA events" if cuda else "interpreter wall clock"
    else:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            # a fresh launcher inside the capture: it prepares its loop on the capture stream,
            # as a stepwise launcher does when fused_rnn._graphs records it
            captured = _launch.step_launcher(_empty_kernel, (1,), ("t",), x=x)
            for i in range(n):
                captured(i)
        graph.replay()
        torch.cuda.synchronize(device)
        times = []
        for _ in range(rounds):
            host, dev = _time_launches(lambda i: graph.replay(), 1, device)
            times.append((host / n, dev / n))
        row["timer"] = f"one graph of {n} lean launches replayed; perf_counter; CUDA events"
    row["host_us"] = statistics.median(h for h, _ in times)
    row["device_us"] = statistics.median(d for _, d in times) if cuda else None
    return row
