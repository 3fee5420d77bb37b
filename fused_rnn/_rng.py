"""Zoneout masks from a counter-based generator: the same bits on every backend.

Zoneout (Krueger et al. 2016) keeps, at every step, a random subset of a state's units at their
previous value. The masks are never stored: every place that needs the mask of a step (the
torch loop, the stepwise Triton kernels, their backward passes) computes it from

    rng = (seed, offset)   a (2,) int64 tensor on the layer's device, drawn once per forward
                           from torch's generator (`draw`), so `torch.manual_seed` fixes it

and the coordinates of the element, with Philox 4x32-10 (Salmon et al. 2011, "Parallel random
numbers: as easy as 1, 2, 3"), the generator behind `tl.philox` / `tl.randint`:

    e       = b * W + j                                        the element's flat index
    key     = seed (64 bits: low word k0, high word k1)
    counter = (e >> 2,  t + (offset >> 32),  2 * stream + which,  offset mod 2**32)
    u       = 32-bit word e mod 4 of Philox4x32-10(key, counter)
    keep    = (u >> 1) < floor(p * 2**31)                      P(keep) = floor(p * 2**31) / 2**31

(each counter's four output words serve four consecutive elements, as curand_uniform4 and
torch's own Philox-based dropout use them: a quarter of the generator's work per element) for
batch row b, unit j of a state of width W, time step t (the sequence index, not the
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


def philox(key: int | Tensor, c0: Tensor, c1, c2, c3, rounds: int = 10):
    """Philox4x32-`rounds` of counters (c0, c1, c2, c3) (32-bit values: int64 tensors, which
    broadcast together, or ints; at least one a tensor) under the 64-bit `key` (an int or an
    int64 tensor, two's complement bits); returns the four 32-bit output words as int64 tensors
    of the broadcast shape. No tensor is made from host data: the function runs under CUDA graph
    capture.

    Each round's 32 x 32 -> 64-bit products are one int64 multiply: the product of two values
    below 2**32 is below 2**64, and torch's int64 multiply keeps its low 64 bits (two's
    complement wrap-around, on CPU and CUDA alike), from which `>> 32` and `& (2**32 - 1)` take
    the high and low words (the sign bits an arithmetic shift brings in are masked off). The
    known-answer tests (tests/test_regularised.py) check the result. The words live in four
    buffers updated in place, two more for the products: 12 elementwise passes a round."""
    k0, k1 = key & _M32, (key >> 32) & _M32
    ref = next(c for c in (c0, c1, c2, c3) if isinstance(c, Tensor))
    shape = torch.broadcast_shapes(*(c.shape for c in (c0, c1, c2, c3) if isinstance(c, Tensor)))
    words = []
    for c in (c0, c1, c2, c3):
        w = torch.zeros(shape, dtype=torch.int64, device=ref.device)
        words.append(w.add_(c).bitwise_and_(_M32))
    c0, c1, c2, c3 = words
    pa, pb = torch.empty_like(c0), torch.empty_like(c0)
    for _ in range(rounds):
        torch.mul(c2, _ROUND_B, out=pb)
        torch.mul(c0, _ROUND_A, out=pa)
        # (c0, c1, c2, c3) <- (hi(pb) ^ c1 ^ k0, lo(pb), hi(pa) ^ c3 ^ k1, lo(pa)), each word
        # written into a buffer whose old value was already read
        n0 = torch.bitwise_right_shift(pb, 32, out=c2).bitwise_and_(_M32)
        n0.bitwise_xor_(c1).bitwise_xor_(k0)
        torch.bitwise_and(pb, _M32, out=c1)
        n2 = torch.bitwise_right_shift(pa, 32, out=c0).bitwise_and_(_M32)
        n2.bitwise_xor_(c3).bitwise_xor_(k1)
        torch.bitwise_and(pa, _M32, out=c3)
        c0, c2 = n0, n2
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


def _words(rng: Tensor, t, n: int, stream: int, which: int) -> Tensor:
    """(..., n) int64: the generator's 32-bit word of each element e < n of a state (flat index
    b * W + j) at step(s) t (an int64 tensor, (S, 1) for S steps, the step offset added): word
    e mod 4 of Philox of counter e >> 2 (module docstring)."""
    q = torch.arange((n + 3) // 4, dtype=torch.int64, device=rng.device)
    words = philox(rng[0], q, t, 2 * stream + which, rng[1])
    return torch.stack(words, dim=-1).flatten(-2)[..., :n]


def keep_mask(rng: Tensor, t: int, B: int, W: int, stream: int, which: int, p: float) -> Tensor:
    """(B, W) bool: the units of a width-W state that keep their previous value at step t."""
    u = _words(rng, t + (rng[1] >> 32), B * W, stream, which)
    return ((u >> 1) < threshold(p)).view(B, W)


def keep_masks(rng: Tensor, steps, B: int, W: int, stream: int, which: int, p: float) -> Tensor:
    """(len(steps), B, W) bool: `keep_mask` of several steps at once (a chunk of a loop)."""
    if isinstance(steps, range):  # made on the device (CUDA graph capture allows it)
        t = torch.arange(steps.start, steps.stop, steps.step, dtype=torch.int64, device=rng.device)
    else:
        t = torch.tensor(list(steps), dtype=torch.int64, device=rng.device)
    t = t[:, None] + (rng[1] >> 32)  # the step offset (module docstring)
    u = _words(rng, t, B * W, stream, which)
    return ((u >> 1) < threshold(p)).view(-1, B, W)
