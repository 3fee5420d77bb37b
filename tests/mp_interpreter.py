"""Every program of an interpreted Triton grid in its own thread: grid barriers under the CPU
interpreter (tests only).

Triton's interpreter (TRITON_INTERPRET=1; written against Triton 3.9's
triton/runtime/interpreter.py) runs a grid's programs one after another in
`GridExecutor.__call__` and keeps the current program id in its one module-wide
`interpreter_builder`, so a program spinning at a grid barrier for a later program waits
forever. Within `threaded_programs()`:

- `GridExecutor.__call__` prepares the launch as the interpreter does (host copies of the
  arguments, pre-run hooks, the `tl` patches of `_patch_lang`), then starts one thread per
  program and joins them all before it restores the patches and returns;
- the builder's program id and grid size (`self.grid_idx` / `self.grid_dim`, read by
  `program_id`, `num_programs` and `device_print`) are thread-local, set by each thread;
- each program gets its own pointer handles of the arguments (`_implicit_cvt`);
- the rewrite cache of jit functions (`InterpretedFunction.rewrite`) is filled under a lock;
- a watchdog turns a hang into `GridHangError` within seconds: when no program has written
  memory (store, writing atomic, end of a program) for `stall_s` seconds, or the launch passed
  `timeout_s`, it raises an abort flag that every program checks at each load and atomic, so
  a stuck program raises inside its own thread and exits. A program that raises stops the
  others the same way, and the launch re-raises its error;
- `fused_rnn.kernels._common.concurrent_programs()` is entered, so that the persistent
  launchers accept grid barriers over several programs.

Two schedules:

- "greedy" (default, deterministic): one program runs at a time, as far as it can; it hands
  over to the next live program (round robin in grid order) when it waits, i.e. when a
  read-only atomic (an add of 0: a barrier's poll) returns what its previous poll of the same
  address returned. The interleaving is a function of the kernel alone, so a failure
  reproduces, and a program runs as far ahead of the others as the barriers let it: a read of
  another program's data that a barrier does not order sees NaN poison.
- "free": all programs run at once; the OS and the GIL interleave them (each atomic ends with
  `time.sleep(0)`, handing the GIL over, so a spinning program does not hold it for a whole
  switch interval). Interleavings vary from run to run.

Why sharing the rest is safe. Atomics: `_interpreter.atomic_rmw` / `atomic_cas` are C++
functions (python/src/interpreter.cc) whose bindings keep the GIL for the whole call and that
use `std::atomic` fetch-add / compare-exchange (a mutex for types std::atomic cannot take);
loads and stores are C++ memcpy loops, also under the GIL: every memory operation is atomic
with respect to the other programs (the tests also count concurrent atomic adds). The `tl`
patches are installed by the launch before any thread starts; a jit helper called from a
program re-patches the same names with equivalent functions (builtins, already replaced, are
skipped) and never restores them. What this cannot check: the GPU's memory model (everything
here is sequentially consistent), warps within a program, and co-residency.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import threading
import time

from triton.runtime import interpreter as _interp
from triton.runtime.errors import InterpreterError

from fused_rnn.kernels import _common

__all__ = ["GridHangError", "Launch", "ThreadedGrid", "threaded_programs", "SCHEDULES"]

SCHEDULES = ("greedy", "free")


class GridHangError(RuntimeError):
    """A grid's programs stopped making progress (e.g. a grid barrier nobody can pass)."""


class _Aborted(BaseException):
    """Raised inside a program's thread to stop it; never escapes the executor."""


@dataclasses.dataclass
class Launch:
    """One interpreted launch: the kernel, its grid, and how it went."""

    kernel: str
    grid: tuple[int, int, int]
    seconds: float = 0.0
    atomics: int = 0
    switches: int = 0  # greedy schedule: hand-overs between programs
    hang: str | None = None  # why the watchdog stopped it, if it did


@dataclasses.dataclass
class ThreadedGrid:
    """What `threaded_programs` yields: its settings and a record of every launch."""

    schedule: str
    stall_s: float
    timeout_s: float
    launches: list[Launch] = dataclasses.field(default_factory=list)


class _Baton:
    """Greedy schedule: which program may run. Round robin over the live programs."""

    def __init__(self, order):
        self.cond = threading.Condition()
        self.live = list(order)
        self.turn = self.live[0]
        self.switches = 0

    def wait(self, me, abort: threading.Event):
        with self.cond:
            while self.turn != me:
                if abort.is_set():
                    raise _Aborted
                self.cond.wait(0.1)

    def pass_on(self, me, abort: threading.Event):
        with self.cond:
            self.turn = self.live[(self.live.index(me) + 1) % len(self.live)]
            self.switches += 1
            self.cond.notify_all()
        self.wait(me, abort)

    def leave(self, me):
        with self.cond:
            i = self.live.index(me)
            self.live.remove(me)
            if self.turn == me and self.live:
                self.turn = self.live[i % len(self.live)]
            self.cond.notify_all()

    def wake(self):
        with self.cond:
            self.cond.notify_all()


