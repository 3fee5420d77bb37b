"""Helpers shared by every cell's kernels (lstm.py, gru.py, rnn.py).

Host side: interpreter detection, the `tl.dot` precision that matches cuDNN's RNN, block sizes,
the output allocator (NaN-poisoned on request, so tests prove every element is written), and
the one place where inputs are made contiguous and checked for a common dtype and device.
Device side: numerically safe `_sigmoid` and `_tanh` for use inside kernels.

Public names here are used by all cells: keep them stable.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

__all__ = [
    "POISON",
    "is_interpreter",
    "poison_enabled",
    "poisoned",
    "new_output",
    "acc_dtype",
    "dot_precision",
    "next_pow2",
    "block_size",
    "block_b",
    "block_h",
    "block_k",
    "num_warps",
    "normalize",
    "_sigmoid",
    "_tanh",
    "_dot",
]

# Module switch for NaN-filled outputs (tests); the env var FUSED_RNN_POISON=1 does the same.
POISON = False


def is_interpreter() -> bool:
    """True when Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------- outputs


def poison_enabled() -> bool:
    return POISON or os.environ.get("FUSED_RNN_POISON", "0").lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def poisoned(flag: bool = True):
    """Context manager turning the NaN poison of `new_output` on (or off) for its body."""
    global POISON
    old, POISON = POISON, flag
    try:
        yield
    finally:
        POISON = old


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised buffer a kernel must fill completely: NaN-filled when poison is on."""
    if poison_enabled() and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# --------------------------------------------------------------------------- numerics


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / cell-state dtype: fp32, except fp64 stays fp64 (interpreter tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cudnn_rnn_allows_tf32() -> bool:
    cudnn = torch.backends.cudnn
    rnn = getattr(cudnn, "rnn", None)
    prec = getattr(rnn, "fp32_precision", None) if rnn is not None else None
    if isinstance(prec, str):  # torch >= 2.9: the per-op flag cuDNN's RNN actually reads
        return prec.lower() == "tf32"
    return bool(cudnn.allow_tf32)


def dot_precision(dtype: torch.dtype) -> str:
    """`input_precision` for `tl.dot` on operands of `dtype`, following cuDNN's RNN.

    fp32 uses TF32 when torch lets cuDNN's RNN use it (`torch.backends.cudnn.allow_tf32`, or
    `torch.backends.cudnn.rnn.fp32_precision` on newer torch), otherwise exact "ieee".
    fp16/bf16/fp64 ignore the option; the interpreter always computes exactly ("ieee").
    """
    if dtype != torch.float32 or is_interpreter():
        return "ieee"
    return "tf32" if _cudnn_rnn_allows_tf32() else "ieee"


# --------------------------------------------------------------------------- block sizes


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def block_size(n: int, lo: int = 16, hi: int = 64) -> int:
    """The power of two covering `n`, clamped to [lo, hi]; `tl.dot` needs every dim >= 16."""
    return max(lo, min(hi, next_pow2(n)))


def block_b(B: int) -> int:
    """Batch tile (the MMA's N side): padded up to 16, at most 64 (128 under the interpreter)."""
    return block_size(B, 16, 128 if is_interpreter() else 64)


def block_h(H: int, n_b_tiles: int = 1) -> int:
    """Tile of hidden units (or projection rows) one program owns.

    Under the interpreter, as few programs as possible (each costs Python time). On a GPU,
    small tiles so that the per-step grid covers the SMs: the per-step work is latency bound.
    """
    if is_interpreter():
        return block_size(H, 16, 128)
    return 16 if H * n_b_tiles <= 8192 else 32


def block_k(K: int) -> int:
    """Reduction chunk of a `tl.dot` loop (over R, H, P or G*H)."""
    return block_size(K, 16, 128 if is_interpreter() else 64)


def num_warps(block_m: int, block_n: int) -> int:
    """Warps for a program holding (block_m, block_n) accumulators.

    Not fewer than 4: with 1-2 warps an LSTM forward program (4 gate tiles of W in flight)
    hit 255 registers and spilled to the stack on sm_90; 4 warps need ~180 and no stack.
    """
    return 8 if block_m * block_n >= 128 * 64 else 4


# --------------------------------------------------------------------------- inputs


def normalize(*tensors: torch.Tensor | None, dtype: torch.dtype | None = None):
    """Contiguous versions of `tensors` (None passes through), all of one dtype and device.

    The dtype is `dtype` or that of the first tensor; a mismatch raises TypeError rather than
    casting silently (the caller decides where a cast belongs, autograd must see it).
    """
    first = next((t for t in tensors if t is not None), None)
    if first is None:
        return tensors
    dtype = first.dtype if dtype is None else dtype
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        if t.dtype != dtype:
            raise TypeError(f"expected all tensors in {dtype}, got one in {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"expected all tensors on {first.device}, got one on {t.device}")
        out.append(t.contiguous())
    return tuple(out)


# --------------------------------------------------------------------------- jit helpers

# Read at trace time by `_dot`; a compiled (GPU) kernel never sees the interpreter branch.
_INTERPRET = tl.constexpr(is_interpreter())


@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr):
    """`tl.dot(a, b, acc)` with `input_precision=DOT_PREC`; acc's dtype is the result's.

    The CPU interpreter (Triton 3.9) multiplies bf16 operands as their raw uint16 bits; there
    both are widened to fp32 first, which is exact and what the tensor cores compute on a GPU.
    """
    if _INTERPRET:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _sigmoid(x):
    """σ(x) without overflow: exp is only taken of -|x|, so no inf/inf for large |x|."""
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    return tl.where(x >= 0, r, e * r)


@triton.jit
def _tanh(x):
    """tanh(x) = sign(x) (1 - e) / (1 + e) with e = exp(-2|x|) in (0, 1]: no overflow."""
    e = tl.exp(-2.0 * tl.abs(x))
    r = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, r, -r)
