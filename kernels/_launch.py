"""Lean launches for the stepwise loops: one kernel launched once per time step with the same
arguments every time except its step indices (t, s_in, s_out, ...).

`kernel[grid](**kwargs)` spends 20-50 µs of Python per launch before any GPU work (measured on
CPU with a stub driver, bench/host_cost.py; cuDNN's whole LSTM step is ~2 µs): the heuristics
wrapper, binding and specializing every argument, the compile-cache key, the launch metadata and
the launcher's own wrapper. A stepwise
recurrence makes T such launches whose arguments never change but for the step, so `step_launcher`
resolves everything else once per loop:

1. The first step launches through `kernel[grid](...)` as usual. That applies the heuristics,
   compiles (or finds) the kernel, checks every pointer, and returns the `CompiledKernel`.
2. The call that the compiled kernel's launcher makes to its raw (C) launch function is recorded
   once, on a copy of the launcher whose `launch` records instead of launching, with the step
   arguments replaced by markers and tensors by their device addresses (the raw launch takes an
   int as a pointer and skips the per-tensor `data_ptr()` and driver query).
3. Every later step calls the raw launch function with that argument list, the step values put
   where the markers were. No tensor is created and nothing synchronises, so a loop of such
   launches can be captured in a CUDA graph.

Recording the launcher's own call, rather than writing out its arguments, keeps this independent
of the Triton version: 3.6 passes the kernel arguments to the raw launch unpacked, 3.9 as one tuple
beside its argument annotations; both come out of the recording as they are.

One compiled kernel must serve every step, so each step argument must be in the kernel's
`do_not_specialize` (checked, ValueError otherwise): Triton would otherwise compile variants for
a step of 1 or a multiple of 16. Step values are time indices, int32 like the first step's.

The plain `kernel[grid](...)` launch is used for the whole loop when the lean one cannot be set up:
under the interpreter, with `lean_launches(False)` or FUSED_RNN_LEAN_LAUNCH=0, for a kernel that is
not a (heuristics-wrapped) JITFunction, with Triton's launch hooks or pre-run hooks set (they want
every launch), or a kernel that needs per-launch scratch memory. Each prepared loop is counted in
`STATS` ("lean" or "plain", and "plain:<reason>"); the reason is logged (logger
"fused_rnn.kernels", DEBUG).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import inspect
import logging
import os

import torch
from triton import knobs
from triton.runtime import driver
from triton.runtime.autotuner import Heuristics
from triton.runtime.jit import JITFunction

from ._common import is_interpreter

__all__ = ["STATS", "lean_enabled", "lean_launches", "step_launcher"]

_log = logging.getLogger("fused_rnn.kernels")

# Loops prepared per path: "lean", "plain" and "plain:<reason>" (tests, bench/host_cost.py).
STATS: collections.Counter = collections.Counter()

# Module switch for the lean path; FUSED_RNN_LEAN_LAUNCH=0 turns it off as well.
LEAN = True


def lean_enabled() -> bool:
    return LEAN and os.environ.get("FUSED_RNN_LEAN_LAUNCH", "1").lower() not in ("0", "false", "no")


@contextlib.contextmanager
def lean_launches(flag: bool = True):
    """Context manager turning the lean launches on (or off: every step `kernel[grid](...)`)."""
    global LEAN
    old, LEAN = LEAN, flag
    try:
        yield
    finally:
        LEAN = old


def step_launcher(kernel, grid, steps: tuple[str, ...], **kwargs):
    """A function launching `kernel[grid](**kwargs, **dict(zip(steps, values)))` for `values`.

    kernel: a @triton.jit function, possibly under @triton.heuristics; grid: a tuple of up to 3
    ints; steps: names of the kernel's arguments that change from one launch to the next (each
    in its `do_not_specialize`); kwargs: every other argument and the launch options
    (num_warps, ...), the same for every launch. Create one per loop (it holds the loop's
    tensors) and call it with the step values, positionally in the order of `steps`.
    """
    steps = tuple(steps)
    _check_not_specialized(kernel, steps)
    grid = tuple(grid)
    kwargs = dict(kwargs)

    def plain(values):
        kwargs.update(zip(steps, values))
        kernel[grid](**kwargs)

    reason = _plain_reason(kernel)
    if reason is not None:
        _count_plain(kernel, reason)
        return lambda *values: plain(values)

    fast = None

    def launch(*values):
        nonlocal fast
        if fast is not None:
            fast(values)
            return
        kwargs.update(zip(steps, values))
        fast = _prepare(kernel, grid, steps, kwargs) or plain

    return launch


# --------------------------------------------------------------------------- setup


def _kernel_name(kernel) -> str:
    fn, _ = _unwrap(kernel)
    return getattr(getattr(fn, "fn", fn), "__name__", type(fn).__name__)


def _count_plain(kernel, reason: str) -> None:
    STATS["plain"] += 1
    STATS["plain:" + reason] += 1
    _log.debug("%s: plain launches (%s)", _kernel_name(kernel), reason)


def _unwrap(kernel):
    """(the JITFunction under any @triton.heuristics, the heuristics outermost first)."""
    heuristics = []
    while isinstance(kernel, Heuristics):
        heuristics.append(kernel.values)
        kernel = kernel.fn
    return kernel, heuristics


_CHECKED: set = set()  # (kernel, steps) found valid


def _check_not_specialized(kernel, steps) -> None:
    if (kernel, steps) in _CHECKED:
        return
    fn, _ = _unwrap(kernel)
    names = list(getattr(fn, "arg_names", ()))
    dns = getattr(fn, "do_not_specialize", None)
    if dns is None:  # the interpreter keeps the jit options in .kwargs
        dns = getattr(fn, "kwargs", {}).get("do_not_specialize")
    dns = {names[d] if isinstance(d, int) else d for d in (dns or ())}
    missing = [s for s in steps if s not in dns]
    if missing:
        raise ValueError(
            f"{_kernel_name(kernel)}: step arguments {missing} must be in do_not_specialize, "
            "so that one compiled kernel serves every step"
        )
    _CHECKED.add((kernel, steps))


def _plain_reason(kernel) -> str | None:
    """Why the loop must launch through `kernel[grid](...)`, or None."""
    if not lean_enabled():
        return "switched off"
    if is_interpreter():
        return "interpreter"
    fn, _ = _unwrap(kernel)
    if not isinstance(fn, JITFunction):
        return f"not a JITFunction: {type(fn).__name__}"
    if fn.pre_run_hooks:
        return "pre-run hooks"
    if _hooked(knobs.runtime.launch_enter_hook) or _hooked(knobs.runtime.launch_exit_hook):
        return "launch hooks"
    return None


def _hooked(hook) -> bool:
    """Whether a launch hook is set: a callable, or since Triton 3.5 a HookChain with calls."""
    return hook is not None and bool(getattr(hook, "calls", True))


class _Marker:
    """Stands for a step argument in the recorded launch call."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


