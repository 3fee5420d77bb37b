"""LSTM recurrence in Triton: stepwise (one launch per timestep) and persistent (one per sequence).

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
padded to 16 with masks. Two strategies (DESIGN.md) share the per-step maths, written once as
jit helpers (`_lstm_cell`, `_lstm_cell_bwd`, gate block loads/stores):

stepwise, one launch per step. Forward: `_lstm_fwd_cell_kernel` (all G gates of a block of
units, one `tl.dot` per gate over h), plus `_lstm_fwd_proj_kernel` with proj_size. Backward:
`_lstm_bwd_cell_kernel`, which without a projection also forms dh for its own units from the
previous launch's da (dh = da_{t+1} W_hh[:, j], a `tl.dot` over G*H); with a projection
`_lstm_bwd_dh_kernel` forms dh over the P columns first.

persistent, one launch per sequence and direction: `_lstm_fwd_persistent_kernel` and
`_lstm_bwd_persistent_kernel`. A program loads its slice of W_hh (forward: its units' rows of
every gate block; backward: its units' columns) once, keeps c (dc, dh) in registers and loops
over t; programs meet at a grid barrier each step, after which h_{t-1} (backward: da_{t+1}) of
all units is read from global memory. With a projection a step has two phases and two
barriers: forward m_t for the unit block, then h_t = m_t W_hr^T for a block of P rows;
backward dh_t over a block of P, then dm = dh_t W_hr for the unit block. The launcher falls
back to the stepwise kernels when the grid could not be co-resident (_common.launch_persistent).

The weight gradients are single GEMMs after the time loop, whichever strategy ran.

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

from ._common import (
    PERSISTENT_WARPS,
    _dot,
    _dot_split,
    _grid_barrier,
    _live,
    _load_split_a,
    _load_split_b,
    _mm_tile,
    _sigmoid,
    _tanh,
    _zone,
    _zoneout_factor,
    acc_dtype,
    block_b,
    block_h,
    block_k,
    device_props,
    dot_precision,
    is_interpreter,
    launch_persistent,
    new_output,
    next_pow2,
    num_warps,
    persistent_tiles,
    split_k,
    zoneout_threshold,
)
from ._launch import step_launcher

__all__ = ["lstm_fwd", "lstm_bwd"]

_TL_ACC = {torch.float64: tl.float64, torch.float32: tl.float32}


# =========================================================================== kernels


@triton.jit
def _load_gate_blocks(p, m_hb, H, COUPLED: tl.constexpr, ACC: tl.constexpr):
    """The G gate blocks (i, f, g, o) of one step's (B, G*H) slab, p at gate block 0 of the tile.

    (BLOCK_H, BLOCK_B) each in ACC; without an i block (coupled) the f block stands in for it.
    """
    GF: tl.constexpr = 0 if COUPLED else 1
    b_f = tl.load(p + GF * H, mask=m_hb, other=0.0).to(ACC)
    b_g = tl.load(p + (GF + 1) * H, mask=m_hb, other=0.0).to(ACC)
    b_o = tl.load(p + (GF + 2) * H, mask=m_hb, other=0.0).to(ACC)
    if COUPLED:
        b_i = b_f
    else:
        b_i = tl.load(p, mask=m_hb, other=0.0).to(ACC)
    return b_i, b_f, b_g, b_o


@triton.jit
def _store_gate_blocks(p, b_i, b_f, b_g, b_o, m_hb, H, COUPLED: tl.constexpr):
    """Stores the G gate blocks into one step's (B, G*H) slab (cast to its dtype)."""
    DT: tl.constexpr = p.dtype.element_ty
    GF: tl.constexpr = 0 if COUPLED else 1
    if not COUPLED:
        tl.store(p, b_i.to(DT), mask=m_hb)
    tl.store(p + GF * H, b_f.to(DT), mask=m_hb)
    tl.store(p + (GF + 1) * H, b_g.to(DT), mask=m_hb)
    tl.store(p + (GF + 2) * H, b_o.to(DT), mask=m_hb)


@triton.jit
def _lstm_peepholes(
    w_ch, o_h, m_h, H, COUPLED: tl.constexpr, HAS_PEEP: tl.constexpr, ACC: tl.constexpr
):
    """(BLOCK_H, 1) peephole weights (p_i, p_f, p_o) of units o_h; p_i = p_f (unused) when
    coupled; scalar zeros (unused) without peepholes."""
    if HAS_PEEP:
        PF: tl.constexpr = 0 if COUPLED else 1  # blocks of w_ch: (i, f, o) or (f, o)
        b_pf = tl.load(w_ch + PF * H + o_h, mask=m_h, other=0.0).to(ACC)[:, None]
        b_po = tl.load(w_ch + (PF + 1) * H + o_h, mask=m_h, other=0.0).to(ACC)[:, None]
        if COUPLED:
            b_pi = b_pf
        else:
            b_pi = tl.load(w_ch + o_h, mask=m_h, other=0.0).to(ACC)[:, None]
        return b_pi, b_pf, b_po
    else:
        return 0.0, 0.0, 0.0


@triton.jit
def _lstm_cell(b_ai, b_af, b_ag, b_ao, b_cp, b_pi, b_pf, b_po, COUPLED: tl.constexpr,
               HAS_PEEP: tl.constexpr):  # fmt: skip
    """One forward step from the pre-activations a = gx_t + h W_hh^T and c = c_{t-1}.

    Returns the activated gates (i, f, g, o), c' and m = o tanh(c'), in ACC (file docstring).
    """
    if HAS_PEEP:
        b_af += b_pf * b_cp
    b_f = _sigmoid(b_af)
    if COUPLED:
        b_i = 1.0 - b_f
    else:
        if HAS_PEEP:
            b_ai += b_pi * b_cp
        b_i = _sigmoid(b_ai)
    b_g = _tanh(b_ag)
    b_c = b_f * b_cp + b_i * b_g
    if HAS_PEEP:
        b_ao += b_po * b_c
    b_o = _sigmoid(b_ao)
    return b_i, b_f, b_g, b_o, b_c, b_o * _tanh(b_c)


@triton.jit
def _lstm_cell_bwd(b_dm, b_dc, b_i, b_f, b_g, b_o, b_cp, b_c, b_pi, b_pf, b_po,
                   COUPLED: tl.constexpr, HAS_PEEP: tl.constexpr):  # fmt: skip
    """One backward step: dm (gradient of m) and dc (reaching c') with forward's gates, c_{t-1}
    and c'. Returns (da_i, da_f, da_g, da_o, dc_{t-1}); da_i = da_f (unused) when coupled."""
    b_tc = _tanh(b_c)
    b_dao = b_dm * b_tc * b_o * (1.0 - b_o)
    b_dc = b_dc + b_dm * b_o * (1.0 - b_tc * b_tc)
    if HAS_PEEP:
        b_dc += b_po * b_dao
    b_dag = b_dc * b_i * (1.0 - b_g * b_g)
    if COUPLED:
        b_daf = b_dc * (b_cp - b_g) * b_f * (1.0 - b_f)
        b_dai = b_daf
    else:
        b_daf = b_dc * b_cp * b_f * (1.0 - b_f)
        b_dai = b_dc * b_g * b_i * (1.0 - b_i)
    b_dcp = b_dc * b_f
    if HAS_PEEP:
        b_dcp += b_pf * b_daf
        if not COUPLED:
            b_dcp += b_pi * b_dai
    return b_dai, b_daf, b_dag, b_dao, b_dcp


