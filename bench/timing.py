"""Timers: median of many runs after warm-up, with the spread, and when a difference is noise.

CUDA: one pair of CUDA events around every run, read after a single synchronize at the end,
so host-side launch cost is counted (as a user sees it) but no host sync sits between runs.
CPU: ``time.perf_counter_ns`` around every run with the garbage collector off.

The number of timed runs is ``reps`` at most, fewer when the warm-up says they would take longer
than ``budget_s``, never fewer than ``min(MIN_REPS, reps)``.

Spread and noise. Each side is summarised by its median and its interquartile range
[p25, p75]. Two sides differ by more than the noise when their interquartile ranges do not
overlap; equivalently, the ratio's range

    ref.p25 / new.p75  <=  ref.median / new.median  <=  ref.p75 / new.p25
    (ratio_lo)             (ratio)                      (ratio_hi)

does not contain 1. Why this rule rather than a significance test (Mann-Whitney, a bootstrap
interval): the two sides are timed one after the other, not interleaved, so a change of load on
the machine between them shifts one whole sample; the runs are not independent draws, and a
test's confidence grows with the number of runs whatever the drift. The IQR rule asks a
question that more runs do not bias: is the gap between the medians larger than the spread of
the runs themselves? The tighter the runs, the smaller the difference it separates; on a loaded
CPU it declines to call a difference that the run-to-run spread could explain. Fewer than
MIN_SPREAD_REPS runs on a side give no verdict (None).
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "MIN_REPS",
    "MIN_SPREAD_REPS",
    "Timing",
    "measure",
    "ratio_range",
    "summarize",
    "within_noise",
]

MIN_REPS = 10
# quartiles of fewer runs say nothing about the spread (of one run, the IQR is 0)
MIN_SPREAD_REPS = 3


@dataclass(frozen=True)
class Timing:
    """Run times in milliseconds."""

    median_ms: float
    min_ms: float
    q1_ms: float
    q3_ms: float
    reps: int

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms


def summarize(times_ms: list[float]) -> Timing:
    if not times_ms:
        raise ValueError("no timed runs")
    if len(times_ms) == 1:
        t = times_ms[0]
        return Timing(t, t, t, t, 1)
    q1, _, q3 = statistics.quantiles(times_ms, n=4, method="inclusive")
    return Timing(statistics.median(times_ms), min(times_ms), q1, q3, len(times_ms))


def ratio_range(ref: Timing, new: Timing) -> tuple[float, float] | None:
    """(ref.p25 / new.p75, ref.p75 / new.p25): the range of ``ref / new`` over the two
    interquartile ranges; None when a side has fewer than MIN_SPREAD_REPS runs or a zero p25."""
    if min(ref.reps, new.reps) < MIN_SPREAD_REPS or new.q1_ms <= 0:
        return None
    return ref.q1_ms / new.q3_ms, ref.q3_ms / new.q1_ms


def within_noise(ref: Timing, new: Timing) -> bool | None:
    """True when the two interquartile ranges overlap (the ratio's range contains 1): the
    difference between the medians is within the run-to-run spread. None: too few runs."""
    if min(ref.reps, new.reps) < MIN_SPREAD_REPS:
        return None
    return ref.q1_ms <= new.q3_ms and new.q1_ms <= ref.q3_ms


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _n_reps(estimate_s: float, reps: int, budget_s: float | None) -> int:
    if budget_s is None or estimate_s <= 0 or not math.isfinite(estimate_s):
        return reps
    return max(min(MIN_REPS, reps), min(reps, int(budget_s / estimate_s)))


def measure(
    fn: Callable[[], object],
    device: torch.device | str,
    *,
    warmup: int = 3,
    reps: int = 20,
    budget_s: float | None = 1.0,
) -> Timing:
    """Time ``fn()`` on ``device``: ``warmup`` untimed runs, then up to ``reps`` timed ones."""
    device = torch.device(device)
    if reps < 1:
        raise ValueError("reps must be >= 1")
    # The fastest warm-up run sizes the timed loop: one stall (a first-call allocation, a
    # neighbour's process) must not shrink it to a handful of runs.
    estimate = math.inf
    for _ in range(warmup):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        estimate = min(estimate, time.perf_counter() - t0)
    n = _n_reps(estimate, reps, budget_s)
    if device.type == "cuda":
        return summarize(_time_cuda(fn, device, n))
    return summarize(_time_cpu(fn, n))


def _time_cuda(fn, device: torch.device, n: int) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    with torch.cuda.device(device):
        for start, end in zip(starts, ends, strict=True):
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]


def _time_cpu(fn, n: int) -> list[float]:
    times = []
    gc_was_on = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(n):
            t0 = time.perf_counter_ns()
            fn()
            times.append((time.perf_counter_ns() - t0) / 1e6)
    finally:
        if gc_was_on:
            gc.enable()
    return times