def _prepare(kernel, grid, steps, kwargs):
    """Launches the first step the plain way, then returns the lean launch of later steps, or
    None (counted, logged) when it cannot be set up."""
    fn, heuristics = _unwrap(kernel)
    # what Heuristics.run does, outermost first, on the arguments of this launch
    for values in heuristics:
        for name, heur in values.items():
            kwargs[name] = heur(kwargs)
    device = driver.active.get_current_device()
    stream = driver.active.get_current_stream(device)
    compiled = fn.run(grid=grid, warmup=False, **kwargs)
    # hooks set by the plain launch itself (a profiler starting up) want every launch
    reason = _plain_reason(kernel)
    if reason is None:
        try:
            return _record(fn, compiled, grid, stream, steps, kwargs)
        except _NotLean as e:
            reason = str(e)
        except Exception as e:  # an unexpected Triton internals change: stay correct
            reason = f"{type(e).__name__}: {e}"
    _count_plain(kernel, reason)
    return None


class _NotLean(Exception):
    pass


_NO_DEFAULT = inspect.Parameter.empty


@functools.cache
def _params(fn) -> tuple:
    """(name, default) of each parameter of a jit function, in order."""
    return tuple((n, p.default) for n, p in fn.signature.parameters.items())


def _record(fn, compiled, grid, stream, steps, kwargs):
    """The lean launch of `compiled`: records the call its launcher makes to the raw launch once
    (step arguments as markers), then returns a function repeating it with the step values."""
    meta = compiled.metadata
    for field in ("global_scratch_size", "profile_scratch_size"):
        if getattr(meta, field, 0):
            raise _NotLean(f"per-launch scratch memory ({field})")
    launcher = compiled.run
    if getattr(launcher, "gsan_enabled", False):
        raise _NotLean("gsan instrumentation")
    if not callable(getattr(launcher, "launch", None)):
        raise _NotLean(f"launcher without a raw launch: {type(launcher).__name__}")

    # the kernel's arguments in signature order, as the binder passes them (defaults filled in)
    # (addresses stay valid: the caller's `kwargs`, kept by its launch function, holds the tensors)
    args = []
    for name, default in _params(fn):
        if name in steps:
            args.append(_Marker(steps.index(name)))
        elif name in kwargs:
            a = kwargs[name]
            args.append(a.data_ptr() if isinstance(a, torch.Tensor) else a)
        elif default is not _NO_DEFAULT:
            args.append(default)
        else:
            raise _NotLean(f"argument {name} missing")
    g = grid + (1,) * (3 - len(grid))

    calls = []
    probe = copy.copy(launcher)
    probe.launch = lambda *a: calls.append(a)
    probe(g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata, None, None, None,
          *args)  # fmt: skip
    if len(calls) != 1:
        raise _NotLean(f"launcher made {len(calls)} raw calls")
    call = list(calls[0])

    # where the markers went: in the call itself (3.6) or in one tuple inside it (3.9)
    found = [(i, None) for i, a in enumerate(call) if type(a) is _Marker]
    for i, a in enumerate(call):
        if type(a) is tuple or type(a) is list:
            found += [(i, j) for j, b in enumerate(a) if type(b) is _Marker]
    nested = {i for i, j in found if j is not None}
    mixed = nested and any(j is None for _, j in found)
    if len(found) != len(steps) or len(nested) > 1 or mixed:
        raise _NotLean("step arguments not found once each in the launcher's call")
    where = [None] * len(steps)
    for i, j in found:
        m = call[i] if j is None else call[i][j]
        where[m.index] = i if j is None else j
    raw = launcher.launch
    head = tail = ()
    if nested:
        (k,) = nested
        if not isinstance(call[k], tuple):
            raise _NotLean(f"kernel arguments passed as {type(call[k]).__name__}")
        head, tail, call = tuple(call[:k]), tuple(call[k + 1 :]), list(call[k])
    _log.debug("%s: lean launches", _kernel_name(fn))
    STATS["lean"] += 1
    # the hot path of every step: where the step arguments are consecutive and in order (every
    # kernel here), the arguments are two constant tuples around the step's values
    p = where[0]
    if where == list(range(p, p + len(where))):
        pre, post = tuple(call[:p]), tuple(call[p + len(where) :])
        if nested:
            return lambda values: raw(*head, pre + values + post, *tail)
        return lambda values: raw(*(pre + values + post))

    def launch(values):
        for i, v in zip(where, values):
            call[i] = v
        if nested:
            raw(*head, tuple(call), *tail)
        else:
            raw(*call)

    return launch