@triton.jit
def _lstm_load_saved(p_gates, cs, s_in, s_out, o_c, m_hb, B, H, COUPLED: tl.constexpr,
                     ACC: tl.constexpr):  # fmt: skip
    """What backward reads of forward at one step, (BLOCK_H, BLOCK_B) each in ACC: the activated
    gates (i, f, g, o) at p_gates (coupled: i = 1 - f), c_{t-1} and c' from slots s_in, s_out."""
    b_i, b_f, b_g, b_o = _load_gate_blocks(p_gates, m_hb, H, COUPLED, ACC)
    if COUPLED:
        b_i = 1.0 - b_f
    b_cp = tl.load(cs + s_in * B * H + o_c, mask=m_hb, other=0.0)
    b_c = tl.load(cs + s_out * B * H + o_c, mask=m_hb, other=0.0)
    return b_i, b_f, b_g, b_o, b_cp, b_c


@triton.jit
def _lstm_bwd_step(p_da, b_dm, b_dc, b_i, b_f, b_g, b_o, b_cp, b_c, b_pi, b_pf, b_po, m_live,
                   m_hb, H, COUPLED: tl.constexpr, HAS_PEEP: tl.constexpr):  # fmt: skip
    """`_lstm_cell_bwd`, then da stored at p_da (one step's (B, G*H) slab, zero where the step is
    dead). Returns dc_{t-1}: dc passed through unchanged where the step is dead."""
    b_dai, b_daf, b_dag, b_dao, b_dcp = _lstm_cell_bwd(
        b_dm, b_dc, b_i, b_f, b_g, b_o, b_cp, b_c, b_pi, b_pf, b_po, COUPLED, HAS_PEEP
    )
    b_dcp = tl.where(m_live, b_dcp, b_dc)
    _store_gate_blocks(
        p_da, tl.where(m_live, b_dai, 0.0), tl.where(m_live, b_daf, 0.0),
        tl.where(m_live, b_dag, 0.0), tl.where(m_live, b_dao, 0.0), m_hb, H, COUPLED,
    )  # fmt: skip
    return b_dcp


@triton.jit
def _dh_from_next(
    dgx,  # (T, B, G*H) da of every step; step t_next is complete (previous launch)
    w_hh,  # (G*H, R)
    dh,  # (B, R) ACC: the gradient reaching the state after step t_next (CARRY: see below)
    lengths,  # (B,) int64 or None
    drop,  # (B, R) ACC or None: recurrent dropout's mask (HAS_DROP)
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
    HAS_DROP: tl.constexpr = False,
    CARRY: tl.constexpr = False,
):
    """(BLOCK_R, BLOCK_B) gradient reaching the state entering step t_next, columns o_r.

    da_{t_next} W_hh[:, o_r] (⊙ the dropout mask) where t_next was live, else dh passed through
    unchanged. CARRY (zoneout of h): dh holds what step t_next passed to h_{t-1} past its cell
    (d ⊙ dh, or dh itself where t_next was dead), added to the product where t_next was live.
    """
    # W_hh^T (rows o_r = columns of W_hh) times da^T, over G*H
    b_acc = _mm_tile(
        tl.zeros([BLOCK_R, BLOCK_B], dtype=ACC), w_hh, dgx + t_next.to(tl.int64) * B * GH, 1, R,
        GH, o_r, m_r, o_b, m_b, GH, DOT_PREC, BLOCK_K,
    )  # fmt: skip
    o_rb = o_b[None, :] * R + o_r[:, None]
    m_rb = m_r[:, None] & m_b[None, :]
    if HAS_DROP:
        b_acc *= tl.load(drop + o_rb, mask=m_rb, other=0.0)
    if CARRY:
        b_old = tl.load(dh + o_rb, mask=m_rb, other=0.0)
        m_live = _live(lengths, t_next, o_b, m_b, HAS_LEN)
        b_acc = tl.where(m_live, b_acc, 0.0) + b_old
    elif HAS_LEN:
        m_live = _live(lengths, t_next, o_b, m_b, HAS_LEN)
        b_old = tl.load(dh + o_rb, mask=m_rb)
        b_acc = tl.where(m_live, b_acc, b_old)
    return b_acc


_OPTION_HEURISTICS = {
    "HAS_RNG": lambda a: a["rng"] is not None,
    "HAS_DROP": lambda a: a["drop"] is not None,
    "ZONE_C": lambda a: a["z_c"] > 0,
    "ZONE_H": lambda a: a["z_h"] > 0,
}


