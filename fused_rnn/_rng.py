"""Zoneout masks from a counter-based generator: the same bits on every backend.

Zoneout (Krueger et al. 2016) keeps, at every step, a random subset of a state's units at their
previous value. The masks are never stored: every place that needs the mask of a step (the
torch loop, the stepwise Triton kernels, their backward passes) computes it from

    rng = (seed, offset)   a (2,) int64 tensor on the layer's device, drawn once per forward
                           from torch's generator (`draw`), so `torch.manual_seed` fixes it

and the coordinates of the element, with Philox 4x32-10 (Salmon et al. 2011, "Parallel random
numbers: as easy as 1, 2, 3"), the generator behind `tl.philox` / `tl.randint`:

    key     = seed (64 bits: low word k0, high word k1)
    counter = (b * W + j,  t + (offset >> 32),  2 * stream + which,  offset mod 2**32)
    u       = first 32-bit word of Philox4x32-10(key, counter)
    keep    = (u >> 1) < floor(p * 2**31)                      P(keep) = floor(p * 2**31) / 2**31

for batch row b, unit j of a state of width W, time step t (the sequence index, not the
processing order), `stream` = the layer-direction index (layer * num_directions + direction)
and `which` = 0 for h, 1 for the LSTM's cell state c. The offset's high word is a step offset:
`draw` leaves it 0; a call over steps t0.. of a longer sequence (a chunk of the wavefront
schedule, fused_rnn._schedule) passes offset + (t0 << 32), and its step t draws the masks of
step t0 + t of the whole sequence. `philox` below is that generator in int64
torch ops; kernels/_common.py `_zoneout_keep` is the same in Triton. Tests check both against
the published known-answer vectors of Philox4x32-10 and against each other bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["philox", "draw", "threshold", "keep_mask", "WHICH_H", "WHICH_C"]

WHICH_H = 0
WHICH_C = 1

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85  # Weyl sequence that bumps the key each round


def _mul_hi_lo(a: int, b):
    """(high, low) 32-bit words of a * b for a 32-bit constant a and b < 2**32 (an int64 tensor
    or an int), without leaving int64 (a * b may need 64 bits): a is split into 16-bit halves."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    p_hi, p_lo = b * a_hi, b * a_lo  # each < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _M32
    return hi, lo


def philox(key: int | Tensor, c0: Tensor, c1, c2, c3, rounds: int = 10):
    """Philox4x32-`rounds` of counters (c0, c1, c2, c3) (32-bit values: int64 tensors, which
    broadcast together, or ints) under the 64-bit `key` (an int or an int64 tensor, two's
    complement bits); returns the four 32-bit output words (int64 tensors where an input was a
    tensor). No tensor is made from host data: the function runs under CUDA graph capture."""
    k0, k1 = key & _M32, (key >> 32) & _M32
    c0, c1, c2, c3 = (c & _M32 for c in (c0, c1, c2, c3))
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def draw(device) -> Tensor:
    """A fresh (seed, offset) pair from torch's default generator of `device`: one (2,) int64
    tensor, made on the device without a host round trip (CUDA graphs and the stepwise loops
    read it as a tensor argument, so a replay sees each call's value): seed in [0, 2**62),
    offset in [0, 2**31). Consumes one `torch.randint` call of the generator."""
    rng = torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device)
    rng[1:].remainder_(2**31)
    return rng


def threshold(p: float) -> int:
    """The int32 threshold of `keep` for probability p in [0, 1): floor(p * 2**31)."""
    return min(int(p * 2**31), 2**31 - 1)


def keep_mask(rng: Tensor, t: int, B: int, W: int, stream: int, which: int, p: float) -> Tensor:
    """(B, W) bool: the units of a width-W state that keep their previous value at step t."""
    b = torch.arange(B, dtype=torch.int64, device=rng.device)[:, None]
    j = torch.arange(W, dtype=torch.int64, device=rng.device)[None, :]
    u, *_ = philox(rng[0], b * W + j, t + (rng[1] >> 32), 2 * stream + which, rng[1])
    return (u >> 1) < threshold(p)


def keep_masks(rng: Tensor, steps, B: int, W: int, stream: int, which: int, p: float) -> Tensor:
    """(len(steps), B, W) bool: `keep_mask` of several steps at once (a chunk of a loop)."""
    if isinstance(steps, range):  # made on the device (CUDA graph capture allows it)
        t = torch.arange(steps.start, steps.stop, steps.step, dtype=torch.int64, device=rng.device)
    else:
        t = torch.tensor(list(steps), dtype=torch.int64, device=rng.device)
    t = t[:, None, None] + (rng[1] >> 32)  # the step offset (module docstring)
    b = torch.arange(B, dtype=torch.int64, device=rng.device)[:, None]
    j = torch.arange(W, dtype=torch.int64, device=rng.device)[None, :]
    u, *_ = philox(rng[0], b * W + j, t, 2 * stream + which, rng[1])
    return (u >> 1) < threshold(p)
