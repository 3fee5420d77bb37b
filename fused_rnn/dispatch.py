"""Which backend runs a recurrence, and why.

Backends:
    "torch"       plain torch: torch's native RNN ops for the standard cells (cuDNN on CUDA), a
                  per-step torch loop for the LSTM variants. Runs everywhere; the CPU path.
    "stepwise"    Triton, one fused launch per timestep (fused_rnn.kernels). CUDA tensors, or CPU
                  tensors under TRITON_INTERPRET=1 (the test setting).
    "persistent"  Triton, one launch per layer and direction for the whole sequence.
    "auto"        the backend measured fastest for the call (below). Never raises.

What "auto" runs, first rule that applies (`_decide_auto`: the one place that decides and gives
the reason; `resolve` and `explain` both read it):

1. Not a CUDA tensor: "torch".
2. A full layer with `torch.backends.cudnn.enabled = False`: "torch" — torch's native non-cuDNN
   op, or the per-step torch loop for the LSTM variants — as torch.nn runs. Cells are not
   affected: torch.nn's cells never run cuDNN.
3. No fused backend can run the call (Triton missing, a dtype the kernels do not run on CUDA
   such as float64, bf16 before sm_80, a GPU before sm_75, an empty batch): "torch".
4. Autotuning on (`set_autotune(True)` or FUSED_RNN_AUTOTUNE=1): the winner measured on this
   device for the call's key, from the autotune cache, or timed now on the first call of a key
   (never while a CUDA graph is captured or torch.compile / torch.export trace: then a cached
   winner if there is one, else rule 5). Where torch's op failed on the device and a fused
   backend ran, the fastest that ran.
5. The shipped policy (policy.json, built by `python -m fused_rnn.bench.build_policy` from GPU
   results committed in bench/results/): the winner measured for the key on a GPU of the same
   compute capability.
6. No measurement: torch's native op (cuDNN) for the standard cells, so that "auto" is never
   slower than torch.nn by construction; "stepwise" for the LSTM variants (peephole, coupled
   gates), for which torch.nn has no op: torch runs a variant as a per-step loop of a GEMM and
   9 to 12 pointwise kernels in the forward (functional._torch_step), each a launch and a pass
   over the state, where the stepwise kernel does the step's product and cell update in one
   launch. That is a model, not a measurement; rules 4 and 5 override it. The regularised and
   normalised recurrences (zoneout, recurrent dropout, layer norm: `regularised`) count as
   variants: torch.nn has no op for them either.

"persistent" is chosen only where a measurement (rule 4 or 5) says so. A fused backend wins a
measurement only if it is at least MIN_GAIN times faster than torch (ties go to torch, whose
numbers torch.nn users already have).

Deterministic algorithms (`torch.use_deterministic_algorithms(True)`): "auto" considers only the
fused backends marked in DETERMINISTIC. Both are (see there). torch.nn itself keeps running
cuDNN's RNN in that mode: the RNN ops are on neither of torch's lists (ops that switch to a
deterministic implementation, ops that raise), and ATen's cuDNN algorithm choice
(aten/src/ATen/native/cudnn/RNN.cpp, `get_algo`) does not read the flag. torch documents known
nondeterminism of RNNs on some cuDNN/CUDA versions, fixed by CUBLAS_WORKSPACE_CONFIG, which
deterministic mode asks for anyway; cuDNN's dropout between layers is random by design
(pytorch/pytorch#18110, #35661, #90168). "torch" therefore stays a candidate, as in torch.nn.

An explicit backend is never overridden by a flag, the policy or autotuning. Asking for a fused
backend that cannot run raises a RuntimeError that says why.

The key of a call (`Problem.key`): cell (LSTM, LSTM+proj, LSTM+peephole, LSTM+coupled, ...,
GRU, and RNN for tanh and relu alike: same kernels, same cuDNN algorithm choice), dtype class
(fp16, bf16, fp32 with TF32 off, tf32 with TF32 on for cuDNN's RNN, as the kernels follow it),
the GPU's compute capability (sm_90), fwd or fwdbwd (gradients needed), and size classes: T, B,
H and the number of layers in powers of two (T1024 holds T = 513..1024), plus the direction
(uni, bi), or "cell" for the *Cell modules.

Under torch.compile / torch.export, `resolve` is traced. For "auto" its answer comes from
`_auto`, a compile-time constant (`compile_constant`) computed once from the call's constants:
dtype, sizes and the flags read at trace time. A symbolic size (dynamic shapes) counts as
unknown, so the call has no key (rules 1-3 and 6), rather than a guard on its value.
In eager mode a decision is remembered per call arguments and flag values (`resolve` runs on
every forward); the environment variables are read at import and by `forget()`.
Triton is imported lazily, only when a fused backend is resolved.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.resources
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

__all__ = [
    "BACKENDS",
    "CANDIDATES",
    "DETERMINISTIC",
    "MIN_GAIN",
    "Decision",
    "DeviceInfo",
    "Explanation",
    "Problem",
    "autotune_enabled",
    "available_backends",
    "cache_path",
    "check_backend",
    "choose",
    "explain",
    "forget",
    "load_policy",
    "needs_grad",
    "note_schedule",
    "recording",
    "register_workload",
    "resolve",
    "set_autotune",
    "size_class",
    "unavailable_reason",
]

BACKENDS = ("auto", "torch", "stepwise", "persistent")
FUSED_BACKENDS = ("stepwise", "persistent")
# what a measurement compares: "torch" is torch's native op, or the torch loop of a variant
CANDIDATES = ("torch", "stepwise", "persistent")

# Bitwise reproducible from run to run on one device (torch.use_deterministic_algorithms).
# Both fused backends are: their kernels use no floating-point atomics (the only atomics, in the
# persistent kernels' grid barrier, add 1 to an int32 counter: they order steps, they sum no
# data), every tl.dot / tl.sum and split-K chunk reduces in a fixed order, and the weight
# gradients are torch GEMMs and sums after the time loop (deterministic under torch's own rules:
# CUBLAS_WORKSPACE_CONFIG). Whether the persistent launcher runs its kernel or the stepwise one
# depends only on the sizes and the device. tests/test_dispatch.py checks the atomics.
DETERMINISTIC = {"stepwise": True, "persistent": True}

# A fused backend replaces the baseline only if it is at least this much faster (median times)
# in every measured shape of the size class: medians of repeated GPU runs move by a few percent
# from run to run, and a tie goes to torch.
MIN_GAIN = 1.05

# The dtypes the fused kernels run on CUDA (float64 only under the interpreter).
FUSED_DTYPES = ("fp16", "bf16", "fp32", "tf32")
_DTYPE_CLASS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}

# mode -> (kernel module, its launcher): both fused backends run the same launchers
_KERNELS = {
    "LSTM": ("lstm", "lstm_fwd"),
    "GRU": ("gru", "gru_fwd"),
    "RNN_TANH": ("gru", "gru_fwd"),
    "RNN_RELU": ("gru", "gru_fwd"),
}

NO_MEASUREMENT = "no GPU measurement yet"

# Environment variables, read when fused_rnn is imported and by forget() (resolve() runs on every
# forward; a read of os.environ costs about a microsecond): set them before starting Python.
AUTOTUNE_ENV = "FUSED_RNN_AUTOTUNE"  # 1: autotune backend="auto" (set_autotune overrides it)
CACHE_DIR_ENV = "FUSED_RNN_CACHE_DIR"  # where the autotune cache lives
POLICY_ENV = "FUSED_RNN_POLICY"  # a policy file to read instead of the one shipped
_ENV: dict[str, str | None] = {}
_ENV_AUTOTUNE = False


def _read_env() -> None:
    global _ENV_AUTOTUNE
    for name in (AUTOTUNE_ENV, CACHE_DIR_ENV, POLICY_ENV, "XDG_CACHE_HOME"):
        _ENV[name] = os.environ.get(name)
    flag = (_ENV[AUTOTUNE_ENV] or "0").strip().lower()
    _ENV_AUTOTUNE = flag not in ("", "0", "false", "no", "off")


_read_env()


def check_backend(backend: str) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ============================================================================ availability


@functools.cache
def _triton_error() -> str | None:
    try:
        importlib.import_module("triton")
    except Exception as e:  # ImportError, or a broken install
        return f"triton cannot be imported ({type(e).__name__}: {e})"
    return None


@functools.cache
def _kernel_error(mode: str) -> str | None:
    """None if the kernels of `mode` import, else why not."""
    module, name = _KERNELS[mode]
    try:
        mod = importlib.import_module(f"fused_rnn.kernels.{module}")
    except ImportError as e:
        return f"fused_rnn.kernels.{module} is not available ({e})"
    if getattr(mod, name, None) is None:
        return f"the {mode} kernels are not implemented"
    return None


def unavailable_reason(backend: str, mode: str, device: torch.device) -> str | None:
    """None if fused `backend` can run `mode` on `device`, else why not."""
    device = torch.device(device)
    if device.type == "cpu":
        if not interpreter_enabled():
            return "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on CPU)"
    elif device.type != "cuda":
        return f"Triton kernels do not run on {device.type} tensors"
    return _import_error(backend, mode)


def _import_error_impl(backend: str, mode: str) -> str | None:
    return _triton_error() or _kernel_error(mode)


def compile_constant(fn):
    """`torch.compiler.assume_constant_result(fn)` without importing torch._dynamo (and with it
    triton) at `import fused_rnn` time: the decorator only sets this attribute.

    torch.compile / torch.export then call `fn` once at trace time and keep its (str, int or
    None) answer as a constant, instead of tracing into the imports behind it, which would break
    the graph (fullgraph=True fails). Its arguments must be constants there too (str, int, bool,
    None, torch.dtype, torch.device). tests/test_compile.py checks the attribute is still the one
    torch's decorator sets.
    """
    fn._dynamo_marked_constant = True
    return fn


_import_error = compile_constant(_import_error_impl)


def available_backends(device: torch.device | str = "cpu", mode: str = "LSTM") -> list[str]:
    """The concrete backends that can run `mode` on `device`."""
    out = ["torch"]
    out += [b for b in FUSED_BACKENDS if unavailable_reason(b, mode, torch.device(device)) is None]
    return out


# ============================================================================ the call's key


def size_class(n: int) -> int:
    """The power of two at or above n (n >= 1): class c holds c/2 < n <= c (1 holds 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


# torch.backends' flag modules cost tens of microseconds per read through their __getattr__;
# resolve() runs on every forward, so it reads the same flags through torch._C where it can.
_fp32_precision = getattr(torch._C, "_get_fp32_precision_getter", None)
_cudnn_enabled = getattr(torch._C, "_get_cudnn_enabled", None) or (
    lambda: torch.backends.cudnn.enabled
)


def rnn_allows_tf32() -> bool:
    """Whether cuDNN's RNN (and so the kernels, kernels._common.dot_precision) may use TF32 for
    float32. Same rule as kernels._common._cudnn_rnn_allows_tf32, which imports triton."""
    if _fp32_precision is not None:
        try:  # what torch.backends.cudnn.rnn.fp32_precision reads
            return _fp32_precision("cuda", "rnn").lower() == "tf32"
        except RuntimeError:
            pass
    cudnn = torch.backends.cudnn
    rnn = getattr(cudnn, "rnn", None)
    prec = getattr(rnn, "fp32_precision", None) if rnn is not None else None
    if isinstance(prec, str):  # torch >= 2.9: the per-op flag cuDNN's RNN reads
        return prec.lower() == "tf32"
    return bool(cudnn.allow_tf32)


def dtype_class(dtype: torch.dtype | None) -> str | None:
    """ "fp16", "bf16", "fp32" (TF32 off), "tf32" (float32, TF32 on), "fp64", ...; None: unknown."""
    if dtype is None:
        return None
    if dtype == torch.float32:
        return "tf32" if rnn_allows_tf32() else "fp32"
    return _DTYPE_CLASS.get(dtype, str(dtype).removeprefix("torch."))


@dataclass(frozen=True)
class Problem:
    """What a call computes, as far as choosing a backend goes. None: unknown (a symbolic size)."""

    mode: str  # "LSTM", "GRU", "RNN_TANH", "RNN_RELU"
    dtype: str | None = None  # dtype_class of what the recurrence runs in
    steps: int | None = None  # T (1 for a cell)
    batch: int | None = None
    input_size: int | None = None
    hidden: int | None = None
    proj: int = 0
    layers: int = 1
    bidirectional: bool = False
    peephole: bool = False
    coupled: bool = False
    grad: bool = False  # a backward will follow (autograd records the call)
    cell: bool = False  # a *Cell call: one step, torch's cell ops rather than cuDNN
    regularised: bool = False  # zoneout, recurrent dropout or layer norm

    @property
    def variant(self) -> bool:
        """A variant (LSTM peephole or coupled gates, or a regularised / normalised cell):
        torch.nn has no op for it."""
        return self.peephole or self.coupled or self.regularised

    @property
    def cell_name(self) -> str:
        name = "RNN" if self.mode.startswith("RNN") else self.mode
        tags = (("proj", self.proj > 0), ("peephole", self.peephole), ("coupled", self.coupled),
                ("regularised", self.regularised))  # fmt: skip
        return name + "".join(f"+{tag}" for tag, on in tags if on)

    def key(self, arch: str) -> str | None:
        """The policy / autotune key on a GPU of compute capability `arch` ("sm_90"), or None
        when a part of it is unknown."""
        if None in (self.dtype, self.steps, self.batch, self.hidden):
            return None
        shape = "cell" if self.cell else f"L{size_class(self.layers)}|"
        if not self.cell:
            shape += "bi" if self.bidirectional else "uni"
        parts = [self.cell_name, self.dtype, arch, "fwdbwd" if self.grad else "fwd",
                 f"T{size_class(self.steps)}", f"B{size_class(self.batch)}",
                 f"H{size_class(self.hidden)}", shape]  # fmt: skip
        return "|".join(parts)

    def label(self) -> str:
        """The exact sizes, e.g. ``T1024 B16 I768 H768 L2 bi``."""
        s = f"T{self.steps} B{self.batch} I{self.input_size} H{self.hidden}"
        if self.proj:
            s += f" P{self.proj}"
        if self.cell:
            return s + " cell"
        if self.layers > 1:
            s += f" L{self.layers}"
        return s + (" bi" if self.bidirectional else "")


class DeviceInfo(NamedTuple):
    name: str  # torch.cuda.get_device_name
    capability: tuple[int, int]

    @property
    def arch(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}"


@functools.cache
def _cuda_info(index: int) -> DeviceInfo:
    return DeviceInfo(torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index))