@triton.heuristics(
    {
        "HAS_PEEP": lambda a: a["w_ch"] is not None,
        "HAS_LEN": lambda a: a["lengths"] is not None,
        "HAS_PROJ": lambda a: a["ms"] is not None,
        "STORE_GATES": lambda a: a["gates"] is not None,
        **_OPTION_HEURISTICS,
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
    rng,  # (2,) int64 (seed, offset) of the zoneout masks (training), or None
    drop,  # (B, R) ACC: recurrent dropout's mask on h where it meets W_hh, or None
    t,  # time index of this step
    B,
    H,
    R,
    z_stream,  # layer-direction index in the zoneout masks' counters (not `stream`: reserved)
    z_c,  # zoneout probability of c (ZONE_C: > 0), the expectation's weight in evaluation
    z_h,  # zoneout probability of h (without projection; with one the proj kernel zones h)
    thr_c,  # int32 threshold of c's masks (_common.zoneout_threshold)
    thr_h,
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
    HAS_RNG: tl.constexpr,
    HAS_DROP: tl.constexpr,
    ZONE_C: tl.constexpr,
    ZONE_H: tl.constexpr,
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
        if HAS_DROP:
            b_s = tl.load(
                drop + o_b[None, :] * R + o_k[:, None], mask=m_k[:, None] & m_b[None, :], other=0.0
            )
            b_ht = (b_ht.to(ACC) * b_s).to(b_ht.dtype)
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
    b_gi, b_gf, b_gg, b_go = _load_gate_blocks(gx + o_gx, m_hb, H, COUPLED, ACC)
    b_cp = tl.load(cs + s_in * B * H + o_c, mask=m_hb, other=0.0)
    b_pi, b_pf, b_po = _lstm_peepholes(w_ch, o_h, m_h, H, COUPLED, HAS_PEEP, ACC)
    b_i, b_f, b_g, b_o, b_c, b_m = _lstm_cell(
        b_ai + b_gi, b_af + b_gf, b_ag + b_gg, b_ao + b_go, b_cp, b_pi, b_pf, b_po,
        COUPLED, HAS_PEEP,
    )  # fmt: skip

    m_live = _live(lengths, t, o_b, m_b, HAS_LEN)
    if ZONE_C:  # b_c is the candidate c̃: the output above and backward use it, the state not
        b_c = _zone(b_cp, b_c, rng, t, z_stream, o_h, o_b, H, z_c, thr_c, 1, HAS_RNG)
    tl.store(cs + s_out * B * H + o_c, tl.where(m_live, b_c, b_cp), mask=m_hb)
    if STORE_GATES:
        _store_gate_blocks(gates + o_gx, b_i, b_f, b_g, b_o, m_hb, H, COUPLED)
    if HAS_PROJ:
        # _lstm_fwd_proj_kernel applies the lengths (and zoneout) to h and y
        tl.store(ms + t64 * B * H + o_c, b_m.to(ms.dtype.element_ty), mask=m_hb)
    else:
        b_hp = tl.load(hs + s_in * B * R + o_c, mask=m_hb)  # R == H here
        if ZONE_H:
            b_m = _zone(b_hp, b_m, rng, t, z_stream, o_h, o_b, R, z_h, thr_h, 0, HAS_RNG)
        b_m = b_m.to(hs.dtype.element_ty)
        tl.store(hs + s_out * B * R + o_c, tl.where(m_live, b_m, b_hp), mask=m_hb)
        tl.store(y + t64 * B * R + o_c, tl.where(m_live, b_m, 0.0), mask=m_hb)


@triton.heuristics(
    {
        "HAS_LEN": lambda a: a["lengths"] is not None,
        "HAS_RNG": lambda a: a["rng"] is not None,
        "ZONE_H": lambda a: a["z_h"] > 0,
    }
)
@triton.jit(do_not_specialize=["t"])
def _lstm_fwd_proj_kernel(
    ms,  # (T, B, H) input dtype: m = o * tanh(c) of every step
    w_hr,  # (P, H) input dtype
    hs,  # (T+1, B, P) input dtype: states in time order; writes the one leaving t
    y,  # (T, B, P) input dtype
    lengths,  # (B,) int64 or None
    rng,  # (2,) int64 (seed, offset) of the zoneout masks (training), or None
    t,  # time index of this step
    B,
    H,
    P,
    z_stream,  # layer-direction index in the zoneout masks' counters (not `stream`: reserved)
    z_h,  # zoneout probability of h
    thr_h,  # int32 threshold of h's masks
    REVERSE: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_LEN: tl.constexpr,
    HAS_RNG: tl.constexpr,
    ZONE_H: tl.constexpr,
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

    # h = m W_hr^T for rows o_p of h, over H
    b_acc = _mm_tile(
        tl.zeros([BLOCK_P, BLOCK_B], dtype=ACC), w_hr, ms + t64 * B * H, H, 1, H,
        o_p, m_p, o_b, m_b, H, DOT_PREC, BLOCK_K,
    )  # fmt: skip

    m_live = _live(lengths, t, o_b, m_b, HAS_LEN)
    o_h = o_b[None, :] * P + o_p[:, None]
    b_hp = tl.load(hs + s_in * B * P + o_h, mask=m_pb)
    if ZONE_H:
        b_acc = _zone(b_hp, b_acc, rng, t, z_stream, o_p, o_b, P, z_h, thr_h, 0, HAS_RNG)
    b_h = b_acc.to(hs.dtype.element_ty)
    tl.store(hs + s_out * B * P + o_h, tl.where(m_live, b_h, b_hp), mask=m_pb)
    tl.store(y + t64 * B * P + o_h, tl.where(m_live, b_h, 0.0), mask=m_pb)


@triton.heuristics(
    {
        "HAS_LEN": lambda a: a["lengths"] is not None,
        "HAS_RNG": lambda a: a["rng"] is not None,
        "HAS_DROP": lambda a: a["drop"] is not None,
        "ZONE_H": lambda a: a["z_h"] > 0,
    }
)
@triton.jit(do_not_specialize=["t"])
def _lstm_bwd_dh_kernel(
    dgx,  # (T, B, G*H) input dtype: da; step t_next (previous launch) is read
    w_hh,  # (G*H, P) input dtype
    dh,  # (B, P) ACC, in/out: gradient reaching the state after t_next, then after t
    dy,  # (T, B, P) input dtype
    dhs,  # (T, B, P) input dtype, out: total gradient of h_t (dy_t + recurrent), 0 when dead
    lengths,  # (B,) int64 or None
    rng,  # (2,) int64 (seed, offset) of the zoneout masks, or None
    drop,  # (B, P) ACC: recurrent dropout's mask, or None
    t,  # time index of this step
    B,
    GH,
    P,
    z_stream,  # layer-direction index in the zoneout masks' counters (not `stream`: reserved)
    z_h,  # zoneout probability of h
    thr_h,  # int32 threshold of h's masks
    REVERSE: tl.constexpr,
    USE_NEXT: tl.constexpr,  # False on the first backward step: dh holds dh_T
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_LEN: tl.constexpr,
    HAS_RNG: tl.constexpr,
    HAS_DROP: tl.constexpr,
    ZONE_H: tl.constexpr,
):
    """With proj_size: the recurrent dh over the P columns, before the cell backward.

    With zoneout of h, dhs_t is the gradient of the cell's h̃_t, (1 - d) ⊙ dh_t, and dh keeps
    d ⊙ dh_t (dh_t where the step is dead), which reaches h_{t-1} past the cell."""
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
            dgx, w_hh, dh, lengths, drop, t_next, o_p, m_p, o_b, m_b, B, GH, P,
            ACC, DOT_PREC, BLOCK_P, BLOCK_B, BLOCK_K, HAS_LEN, HAS_DROP, ZONE_H,
        )  # fmt: skip
        if not ZONE_H:
            tl.store(dh + o_dh, b_dh, mask=m_pb)
    else:
        b_dh = tl.load(dh + o_dh, mask=m_pb, other=0.0)
    m_live = _live(lengths, t, o_b, m_b, HAS_LEN)
    b_tot = b_dh + tl.load(dy + t64 * B * P + o_dh, mask=m_pb, other=0.0).to(ACC)
    if ZONE_H:
        b_d = _zoneout_factor(rng, t, z_stream, o_p, o_b, P, z_h, thr_h, 0, HAS_RNG, ACC)
        tl.store(dh + o_dh, tl.where(m_live, b_d * b_tot, b_dh), mask=m_pb)
        b_tot = (1.0 - b_d) * b_tot
    b_tot = tl.where(m_live, b_tot, 0.0)
    tl.store(dhs + t64 * B * P + o_dh, b_tot.to(dhs.dtype.element_ty), mask=m_pb)


@triton.heuristics(
    {
        "HAS_PEEP": lambda a: a["w_ch"] is not None,
        "HAS_LEN": lambda a: a["lengths"] is not None,
        "HAS_PROJ": lambda a: a["w_hr"] is not None,
        **_OPTION_HEURISTICS,
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
    rng,  # (2,) int64 (seed, offset) of the zoneout masks, or None
    drop,  # (B, R) ACC: recurrent dropout's mask, or None
    t,  # time index of this step
    B,
    H,
    R,
    z_stream,  # layer-direction index in the zoneout masks' counters (not `stream`: reserved)
    z_c,  # zoneout probability of c
    z_h,  # zoneout probability of h (without projection: the dh kernel handles it with one)
    thr_c,  # int32 thresholds of the masks
    thr_h,
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
    HAS_RNG: tl.constexpr,
    HAS_DROP: tl.constexpr,
    ZONE_C: tl.constexpr,
    ZONE_H: tl.constexpr,
):
    """Backward of step t for units o_h: dm (from dh without projection), the cell's backward,
    da_t and dc_{t-1}. Zoneout: the gradient of h_t (c_t) splits into (1 - d) ⊙ it for the
    cell's h̃ (c̃) and d ⊙ it, which reaches h_{t-1} (c_{t-1}) directly: dh keeps the latter
    for the next launch (CARRY in `_dh_from_next`), dc adds it. c̃ = f c + i g is recomputed
    from the gates (cs holds the zoned c)."""
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
        # dm = dh W_hr: W_hr^T (rows o_h = columns of W_hr) times dh^T, over P
        b_dm = _mm_tile(
            tl.zeros([BLOCK_H, BLOCK_B], dtype=ACC), w_hr, dhs + t64 * B * R, 1, H, R,
            o_h, m_h, o_b, m_b, R, DOT_PREC, BLOCK_K,
        )  # fmt: skip
    else:
        if USE_NEXT:
            t_next = t - 1 if REVERSE else t + 1
            b_dm = _dh_from_next(
                dgx, w_hh, dh, lengths, drop, t_next, o_h, m_h, o_b, m_b, B, G * H, R,
                ACC, DOT_PREC, BLOCK_H, BLOCK_B, BLOCK_K, HAS_LEN, HAS_DROP, ZONE_H,
            )  # fmt: skip
            if not ZONE_H:
                tl.store(dh + o_c, b_dm, mask=m_hb)
        else:
            b_dm = tl.load(dh + o_c, mask=m_hb, other=0.0)
        b_tot = b_dm + tl.load(dy + t64 * B * R + o_c, mask=m_hb, other=0.0).to(ACC)
        if ZONE_H:
            b_d = _zoneout_factor(rng, t, z_stream, o_h, o_b, R, z_h, thr_h, 0, HAS_RNG, ACC)
            m_now = _live(lengths, t, o_b, m_b, HAS_LEN)
            tl.store(dh + o_c, tl.where(m_now, b_d * b_tot, b_dm), mask=m_hb)
            b_tot = (1.0 - b_d) * b_tot
        b_dm = b_tot

    o_gx = t64 * B * G * H + o_b[None, :] * (G * H) + o_h[:, None]
    b_i, b_f, b_g, b_o, b_cp, b_c = _lstm_load_saved(
        gates + o_gx, cs, s_in, s_out, o_c, m_hb, B, H, COUPLED, ACC
    )
    if ZONE_C:
        b_c = b_f * b_cp + b_i * b_g  # the candidate c̃ (cs holds the zoned state)
    b_dc = tl.load(dc + o_c, mask=m_hb, other=0.0)
    b_pi, b_pf, b_po = _lstm_peepholes(w_ch, o_h, m_h, H, COUPLED, HAS_PEEP, ACC)
    m_live = _live(lengths, t, o_b, m_b, HAS_LEN)
    if ZONE_C:
        b_dz = _zoneout_factor(rng, t, z_stream, o_h, o_b, H, z_c, thr_c, 1, HAS_RNG, ACC)
        b_dcp = _lstm_bwd_step(
            dgx + o_gx, b_dm, (1.0 - b_dz) * b_dc, b_i, b_f, b_g, b_o, b_cp, b_c, b_pi, b_pf,
            b_po, m_live, m_hb, H, COUPLED, HAS_PEEP,
        )  # fmt: skip
        b_dc = tl.where(m_live, b_dcp + b_dz * b_dc, b_dc)
    else:
        b_dc = _lstm_bwd_step(
            dgx + o_gx, b_dm, b_dc, b_i, b_f, b_g, b_o, b_cp, b_c, b_pi, b_pf, b_po, m_live,
            m_hb, H, COUPLED, HAS_PEEP,
        )  # fmt: skip
    tl.store(dc + o_c, b_dc, mask=m_hb)


@triton.heuristics(
    {
        "HAS_PEEP": lambda a: a["w_ch"] is not None,
        "HAS_LEN": lambda a: a["lengths"] is not None,
        "HAS_PROJ": lambda a: a["w_hr"] is not None,
        "STORE_GATES": lambda a: a["gates"] is not None,
    }
)
@triton.jit
def _lstm_fwd_persistent_kernel(
    gx,  # (T, B, G*H) input dtype: x W_ih^T + b_ih + b_hh, gate row blocks in G order
    hs,  # (T+1, B, R) input dtype: the initial state in place; every state written
    cs,  # (T+1, B, H) ACC: the initial cell state in place; every c written
    y,  # (T, B, R) input dtype
    gates,  # (T, B, G*H) ACC or None: activated gates, kept for backward
    ms,  # (T, B, H) input dtype, with projection: m of every step (read back by all programs)
    w_hh,  # (G*H, R) input dtype
    w_hr,  # (P, H) input dtype or None
    w_ch,  # (3*H,) (i, f, o), or (2*H,) (f, o) when coupled, input dtype, or None
    lengths,  # (B,) int64 or None
    cnt,  # (1,) int32, zeroed: the grid barrier's counter
    T,
    B,
    H,
    R,
    G: tl.constexpr,
    COUPLED: tl.constexpr,
    REVERSE: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_H: tl.constexpr,  # units (all gates) per program
    BLOCK_P: tl.constexpr,  # rows of h per program, with projection
    BLOCK_B: tl.constexpr,
    BLOCK_R: tl.constexpr,  # power of two >= R: h W_hh^T is one split-K product over R
    BLOCK_HK: tl.constexpr,  # power of two >= H: m W_hr^T is one split-K product over H
    SPLIT_R: tl.constexpr,  # chunks of the reduction over R
    SPLIT_HK: tl.constexpr,  # chunks of the reduction over H
    HAS_PEEP: tl.constexpr,
    HAS_LEN: tl.constexpr,
    HAS_PROJ: tl.constexpr,
    STORE_GATES: tl.constexpr,
):
    """The whole forward sequence; program (i_u, i_b) owns units o_h (with projection also rows
    o_q of h) of sequences o_b. Barrier k (1-based) waits for k * num_programs arrivals."""
    GF: tl.constexpr = 0 if COUPLED else 1
    PH: tl.constexpr = 2 if HAS_PROJ else 1  # barriers per step
    i_u, i_b = tl.program_id(0), tl.program_id(1)
    n_prog = tl.num_programs(0) * tl.num_programs(1)
    o_h = i_u * BLOCK_H + tl.arange(0, BLOCK_H)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    m_h, m_b = o_h < H, o_b < B
    m_hb = m_h[:, None] & m_b[None, :]

    # rows o_h of every gate block of W_hh, split over R: loaded once, kept on chip
    if not COUPLED:
        b_wi = _load_split_a(w_hh, o_h, m_h, R, 1, R, SPLIT_R, BLOCK_R)
    b_wf = _load_split_a(w_hh + GF * H * R, o_h, m_h, R, 1, R, SPLIT_R, BLOCK_R)
    b_wg = _load_split_a(w_hh + (GF + 1) * H * R, o_h, m_h, R, 1, R, SPLIT_R, BLOCK_R)
    b_wo = _load_split_a(w_hh + (GF + 2) * H * R, o_h, m_h, R, 1, R, SPLIT_R, BLOCK_R)
    b_pi, b_pf, b_po = _lstm_peepholes(w_ch, o_h, m_h, H, COUPLED, HAS_PEEP, ACC)
    if HAS_PROJ:
        # rows o_q of W_hr, split over H: this program's rows of h = m W_hr^T
        o_q = i_u * BLOCK_P + tl.arange(0, BLOCK_P)
        m_q = o_q < R
        b_wr = _load_split_a(w_hr, o_q, m_q, H, 1, H, SPLIT_HK, BLOCK_HK)
    else:
        o_q, m_q = o_h, m_h
    m_qb = m_q[:, None] & m_b[None, :]
    o_hq = o_b[None, :] * R + o_q[:, None]  # this program's elements of a (B, R) slab
    o_c = o_b[None, :] * H + o_h[:, None]  # ... of a (B, H) slab
    o_g = o_b[None, :] * (G * H) + o_h[:, None]  # ... of gate block 0 of a (B, G*H) slab

    s0 = tl.cast(T, tl.int64) if REVERSE else 0  # int64: T*B*H can pass 2**31
    b_c = tl.load(cs + s0 * B * H + o_c, mask=m_hb, other=0.0)  # c, ACC, kept in registers
    b_h = tl.load(hs + s0 * B * R + o_hq, mask=m_qb, other=0.0)  # own rows of h
    # num_stages=1: no software pipelining, which could issue the next step's loads of
    # other programs' data before that step's barrier
    for s in tl.range(0, T, num_stages=1):
        t = T - 1 - s if REVERSE else s
        t64 = t.to(tl.int64)
        s_in = t64 + 1 if REVERSE else t64
        s_out = t64 if REVERSE else t64 + 1
        # this program's inputs of the step do not depend on the others: loaded before the wait
        p_gx = gx + t64 * B * G * H + o_g
        b_ai, b_af, b_ag, b_ao = _load_gate_blocks(p_gx, m_hb, H, COUPLED, ACC)
        m_live = _live(lengths, t, o_b, m_b, HAS_LEN)
        if s > 0:
            _grid_barrier(cnt, PH * s * n_prog)  # h_{t-1} of every unit is written
        b_ht = _load_split_b(hs + s_in * B * R, o_b, m_b, R, R, SPLIT_R, BLOCK_R)
        if not COUPLED:
            b_ai = _dot_split(b_wi, b_ht, b_ai, DOT_PREC)
        b_af = _dot_split(b_wf, b_ht, b_af, DOT_PREC)
        b_ag = _dot_split(b_wg, b_ht, b_ag, DOT_PREC)
        b_ao = _dot_split(b_wo, b_ht, b_ao, DOT_PREC)
        b_i, b_f, b_g, b_o, b_cn, b_m = _lstm_cell(
            b_ai, b_af, b_ag, b_ao, b_c, b_pi, b_pf, b_po, COUPLED, HAS_PEEP
        )
        b_c = tl.where(m_live, b_cn, b_c)
        tl.store(cs + s_out * B * H + o_c, b_c, mask=m_hb)
        if STORE_GATES:
            _store_gate_blocks(gates + t64 * B * G * H + o_g, b_i, b_f, b_g, b_o, m_hb, H, COUPLED)
        if HAS_PROJ:
            p_m = ms + t64 * B * H
            tl.store(p_m + o_c, b_m.to(ms.dtype.element_ty), mask=m_hb)
            _grid_barrier(cnt, (PH * s + 1) * n_prog)  # m_t of every unit is written
            b_mt = _load_split_b(p_m, o_b, m_b, H, H, SPLIT_HK, BLOCK_HK)
            b_hn = _dot_split(b_wr, b_mt, tl.zeros([BLOCK_P, BLOCK_B], dtype=ACC), DOT_PREC)
        else:
            b_hn = b_m
        b_hn = b_hn.to(hs.dtype.element_ty)
        b_h = tl.where(m_live, b_hn, b_h)
        tl.store(hs + s_out * B * R + o_hq, b_h, mask=m_qb)
        tl.store(y + t64 * B * R + o_hq, tl.where(m_live, b_hn, 0.0), mask=m_qb)


@triton.heuristics(
    {
        "HAS_PEEP": lambda a: a["w_ch"] is not None,
        "HAS_LEN": lambda a: a["lengths"] is not None,
        "HAS_PROJ": lambda a: a["w_hr"] is not None,
    }
)
@triton.jit
def _lstm_bwd_persistent_kernel(
    dgx,  # (T, B, G*H) input dtype, out: da of every step (zero when dead), read back by all
    gates,  # (T, B, G*H) ACC: activated gates from forward
    cs,  # (T+1, B, H) ACC: cell states in time order
    dh,  # (B, R) ACC, in/out: dh_T; on exit the gradient reaching the state after the last step
    dc,  # (B, H) ACC, in/out: dc_T; on exit dc_0
    dy,  # (T, B, R) input dtype
    dhs,  # (T, B, P) input dtype, out, with projection: total gradient of h_t (read back by all)
    w_hh,  # (G*H, R) input dtype
    w_hr,  # (P, H) input dtype or None
    w_ch,  # (3*H,) or (2*H,) input dtype, or None: peepholes
    lengths,  # (B,) int64 or None
    cnt,  # (1,) int32, zeroed: the grid barrier's counter
    T,
    B,
    H,
    R,
    G: tl.constexpr,
    COUPLED: tl.constexpr,
    REVERSE: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_R: tl.constexpr,  # power of two >= R: dm = dh W_hr is one split-K product over P
    BLOCK_HK: tl.constexpr,  # power of two >= H: da_g W_hh[g] is one split-K product over H
    SPLIT_R: tl.constexpr,
    SPLIT_HK: tl.constexpr,
    HAS_PEEP: tl.constexpr,
    HAS_LEN: tl.constexpr,
    HAS_PROJ: tl.constexpr,
):
    """The whole reverse sequence; program (i_u, i_b) owns units o_h and columns o_q of W_hh
    (o_q = o_h without projection) for sequences o_b."""
    GF: tl.constexpr = 0 if COUPLED else 1
    PH: tl.constexpr = 2 if HAS_PROJ else 1
    BLOCK_Q: tl.constexpr = BLOCK_P if HAS_PROJ else BLOCK_H
    i_u, i_b = tl.program_id(0), tl.program_id(1)
    n_prog = tl.num_programs(0) * tl.num_programs(1)
    o_h = i_u * BLOCK_H + tl.arange(0, BLOCK_H)
    o_q = i_u * BLOCK_Q + tl.arange(0, BLOCK_Q)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    m_h, m_q, m_b = o_h < H, o_q < R, o_b < B
    m_hb = m_h[:, None] & m_b[None, :]
    m_qb = m_q[:, None] & m_b[None, :]

    # columns o_q of every gate block of W_hh (W_g^T rows), split over H: loaded once
    if not COUPLED:
        b_wti = _load_split_a(w_hh, o_q, m_q, 1, R, H, SPLIT_HK, BLOCK_HK)
    b_wtf = _load_split_a(w_hh + GF * H * R, o_q, m_q, 1, R, H, SPLIT_HK, BLOCK_HK)
    b_wtg = _load_split_a(w_hh + (GF + 1) * H * R, o_q, m_q, 1, R, H, SPLIT_HK, BLOCK_HK)
    b_wto = _load_split_a(w_hh + (GF + 2) * H * R, o_q, m_q, 1, R, H, SPLIT_HK, BLOCK_HK)
    b_pi, b_pf, b_po = _lstm_peepholes(w_ch, o_h, m_h, H, COUPLED, HAS_PEEP, ACC)
    if HAS_PROJ:
        # columns o_h of W_hr (W_hr^T rows), split over P: dm = dh W_hr for units o_h
        b_wrt = _load_split_a(w_hr, o_h, m_h, 1, H, R, SPLIT_R, BLOCK_R)
    o_dq = o_b[None, :] * R + o_q[:, None]  # this program's elements of a (B, R) slab
    o_c = o_b[None, :] * H + o_h[:, None]
    o_g = o_b[None, :] * (G * H) + o_h[:, None]

    b_dh = tl.load(dh + o_dq, mask=m_qb, other=0.0)  # gradient reaching h after the step, ACC
    b_dc = tl.load(dc + o_c, mask=m_hb, other=0.0)
    # num_stages=1: no software pipelining, which could issue the next step's loads of
    # other programs' data before that step's barrier
    for k in tl.range(0, T, num_stages=1):
        t = k if REVERSE else T - 1 - k
        t64 = t.to(tl.int64)
        s_in = t64 + 1 if REVERSE else t64
        s_out = t64 if REVERSE else t64 + 1
        # forward's buffers and dy: independent of the other programs, loaded before the wait
        b_i, b_f, b_g, b_o, b_cp, b_c = _lstm_load_saved(
            gates + t64 * B * G * H + o_g, cs, s_in, s_out, o_c, m_hb, B, H, COUPLED, ACC
        )
        b_dy = tl.load(dy + t64 * B * R + o_dq, mask=m_qb, other=0.0).to(ACC)
        m_live = _live(lengths, t, o_b, m_b, HAS_LEN)
        if k > 0:
            _grid_barrier(cnt, PH * k * n_prog)  # da_{t_next} of every unit is written
            t_next = t - 1 if REVERSE else t + 1
            p_da = dgx + t_next.to(tl.int64) * B * G * H
            b_rec = tl.zeros([BLOCK_Q, BLOCK_B], dtype=ACC)
            if not COUPLED:
                b_da = _load_split_b(p_da, o_b, m_b, G * H, H, SPLIT_HK, BLOCK_HK)
                b_rec = _dot_split(b_wti, b_da, b_rec, DOT_PREC)
            b_da = _load_split_b(p_da + GF * H, o_b, m_b, G * H, H, SPLIT_HK, BLOCK_HK)
            b_rec = _dot_split(b_wtf, b_da, b_rec, DOT_PREC)
            b_da = _load_split_b(p_da + (GF + 1) * H, o_b, m_b, G * H, H, SPLIT_HK, BLOCK_HK)
            b_rec = _dot_split(b_wtg, b_da, b_rec, DOT_PREC)
            b_da = _load_split_b(p_da + (GF + 2) * H, o_b, m_b, G * H, H, SPLIT_HK, BLOCK_HK)
            b_rec = _dot_split(b_wto, b_da, b_rec, DOT_PREC)
            # a dead step t_next passed dh through unchanged
            b_dh = tl.where(_live(lengths, t_next, o_b, m_b, HAS_LEN), b_rec, b_dh)
        if HAS_PROJ:
            p_dh = dhs + t64 * B * R
            b_dq = tl.where(m_live, b_dh + b_dy, 0.0)
            tl.store(p_dh + o_dq, b_dq.to(dhs.dtype.element_ty), mask=m_qb)
            _grid_barrier(cnt, (PH * k + 1) * n_prog)  # dh_t of every row of h is written
            b_dht = _load_split_b(p_dh, o_b, m_b, R, R, SPLIT_R, BLOCK_R)
            b_dm = _dot_split(b_wrt, b_dht, tl.zeros([BLOCK_H, BLOCK_B], dtype=ACC), DOT_PREC)
        else:
            b_dm = b_dh + b_dy
        b_dc = _lstm_bwd_step(
            dgx + t64 * B * G * H + o_g, b_dm, b_dc, b_i, b_f, b_g, b_o, b_cp, b_c, b_pi, b_pf,
            b_po, m_live, m_hb, H, COUPLED, HAS_PEEP,
        )  # fmt: skip
    tl.store(dh + o_dq, b_dh, mask=m_qb)
    tl.store(dc + o_c, b_dc, mask=m_hb)


# =========================================================================== launchers


def _state_index(T: int, reverse: bool) -> tuple[int, int]:
    """(index of the initial state, index of the final state) in the (T+1, ...) buffers."""
    return (T, 0) if reverse else (0, T)


def _dims(x, w_hh, coupled: bool):
    """(T, B, G*H, G, H, R) from a (T, B, G*H) buffer (gx, gates or dgx) and W_hh (G*H, R)."""
    T, B, GH = x.shape
    G = 3 if coupled else 4
    return T, B, GH, G, GH // G, w_hh.shape[1]


def _stepwise_meta(B: int, N: int, K: int, block: str):
    """(grid, launch constexprs) of a stepwise kernel whose programs own `block` (a BLOCK_*
    name) of N rows (units or rows of h) for BLOCK_B sequences, reducing over K in BLOCK_K."""
    BLOCK_B = block_b(B)
    n_b = triton.cdiv(B, BLOCK_B)
    BLOCK_N = block_h(N, n_b)
    meta = {block: BLOCK_N, "BLOCK_B": BLOCK_B, "BLOCK_K": block_k(K)}
    return (triton.cdiv(N, BLOCK_N), n_b), dict(meta, num_warps=num_warps(BLOCK_N, BLOCK_B))


def _persistent_meta(H: int, B: int, R: int, proj: bool, device):
    """(grid, tile constexprs) of the persistent kernels, forward and backward alike."""
    sm = 1 if is_interpreter() else device_props(device).sm_count
    BLOCK_H, BLOCK_P, BLOCK_B, grid = persistent_tiles(H, B, R if proj else 0, sm)
    BLOCK_R, BLOCK_HK = max(16, next_pow2(R)), max(16, next_pow2(H))
    meta = dict(
        BLOCK_H=BLOCK_H, BLOCK_P=BLOCK_P, BLOCK_B=BLOCK_B, BLOCK_R=BLOCK_R, BLOCK_HK=BLOCK_HK,
        SPLIT_R=split_k(BLOCK_R, PERSISTENT_WARPS), SPLIT_HK=split_k(BLOCK_HK, PERSISTENT_WARPS),
    )  # fmt: skip
    return grid, meta


def _lstm_fwd_persistent(gx, hs, cs, y, gates, ms, w_hh, w_hr, w_ch, lengths, reverse, coupled):
    """One persistent launch over the sequence; False (nothing run) if it cannot run safely."""
    T, B, GH, G, H, R = _dims(gx, w_hh, coupled)
    proj = w_hr is not None
    grid, meta = _persistent_meta(H, B, R, proj, gx.device)
    onchip = G * meta["BLOCK_H"] * meta["BLOCK_R"] + (
        meta["BLOCK_P"] * meta["BLOCK_HK"] if proj else 0
    )
    return launch_persistent(
        _lstm_fwd_persistent_kernel, grid, barriers=(2 * T - 1 if proj else T - 1),
        onchip_bytes=onchip * gx.element_size(), device=gx.device,
        gx=gx, hs=hs, cs=cs, y=y, gates=gates, ms=ms, w_hh=w_hh, w_hr=w_hr, w_ch=w_ch,
        lengths=lengths, T=T, B=B, H=H, R=R, G=G, COUPLED=coupled, REVERSE=reverse,
        ACC=_TL_ACC[cs.dtype], DOT_PREC=dot_precision(gx.dtype), **meta,
    )  # fmt: skip


def _has_options(rng, zoneout_c, zoneout_h, drop, ln_hh) -> bool:
    """Whether a call uses zoneout, recurrent dropout or layer norm."""
    on = zoneout_c > 0 or zoneout_h > 0
    return on or rng is not None or drop is not None or ln_hh is not None


def _option_args(rng, zoneout_c, zoneout_h, stream, drop, proj: bool):
    """Keyword arguments of the stepwise kernels for zoneout and recurrent dropout: (those of the
    cell kernels, those of the projection's forward and dh kernels). With a projection h is
    zoned by the latter (z_h = 0 for the cell kernels)."""
    z_h = float(zoneout_h)
    common = dict(rng=rng, z_stream=int(stream))
    cell = dict(common, drop=drop, z_c=float(zoneout_c), z_h=0.0 if proj else z_h,
                thr_c=zoneout_threshold(zoneout_c), thr_h=zoneout_threshold(zoneout_h))  # fmt: skip
    return cell, dict(common, z_h=z_h, thr_h=zoneout_threshold(zoneout_h))


def lstm_fwd(
    gx, h0, c0, w_hh, w_hr, w_ch, lengths, reverse, coupled, store_gates, rng=None,
    zoneout_c=0.0, zoneout_h=0.0, stream=0, drop=None, ln_hh=None, ln_c_w=None, ln_c_b=None, *,
    persistent=False,
):  # fmt: skip
    """Runs the forward recurrence; returns (y, hs, cs, gates, ms) (see the file docstring).

    Options (stepwise kernels only): zoneout of c and h (masks from `rng` (2,) int64 in
    training, the expectation without it) in layer-direction `stream`, recurrent dropout's
    (B, R) mask `drop` in the accumulation dtype.
    persistent=True: one persistent launch when it can run safely, else the stepwise loop.
    """
    if ln_hh is not None:
        raise NotImplementedError("layer norm in the stepwise LSTM kernels")
    # the persistent kernels have none of the options: the stepwise loop runs them
    persistent = persistent and not _has_options(rng, zoneout_c, zoneout_h, drop, ln_hh)
    T, B, GH, G, H, R = _dims(gx, w_hh, coupled)
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
    if persistent and _lstm_fwd_persistent(
        gx, hs, cs, y, gates, ms, w_hh, w_hr, w_ch, lengths, reverse, coupled
    ):
        return y, hs, cs, gates, ms

    kw = dict(REVERSE=reverse, ACC=_TL_ACC[acc], DOT_PREC=dot_precision(dt))
    opt_cell, opt_proj = _option_args(rng, zoneout_c, zoneout_h, stream, drop, w_hr is not None)
    cell_grid, cell_kw = _stepwise_meta(B, H, R, "BLOCK_H")
    cell = step_launcher(
        _lstm_fwd_cell_kernel, cell_grid, ("t",), gx=gx, hs=hs, cs=cs, y=y, gates=gates, ms=ms,
        w_hh=w_hh, w_ch=w_ch, lengths=lengths, B=B, H=H, R=R, G=G, COUPLED=coupled, **kw,
        **cell_kw, **opt_cell,
    )  # fmt: skip
    if w_hr is not None:
        proj_grid, proj_kw = _stepwise_meta(B, R, H, "BLOCK_P")
        proj = step_launcher(
            _lstm_fwd_proj_kernel, proj_grid, ("t",), ms=ms, w_hr=w_hr, hs=hs, y=y,
            lengths=lengths, B=B, H=H, P=R, **kw, **proj_kw, **opt_proj,
        )  # fmt: skip
    for s in range(T):
        t = T - 1 - s if reverse else s
        cell(t)
        if w_hr is not None:
            proj(t)
    return y, hs, cs, gates, ms


def _lstm_bwd_persistent(dy, dh, dc, dgx, dhs, cs, gates, w_hh, w_hr, w_ch, lengths, reverse,
                         coupled):  # fmt: skip
    """One persistent launch over the reversed sequence; False (nothing run) if it cannot run
    safely. Leaves in dh and dc what the stepwise loop leaves there."""
    T, B, GH, G, H, R = _dims(gates, w_hh, coupled)
    proj = w_hr is not None
    grid, meta = _persistent_meta(H, B, R, proj, dy.device)
    BLOCK_Q = meta["BLOCK_P"] if proj else meta["BLOCK_H"]
    onchip = G * BLOCK_Q * meta["BLOCK_HK"] + (meta["BLOCK_H"] * meta["BLOCK_R"] if proj else 0)
    return launch_persistent(
        _lstm_bwd_persistent_kernel, grid, barriers=(2 * T - 1 if proj else T - 1),
        onchip_bytes=onchip * dy.element_size(), device=dy.device,
        dgx=dgx, gates=gates, cs=cs, dh=dh, dc=dc, dy=dy, dhs=dhs, w_hh=w_hh, w_hr=w_hr,
        w_ch=w_ch, lengths=lengths, T=T, B=B, H=H, R=R, G=G, COUPLED=coupled,
        REVERSE=reverse, ACC=_TL_ACC[cs.dtype], DOT_PREC=dot_precision(dy.dtype), **meta,
    )  # fmt: skip


def lstm_bwd(
    dy, dhT, dcT, hs, cs, gates, ms, w_hh, w_hr, w_ch, lengths, reverse, coupled, needs,
    aux=None, rng=None, zoneout_c=0.0, zoneout_h=0.0, stream=0, drop=None, ln_hh=None,
    ln_c_w=None, ln_c_b=None, *, persistent=False,
):  # fmt: skip
    """Reverse-time loop; returns (dgx, dh0, dc0, dw_hh, dw_hr, dw_ch) (None where not needed),
    and the layer-norm gradients (dln_hh, dln_c_w, dln_c_b) when `needs` has their 3 flags.

    The options as `lstm_fwd`'s (the same rng, stream and mask: the zoneout masks are drawn
    again, not stored). persistent=True: one persistent launch when it can run safely, else the
    stepwise loop.
    """
    if ln_hh is not None:
        raise NotImplementedError("layer norm in the stepwise LSTM kernels")
    options = (rng, zoneout_c, zoneout_h, stream, drop)
    # the persistent kernels have none of the options: the stepwise loop runs them
    persistent = persistent and not _has_options(rng, zoneout_c, zoneout_h, drop, ln_hh)
    T, B, GH = gates.shape
    R = w_hh.shape[1]
    dt, acc = hs.dtype, cs.dtype
    dev = hs.device

    dgx = new_output((T, B, GH), dt, dev)
    # (B, R) and (B, H), updated in place by the kernels: always fresh copies, never the caller's
    dh = dhT.to(dtype=acc, memory_format=torch.contiguous_format, copy=True)
    dc = dcT.to(dtype=acc, memory_format=torch.contiguous_format, copy=True)
    dhs = new_output((T, B, R), dt, dev) if w_hr is not None else None
    if not (
        persistent
        and _lstm_bwd_persistent(
            dy, dh, dc, dgx, dhs, cs, gates, w_hh, w_hr, w_ch, lengths, reverse, coupled
        )
    ):
        _lstm_bwd_stepwise(dy, dh, dc, dgx, dhs, cs, gates, w_hh, w_hr, w_ch, lengths, reverse,
                           coupled, options)  # fmt: skip
    grads = _lstm_bwd_weights(dgx, dh, dc, dhs, hs, cs, ms, w_hh, lengths, reverse, coupled,
                              needs[:6], gates, options)  # fmt: skip
    return grads + (None,) * (len(needs) - 6)


def _lstm_bwd_stepwise(dy, dh, dc, dgx, dhs, cs, gates, w_hh, w_hr, w_ch, lengths, reverse,
                       coupled, options=(None, 0.0, 0.0, 0, None)):  # fmt: skip
    """One launch (two with a projection) per step, reverse time order."""
    T, B, GH, G, H, R = _dims(gates, w_hh, coupled)
    kw = dict(REVERSE=reverse, ACC=_TL_ACC[cs.dtype], DOT_PREC=dot_precision(dy.dtype))
    opt_cell, opt_dh = _option_args(*options, w_hr is not None)
    cell_grid, cell_kw = _stepwise_meta(B, H, R if w_hr is not None else GH, "BLOCK_H")
    cell_kw.update(
        dgx=dgx, gates=gates, cs=cs, dc=dc, dh=dh, dy=dy, dhs=dhs, w_hh=w_hh, w_hr=w_hr,
        w_ch=w_ch, lengths=lengths, B=B, H=H, R=R, G=G, COUPLED=coupled, **kw, **opt_cell,
    )  # fmt: skip
    if w_hr is not None:
        dh_grid, dh_kw = _stepwise_meta(B, R, GH, "BLOCK_P")
        dh_kw.update(dgx=dgx, w_hh=w_hh, dh=dh, dy=dy, dhs=dhs, lengths=lengths, B=B, GH=GH, P=R,
                     drop=options[4], **kw, **opt_dh)  # fmt: skip
    # the first step processed (s = T - 1) has no later step to take dh from: its own variant
    t = 0 if reverse else T - 1
    if w_hr is not None:
        _lstm_bwd_dh_kernel[dh_grid](t=t, USE_NEXT=False, **dh_kw)
        dh_step = step_launcher(_lstm_bwd_dh_kernel, dh_grid, ("t",), USE_NEXT=True, **dh_kw)
    _lstm_bwd_cell_kernel[cell_grid](t=t, USE_NEXT=False, **cell_kw)
    cell = step_launcher(_lstm_bwd_cell_kernel, cell_grid, ("t",), USE_NEXT=True, **cell_kw)
    for s in range(T - 2, -1, -1):
        t = T - 1 - s if reverse else s
        if w_hr is not None:
            dh_step(t)
        cell(t)


def _lstm_bwd_weights(dgx, dh, dc, dhs, hs, cs, ms, w_hh, lengths, reverse, coupled, needs,
                      gates=None, options=(None, 0.0, 0.0, 0, None)):  # fmt: skip
    """After the reverse loop: dh0, dc0 and the weight gradients, one GEMM / reduction each over
    all steps (dead steps have da = 0). Returns (dgx, dh0, dc0, dw_hh, dw_hr, dw_ch).

    Recurrent dropout: W_hh met h ⊙ mask. Zoneout of h: dh holds what the first step processed
    passed to h0 past its cell. Zoneout of c: the peephole of o saw the candidate c̃ = f c + i g
    (recomputed from `gates`), not the zoned state in cs."""
    T, B, GH, G, H, R = _dims(dgx, w_hh, coupled)
    dt, acc = hs.dtype, cs.dtype
    need_gx, need_h0, need_c0, need_whh, need_whr, need_wch = needs
    _, zoneout_c, zoneout_h, _, drop = options
    h_prev = hs[1:] if reverse else hs[:-1]  # (T, B, R): the state each step read
    c_prev = cs[1:] if reverse else cs[:-1]
    c_new = cs[:-1] if reverse else cs[1:]
    dh0 = dc0 = dw_hh = dw_hr = dw_ch = None
    if need_h0:
        t0 = T - 1 if reverse else 0  # the first step processed read h0
        dh0 = dgx[t0].to(acc) @ w_hh.to(acc)
        if drop is not None:
            dh0 = dh0 * drop
        if zoneout_h > 0:
            dh0 = dh0 + dh
        if lengths is not None:
            dh0 = torch.where((lengths > t0)[:, None], dh0, dh)
        dh0 = dh0.to(dt)
    if need_c0:
        dc0 = dc.to(dt)
    if need_whh:
        if drop is not None:
            h_prev = (h_prev.to(acc) * drop).to(dt)
        dw_hh = dgx.reshape(T * B, GH).t() @ h_prev.reshape(T * B, R)
    if need_whr:
        dw_hr = dhs.reshape(T * B, R).t() @ ms.reshape(T * B, H)
    if need_wch:
        da = dgx.view(T, B, G, H).to(acc)
        gf = 0 if coupled else 1
        if zoneout_c > 0:
            blocks = gates.view(T, B, G, H)
            i = 1.0 - blocks[:, :, 0] if coupled else blocks[:, :, 0]
            c_new = blocks[:, :, gf] * c_prev + i * blocks[:, :, gf + 1]
        parts = [] if coupled else [(da[:, :, 0] * c_prev).sum((0, 1))]
        parts += [(da[:, :, gf] * c_prev).sum((0, 1)), (da[:, :, gf + 2] * c_new).sum((0, 1))]
        dw_ch = torch.cat(parts).to(dt)
    return (dgx if need_gx else None), dh0, dc0, dw_hh, dw_hr, dw_ch
