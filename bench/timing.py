"""Timers: median of many runs after warm-up, with the spread.

CUDA: one pair of CUDA events around every run, read after a single synchronize at the end,
so host-side launch cost is counted (as a user sees it) but no host sync sits between runs.
CPU: ``time.perf_counter_ns`` around every run with the garbage collector off.

The number of timed runs is ``reps`` at most, fewer when the warm-up says they would take longer
than ``budget_s``, never fewer than ``min(MIN_REPS, reps)``.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["MIN_REPS", "Timing", "measure", "summarize"]

MIN_REPS = 10


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