def device_info(device: torch.device) -> DeviceInfo | None:
    """Name and compute capability of a CUDA device; None for other devices (tests replace this
    function to make a CPU tensor look like one on a GPU)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return _cuda_info(device.index if device.index is not None else torch.cuda.current_device())


_device_info = device_info  # the real one


def needs_grad(*tensors) -> bool:
    """Whether autograd records a call on `tensors` (tensors, None, or tuples of them): then a
    backward is expected, and the fwdbwd measurements apply."""
    if not torch.is_grad_enabled():
        return False
    flat = [t for x in tensors for t in (x if isinstance(x, (tuple, list)) else (x,))]
    return any(t is not None and t.requires_grad for t in flat)


# ============================================================================ decisions


class Decision(NamedTuple):
    backend: str  # the concrete backend: "torch", "stepwise" or "persistent"
    reason: str
    key: str | None = None  # the policy / autotune key, where the call has one
    problem: Problem | None = None
    # the schedule of a stack's layer-directions (fused_rnn._schedule: "serial", "directions",
    # "wavefront (K=..)") and why, where a stack ran on the generic path (`note_schedule`)
    schedule: str | None = None
    schedule_reason: str = ""


def choose(groups: list[dict[str, float]], allowed: Iterable[str], default: str,
           min_gain: float = MIN_GAIN) -> str | None:  # fmt: skip
    """The winner of measurements `groups` (one {backend: ms} per measured shape of a size
    class) among `allowed`, or None when they cannot say.

    The baseline is "torch" where every group measured it, else `default` (what runs without a
    measurement). Another backend wins only if every group measured it at least `min_gain`
    times faster than the baseline; among those, the one with the best geometric mean speedup.
    """
    allowed = set(allowed)
    groups = [{b: t for b, t in g.items() if b in allowed and t is not None} for g in groups]
    if not groups:
        return None
    for base in ("torch", default):
        if all(base in g for g in groups):
            break
    else:
        return None
    wins = {}
    for b in CANDIDATES:
        if b == base or not all(b in g for g in groups):
            continue
        if all(g[b] * min_gain <= g[base] for g in groups):
            wins[b] = sum(math.log(g[b] / g[base]) for g in groups)
    return min(wins, key=wins.get) if wins else base


def _ms(entry: dict) -> list[dict[str, float]]:
    """The {backend: ms} of each shape of a policy or autotune entry."""
    return [g["ms"] for g in entry["shapes"]]


def _times(groups: list[dict], limit: int = 2) -> str:
    """'torch 2.01, stepwise 1.52 ms at T1024 B16 I768 H768' for the first `limit` shapes."""
    parts = []
    for g in groups[:limit]:
        ms = ", ".join(f"{b} {t:.3g}" for b, t in sorted(g["ms"].items(), key=lambda kv: kv[1]))
        parts.append(f"{ms} ms at {g.get('shape', '?')}")
    more = len(groups) - limit
    return "; ".join(parts) + (f" (+{more} more shapes)" if more > 0 else "")


def _fused_unsupported(p: Problem, info: DeviceInfo) -> str | None:
    if info.capability < (7, 5):
        return f"Triton needs sm_75 or newer, this GPU is {info.arch}"
    if p.dtype is not None and p.dtype not in FUSED_DTYPES:
        return f"the kernels run fp16, bf16 and fp32 on CUDA, not {p.dtype}"
    if p.dtype == "bf16" and info.capability < (8, 0):
        return f"bf16 tensor-core products need sm_80 or newer, this GPU is {info.arch}"
    return None


def _decide_auto(p: Problem, device: torch.device, compiling: bool = False) -> Decision:
    """What "auto" runs for `p` on `device`, and why (the rules of the module docstring)."""
    info = device_info(device)
    if info is None:
        return Decision("torch", f"{device.type} tensor: the fused kernels run on CUDA", None, p)
    key = p.key(info.arch)

    def done(backend: str, reason: str) -> Decision:
        return Decision(backend, reason, key, p)

    if not p.cell and not torch.backends.cudnn.enabled:
        loop = "the torch per-step loop" if p.variant else "torch's non-cuDNN native op"
        return done("torch", f"torch.backends.cudnn.enabled is False: {loop}, as torch.nn")
    if p.batch == 0:
        return done("torch", "empty batch: nothing to launch")
    why = _fused_unsupported(p, info)
    fused = [] if why else [b for b in FUSED_BACKENDS if not unavailable_reason(b, p.mode, device)]
    if not fused:
        why = why or unavailable_reason("stepwise", p.mode, device)
        return done("torch", f"no fused backend can run this call ({why})")
    note = ""
    if torch.are_deterministic_algorithms_enabled():
        dropped = [b for b in fused if not DETERMINISTIC[b]]
        fused = [b for b in fused if DETERMINISTIC[b]]
        note = "; deterministic algorithms on: " + (
            f"{', '.join(dropped)} excluded" if dropped else "all fused backends qualify"
        )
    allowed = ("torch", *fused)
    default = "stepwise" if p.variant and "stepwise" in fused else "torch"

    if key is not None and autotune_enabled():
        env = environment_key(info)
        entry, how = _CACHE.get(env, key), "autotune cache"
        tried = set(entry["shapes"][0]["ms"]) | set(entry.get("errors", ())) if entry else set()
        if not tried.issuperset(allowed):  # never tuned, or not with every allowed candidate
            blocker = _tune_blocker(device, compiling)
            if blocker is None:
                entry, how = _tune(p, key, device, env, allowed), "autotuned now"
            else:
                note += f"; {_NOT_TUNED} ({blocker})"
        won = choose(_ms(entry), allowed, default) if entry else None
        if won is None and entry and entry["shapes"][0]["ms"]:
            # the baseline failed on this device (the errors say how): the fastest that ran
            ms = {b: t for b, t in entry["shapes"][0]["ms"].items() if b in allowed}
            won = min(ms, key=ms.get) if ms else None
            failed = "; ".join(f"{b} failed: {e}" for b, e in entry.get("errors", {}).items())
            note = f"; {failed}{note}"
        if won is not None:
            return done(won, f"{how}: {_times(entry['shapes'])}{note}")
        if entry:
            note += "; autotuning measured nothing usable"

    policy = load_policy()
    entry = policy["entries"].get(key) if key is not None else None
    if entry is not None:
        won = choose(_ms(entry), allowed, default, policy.get("min_gain", MIN_GAIN))
        if won is not None:
            src = policy.get("source", "?")
            return done(won, f"policy: {_times(entry['shapes'])} [{src}]{note}")
    if key is None and not p.variant:
        return done("torch", f"no size class (sizes unknown): torch's native op{note}")
    if default == "torch":
        if p.variant:
            return done("torch", f"variant, but the stepwise kernels are excluded{note}")
        op = "torch's native cell op" if p.cell else "torch's native op (cuDNN)"
        return done("torch", f"no measurement for {key}: {op}, as torch.nn{note}")
    return done("stepwise", "variant: torch.nn has no op for it (torch runs a per-step loop of "
                            f"small kernels); stepwise, not measured{note}")  # fmt: skip


_NOT_TUNED = "not autotuned"  # in the reason of a decision made while tuning was blocked

# Decisions of eager calls, keyed by the call's arguments and every setting a decision reads
# (flags, environment, autotune cache generation): resolve runs on every forward.
_MEMO: dict = {}


def _state(dtype) -> tuple:
    return (_cudnn_enabled(), torch.are_deterministic_algorithms_enabled(),
            dtype == torch.float32 and rnn_allows_tf32(), autotune_enabled(), device_info,
            _CACHE.generation)  # fmt: skip


def _auto_impl(mode, device, dtype, steps, batch, input_size, hidden, proj, layers,
               bidirectional, peephole, coupled, grad, cell, compiling,
               regularised=False) -> str:  # fmt: skip
    memo = (mode, device, dtype, steps, batch, input_size, hidden, proj, layers, bidirectional,
            peephole, coupled, grad, cell, compiling, regularised, _state(dtype))  # fmt: skip
    d = _MEMO.get(memo)
    if d is None:
        p = Problem(mode, dtype_class(dtype), steps, batch, input_size, hidden, proj, layers,
                    bidirectional, peephole, coupled, grad, cell, regularised)  # fmt: skip
        d = _decide_auto(p, device, compiling)
        if _NOT_TUNED not in d.reason:  # blocked now, maybe not on the next call
            if len(_MEMO) > 4096:
                _MEMO.clear()
            _MEMO[memo] = d
    if _RECORDS is not None:
        _RECORDS.append(d)
    return d.backend


def forget() -> None:
    """Forgets remembered decisions, the policy and the autotune results in memory (not the
    cache file), and reads the environment variables again."""
    _read_env()
    _MEMO.clear()
    _load_policy.cache_clear()
    _CACHE.forget()


# "auto"'s answer is a trace-time constant under torch.compile / torch.export (module docstring)
_auto = compile_constant(_auto_impl)


def _explicit(backend: str, mode: str, device: torch.device, problem_args: tuple) -> str:
    if backend != "torch":
        why = unavailable_reason(backend, mode, device)
        if why is not None:
            raise RuntimeError(
                f"backend={backend!r} is not available for {mode} on {device}: {why}"
            )
    if _RECORDS is not None:  # explain: eager only
        p = Problem(mode, *problem_args)
        reason = f"backend={backend!r} asked for: flags, policy and autotuning do not override it"
        which = backend
        if backend != "torch" and p.batch == 0:
            which, reason = "torch", "empty batch: nothing to launch"
        _RECORDS.append(Decision(which, reason, None, p))
    return backend


def _constant(n):
    """A size as a constant: a symbolic size (dynamic shapes) is unknown (None).

    `__class__`, because dynamo answers isinstance(n, int) with True for a SymInt it traces (and
    isinstance(n, torch.SymInt) with False), while it keeps SymInt as a symbolic size's class.
    """
    return n if n.__class__ is int else None


def resolve(backend: str, mode: str, device: torch.device, *, dtype: torch.dtype | None = None,
            steps: int | None = None, batch: int | None = None, input_size: int | None = None,
            hidden: int | None = None, proj: int = 0, layers: int = 1,
            bidirectional: bool = False, peephole: bool = False, coupled: bool = False,
            grad: bool = False, cell: bool = False, regularised: bool = False) -> str:  # fmt: skip
    """The concrete backend ("torch", "stepwise" or "persistent") for a call of `mode` on
    `device`.

    Args:
        backend: as the caller asked: "auto" or a concrete backend (returned as it is, or a
            RuntimeError when a fused one cannot run).
        dtype: what the recurrence runs in (after autocast). steps, batch, input_size, hidden,
            proj: T, B, I, H, P of the call (steps=1 for a cell). layers, bidirectional: the
            stack. peephole, coupled: the LSTM variants. grad: autograd records the call
            (`needs_grad`). cell: a *Cell call. regularised: zoneout, recurrent dropout or
            layer norm is on (a variant). What is not given counts as unknown: without
            dtype and sizes "auto" has no key (no policy, no autotuning).
    """
    check_backend(backend)
    device = torch.device(device)
    if backend != "auto":
        args = (dtype_class(dtype) if _RECORDS is not None else None, steps, batch, input_size,
                hidden, proj, layers, bidirectional, peephole, coupled, grad, cell,
                bool(regularised))  # fmt: skip
        return _explicit(backend, mode, device, args)
    if device.type != "cuda" and device_info is _device_info and _RECORDS is None:
        return "torch"  # rule 1 on the CPU path, at no more cost than it takes to say so
    return _auto(mode, device, dtype, _constant(steps), _constant(batch), _constant(input_size),
                 _constant(hidden), _constant(proj) or 0, _constant(layers) or 1,
                 bool(bidirectional), bool(peephole), bool(coupled), bool(grad), bool(cell),
                 torch.compiler.is_compiling(), bool(regularised))  # fmt: skip


# ============================================================================ the policy


@functools.cache
def _load_policy(path: str | None) -> dict:
    """The policy at `path`, or the one shipped (None); read once per path."""
    where = path or "fused_rnn/policy.json"
    try:
        if path:
            text = Path(path).read_text()
        else:
            text = importlib.resources.files("fused_rnn").joinpath("policy.json").read_text()
        doc = json.loads(text)
        if doc.get("format") != 1 or not isinstance(doc.get("entries"), dict):
            raise ValueError("not a format-1 policy")
    except (OSError, ValueError) as e:
        warnings.warn(f"fused_rnn: ignoring the policy {where}: {e}", stacklevel=3)
        return {"format": 1, "source": f"unreadable policy {where}", "entries": {}}
    return doc


def load_policy() -> dict:
    """The policy "auto" reads (rule 5): $FUSED_RNN_POLICY if set, else the one shipped.
    {"format": 1, "source": ..., "min_gain": ..., "runs": [...],
    "entries": {key: {"backend": ..., "shapes": [{"shape", "run", "ms": {backend: ms}}]}}}."""
    return _load_policy(_ENV[POLICY_ENV] or None)


# ============================================================================ autotuning

_AUTOTUNE: bool | None = None  # set_autotune; None: the environment variable decides


def set_autotune(enabled: bool | None = True) -> None:
    """Turns on-device autotuning of backend="auto" on (True) or off (False); None leaves it to
    the environment variable FUSED_RNN_AUTOTUNE (1 on, unset or 0 off).

    When on, the first call of each key (cell, dtype, GPU, size class: see fused_rnn.dispatch)
    times torch's native op and the fused backends on synthetic tensors of the call's sizes —
    forward only under no_grad, forward and backward when the call records gradients — with
    CUDA events, and keeps the fastest in memory and in `cache_path()`, keyed by the GPU's name
    and the versions of torch, triton, cuDNN and fused_rnn. Later calls (and later processes)
    read the cache.
    """
    global _AUTOTUNE
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"set_autotune takes True, False or None, got {enabled!r}")
    _AUTOTUNE = enabled


def autotune_enabled() -> bool:
    if _AUTOTUNE is not None:
        return _AUTOTUNE
    return _ENV_AUTOTUNE


def cache_path() -> Path:
    """The autotune cache file: $FUSED_RNN_CACHE_DIR, else $XDG_CACHE_HOME/fused_rnn, else
    ~/.cache/fused_rnn; file autotune.json. Safe to delete."""
    folder = _ENV[CACHE_DIR_ENV]
    if not folder:
        base = _ENV["XDG_CACHE_HOME"] or os.path.join(os.path.expanduser("~"), ".cache")
        folder = os.path.join(base, "fused_rnn")
    return Path(folder) / "autotune.json"


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "none"


@functools.cache
def _source_hash() -> str:
    """A hash of fused_rnn's and its kernels' sources: a checkout that changes kernels without a
    new version number still invalidates its autotune results."""
    files = sorted(Path(__file__).parent.glob("*.py"))
    spec = importlib.util.find_spec("fused_rnn.kernels")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        files += sorted(Path(folder).glob("*.py"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


@functools.cache
def _versions() -> str:
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return (f"torch={torch.__version__}|triton={_dist_version('triton')}|cudnn={cudnn}|"
            f"fused_rnn={_dist_version('fused-rnn')}+{_source_hash()}")  # fmt: skip


def environment_key(info: DeviceInfo) -> str:
    """What autotune results are valid for: the GPU and the library versions."""
    return f"{info.name}|{_versions()}"


class _AutotuneCache:
    """Autotune results in memory, backed by the JSON file at cache_path():
    {"format": 1, "environments": {environment_key: {key: entry}}}."""

    def __init__(self):
        self._path: Path | None = None
        self._data: dict = {}
        self.generation = 0  # changes whenever what get() returns may change

    @staticmethod
    def _read(path: Path) -> dict:
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            warnings.warn(f"fused_rnn: ignoring the autotune cache {path}: {e}", stacklevel=4)
            return {}
        envs = doc.get("environments") if isinstance(doc, dict) else None
        return envs if doc.get("format") == 1 and isinstance(envs, dict) else {}

    def _current(self) -> dict:
        path = cache_path()
        if path != self._path:
            self._path, self._data = path, self._read(path)
            self.generation += 1
        return self._data

    def get(self, env: str, key: str) -> dict | None:
        return self._current().get(env, {}).get(key)

    def put(self, env: str, key: str, entry: dict) -> None:
        path = cache_path()
        data = self._read(path)  # what other processes wrote meanwhile
        data.setdefault(env, {})[key] = entry
        self._path, self._data = path, data
        self.generation += 1
        doc = {"format": 1, "note": "fused_rnn autotuning results; safe to delete",
               "environments": data}  # fmt: skip
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, path)
        except OSError as e:
            warnings.warn(f"fused_rnn: autotune results kept in memory only ({e})", stacklevel=4)

    def forget(self) -> None:
        """Drops what is in memory (the file is read again on next use)."""
        self._path, self._data = None, {}
        self.generation += 1


_CACHE = _AutotuneCache()

# (problem, backend, device) -> a callable running one call of `problem` on `backend`.
# fused_rnn/__init__ registers fused_rnn._tuning.workload (it needs the functional layer above).
_WORKLOAD: Callable | None = None
_TUNING = False  # a tuning run is in progress (its own calls use explicit backends)


def register_workload(fn: Callable | None) -> None:
    global _WORKLOAD
    _WORKLOAD = fn


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _tune_blocker(device: torch.device, compiling: bool) -> str | None:
    if compiling:
        return "torch.compile / torch.export is tracing"
    if _capturing(device):
        return "a CUDA graph is being captured"
    if _WORKLOAD is None:
        return "no workload registered"
    if _TUNING:
        return "a tuning run is in progress"
    return None


def cuda_event_timer(backend: str, run: Callable[[], object], device: torch.device, *,
                     warmup: int = 2, reps: int = 20, budget_s: float = 0.2) -> float:  # fmt: skip
    """Median milliseconds of `run()` on the current CUDA stream, timed with CUDA events.

    `warmup` untimed runs first (the first one compiles the Triton kernels); one run timed on
    the host sizes the loop to about `budget_s`, between 3 and `reps` runs. Events wrap each
    run and are read after one synchronize, so host launch cost counts, as users see it.
    """
    with torch.cuda.device(device):
        for _ in range(warmup):
            run()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        n = max(3, min(reps, int(budget_s / max(time.perf_counter() - t0, 1e-6))))
        pairs = []
        for _ in range(n):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in pairs)


# (backend, run, device) -> milliseconds; tests replace it
_timer: Callable[..., float] = cuda_event_timer


def _tune(p: Problem, key: str, device: torch.device, env: str, allowed) -> dict:
    """Times every allowed candidate on `p`'s sizes and stores the result under (env, key)."""
    global _TUNING, _RECORDS
    ms, errors = {}, {}
    # the timing runs' own decisions are not the caller's: explain records none of them
    _TUNING, records, _RECORDS = True, _RECORDS, None
    try:
        for b in CANDIDATES:
            if b not in allowed:
                continue
            try:
                ms[b] = float(_timer(b, _WORKLOAD(p, b, device), device))
            except Exception as e:  # a candidate that fails here cannot win
                errors[b] = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    finally:
        _TUNING, _RECORDS = False, records
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    entry = {"shapes": [{"shape": p.label(), "ms": ms}], "errors": errors, "date_utc": date}
    _CACHE.put(env, key, entry)
    return entry


