"""LSTM recurrence, stepwise: one fused Triton launch per timestep (DESIGN.md "stepwise").

Legend
    T  time steps            B  batch                 H  hidden units (cell width)
    G  gates: 4 (i | f | g | o, torch's row order) or 3 when coupled (f | g | o, i = 1 - f)
    P  proj_size             R  width of h: P with a projection, else H

Forward, for each step t in processing order (T-1 .. 0 when reverse), per sequence b:
    a       = gx_t + h W_hh^T                        gx_t = x_t W_ih^T + b_ih + b_hh (caller)
    a_i    += p_i ⊙ c;   a_f += p_f ⊙ c              (peephole, c = c_{t-1})
    i = σ(a_i)  (coupled: i = 1 - f);   f = σ(a_f);   g = tanh(a_g)
    c'      = f ⊙ c + i ⊙ g
    a_o    += p_o ⊙ c'                               (peephole: the output gate sees the new c)
    o = σ(a_o);   m = o ⊙ tanh(c');   h' = m  (with proj_size: h' = m W_hr^T)
With `lengths`, step t is live for b only when t < lengths[b]; a dead step keeps h, c and writes
y_t[b] = 0, so the reverse direction starts at each sequence's own last step.

Backward, per step in reverse processing order, with dh the gradient reaching h' (from y_t and
from the step that read h') and dc the one reaching c':
    dm   = dh (with proj: dh W_hr)                   dW_hr = Σ_t dh_t^T m_t
    da_o = dm ⊙ tanh(c') ⊙ o(1-o)
    dc  += dm ⊙ o ⊙ (1 - tanh²c') + p_o ⊙ da_o
    da_g = dc ⊙ i ⊙ (1-g²)
    da_f = dc ⊙ c ⊙ f(1-f)    (coupled: dc ⊙ (c - g) ⊙ f(1-f));   da_i = dc ⊙ g ⊙ i(1-i)
    dc_prev = dc ⊙ f + p_i ⊙ da_i + p_f ⊙ da_f;     dh_prev = da W_hh
    dgx = da;   dW_hh = Σ_t da_t^T h_{t-1};
    dp_i = Σ da_i ⊙ c,   dp_f = Σ da_f ⊙ c,   dp_o = Σ da_o ⊙ c'   (sums over t and b)
A dead step passes dh and dc through unchanged and has da = 0.

Kernels work on (hidden, batch) tiles: hidden units on the MMA's M side, the (small) batch on N,
padded to 16 with masks. Forward: `_lstm_fwd_cell_kernel` (all G gates of a block of units, one
`tl.dot` per gate over h), plus `_lstm_fwd_proj_kernel` with proj_size. Backward:
`_lstm_bwd_cell_kernel`, which without a projection also forms dh for its own units from the
previous launch's da (dh = da_{t+1} W_hh[:, j], a `tl.dot` over G*H); with a projection
`_lstm_bwd_dh_kernel` forms dh over the P columns first. The weight gradients are single GEMMs
after the time loop.

What forward keeps for backward (buffers in "time order": the state entering step t is index t,
the one leaving it t + 1; reversed with reverse=True, so h0 sits at T there):
    hs     (T+1, B, R) input dtype: every h, including h0 (the dW_hh GEMM reads h_{t-1} from it)
    cs     (T+1, B, H) fp32 (fp64 for fp64 input): every c, including c0
    gates  (T, B, G*H) fp32: activated gates i, f, g, o (coupled: f, g, o); saves all
           transcendental recomputation in backward except tanh(c'). fp32 because the backward
           products of gates lose accuracy in bf16.
    ms     (T, B, H) input dtype, proj only: m = o ⊙ tanh(c') as fed to the projection.
Gates are only written when a gradient is needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._common import (
    _dot,
    _sigmoid,
    _tanh,
    acc_dtype,
    block_b,
    block_h,
    block_k,
    dot_precision,
    new_output,
    normalize,
    num_warps,
)

__all__ = ["lstm_recurrence", "LSTMRecurrence"]

_TL_ACC = {torch.float64: tl.float64, torch.float32: tl.float32}


# =========================================================================== kernels


@triton.jit
def _live(lengths, t, o_b, m_b, HAS_LEN: tl.constexpr):
    """(1, BLOCK_B) mask of the sequences for which step t is live (t < lengths[b])."""
    if HAS_LEN:
        b_len = tl.load(lengths + o_b, mask=m_b, other=0)
        return (t < b_len)[None, :]
    else:
        return m_b[None, :]


@triton.jit
def _dh_from_next(
    dgx,  # (T, B, G*H) da of every step; step t_next is complete (previous launch)
    w_hh,  # (G*H, R)
    dh,  # (B, R) ACC: the gradient reaching the state after step t_next
    lengths,  # (B,) int64 or None
    t_next,
    o_r,
    m_r,
    o_b,
    m_b,
    B,
    GH,
    R,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_LEN: tl.constexpr,
):
    """(BLOCK_R, BLOCK_B) gradient reaching the state entering step t_next, columns o_r.

    da_{t_next} W_hh[:, o_r] where t_next was live, else dh passed through unchanged.
    """
    p_da = dgx + t_next.to(tl.int64) * B * GH
    b_acc = tl.zeros([BLOCK_R, BLOCK_B], dtype=ACC)
    for k in range(0, GH, BLOCK_K):
        o_k = k + tl.arange(0, BLOCK_K)
        m_k = o_k < GH
        # W_hh^T tile (BLOCK_R, BLOCK_K) and da^T tile (BLOCK_K, BLOCK_B)
        b_w = tl.load(
            w_hh + o_k[None, :] * R + o_r[:, None], mask=m_r[:, None] & m_k[None, :], other=0.0
        )
        b_da = tl.load(
            p_da + o_b[None, :] * GH + o_k[:, None], mask=m_k[:, None] & m_b[None, :], other=0.0
        )
        b_acc = _dot(b_w, b_da, b_acc, DOT_PREC)
    if HAS_LEN:
        m_live = _live(lengths, t_next, o_b, m_b, HAS_LEN)
        b_old = tl.load(dh + o_b[None, :] * R + o_r[:, None], mask=m_r[:, None] & m_b[None, :])
        b_acc = tl.where(m_live, b_acc, b_old)
    return b_acc


@triton.heuristics(
    {
        "HAS_PEEP": lambda a: a["w_ch"] is not None,
        "HAS_LEN": lambda a: a["lengths"] is not None,
        "HAS_PROJ": lambda a: a["ms"] is not None,
        "STORE_GATES": lambda a: a["gates"] is not None,
    }
)
@triton.jit(do_not_specialize=["t"])
def _lstm_fwd_cell_kernel(
    gx,  # (T, B, G*H) input dtype: x W_ih^T + b_ih + b_hh, gate row blocks in G order
    hs,  # (T+1, B, R) input dtype: states in time order; reads the one entering t
    cs,  # (T+1, B, H) ACC: cell states, same indexing; writes the one leaving t
    y,  # (T, B, R) input dtype: outputs (written here only without projection)
    gates,  # (T, B, G*H) ACC or None: activated gates, kept for backward
    ms,  # (T, B, H) input dtype or None: m = o * tanh(c) (with projection; no h written)
    w_hh,  # (G*H, R) input dtype
    w_ch,  # (3*H,) (i, f, o), or (2*H,) (f, o) when coupled, input dtype, or None
    lengths,  # (B,) int64 or None
    t,  # time index of this step
    B,
    H,
    R,
    G: tl.constexpr,
    COUPLED: tl.constexpr,
    REVERSE: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_PEEP: tl.constexpr,
    HAS_LEN: tl.constexpr,
    HAS_PROJ: tl.constexpr,
    STORE_GATES: tl.constexpr,
):
    GI: tl.constexpr = 0  # gate row blocks (GI unused when coupled)
    GF: tl.constexpr = 0 if COUPLED else 1
    GG: tl.constexpr = GF + 1
    GO: tl.constexpr = GF + 2
    i_h, i_b = tl.program_id(0), tl.program_id(1)
    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    m_h = o_h < H
    m_b = o_b < B
    m_hb = m_h[:, None] & m_b[None, :]
    t64 = t.to(tl.int64)
    s_in = t64 + 1 if REVERSE else t64
    s_out = t64 if REVERSE else t64 + 1

    # a = h W_hh^T over R, one accumulator per gate, (BLOCK_H, BLOCK_B) each
    p_h = hs + s_in * B * R
    b_ai = tl.zeros([BLOCK_H, BLOCK_B], dtype=ACC)
    b_af = tl.zeros([BLOCK_H, BLOCK_B], dtype=ACC)
    b_ag = tl.zeros([BLOCK_H, BLOCK_B], dtype=ACC)
    b_ao = tl.zeros([BLOCK_H, BLOCK_B], dtype=ACC)
    for k in range(0, R, BLOCK_K):
        o_k = k + tl.arange(0, BLOCK_K)
        m_k = o_k < R
        b_ht = tl.load(
            p_h + o_b[None, :] * R + o_k[:, None], mask=m_k[:, None] & m_b[None, :], other=0.0
        )
        p_w = w_hh + o_h[:, None] * R + o_k[None, :]
        m_w = m_h[:, None] & m_k[None, :]
        if not COUPLED:
            b_w = tl.load(p_w + GI * H * R, mask=m_w, other=0.0)
            b_ai = _dot(b_w, b_ht, b_ai, DOT_PREC)
        b_w = tl.load(p_w + GF * H * R, mask=m_w, other=0.0)
        b_af = _dot(b_w, b_ht, b_af, DOT_PREC)
        b_w = tl.load(p_w + GG * H * R, mask=m_w, other=0.0)
        b_ag = _dot(b_w, b_ht, b_ag, DOT_PREC)
        b_w = tl.load(p_w + GO * H * R, mask=m_w, other=0.0)
        b_ao = _dot(b_w, b_ht, b_ao, DOT_PREC)

    o_gx = t64 * B * G * H + o_b[None, :] * (G * H) + o_h[:, None]  # gate 0 of (T, B, G*H)
    o_c = o_b[None, :] * H + o_h[:, None]  # within one (B, H) slice
    b_af += tl.load(gx + o_gx + GF * H, mask=m_hb).to(ACC)
    b_ag += tl.load(gx + o_gx + GG * H, mask=m_hb).to(ACC)
    b_ao += tl.load(gx + o_gx + GO * H, mask=m_hb).to(ACC)
    b_cp = tl.load(cs + s_in * B * H + o_c, mask=m_hb, other=0.0)
    if HAS_PEEP:
        PF: tl.constexpr = 0 if COUPLED else 1  # peephole blocks of w_ch
        b_pf = tl.load(w_ch + PF * H + o_h, mask=m_h).to(ACC)[:, None]
        b_po = tl.load(w_ch + (PF + 1) * H + o_h, mask=m_h).to(ACC)[:, None]
        b_af += b_pf * b_cp
    b_f = _sigmoid(b_af)
    if COUPLED:
        b_i = 1.0 - b_f
    else:
        b_ai += tl.load(gx + o_gx + GI * H, mask=m_hb).to(ACC)
        if HAS_PEEP:
            b_pi = tl.load(w_ch + o_h, mask=m_h).to(ACC)[:, None]
            b_ai += b_pi * b_cp
        b_i = _sigmoid(b_ai)
    b_g = _tanh(b_ag)
    b_c = b_f * b_cp + b_i * b_g
    if HAS_PEEP:
        b_ao += b_po * b_c
    b_o = _sigmoid(b_ao)
    b_m = b_o * _tanh(b_c)

    m_live = _live(lengths, t, o_b, m_b, HAS_LEN)
    tl.store(cs + s_out * B * H + o_c, tl.where(m_live, b_c, b_cp), mask=m_hb)
    if STORE_GATES:
        if not COUPLED:
            tl.store(gates + o_gx + GI * H, b_i, mask=m_hb)
        tl.store(gates + o_gx + GF * H, b_f, mask=m_hb)
        tl.store(gates + o_gx + GG * H, b_g, mask=m_hb)
        tl.store(gates + o_gx + GO * H, b_o, mask=m_hb)
    if HAS_PROJ:
        # _lstm_fwd_proj_kernel applies the lengths to h and y
        tl.store(ms + t64 * B * H + o_c, b_m.to(ms.dtype.element_ty), mask=m_hb)
    else:
        b_m = b_m.to(hs.dtype.element_ty)
        b_hp = tl.load(hs + s_in * B * R + o_c, mask=m_hb)  # R == H here
        tl.store(hs + s_out * B * R + o_c, tl.where(m_live, b_m, b_hp), mask=m_hb)
        tl.store(y + t64 * B * R + o_c, tl.where(m_live, b_m, 0.0), mask=m_hb)


@triton.heuristics({"HAS_LEN": lambda a: a["lengths"] is not None})
@triton.jit(do_not_specialize=["t"])
def _lstm_fwd_proj_kernel(
    ms,  # (T, B, H) input dtype: m = o * tanh(c) of every step
    w_hr,  # (P, H) input dtype
    hs,  # (T+1, B, P) input dtype: states in time order; writes the one leaving t
    y,  # (T, B, P) input dtype
    lengths,  # (B,) int64 or None
    t,  # time index of this step
    B,
    H,
    P,
    REVERSE: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_LEN: tl.constexpr,
):
    i_p, i_b = tl.program_id(0), tl.program_id(1)
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    m_p = o_p < P
    m_b = o_b < B
    m_pb = m_p[:, None] & m_b[None, :]
    t64 = t.to(tl.int64)
    s_in = t64 + 1 if REVERSE else t64
    s_out = t64 if REVERSE else t64 + 1

    p_m = ms + t64 * B * H
    b_acc = tl.zeros([BLOCK_P, BLOCK_B], dtype=ACC)
    for k in range(0, H, BLOCK_K):
        o_k = k + tl.arange(0, BLOCK_K)
        m_k = o_k < H
        b_w = tl.load(
            w_hr + o_p[:, None] * H + o_k[None, :], mask=m_p[:, None] & m_k[None, :], other=0.0
        )
        b_mt = tl.load(
            p_m + o_b[None, :] * H + o_k[:, None], mask=m_k[:, None] & m_b[None, :], other=0.0
        )
        b_acc = _dot(b_w, b_mt, b_acc, DOT_PREC)

    m_live = _live(lengths, t, o_b, m_b, HAS_LEN)
    o_h = o_b[None, :] * P + o_p[:, None]
    b_h = b_acc.to(hs.dtype.element_ty)
    b_hp = tl.load(hs + s_in * B * P + o_h, mask=m_pb)
    tl.store(hs + s_out * B * P + o_h, tl.where(m_live, b_h, b_hp), mask=m_pb)
    tl.store(y + t64 * B * P + o_h, tl.where(m_live, b_h, 0.0), mask=m_pb)


@triton.heuristics({"HAS_LEN": lambda a: a["lengths"] is not None})
@triton.jit(do_not_specialize=["t"])
def _lstm_bwd_dh_kernel(
    dgx,  # (T, B, G*H) input dtype: da; step t_next (previous launch) is read
    w_hh,  # (G*H, P) input dtype
    dh,  # (B, P) ACC, in/out: gradient reaching the state after t_next, then after t
    dy,  # (T, B, P) input dtype
    dhs,  # (T, B, P) input dtype, out: total gradient of h_t (dy_t + recurrent), 0 when dead
    lengths,  # (B,) int64 or None
    t,  # time index of this step
    B,
    GH,
    P,
    REVERSE: tl.constexpr,
    USE_NEXT: tl.constexpr,  # False on the first backward step: dh holds dh_T
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_LEN: tl.constexpr,
):
    """With proj_size: the recurrent dh over the P columns, before the cell backward."""
    i_p, i_b = tl.program_id(0), tl.program_id(1)
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    m_p = o_p < P
    m_b = o_b < B
    m_pb = m_p[:, None] & m_b[None, :]
    t64 = t.to(tl.int64)
    o_dh = o_b[None, :] * P + o_p[:, None]
    if USE_NEXT:
        t_next = t - 1 if REVERSE else t + 1
        b_dh = _dh_from_next(
            dgx, w_hh, dh, lengths, t_next, o_p, m_p, o_b, m_b, B, GH, P,
            ACC, DOT_PREC, BLOCK_P, BLOCK_B, BLOCK_K, HAS_LEN,
        )  # fmt: skip
        tl.store(dh + o_dh, b_dh, mask=m_pb)
    else:
        b_dh = tl.load(dh + o_dh, mask=m_pb, other=0.0)
    b_dh += tl.load(dy + t64 * B * P + o_dh, mask=m_pb, other=0.0).to(ACC)
    m_live = _live(lengths, t, o_b, m_b, HAS_LEN)
    b_dh = tl.where(m_live, b_dh, 0.0)
    tl.store(dhs + t64 * B * P + o_dh, b_dh.to(dhs.dtype.element_ty), mask=m_pb)


@triton.heuristics(
    {
        "HAS_PEEP": lambda a: a["w_ch"] is not None,
        "HAS_LEN": lambda a: a["lengths"] is not None,
        "HAS_PROJ": lambda a: a["w_hr"] is not None,
    }
)
@triton.jit(do_not_specialize=["t"])
def _lstm_bwd_cell_kernel(
    dgx,  # (T, B, G*H) input dtype, out: da at t (zero when dead); reads t_next
    gates,  # (T, B, G*H) ACC: activated gates from forward
    cs,  # (T+1, B, H) ACC: cell states in time order
    dc,  # (B, H) ACC, in/out: gradient reaching the cell state after t, then before t
    dh,  # (B, H) ACC, in/out, without projection: gradient reaching the state after t
    dy,  # (T, B, H) input dtype, without projection
    dhs,  # (T, B, P) input dtype, with projection: total gradient of h_t
    w_hh,  # (G*H, R) input dtype
    w_hr,  # (P, H) input dtype or None
    w_ch,  # (3*H,) or (2*H,) input dtype, or None: peepholes
    lengths,  # (B,) int64 or None
    t,  # time index of this step
    B,
    H,
    R,
    G: tl.constexpr,
    COUPLED: tl.constexpr,
    REVERSE: tl.constexpr,
    USE_NEXT: tl.constexpr,  # False on the first backward step: dh holds dh_T
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_PEEP: tl.constexpr,
    HAS_LEN: tl.constexpr,
    HAS_PROJ: tl.constexpr,
):
    GI: tl.constexpr = 0
    GF: tl.constexpr = 0 if COUPLED else 1
    GG: tl.constexpr = GF + 1
    GO: tl.constexpr = GF + 2
    i_h, i_b = tl.program_id(0), tl.program_id(1)
    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    m_h = o_h < H
    m_b = o_b < B
    m_hb = m_h[:, None] & m_b[None, :]
    t64 = t.to(tl.int64)
    s_in = t64 + 1 if REVERSE else t64
    s_out = t64 if REVERSE else t64 + 1
    o_c = o_b[None, :] * H + o_h[:, None]  # within one (B, H) slice

    # dm: gradient of m = o * tanh(c') for units o_h, (BLOCK_H, BLOCK_B)
    if HAS_PROJ:
        p_dh = dhs + t64 * B * R
        b_dm = tl.zeros([BLOCK_H, BLOCK_B], dtype=ACC)
        for k in range(0, R, BLOCK_K):
            o_k = k + tl.arange(0, BLOCK_K)
            m_k = o_k < R
            # W_hr^T tile (BLOCK_H, BLOCK_K) and dh^T tile (BLOCK_K, BLOCK_B)
            b_w = tl.load(
                w_hr + o_k[None, :] * H + o_h[:, None], mask=m_h[:, None] & m_k[None, :], other=0.0
            )
            b_d = tl.load(
                p_dh + o_b[None, :] * R + o_k[:, None], mask=m_k[:, None] & m_b[None, :], other=0.0
            )
            b_dm = _dot(b_w, b_d, b_dm, DOT_PREC)
    else:
        if USE_NEXT:
            t_next = t - 1 if REVERSE else t + 1
            b_dm = _dh_from_next(
                dgx, w_hh, dh, lengths, t_next, o_h, m_h, o_b, m_b, B, G * H, R,
                ACC, DOT_PREC, BLOCK_H, BLOCK_B, BLOCK_K, HAS_LEN,
            )  # fmt: skip
            tl.store(dh + o_c, b_dm, mask=m_hb)
        else:
            b_dm = tl.load(dh + o_c, mask=m_hb, other=0.0)
        b_dm += tl.load(dy + t64 * B * R + o_c, mask=m_hb, other=0.0).to(ACC)

    o_gx = t64 * B * G * H + o_b[None, :] * (G * H) + o_h[:, None]
    b_f = tl.load(gates + o_gx + GF * H, mask=m_hb, other=0.0)
    b_g = tl.load(gates + o_gx + GG * H, mask=m_hb, other=0.0)
    b_o = tl.load(gates + o_gx + GO * H, mask=m_hb, other=0.0)
    if COUPLED:
        b_i = 1.0 - b_f
    else:
        b_i = tl.load(gates + o_gx + GI * H, mask=m_hb, other=0.0)
    b_cp = tl.load(cs + s_in * B * H + o_c, mask=m_hb, other=0.0)
    b_c = tl.load(cs + s_out * B * H + o_c, mask=m_hb, other=0.0)
    b_dc_in = tl.load(dc + o_c, mask=m_hb, other=0.0)

    b_tc = _tanh(b_c)
    b_dao = b_dm * b_tc * b_o * (1.0 - b_o)
    b_dc = b_dc_in + b_dm * b_o * (1.0 - b_tc * b_tc)
    if HAS_PEEP:
        PF: tl.constexpr = 0 if COUPLED else 1
        b_pf = tl.load(w_ch + PF * H + o_h, mask=m_h).to(ACC)[:, None]
        b_po = tl.load(w_ch + (PF + 1) * H + o_h, mask=m_h).to(ACC)[:, None]
        b_dc += b_po * b_dao
    b_dag = b_dc * b_i * (1.0 - b_g * b_g)
    if COUPLED:
        b_daf = b_dc * (b_cp - b_g) * b_f * (1.0 - b_f)
    else:
        b_daf = b_dc * b_cp * b_f * (1.0 - b_f)
        b_dai = b_dc * b_g * b_i * (1.0 - b_i)
    b_dcp = b_dc * b_f
    if HAS_PEEP:
        b_dcp += b_pf * b_daf
        if not COUPLED:
            b_pi = tl.load(w_ch + o_h, mask=m_h).to(ACC)[:, None]
            b_dcp += b_pi * b_dai

    m_live = _live(lengths, t, o_b, m_b, HAS_LEN)
    tl.store(dc + o_c, tl.where(m_live, b_dcp, b_dc_in), mask=m_hb)
    DT: tl.constexpr = dgx.dtype.element_ty
    if not COUPLED:
        tl.store(dgx + o_gx + GI * H, tl.where(m_live, b_dai, 0.0).to(DT), mask=m_hb)
    tl.store(dgx + o_gx + GF * H, tl.where(m_live, b_daf, 0.0).to(DT), mask=m_hb)
    tl.store(dgx + o_gx + GG * H, tl.where(m_live, b_dag, 0.0).to(DT), mask=m_hb)
    tl.store(dgx + o_gx + GO * H, tl.where(m_live, b_dao, 0.0).to(DT), mask=m_hb)


# =========================================================================== launchers


def _state_index(T: int, reverse: bool) -> tuple[int, int]:
    """(index of the initial state, index of the final state) in the (T+1, ...) buffers."""
    return (T, 0) if reverse else (0, T)


def _lstm_fwd(gx, h0, c0, w_hh, w_hr, w_ch, lengths, reverse, coupled, store_gates):
    """Runs the forward recurrence; returns (y, hs, cs, gates, ms) (see the file docstring)."""
    T, B, GH = gx.shape
    G = 3 if coupled else 4
    H, R = GH // G, w_hh.shape[1]
    dt, acc = gx.dtype, acc_dtype(gx.dtype)
    dev = gx.device
    s0, _ = _state_index(T, reverse)
    hs = new_output((T + 1, B, R), dt, dev)
    cs = new_output((T + 1, B, H), acc, dev)
    hs[s0].copy_(h0)
    cs[s0].copy_(c0)
    y = new_output((T, B, R), dt, dev)
    gates = new_output((T, B, GH), acc, dev) if store_gates else None
    ms = new_output((T, B, H), dt, dev) if w_hr is not None else None

    BLOCK_B = block_b(B)
    n_b = triton.cdiv(B, BLOCK_B)
    BLOCK_H = block_h(H, n_b)
    cell_grid = (triton.cdiv(H, BLOCK_H), n_b)
    cell_kw = dict(
        G=G, COUPLED=coupled, REVERSE=reverse, ACC=_TL_ACC[acc], DOT_PREC=dot_precision(dt),
        BLOCK_H=BLOCK_H, BLOCK_B=BLOCK_B, BLOCK_K=block_k(R), num_warps=num_warps(BLOCK_H, BLOCK_B),
    )  # fmt: skip
    if w_hr is not None:
        P = R
        BLOCK_P = block_h(P, n_b)
        proj_grid = (triton.cdiv(P, BLOCK_P), n_b)
        proj_kw = dict(
            REVERSE=reverse, ACC=_TL_ACC[acc], DOT_PREC=dot_precision(dt),
            BLOCK_P=BLOCK_P, BLOCK_B=BLOCK_B, BLOCK_K=block_k(H),
            num_warps=num_warps(BLOCK_P, BLOCK_B),
        )  # fmt: skip
    for s in range(T):
        t = T - 1 - s if reverse else s
        _lstm_fwd_cell_kernel[cell_grid](
            gx=gx, hs=hs, cs=cs, y=y, gates=gates, ms=ms, w_hh=w_hh, w_ch=w_ch,
            lengths=lengths, t=t, B=B, H=H, R=R, **cell_kw,
        )  # fmt: skip
        if w_hr is not None:
            _lstm_fwd_proj_kernel[proj_grid](
                ms=ms, w_hr=w_hr, hs=hs, y=y, lengths=lengths, t=t, B=B, H=H, P=P, **proj_kw
            )
    return y, hs, cs, gates, ms


def _lstm_bwd(dy, dhT, dcT, hs, cs, gates, ms, w_hh, w_hr, w_ch, lengths, reverse, coupled, needs):
    """Reverse-time loop; returns (dgx, dh0, dc0, dw_hh, dw_hr, dw_ch) (None where not needed)."""
    T, B, GH = gates.shape
    G = 3 if coupled else 4
    H, R = GH // G, w_hh.shape[1]
    dt, acc = hs.dtype, cs.dtype
    dev = hs.device
    need_gx, need_h0, need_c0, need_whh, need_whr, need_wch = needs

    dgx = new_output((T, B, GH), dt, dev)
    # (B, R) and (B, H), updated in place by the kernels: always fresh copies, never the caller's
    dh = dhT.to(dtype=acc, memory_format=torch.contiguous_format, copy=True)
    dc = dcT.to(dtype=acc, memory_format=torch.contiguous_format, copy=True)
    dhs = new_output((T, B, R), dt, dev) if w_hr is not None else None

    BLOCK_B = block_b(B)
    n_b = triton.cdiv(B, BLOCK_B)
    BLOCK_H = block_h(H, n_b)
    cell_grid = (triton.cdiv(H, BLOCK_H), n_b)
    prec = dot_precision(dt)
    cell_kw = dict(
        G=G, COUPLED=coupled, REVERSE=reverse, ACC=_TL_ACC[acc], DOT_PREC=prec, BLOCK_H=BLOCK_H,
        BLOCK_B=BLOCK_B, BLOCK_K=block_k(R if w_hr is not None else GH),
        num_warps=num_warps(BLOCK_H, BLOCK_B),
    )  # fmt: skip
    if w_hr is not None:
        BLOCK_P = block_h(R, n_b)
        dh_grid = (triton.cdiv(R, BLOCK_P), n_b)
        dh_kw = dict(
            REVERSE=reverse, ACC=_TL_ACC[acc], DOT_PREC=prec, BLOCK_P=BLOCK_P, BLOCK_B=BLOCK_B,
            BLOCK_K=block_k(GH), num_warps=num_warps(BLOCK_P, BLOCK_B),
        )  # fmt: skip
    for s in range(T - 1, -1, -1):
        t = T - 1 - s if reverse else s
        use_next = s < T - 1
        if w_hr is not None:
            _lstm_bwd_dh_kernel[dh_grid](
                dgx=dgx, w_hh=w_hh, dh=dh, dy=dy, dhs=dhs, lengths=lengths, t=t, B=B, GH=GH,
                P=R, USE_NEXT=use_next, **dh_kw,
            )  # fmt: skip
        _lstm_bwd_cell_kernel[cell_grid](
            dgx=dgx, gates=gates, cs=cs, dc=dc, dh=dh, dy=dy, dhs=dhs, w_hh=w_hh, w_hr=w_hr,
            w_ch=w_ch, lengths=lengths, t=t, B=B, H=H, R=R, USE_NEXT=use_next, **cell_kw,
        )  # fmt: skip

    # The weight gradients are one GEMM / reduction over all steps (dead steps have da = 0).
    h_prev = hs[1:] if reverse else hs[:-1]  # (T, B, R): the state each step read
    c_prev = cs[1:] if reverse else cs[:-1]
    c_new = cs[:-1] if reverse else cs[1:]
    dh0 = dc0 = dw_hh = dw_hr = dw_ch = None
    if need_h0:
        t0 = T - 1 if reverse else 0  # the first step processed read h0
        dh0 = dgx[t0].to(acc) @ w_hh.to(acc)
        if lengths is not None:
            dh0 = torch.where((lengths > t0)[:, None], dh0, dh)
        dh0 = dh0.to(dt)
    if need_c0:
        dc0 = dc.to(dt)
    if need_whh:
        dw_hh = dgx.reshape(T * B, GH).t() @ h_prev.reshape(T * B, R)
    if need_whr:
        dw_hr = dhs.reshape(T * B, R).t() @ ms.reshape(T * B, H)
    if need_wch:
        da = dgx.view(T, B, G, H).to(acc)
        gf = 0 if coupled else 1
        parts = [] if coupled else [(da[:, :, 0] * c_prev).sum((0, 1))]
        parts += [(da[:, :, gf] * c_prev).sum((0, 1)), (da[:, :, gf + 2] * c_new).sum((0, 1))]
        dw_ch = torch.cat(parts).to(dt)
    return (dgx if need_gx else None), dh0, dc0, dw_hh, dw_hr, dw_ch


# =========================================================================== autograd


class LSTMRecurrence(torch.autograd.Function):
    """(gx, h0, c0, w_hh, w_hr, w_ch, lengths, reverse, coupled) -> (y, h_T, c_T).

    Inputs already normalised by `lstm_recurrence` (contiguous, one dtype, checked shapes).
    """

    @staticmethod
    def forward(ctx, gx, h0, c0, w_hh, w_hr, w_ch, lengths, reverse, coupled, store):
        y, hs, cs, gates, ms = _lstm_fwd(
            gx, h0, c0, w_hh, w_hr, w_ch, lengths, reverse, coupled, store
        )
        _, sT = _state_index(gx.shape[0], reverse)
        h_T = hs[sT].clone()
        c_T = cs[sT].to(gx.dtype, copy=True)
        ctx.reverse, ctx.coupled = reverse, coupled
        if store:
            ctx.save_for_backward(hs, cs, gates, ms, w_hh, w_hr, w_ch, lengths)
        return y, h_T, c_T

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dhT, dcT):
        hs, cs, gates, ms, w_hh, w_hr, w_ch, lengths = ctx.saved_tensors
        dy, dhT, dcT = normalize(dy, dhT, dcT, dtype=hs.dtype)
        dgx, dh0, dc0, dw_hh, dw_hr, dw_ch = _lstm_bwd(
            dy, dhT, dcT, hs, cs, gates, ms, w_hh, w_hr, w_ch, lengths,
            ctx.reverse, ctx.coupled, ctx.needs_input_grad[:6],
        )  # fmt: skip
        return dgx, dh0, dc0, dw_hh, dw_hr, dw_ch, None, None, None, None


def lstm_recurrence(
    gx, h0, c0, w_hh, *, w_hr=None, w_ch=None, coupled=False, lengths=None, reverse=False
):
    """The LSTM recurrence of one layer and direction, in fused Triton kernels.

    Args:
        gx: (T, B, G*H) ``x @ W_ih^T + b_ih + b_hh``; G = 4 (rows i | f | g | o) or 3 when
            `coupled` (rows f | g | o, i = 1 - f).
        h0: (B, R) with R = P if `w_hr` is given, else H.   c0: (B, H).
        w_hh: (G*H, R).   w_hr: (P, H) projection (proj_size), optional.
        w_ch: peephole weights, (3H,) in order (i, f, o), or (2H,) (f, o) when coupled.
        lengths: (B,) integer tensor on gx's device: sequence b runs steps t < lengths[b]; its
            state is frozen and its output zero elsewhere (reverse starts at its own last step).
        reverse: run time from T-1 down to 0.
    All floating inputs share one dtype (fp16, bf16, fp32; fp64 under the interpreter).
    Returns y (T, B, R), h_T (B, R), c_T (B, H) in gx's dtype; differentiable once w.r.t.
    gx, h0, c0, w_hh, w_hr, w_ch.
    """
    if gx.dim() != 3:
        raise ValueError(f"gx must be (T, B, G*H), got shape {tuple(gx.shape)}")
    T, B, GH = gx.shape
    G = 3 if coupled else 4
    if GH % G:
        raise ValueError(f"gx's last dim {GH} is not a multiple of {G} gates")
    H = GH // G
    R = H if w_hr is None else w_hr.shape[0]
    if T < 1:
        raise ValueError("gx must have at least one time step")
    expect = {"h0": (h0, (B, R)), "c0": (c0, (B, H)), "w_hh": (w_hh, (GH, R))}
    if w_hr is not None:
        expect["w_hr"] = (w_hr, (R, H))
    if w_ch is not None:
        expect["w_ch"] = (w_ch, ((G - 1) * H,))
    for name, (ten, shape) in expect.items():
        if tuple(ten.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(ten.shape)}")
    gx, h0, c0, w_hh, w_hr, w_ch = normalize(gx, h0, c0, w_hh, w_hr, w_ch)
    if lengths is not None:
        if lengths.shape != (B,):
            raise ValueError(f"lengths must have shape ({B},), got {tuple(lengths.shape)}")
        lengths = lengths.to(device=gx.device, dtype=torch.int64).contiguous()
    store = torch.is_grad_enabled() and any(
        v is not None and v.requires_grad for v in (gx, h0, c0, w_hh, w_hr, w_ch)
    )
    return LSTMRecurrence.apply(
        gx, h0, c0, w_hh, w_hr, w_ch, lengths, bool(reverse), bool(coupled), store
    )