class _Run:
    """State shared by the threads of one launch."""

    def __init__(self, record: Launch, programs: list, schedule: str):
        self.record = record
        self.abort = threading.Event()
        self.done = threading.Event()
        self.last_write = time.monotonic()
        self.errors: list[tuple[tuple[int, int, int], BaseException]] = []
        self.lock = threading.Lock()
        self.remaining = len(programs)
        self.atomics = itertools.count()  # next() is atomic under the GIL
        self.baton = _Baton(programs) if schedule == "greedy" else None

    def wrote(self):
        self.last_write = time.monotonic()

    def check(self):
        if self.abort.is_set():
            raise _Aborted

    def stop(self):
        self.abort.set()
        if self.baton is not None:
            self.baton.wake()

    def finished(self, idx, error: BaseException | None):
        with self.lock:
            if error is not None and not (self.abort.is_set() and _is_abort(error)):
                self.errors.append((idx, error))
            self.remaining -= 1
            if self.remaining == 0:
                self.done.set()
        if error is not None:
            self.stop()  # the others must not wait for this one
        if self.baton is not None:
            self.baton.leave(idx)
        self.wrote()  # a program ending is progress


def _is_abort(e: BaseException | None) -> bool:
    while e is not None:
        if isinstance(e, _Aborted):
            return True
        e = e.__cause__ or e.__context__
    return False


_tls = threading.local()  # per program thread: grid_idx, grid_dim, run, last_poll


class _ThreadedBuilder(_interp.InterpreterBuilder):
    """The interpreter's builder with a thread-local program id and grid size, abort checks at
    memory operations, the watchdog's progress clock and the schedule's hand-overs at atomics.
    Installed by swapping the class of the module's one builder instance."""

    grid_idx = property(
        lambda self: getattr(_tls, "grid_idx", None),
        lambda self, v: setattr(_tls, "grid_idx", v),
    )
    grid_dim = property(
        lambda self: getattr(_tls, "grid_dim", None),
        lambda self, v: setattr(_tls, "grid_dim", v),
    )

    def create_masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        run = getattr(_tls, "run", None)
        if run is not None:
            run.check()
        return super().create_masked_load(ptrs, mask, other, cache_policy, is_volatile)

    def create_masked_store(self, ptrs, value, mask, cache_policy):
        run = getattr(_tls, "run", None)
        if run is not None:
            run.check()
            run.wrote()
        return super().create_masked_store(ptrs, value, mask, cache_policy)

    def _atomic(self, op, ptr, writes: bool):
        run = getattr(_tls, "run", None)
        if run is None:
            return op()
        run.check()
        out = op()
        next(run.atomics)
        if writes:
            run.wrote()
            _tls.last_poll = None
        elif run.baton is not None:
            poll = (ptr.data.tobytes(), out.data.tobytes())
            if poll == getattr(_tls, "last_poll", None):  # polled twice, nothing changed: waits
                run.baton.pass_on(_tls.grid_idx, run.abort)
            _tls.last_poll = poll
        if run.baton is None:
            time.sleep(0)  # free schedule: hand the GIL over, a spinning program must not starve
        return out

    def create_atomic_rmw(self, rmwOp, ptr, val, mask, sem, scope):  # noqa: N803 (Triton's name)
        adds = (_interp._ir.ATOMIC_OP.ADD, _interp._ir.ATOMIC_OP.FADD)
        writes = rmwOp not in adds or bool(val.data.any())  # an add of 0 is a read
        return self._atomic(
            lambda: super(_ThreadedBuilder, self).create_atomic_rmw(
                rmwOp, ptr, val, mask, sem, scope
            ),
            ptr,
            writes,
        )

    def create_atomic_cas(self, ptr, cmp, val, sem, scope):
        return self._atomic(
            lambda: super(_ThreadedBuilder, self).create_atomic_cas(ptr, cmp, val, sem, scope),
            ptr,
            True,
        )


def _program(fn, args, constexprs, idx, grid, run: _Run):
    _tls.grid_idx, _tls.grid_dim, _tls.run, _tls.last_poll = idx, grid, run, None
    error = None
    try:
        if run.baton is not None:
            run.baton.wait(idx, run.abort)
        fn(**{k: v if k in constexprs else _interp._implicit_cvt(v) for k, v in args.items()})
    except BaseException as e:  # noqa: BLE001 (reported by the launching thread)
        error = e
    finally:
        _tls.run = None
        run.finished(idx, error)