# ============================================================================ explain

_RECORDS: list[Decision] | None = None


@contextlib.contextmanager
def recording():
    """Collects the Decision of every resolve() in the block (eager calls)."""
    global _RECORDS
    previous, _RECORDS = _RECORDS, []
    try:
        yield _RECORDS
    finally:
        _RECORDS = previous


def note_schedule(schedule: str, reason: str) -> None:
    """Records the schedule the stack of the last resolved call ran on (explain: eager only)."""
    if _RECORDS:
        _RECORDS[-1] = _RECORDS[-1]._replace(schedule=schedule, schedule_reason=reason)


class ExplainRow(NamedTuple):
    call: int  # which recurrent call of the forward (a model may hold several)
    layer: int | None  # None for a cell
    direction: str  # "forward", "reverse" or "cell"
    backend: str
    reason: str
    key: str | None
    shape: str
    schedule: str | None = None  # the stack's schedule (Decision.schedule); None: torch's op
    schedule_reason: str = ""


class Explanation(list):
    """The rows `explain` returns; str() is the printed table."""

    def __str__(self) -> str:
        if not self:
            return "fused_rnn: no fused_rnn recurrent call ran"
        lines = []
        for call in sorted({r.call for r in self}):
            rows = [r for r in self if r.call == call]
            lines.append(f"call {call}: {rows[0].shape}" + (f"  [{rows[0].key}]" if rows[0].key
                                                           else ""))  # fmt: skip
            if rows[0].schedule is not None:
                lines.append(f"  schedule: {rows[0].schedule} ({rows[0].schedule_reason})")
            for r in rows:
                where = "cell" if r.layer is None else f"layer {r.layer} {r.direction}"
                lines.append(f"  {where:<16} {r.backend:<11} {r.reason}")
        return "\n".join(lines)


