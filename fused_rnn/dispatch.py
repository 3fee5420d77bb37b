"""Which backend runs a recurrence.

Backends:
    "torch"       plain torch: torch's native RNN ops for the standard cells, a per-step torch loop
                  for the LSTM variants. Runs everywhere; the CPU path.
    "stepwise"    Triton, one fused launch per timestep (fused_rnn.kernels). CUDA tensors, or CPU
                  tensors under TRITON_INTERPRET=1 (the test setting).
    "persistent"  Triton, one launch per layer and direction for the whole sequence.
    "auto"        "stepwise" for CUDA tensors when Triton is importable, "torch" otherwise.

"persistent" stays out of "auto" until it has been validated on a GPU (PERSISTENT_IN_AUTO).
Asking explicitly for a fused backend that cannot run raises a RuntimeError that says why;
"auto" never raises.
Triton is imported lazily, only when a fused backend is resolved.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

__all__ = ["BACKENDS", "available_backends", "check_backend", "resolve", "unavailable_reason"]

BACKENDS = ("auto", "torch", "stepwise", "persistent")
FUSED_BACKENDS = ("stepwise", "persistent")

# "auto" may pick "persistent" only once the persistent kernels have passed a GPU validation run
# (correctness and timings on a device, bench/NOTES.md); flip to True then. The persistent entry
# points make the per-launch decision themselves (fused_rnn.kernels._common.choose) and run the
# stepwise kernels where the persistent grid would not fit.
PERSISTENT_IN_AUTO = False

# mode -> (kernel module, its launcher): both fused backends run the same launchers
_KERNELS = {
    "LSTM": ("lstm", "lstm_fwd"),
    "GRU": ("gru", "gru_fwd"),
    "RNN_TANH": ("gru", "gru_fwd"),
    "RNN_RELU": ("gru", "gru_fwd"),
}


def check_backend(backend: str) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
    the graph (fullgraph=True fails). tests/test_compile.py checks the attribute is still the one
    torch's decorator sets.
    """
    fn._dynamo_marked_constant = True
    return fn


_import_error = compile_constant(_import_error_impl)


def resolve(backend: str, mode: str, device: torch.device) -> str:
    """The concrete backend ("torch" or a fused one) for `mode` on `device`."""
    check_backend(backend)
    device = torch.device(device)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        if PERSISTENT_IN_AUTO and unavailable_reason("persistent", mode, device) is None:
            return "persistent"
        if unavailable_reason("stepwise", mode, device) is None:
            return "stepwise"
        return "torch"
    why = unavailable_reason(backend, mode, device)
    if why is not None:
        raise RuntimeError(f"backend={backend!r} is not available for {mode} on {device}: {why}")
    return backend


def available_backends(device: torch.device | str = "cpu", mode: str = "LSTM") -> list[str]:
    """The concrete backends that can run `mode` on `device`."""
    out = ["torch"]
    out += [b for b in FUSED_BACKENDS if unavailable_reason(b, mode, torch.device(device)) is None]
    return out