def _run_grid(fn, args, constexprs, grid, settings: ThreadedGrid, record: Launch):
    programs = list(itertools.product(*(range(n) for n in grid)))
    if not programs:
        return
    run = _Run(record, programs, settings.schedule)
    threads = [
        threading.Thread(
            target=_program,
            args=(fn, args, constexprs, idx, grid, run),
            daemon=True,
            name=f"program{idx}",
        )
        for idx in programs
    ]
    start = time.monotonic()
    try:
        for t in threads:
            t.start()
        while not run.done.wait(0.05):
            if run.errors:
                break
            now = time.monotonic()
            if now - run.last_write > settings.stall_s:
                record.hang = f"no program wrote memory for {settings.stall_s:g} s"
                break
            if now - start > settings.timeout_s:
                record.hang = f"the launch ran past {settings.timeout_s:g} s"
                break
    finally:  # also on KeyboardInterrupt: no program outlives its launch
        run.stop()
        for t in threads:
            if t.is_alive():
                t.join(10.0)
    record.seconds = time.monotonic() - start
    record.atomics = next(run.atomics)
    record.switches = run.baton.switches if run.baton is not None else 0
    stuck = [t.name for t in threads if t.is_alive()]
    if stuck:  # looping without loads or atomics: cannot be stopped from outside
        raise GridHangError(f"{record.kernel}{record.grid}: {stuck} could not be stopped")
    if run.errors:
        idx, e = run.errors[0]
        raise InterpreterError(f"program {idx} of {record.kernel}{record.grid}: {e!r}") from e
    if record.hang is not None:
        raise GridHangError(f"{record.kernel}, grid {record.grid}: {record.hang} (a hang)")


def _threaded_call(settings: ThreadedGrid):
    """A replacement for `GridExecutor.__call__`: the interpreter's preparation of a launch,
    then every program in its own thread."""

    def call(self, *args_dev, **kwargs):
        spec = inspect.getfullargspec(self.fn)
        names = set(spec.args) | set(spec.kwonlyargs)
        kwargs = {k: v for k, v in kwargs.items() if k in names}
        args_hst, kwargs_hst = self._init_args_hst(args_dev, kwargs)
        for hook in self.pre_run_hooks:
            hook(*args_hst, **kwargs_hst)
        patches = _interp._patch_lang(self.fn)
        try:
            args = inspect.getcallargs(self.fn, *args_hst, **kwargs_hst)
            constexprs = frozenset(self.constexprs)
            grid = self.grid
            if callable(grid):
                grid = grid({k: v if k in constexprs else _interp._implicit_cvt(v)
                             for k, v in args.items()})  # fmt: skip
            grid = tuple(int(n) for n in grid) + (1,) * (3 - len(grid))
            record = Launch(self.fn.__name__, grid)
            settings.launches.append(record)
            _run_grid(self.fn, args, constexprs, grid, settings, record)
        finally:
            patches.restore()
        self._restore_args_dev(args_dev, args_hst, kwargs, kwargs_hst)

    return call


_REQUIRED = [
    (_interp, "GridExecutor"),
    (_interp, "InterpreterBuilder"),
    (_interp, "InterpretedFunction"),
    (_interp, "interpreter_builder"),
    (_interp, "_patch_lang"),
    (_interp, "_implicit_cvt"),
    (_interp, "_ir"),
    (_interp.GridExecutor, "_init_args_hst"),
    (_interp.GridExecutor, "_restore_args_dev"),
    (_interp.InterpretedFunction, "rewrite"),
]

_active = threading.Lock()


@contextlib.contextmanager
def threaded_programs(schedule: str = "greedy", stall_s: float = 10.0, timeout_s: float = 300.0):
    """Within the body, interpreted launches run each program of a grid in its own thread.

    schedule: "greedy" (deterministic: one program at a time, handing over when it waits) or
    "free" (all at once). stall_s: a launch in which no program writes memory for this long is
    a hang (every step of the tests' kernels writes within milliseconds). timeout_s: the most
    one launch may take. Yields a `ThreadedGrid` whose `launches` records every launch.
    Not re-entrant; restores the interpreter on exit.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not _common.is_interpreter():
        raise RuntimeError("threaded_programs needs Triton's interpreter (TRITON_INTERPRET=1)")
    missing = [f"{getattr(o, '__name__', o)}.{n}" for o, n in _REQUIRED if not hasattr(o, n)]
    if missing:
        raise RuntimeError(f"written for Triton 3.9's interpreter; this one lacks {missing}")
    if not _active.acquire(blocking=False):
        raise RuntimeError("threaded_programs is already active")
    settings = ThreadedGrid(schedule, stall_s, timeout_s)
    builder = _interp.interpreter_builder
    old_call = _interp.GridExecutor.__call__
    old_rewrite = _interp.InterpretedFunction.rewrite
    rewrite_lock = threading.Lock()

    def rewrite(self):
        with rewrite_lock:
            return old_rewrite(self)

    try:
        builder.__class__ = _ThreadedBuilder
        _interp.GridExecutor.__call__ = _threaded_call(settings)
        _interp.InterpretedFunction.rewrite = rewrite
        with _common.concurrent_programs():
            yield settings
    finally:
        _interp.InterpretedFunction.rewrite = old_rewrite
        _interp.GridExecutor.__call__ = old_call
        builder.__class__ = _interp.InterpreterBuilder
        _active.release()