_STDOUT = object()  # explain's default: sys.stdout as it is at the call


def explain(module, *args, file=_STDOUT, **kwargs) -> Explanation:
    """Which backend each layer and direction of `module` runs for this input, and why.

    Runs `module(*args, **kwargs)` once (as a call would run: grad mode, autocast and
    autotuning included) and records every backend decision of the fused_rnn layers in it, so
    the answer is what ran, with the reason `resolve` gave, and the schedule each stack's
    layer-directions ran on (fused_rnn._schedule; None where torch's own op ran the call).
    Prints the table to `file` (None: silent) and returns its rows.

    Example::

        fused_rnn.dispatch.explain(model, x)
    """
    with recording() as log:
        module(*args, **kwargs)
    out = Explanation()
    for i, d in enumerate(log):
        p = d.problem
        if p.cell:
            units = [(None, "cell")]
        else:
            dirs = ("forward", "reverse") if p.bidirectional else ("forward",)
            units = [(layer, di) for layer in range(p.layers) for di in dirs]
        reason = d.reason
        if d.backend == "persistent":
            reason += " (the launcher runs the stepwise kernels where the grid cannot fit)"
        out += [ExplainRow(i, layer, di, d.backend, reason, d.key, p.label(), d.schedule,
                           d.schedule_reason)
                for layer, di in units]  # fmt: skip
    if file is not None:
        print(out, file=sys.stdout if file is _STDOUT else file)
    return out
