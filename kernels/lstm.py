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
`_lstm_bwd_persistent_kernel`. Program i owns a block of units, all their gates, for every
sequence (the batch is looped over in chunks inside), so the grid holds W_hh once. It loads its
slice once before the time loop (forward: its units' rows of every gate block; backward: their
columns), interleaved unit-major on the MMA's M side (row 4 u + g), and keeps it on chip
(Triton puts it in shared memory, where sm_90's wgmma reads it); programs meet at a grid
barrier each step, after which h_{t-1} (backward: da_{t+1}) of all units is read from L2, every
chunk of it before the first product. One step is one plain 2-D product per batch chunk:
forward (4 BLOCK_U, R) x (R, BLOCK_B), split into the gate tiles; backward (4 BLOCK_U, H) x
(H, 4 BLOCK_B) with the gates' da side by side on N, of which the diagonal gate blocks are
summed (`_common._diag_sum`). Reductions run over the true H (or P) in power-of-two chunks, not
padded. c (backward dh, dc) passes from step to step through its buffer (cs, dh, dc). With a
projection a step has two phases and two barriers: forward m_t for the unit block, then
h_t = m_t W_hr^T for a block of P rows; backward dh_t over a block of P, then dm = dh_t W_hr for
the unit block; the options add phases (below). The launcher falls back to the stepwise kernels
when the launch cannot be made safe (_common.launch_persistent).

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

Options (both strategies, the same buffers: either backward accepts either forward):
    zoneout     c_t = d_c ⊙ c_{t-1} + (1 - d_c) ⊙ c̃_t and h_t = d_h ⊙ h_{t-1} + (1 - d_h) ⊙ h̃_t,
                h̃ formed from the candidate c̃ (Krueger et al. 2016); d the 0/1 masks of
                _common._zoneout_keep (Philox, drawn again in backward) in training, the
                probability in evaluation; y_t = h_t; cs and hs hold the zoned states. With a
                projection h is zoned where it is formed (the projection's kernel or phase).
                Backward splits the gradient of a zoned state into (1 - d) ⊙ it, for the cell,
                and d ⊙ it, which reaches the previous state directly (dh keeps it from one
                step to the next, dc adds it); c̃ = f c + i g is recomputed from the gates.
    recurrent dropout   (h ⊙ m) W_hh^T with one mask m (B, R) of 0 and 1/(1-p) per sequence
                (Gal & Ghahramani 2016): backward multiplies the W_hh part of dh by m, and
                dW_hh pairs da with h ⊙ m. The persistent forward's programs that form h_t also
                store h_t ⊙ m (the (2, B, R) buffer hd, by step parity), which every program's
                next product reads in place of h: no extra operand per step.
    layer norm  a = gx + γ_hh ⊙ û, û = LN(h W_hh^T) over the row's G*H values, and
                h̃ = o ⊙ tanh(γ_c ⊙ LN(c̃) + β_c) (Ba, Kiros & Hinton 2016); why and how a row's
                statistics are reduced across programs: kernels/_common.py, "layer norm".
                aux (T, B, G*H + 3) fp32: û | rstd | mean_c | rstd_c.
                Stepwise forward: phase 1 `_common._ln_rec_kernel`, the cell kernel (which leaves
                c̃, o and partial statistics of c̃), `_lstm_fwd_ln_out_kernel` (h, or m for the
                projection). Stepwise backward: `_lstm_bwd_ln_out_kernel` (dm -> da_o and dq, the
                gradient of LN_c's output, with row sums), then the cell kernel (LN_c'(dq) into
                dc̃, row sums of γ_hh da); the next step's product runs over LN_hh'(da), formed
                inside it (`_dh_from_next`).
                Persistent: the same phases inside the one launch, a grid barrier before each
                (the reductions across programs); the backward forms du = LN_hh'(da) of its
                units in a last phase (`_common._ln_du`), which the next step's product reads.
Stepwise launches per step: forward 1 (+1 with a projection, +2 with layer norm), backward 1
(+1 with a projection, +1 with layer norm). Persistent grid barriers per step, forward and
backward alike: 1 (+1 with a projection, +1 with LN_hh, +1 with LN_c).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    _diag_sum,
    _dot,
    _dot_tiles,
    _grid_barrier,
    _k_tiles,
    _live,
    _ln_du,
    _ln_gate,
    _ln_partials,
    _ln_rec_kernel,
    _ln_stats,
    _ln_stats_all,
    _ln_sums,
    _ln_sums_all,
    _mm_tile,
    _mm_tile_ln,
    _part_at,
    _sigmoid,
    _split_gates,
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
    num_warps,
    persistent_tile_choices,
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
    ln_hh=None,  # (G*H,) LN_hh's gains (HAS_LN)
    aux=None,  # (T, B, LD) ACC (HAS_LN): û of every step in columns [0, G*H), rstd at G*H
    pb=None,  # (n_pb, B, 2) ACC (HAS_LN): per-program row sums of γ da and γ da û of t_next
    n_pb=0,
    LD=0,
    HAS_LN: tl.constexpr = False,
):
    """(BLOCK_R, BLOCK_B) gradient reaching the state entering step t_next, columns o_r.

    da_{t_next} W_hh[:, o_r] (⊙ the dropout mask) where t_next was live, else dh passed through
    unchanged. CARRY (zoneout of h): dh holds what step t_next passed to h_{t-1} past its cell
    (d ⊙ dh, or dh itself where t_next was dead), added to the product where t_next was live.
    HAS_LN: da is the gradient of LN_hh's output: the product runs over du = LN_hh'(da), formed
    chunk by chunk (`_common._mm_tile_ln`).
    """
    # W_hh^T (rows o_r = columns of W_hh) times da^T, over G*H
    p_da = dgx + t_next.to(tl.int64) * B * GH
    if HAS_LN:
        b_s1, b_s2 = _ln_sums(pb, o_b, m_b, B, n_pb, ACC)
        p_xh = aux + t_next.to(tl.int64) * B * LD
        b_rstd = tl.load(p_xh + o_b * LD + GH, mask=m_b, other=0.0)
        b_acc = _mm_tile_ln(
            tl.zeros([BLOCK_R, BLOCK_B], dtype=ACC), w_hh, p_da, p_xh, ln_hh, 1, R, GH, LD, o_r,
            m_r, o_b, m_b, GH, b_rstd, b_s1 / GH, b_s2 / GH, DOT_PREC, BLOCK_K,
        )  # fmt: skip
    else:
        b_acc = _mm_tile(
            tl.zeros([BLOCK_R, BLOCK_B], dtype=ACC), w_hh, p_da, 1, R, GH, o_r, m_r, o_b, m_b,
            GH, DOT_PREC, BLOCK_K,
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
        "HAS_LN": lambda a: a["ln_hh"] is not None,
        "HAS_LNC": lambda a: a["co"] is not None,
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
    ln_hh,  # (G*H,) input dtype or None: LN_hh's gains (layer norm; its bias is in gx)
    lnb,  # (T or 1, B, LD) ACC, layer norm: u of the step (phase 1) -> û in place, rstd at G*H
    part,  # (n_ln, B, 2) ACC, layer norm: phase 1's partial statistics
    co,  # (B, 2H) ACC or None, LN_c: c̃ and o of the step, for `_lstm_fwd_ln_out_kernel`
    part_c,  # (n_programs(0), B, 2) ACC, LN_c: each program's mean and M2 of its c̃ per row
    t,  # time index of this step
    B,
    H,
    R,
    z_stream,  # layer-direction index in the zoneout masks' counters (not `stream`: reserved)
    z_c,  # zoneout probability of c (ZONE_C: > 0), the expectation's weight in evaluation
    z_h,  # zoneout probability of h (without projection; with one the proj kernel zones h)
    thr_c,  # int32 threshold of c's masks (_common.zoneout_threshold)
    thr_h,
    n_ln,  # number of phase-1 blocks (partials per row)
    ln_bn,  # rows of G*H per phase-1 block
    LD,  # row stride of lnb (G*H + 3)
    ln_ts,  # step stride of lnb (B * LD, or 0 when one slot is reused)
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
    HAS_LN: tl.constexpr,
    HAS_LNC: tl.constexpr,
):
    """One step for units o_h of rows o_b: the gates, c' and (without LN_c) h' and y_t.

    Layer norm: the recurrent products come from phase 1 (`_common._ln_rec_kernel`, which
    applied the dropout mask), normalised here, a = gx + γ ⊙ û. LN_c: h needs the statistics of
    c̃ over all H units, a reduction across programs: this kernel leaves c̃, o and its partial
    statistics, and `_lstm_fwd_ln_out_kernel` forms h (module docstring of kernels/_common.py).
    """
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
    if HAS_LN:
        m_hb0 = m_h[:, None] & m_b[None, :]
        b_mean, b_rstd = _ln_stats(part, o_b, m_b, B, G * H, n_ln, ln_bn, ACC)
        p_u = lnb + t64 * ln_ts + o_b[None, :] * LD + o_h[:, None]
        if not COUPLED:
            b_ai = _ln_gate(p_u + GI * H, ln_hh + GI * H + o_h, m_h, m_hb0, b_mean, b_rstd)
        b_af = _ln_gate(p_u + GF * H, ln_hh + GF * H + o_h, m_h, m_hb0, b_mean, b_rstd)
        b_ag = _ln_gate(p_u + GG * H, ln_hh + GG * H + o_h, m_h, m_hb0, b_mean, b_rstd)
        b_ao = _ln_gate(p_u + GO * H, ln_hh + GO * H + o_h, m_h, m_hb0, b_mean, b_rstd)
        if i_h == 0:
            tl.store(lnb + t64 * ln_ts + o_b * LD + G * H, b_rstd, mask=m_b)
    else:  # the product over R here (with layer norm, phase 1 made it)
        for k in range(0, R, BLOCK_K):
            o_k = k + tl.arange(0, BLOCK_K)
            m_k = o_k < R
            b_ht = tl.load(
                p_h + o_b[None, :] * R + o_k[:, None], mask=m_k[:, None] & m_b[None, :], other=0.0
            )
            if HAS_DROP:
                b_s = tl.load(
                    drop + o_b[None, :] * R + o_k[:, None],
                    mask=m_k[:, None] & m_b[None, :],
                    other=0.0,
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
    if HAS_LNC:  # h needs LN_c's statistics: leave c̃, o and this program's part of them
        tl.store(co + o_c + o_b[None, :] * H, b_c, mask=m_hb)
        tl.store(co + o_c + o_b[None, :] * H + H, b_o, mask=m_hb)
        n_p = tl.minimum(H - i_h * BLOCK_H, BLOCK_H).to(ACC)
        b_cm = tl.sum(tl.where(m_hb, b_c, 0.0), axis=0) / n_p
        b_cd = tl.where(m_hb, b_c - b_cm[None, :], 0.0)
        p_pc = part_c + (i_h * B + o_b) * 2
        tl.store(p_pc, b_cm, mask=m_b)
        tl.store(p_pc + 1, tl.sum(b_cd * b_cd, axis=0), mask=m_b)
    if ZONE_C:  # b_c is the candidate c̃: the output above and backward use it, the state not
        b_c = _zone(b_cp, b_c, rng, t, z_stream, o_h, o_b, H, z_c, thr_c, 1, HAS_RNG)
    tl.store(cs + s_out * B * H + o_c, tl.where(m_live, b_c, b_cp), mask=m_hb)
    if STORE_GATES:
        _store_gate_blocks(gates + o_gx, b_i, b_f, b_g, b_o, m_hb, H, COUPLED)
    if HAS_LNC:
        pass
    elif HAS_PROJ:
        # _lstm_fwd_proj_kernel applies the lengths (and zoneout) to h and y
        tl.store(ms + t64 * B * H + o_c, b_m.to(ms.dtype.element_ty), mask=m_hb)
    else:
        b_hp = tl.load(hs + s_in * B * R + o_c, mask=m_hb)  # R == H here
        if ZONE_H:
            b_m = _zone(b_hp, b_m, rng, t, z_stream, o_h, o_b, R, z_h, thr_h, 0, HAS_RNG)
        b_m = b_m.to(hs.dtype.element_ty)
        tl.store(hs + s_out * B * R + o_c, tl.where(m_live, b_m, b_hp), mask=m_hb)
        tl.store(y + t64 * B * R + o_c, tl.where(m_live, b_m, 0.0), mask=m_hb)


@triton.jit
def _lstm_ln_c_out(co, ln_c_w, ln_c_b, o_h, m_h, o_b, m_hb, b_mean, b_rstd, H, ACC: tl.constexpr):
    """m = o ⊙ tanh(γ_c ⊙ ĉ + β_c), ĉ = (c̃ - mean) rstd, for units o_h of rows o_b (ACC), from
    the step's c̃ and o in co ((B, 2H): c̃ | o per row) and the rows' LN_c statistics."""
    o_co = o_b[None, :] * (2 * H) + o_h[:, None]
    b_c = tl.load(co + o_co, mask=m_hb, other=0.0)
    b_o = tl.load(co + o_co + H, mask=m_hb, other=0.0)
    b_gw = tl.load(ln_c_w + o_h, mask=m_h, other=0.0).to(ACC)[:, None]
    b_gb = tl.load(ln_c_b + o_h, mask=m_h, other=0.0).to(ACC)[:, None]
    return b_o * _tanh((b_c - b_mean[None, :]) * b_rstd[None, :] * b_gw + b_gb)


@triton.heuristics(
    {
        "HAS_LEN": lambda a: a["lengths"] is not None,
        "HAS_RNG": lambda a: a["rng"] is not None,
        "ZONE_H": lambda a: a["z_h"] > 0,
        "HAS_PROJ": lambda a: a["ms"] is not None,
    }
)
@triton.jit(do_not_specialize=["t"])
def _lstm_fwd_ln_out_kernel(
    co,  # (B, 2H) ACC: c̃ and o of the step (the cell kernel's)
    part_c,  # (n_pc, B, 2) ACC: the cell kernel's per-program mean and M2 of c̃
    ln_c_w,  # (H,) input dtype: LN_c's gain
    ln_c_b,  # (H,) input dtype: LN_c's bias
    lnb,  # (T or 1, B, LD) ACC: writes LN_c's mean and rstd at columns G*H + 1, G*H + 2
    hs,  # (T+1, B, R) input dtype: states in time order (without projection)
    y,  # (T, B, R) input dtype (without projection)
    ms,  # (T, B, H) input dtype or None: m, with projection (the proj kernel forms h)
    lengths,  # (B,) int64 or None
    rng,  # (2,) int64 (seed, offset) of the zoneout masks (training), or None
    t,  # time index of this step
    B,
    H,
    GH,  # G*H
    n_pc,  # programs along H of the cell kernel (partials per row)
    LD,  # row stride of lnb
    ln_ts,  # step stride of lnb (B * LD, or 0)
    z_stream,  # layer-direction index in the zoneout masks' counters (not `stream`: reserved)
    z_h,  # zoneout probability of h (without projection)
    thr_h,  # int32 threshold of h's masks
    REVERSE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_B: tl.constexpr,
    HAS_LEN: tl.constexpr,
    HAS_RNG: tl.constexpr,
    ZONE_H: tl.constexpr,
    HAS_PROJ: tl.constexpr,
):
    """The LSTM's output with LN_c, m = o ⊙ tanh(LN_c(c̃)), for units o_h of rows o_b: the
    statistics of c̃ over the H units merged from the cell kernel's partials; then h' (zoneout,
    lengths) and y_t, or m for the projection."""
    i_h, i_b = tl.program_id(0), tl.program_id(1)
    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    m_h, m_b = o_h < H, o_b < B
    m_hb = m_h[:, None] & m_b[None, :]
    t64 = t.to(tl.int64)
    b_mean, b_rstd = _ln_stats(part_c, o_b, m_b, B, H, n_pc, BLOCK_H, ACC)
    if i_h == 0:
        p_st = lnb + t64 * ln_ts + o_b * LD + GH
        tl.store(p_st + 1, b_mean, mask=m_b)
        tl.store(p_st + 2, b_rstd, mask=m_b)
    o_c = o_b[None, :] * H + o_h[:, None]
    b_m = _lstm_ln_c_out(co, ln_c_w, ln_c_b, o_h, m_h, o_b, m_hb, b_mean, b_rstd, H, ACC)
    if HAS_PROJ:
        tl.store(ms + t64 * B * H + o_c, b_m.to(ms.dtype.element_ty), mask=m_hb)
    else:
        s_in = t64 + 1 if REVERSE else t64
        s_out = t64 if REVERSE else t64 + 1
        m_live = _live(lengths, t, o_b, m_b, HAS_LEN)
        b_hp = tl.load(hs + s_in * B * H + o_c, mask=m_hb)  # R == H here
        if ZONE_H:
            b_m = _zone(b_hp, b_m, rng, t, z_stream, o_h, o_b, H, z_h, thr_h, 0, HAS_RNG)
        b_m = b_m.to(hs.dtype.element_ty)
        tl.store(hs + s_out * B * H + o_c, tl.where(m_live, b_m, b_hp), mask=m_hb)
        tl.store(y + t64 * B * H + o_c, tl.where(m_live, b_m, 0.0), mask=m_hb)


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
        "HAS_LN": lambda a: a["ln_hh"] is not None,
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
    ln_hh,  # (G*H,) input dtype or None: LN_hh's gains (layer norm)
    aux,  # (T, B, LD) ACC, layer norm: forward's û and rstd
    pb,  # (n_pb, B, 2) ACC, layer norm: the cell kernel's row sums of γ da, γ da û of t_next
    t,  # time index of this step
    B,
    GH,
    P,
    z_stream,  # layer-direction index in the zoneout masks' counters (not `stream`: reserved)
    z_h,  # zoneout probability of h
    thr_h,  # int32 threshold of h's masks
    n_pb,  # programs along H of the cell kernel (partials per row)
    LD,  # row stride of aux
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
    HAS_LN: tl.constexpr,
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
            ACC, DOT_PREC, BLOCK_P, BLOCK_B, BLOCK_K, HAS_LEN, HAS_DROP, ZONE_H, ln_hh, aux, pb,
            n_pb, LD, HAS_LN,
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


@triton.jit
def _lstm_ln_partials(p_pb, m_pb, ln_hh, p_aux, o_h, m_h, o_b, m_hb, H, LD, b_dai, b_daf, b_dag,
                      b_dao, COUPLED: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Stores this program's row sums over its units and gates of γ da and γ da û at p_pb,
    p_pb + 1 ((BLOCK_B,) pointers, mask m_pb); p_aux: the step's (B, LD) slab of û."""
    GF: tl.constexpr = 0 if COUPLED else 1
    o_u = o_b[None, :] * LD + o_h[:, None]
    b_s1 = tl.zeros([o_b.shape[0]], dtype=ACC)
    b_s2 = tl.zeros([o_b.shape[0]], dtype=ACC)
    for gate in tl.static_range(4):
        if gate == 0:
            b_da = b_dai
        elif gate == 1:
            b_da = b_daf
        elif gate == 2:
            b_da = b_dag
        else:
            b_da = b_dao
        if gate > 0 or not COUPLED:
            col = (gate - 1 + GF) * H  # the gate's block: i 0, f GF, g GF + 1, o GF + 2
            b_v = tl.load(ln_hh + col + o_h, mask=m_h, other=0.0).to(ACC)[:, None] * b_da
            b_v = tl.where(m_hb, b_v, 0.0)
            b_s1 += tl.sum(b_v, axis=0)
            b_s2 += tl.sum(b_v * tl.load(p_aux + col + o_u, mask=m_hb, other=0.0), axis=0)
    tl.store(p_pb, b_s1, mask=m_pb)
    tl.store(p_pb + 1, b_s2, mask=m_pb)


@triton.heuristics(
    {
        "HAS_LEN": lambda a: a["lengths"] is not None,
        "HAS_PROJ": lambda a: a["w_hr"] is not None,
        "HAS_LN": lambda a: a["ln_hh"] is not None,
        **_OPTION_HEURISTICS,
    }
)
@triton.jit(do_not_specialize=["t"])
def _lstm_bwd_ln_out_kernel(
    dgx,  # (T, B, G*H) input dtype: reads t_next (the next step's da), writes da_o at t
    gates,  # (T, B, G*H) ACC: activated gates from forward
    cs,  # (T+1, B, H) ACC: cell states in time order
    dh,  # (B, H) ACC, in/out, without projection: as the cell kernel's
    dy,  # (T, B, H) input dtype, without projection
    dhs,  # (T, B, P) input dtype, with projection: total gradient of h_t
    w_hh,  # (G*H, R) input dtype
    w_hr,  # (P, H) input dtype or None
    lengths,  # (B,) int64 or None
    rng,  # (2,) int64 (seed, offset) of the zoneout masks, or None
    drop,  # (B, R) ACC: recurrent dropout's mask, or None
    ln_hh,  # (G*H,) input dtype or None: LN_hh's gains
    aux,  # (T, B, LD) ACC: forward's û, rstd, LN_c's mean and rstd
    pb,  # (n_pb, B, 2) ACC: the cell kernel's row sums of t_next (LN_hh)
    ln_c_w,  # (H,) input dtype: LN_c's gain
    ln_c_b,  # (H,) input dtype: LN_c's bias
    dqs,  # (T, B, H) ACC, out: dq, the gradient of LN_c's output q
    pc,  # (n_pb, B, 2) ACC, out: per-program row sums of γ_c dq and γ_c dq ĉ
    t,  # time index of this step
    B,
    H,
    R,
    z_stream,  # layer-direction index in the zoneout masks' counters (not `stream`: reserved)
    z_c,  # unused here (the cell kernel's)
    z_h,  # zoneout probability of h (without projection)
    thr_c,
    thr_h,
    n_pb,  # programs along H (partials per row)
    LD,  # row stride of aux (G*H + 3)
    G: tl.constexpr,
    COUPLED: tl.constexpr,
    REVERSE: tl.constexpr,
    USE_NEXT: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_LEN: tl.constexpr,
    HAS_PROJ: tl.constexpr,
    HAS_RNG: tl.constexpr,
    HAS_DROP: tl.constexpr,
    ZONE_C: tl.constexpr,
    ZONE_H: tl.constexpr,
    HAS_LN: tl.constexpr,
):
    """Backward of the LSTM's output with LN_c, m = o ⊙ tanh(q), q = LN_c(c̃), for units o_h of
    rows o_b: dm as the cell kernel forms it (`_lstm_bwd_dm`), then da_o = dm tanh(q) o(1-o)
    (stored in dgx) and dq = dm o (1 - tanh²q) (stored in dqs) with this program's row sums of
    γ_c dq and γ_c dq ĉ: LN_c' needs them over all H units, in the next launch (the cell
    kernel)."""
    i_h, i_b = tl.program_id(0), tl.program_id(1)
    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    m_h, m_b = o_h < H, o_b < B
    m_hb = m_h[:, None] & m_b[None, :]
    t64 = t.to(tl.int64)
    s_in = t64 + 1 if REVERSE else t64
    s_out = t64 if REVERSE else t64 + 1
    o_c = o_b[None, :] * H + o_h[:, None]
    b_dm = _lstm_bwd_dm(
        dgx, w_hh, w_hr, dh, dy, dhs, lengths, drop, rng, ln_hh, aux, pb, t, t64, o_h, m_h, o_b,
        m_b, m_hb, o_c, B, H, R, n_pb, LD, z_stream, z_h, thr_h, G, REVERSE, USE_NEXT, ACC,
        DOT_PREC, BLOCK_H, BLOCK_B, BLOCK_K, HAS_LEN, HAS_PROJ, HAS_RNG, HAS_DROP, ZONE_H, HAS_LN,
    )  # fmt: skip
    o_gx = t64 * B * G * H + o_b[None, :] * (G * H) + o_h[:, None]
    b_i, b_f, b_g, b_o, b_cp, _ = _lstm_load_saved(
        gates + o_gx, cs, s_in, s_out, o_c, m_hb, B, H, COUPLED, ACC
    )
    m_live = _live(lengths, t, o_b, m_b, HAS_LEN)
    _lstm_ln_out_bwd(b_dm, b_i, b_f, b_g, b_o, b_cp, m_live, dgx, dqs, pc + (i_h * B + o_b) * 2,
                     m_b, aux, ln_c_w, ln_c_b, t64, o_h, m_h, o_b, m_b, B, H, G, COUPLED,
                     ACC)  # fmt: skip


@triton.jit
def _lstm_ln_out_bwd(b_dm, b_i, b_f, b_g, b_o, b_cp, m_live, dgx, dqs, p_pc, m_pc, aux, ln_c_w,
                     ln_c_b, t64, o_h, m_h, o_b, m_b, B, H, G: tl.constexpr,
                     COUPLED: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Backward of m = o ⊙ tanh(q), q = LN_c(c̃) = γ_c ĉ + β_c, for units o_h of rows o_b of step
    t64 from dm and forward's gates (b_i.. in ACC, c̃ = f c + i g recomputed) and c_{t-1}:
    da_o = dm tanh(q) o(1-o) into dgx's o block, dq = dm o (1 - tanh²q) into dqs ((T, B, H)
    ACC), zero where the step is dead, and this program's row sums of γ_c dq and γ_c dq ĉ at
    p_pc, p_pc + 1 ((BLOCK_B,) pointers, mask m_pc): LN_c' needs them over all H units."""
    m_hb = m_h[:, None] & m_b[None, :]
    LD = G * H + 3
    o_c = o_b[None, :] * H + o_h[:, None]
    o_gx = t64 * B * G * H + o_b[None, :] * (G * H) + o_h[:, None]
    b_c = b_f * b_cp + b_i * b_g  # the candidate c̃
    p_st = aux + t64 * B * LD + o_b * LD + G * H
    b_mc = tl.load(p_st + 1, mask=m_b, other=0.0)[None, :]
    b_rc = tl.load(p_st + 2, mask=m_b, other=0.0)[None, :]
    b_ch = (b_c - b_mc) * b_rc
    b_gw = tl.load(ln_c_w + o_h, mask=m_h, other=0.0).to(ACC)[:, None]
    b_gb = tl.load(ln_c_b + o_h, mask=m_h, other=0.0).to(ACC)[:, None]
    b_tq = _tanh(b_ch * b_gw + b_gb)
    m_live = m_live & m_hb
    b_dao = tl.where(m_live, b_dm * b_tq * b_o * (1.0 - b_o), 0.0)
    b_dq = tl.where(m_live, b_dm * b_o * (1.0 - b_tq * b_tq), 0.0)
    tl.store(dgx + o_gx + (G - 1) * H, b_dao.to(dgx.dtype.element_ty), mask=m_hb)
    tl.store(dqs + t64 * B * H + o_c, b_dq, mask=m_hb)
    b_v = b_gw * b_dq
    tl.store(p_pc, tl.sum(b_v, axis=0), mask=m_pc)
    tl.store(p_pc + 1, tl.sum(b_v * b_ch, axis=0), mask=m_pc)


@triton.jit
def _lstm_bwd_dm(dgx, w_hh, w_hr, dh, dy, dhs, lengths, drop, rng, ln_hh, aux, pb, t, t64, o_h,
                 m_h, o_b, m_b, m_hb, o_c, B, H, R, n_pb, LD, z_stream, z_h, thr_h,
                 G: tl.constexpr, REVERSE: tl.constexpr, USE_NEXT: tl.constexpr,
                 ACC: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, HAS_LEN: tl.constexpr,
                 HAS_PROJ: tl.constexpr, HAS_RNG: tl.constexpr, HAS_DROP: tl.constexpr,
                 ZONE_H: tl.constexpr, HAS_LN: tl.constexpr):  # fmt: skip
    """(BLOCK_H, BLOCK_B) dm, the gradient of m = o tanh(c') of step t for units o_h: dh W_hr
    with a projection (the dh kernel did the rest), else the gradient reaching h_t (from the
    next step, `_dh_from_next`, and dy_t), with zoneout its (1 - d) part (dh keeps d ⊙ it)."""
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
                ACC, DOT_PREC, BLOCK_H, BLOCK_B, BLOCK_K, HAS_LEN, HAS_DROP, ZONE_H, ln_hh, aux,
                pb, n_pb, LD, HAS_LN,
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
    return b_dm


@triton.heuristics(
    {
        "HAS_PEEP": lambda a: a["w_ch"] is not None,
        "HAS_LEN": lambda a: a["lengths"] is not None,
        "HAS_PROJ": lambda a: a["w_hr"] is not None,
        "HAS_LN": lambda a: a["ln_hh"] is not None,
        "HAS_LNC": lambda a: a["dqs"] is not None,
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
    ln_hh,  # (G*H,) input dtype or None: LN_hh's gains (layer norm)
    aux,  # (T, B, LD) ACC, layer norm: forward's û, rstd, LN_c's mean and rstd
    pb,  # (n_pb, B, 2) ACC, layer norm: per program, row sums of γ da and γ da û; reads
    #      t_next's (with a projection the dh kernel does), then writes t's
    ln_c_w,  # (H,) input dtype or None: LN_c's gain
    ln_c_b,  # (H,) input dtype or None: LN_c's bias
    dqs,  # (T, B, H) ACC or None, LN_c: dq = gradient of LN_c's output (the output kernel's)
    pc,  # (n_pb, B, 2) ACC, LN_c: per-program row sums of γ_c dq and γ_c dq ĉ
    t,  # time index of this step
    B,
    H,
    R,
    z_stream,  # layer-direction index in the zoneout masks' counters (not `stream`: reserved)
    z_c,  # zoneout probability of c
    z_h,  # zoneout probability of h (without projection: the dh kernel handles it with one)
    thr_c,  # int32 thresholds of the masks
    thr_h,
    n_pb,  # programs along H (partials per row)
    LD,  # row stride of aux (G*H + 3)
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
    HAS_LN: tl.constexpr,
    HAS_LNC: tl.constexpr,
):
    """Backward of step t for units o_h: dm (from dh without projection), the cell's backward,
    da_t and dc_{t-1}. Zoneout: the gradient of h_t (c_t) splits into (1 - d) ⊙ it for the
    cell's h̃ (c̃) and d ⊙ it, which reaches h_{t-1} (c_{t-1}) directly: dh keeps the latter
    for the next launch (CARRY in `_dh_from_next`), dc adds it. c̃ = f c + i g is recomputed
    from the gates (cs holds the zoned c). Layer norm: the product of the next step runs over
    LN_hh'(da) (`_dh_from_next`), and this launch leaves its row sums in pb; LN_c: dm was taken to
    da_o and dq by `_lstm_bwd_ln_out_kernel`, and here dc̃ gains LN_c'(dq)."""
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

    b_dm = 0.0  # with LN_c, `_lstm_bwd_ln_out_kernel` took dm to da_o and dq
    if not HAS_LNC:
        b_dm = _lstm_bwd_dm(
            dgx, w_hh, w_hr, dh, dy, dhs, lengths, drop, rng, ln_hh, aux, pb, t, t64, o_h, m_h,
            o_b, m_b, m_hb, o_c, B, H, R, n_pb, LD, z_stream, z_h, thr_h, G, REVERSE, USE_NEXT,
            ACC, DOT_PREC, BLOCK_H, BLOCK_B, BLOCK_K, HAS_LEN, HAS_PROJ, HAS_RNG, HAS_DROP, ZONE_H,
            HAS_LN,
        )  # fmt: skip

    o_gx = t64 * B * G * H + o_b[None, :] * (G * H) + o_h[:, None]
    b_i, b_f, b_g, b_o, b_cp, b_c = _lstm_load_saved(
        gates + o_gx, cs, s_in, s_out, o_c, m_hb, B, H, COUPLED, ACC
    )
    b_dc = tl.load(dc + o_c, mask=m_hb, other=0.0)
    b_pi, b_pf, b_po = _lstm_peepholes(w_ch, o_h, m_h, H, COUPLED, HAS_PEEP, ACC)
    m_live = _live(lengths, t, o_b, m_b, HAS_LEN)
    _lstm_bwd_tail(
        b_dm, b_i, b_f, b_g, b_o, b_cp, b_c, b_dc, b_pi, b_pf, b_po, m_live, dgx, dc, pb, pc, aux,
        dqs, ln_hh, ln_c_w, rng, t, t64, i_h, o_h, m_h, o_b, m_b, B, H, n_pb, z_stream, z_c,
        thr_c, G, COUPLED, ACC, HAS_PEEP, HAS_RNG, ZONE_C, HAS_LN, HAS_LNC,
    )  # fmt: skip


@triton.jit
def _lstm_bwd_tail(b_dm, b_i, b_f, b_g, b_o, b_cp, b_c, b_dc, b_pi, b_pf, b_po, m_live, dgx, dc,
                   pb, pc, aux, dqs, ln_hh, ln_c_w, rng, t, t64, i_p, o_h, m_h, o_b, m_b, B, H,
                   n_pc, z_stream, z_c, thr_c, G: tl.constexpr, COUPLED: tl.constexpr,
                   ACC: tl.constexpr, HAS_PEEP: tl.constexpr, HAS_RNG: tl.constexpr,
                   ZONE_C: tl.constexpr, HAS_LN: tl.constexpr, HAS_LNC: tl.constexpr,
                   ALL: tl.constexpr = False):  # fmt: skip
    """The cell's backward of step t for units o_h of rows o_b (both strategies), from dm (the
    gradient of m; unused with LN_c, whose output backward left da_o and dq), forward's gates
    and c_{t-1}, c (ACC) and dc (reaching the cell state after t): da_t into dgx (zero where
    dead), dc_{t-1} into dc; with layer norm this program's row sums of γ da and γ da û at
    pb[i_p]. Zoneout of c: the gradient of c_t splits into (1 - d) ⊙ it, the candidate c̃'s,
    and d ⊙ it, which reaches c_{t-1} directly; c̃ = f c + i g is recomputed (c is the zoned
    state). LN_c: dc̃ gains LN_c'(dq) from the row sums of every program at pc (n_pc of them).
    ALL: a persistent launch's sums, (B, n_pc, 2) with n_pc a constexpr (`_common._ln_sums_all`);
    else the stepwise kernels' (n_pc, B, 2)."""
    m_hb = m_h[:, None] & m_b[None, :]
    LD = G * H + 3
    o_c = o_b[None, :] * H + o_h[:, None]
    o_gx = t64 * B * G * H + o_b[None, :] * (G * H) + o_h[:, None]
    if ZONE_C or HAS_LNC:
        b_c = b_f * b_cp + b_i * b_g  # the candidate c̃ (cs holds the zoned state)
    if HAS_LN or HAS_LNC:
        b_dct = b_dc  # the part of dc reaching c̃
        if ZONE_C:
            b_dz = _zoneout_factor(rng, t, z_stream, o_h, o_b, H, z_c, thr_c, 1, HAS_RNG, ACC)
            b_dct = (1.0 - b_dz) * b_dc
        if HAS_LNC:
            # dc̃ += LN_c'(dq) = rstd_c (γ_c dq - mean(γ_c dq) - ĉ mean(γ_c dq ĉ)), and the
            # output gate's peephole term; dm already went to da_o and dq
            if ALL:
                b_s1, b_s2 = _ln_sums_all(pc, o_b, m_b, n_pc, ACC)
            else:
                b_s1, b_s2 = _ln_sums(pc, o_b, m_b, B, n_pc, ACC)
            p_st = aux + t64 * B * LD + o_b * LD + G * H
            b_mc = tl.load(p_st + 1, mask=m_b, other=0.0)[None, :]
            b_rc = tl.load(p_st + 2, mask=m_b, other=0.0)[None, :]
            b_ch = (b_c - b_mc) * b_rc
            b_dq = tl.load(dqs + t64 * B * H + o_c, mask=m_hb, other=0.0)
            b_dq *= tl.load(ln_c_w + o_h, mask=m_h, other=0.0).to(ACC)[:, None]
            b_dct += b_rc * (b_dq - b_s1[None, :] / H - b_ch * b_s2[None, :] / H)
            b_dao = tl.load(dgx + o_gx + (G - 1) * H, mask=m_hb, other=0.0).to(ACC)
            if HAS_PEEP:
                b_dct += b_po * b_dao
            b_dai, b_daf, b_dag, _, b_dcp = _lstm_cell_bwd(
                0.0, b_dct, b_i, b_f, b_g, b_o, b_cp, b_c, b_pi, b_pf, b_po, COUPLED, HAS_PEEP
            )
        else:
            b_dai, b_daf, b_dag, b_dao, b_dcp = _lstm_cell_bwd(
                b_dm, b_dct, b_i, b_f, b_g, b_o, b_cp, b_c, b_pi, b_pf, b_po, COUPLED, HAS_PEEP
            )
        b_dai = tl.where(m_live, b_dai, 0.0)
        b_daf = tl.where(m_live, b_daf, 0.0)
        b_dag = tl.where(m_live, b_dag, 0.0)
        b_dao = tl.where(m_live, b_dao, 0.0)
        _store_gate_blocks(dgx + o_gx, b_dai, b_daf, b_dag, b_dao, m_hb, H, COUPLED)
        if ZONE_C:
            b_dcp += b_dz * b_dc
        b_dc = tl.where(m_live, b_dcp, b_dc)
        if HAS_LN:  # this program's row sums of γ da and γ da û, for the next step's product
            if ALL:  # (B, programs, 2)
                p_pb, m_pb = _part_at(pb, o_b, m_b, i_p, n_pc)
            else:  # (programs, B, 2)
                p_pb, m_pb = pb + (i_p * B + o_b) * 2, m_b
            _lstm_ln_partials(
                p_pb, m_pb, ln_hh, aux + t64 * B * LD, o_h, m_h, o_b, m_hb, H, LD, b_dai, b_daf,
                b_dag, b_dao, COUPLED, ACC,
            )  # fmt: skip
    elif ZONE_C:
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


@triton.jit
def _lstm_h_out(hs, y, hd, drop, rng, b_h, b_hp, m_live, s_out, slot_out, t, t64, o_w, o_b, o_x,
                m_xb, B, R, z_stream, z_h, thr_h, HAS_LEN: tl.constexpr, HAS_RNG: tl.constexpr,
                ZONE_H: tl.constexpr, HAS_DROP: tl.constexpr):  # fmt: skip
    """h_t of the elements o_x of a (B, R) slab (o_w their columns, o_b their rows) from b_h, the
    cell's (or the projection's) value in ACC: zoned with h_{t-1} = b_hp (ZONE_H), h_{t-1}
    kept where the step is dead, stored into slot s_out of hs and as y_t (0 where dead); with
    recurrent dropout also h_t ⊙ mask into slot slot_out of hd, what the next step's product
    reads. b_hp: h_{t-1} in hs's dtype, read by the caller (used with ZONE_H or HAS_LEN)."""
    DT: tl.constexpr = hs.dtype.element_ty
    if ZONE_H:
        b_h = _zone(b_hp, b_h, rng, t, z_stream, o_w, o_b, R, z_h, thr_h, 0, HAS_RNG)
    b_h = b_h.to(DT)
    if HAS_LEN:
        b_st = tl.where(m_live, b_h, b_hp)
    else:
        b_st = b_h
    tl.store(hs + s_out * B * R + o_x, b_st, mask=m_xb)
    tl.store(y + t64 * B * R + o_x, tl.where(m_live, b_h, 0.0), mask=m_xb)
    if HAS_DROP:
        b_s = tl.load(drop + o_x, mask=m_xb, other=0.0)
        tl.store(hd + slot_out * B * R + o_x, (b_st.to(b_s.dtype) * b_s).to(DT), mask=m_xb)


@triton.jit
def _lstm_fwd_tail(b_ai, b_af, b_ag, b_ao, b_gi, b_gf, b_gg, b_go, b_cp, b_hp, b_pi, b_pf, b_po,
                   m_live, cs, gates, ms, co, part_c, hs, y, hd, drop, rng, t, t64, s_in, s_out,
                   slot_out, i_u, o_h, m_h, o_b, m_b, B, H, R, z_stream, z_c, z_h, thr_c, thr_h,
                   G: tl.constexpr, COUPLED: tl.constexpr, BLOCK_U: tl.constexpr,
                   HAS_PEEP: tl.constexpr, HAS_LEN: tl.constexpr, HAS_PROJ: tl.constexpr,
                   STORE_GATES: tl.constexpr, HAS_RNG: tl.constexpr, HAS_DROP: tl.constexpr,
                   ZONE_C: tl.constexpr, ZONE_H: tl.constexpr, HAS_LNC: tl.constexpr):  # fmt: skip
    """A persistent forward step for units o_h of rows o_b once the recurrent pre-activations
    (b_a*: h W_hh^T, or γ ⊙ û with layer norm) are known; b_g* the input gates, b_cp = c_{t-1},
    b_hp = h_{t-1} (`_lstm_h_out`). The cell; with LN_c c̃, o and this program's partial
    statistics of c̃ left for the output phase; c (zoned: the candidate c̃ stays what the
    output and backward see); the gates; then h (zoned) and y, or m for the projection."""
    m_hb = m_h[:, None] & m_b[None, :]
    o_c = o_b[None, :] * H + o_h[:, None]  # this program's elements of a (B, H) slab
    b_i, b_f, b_g, b_o, b_c, b_m = _lstm_cell(
        b_ai + b_gi, b_af + b_gf, b_ag + b_gg, b_ao + b_go, b_cp, b_pi, b_pf, b_po,
        COUPLED, HAS_PEEP,
    )  # fmt: skip
    if HAS_LNC:
        tl.store(co + o_c + o_b[None, :] * H, b_c, mask=m_hb)
        tl.store(co + o_c + o_b[None, :] * H + H, b_o, mask=m_hb)
        n_p = tl.maximum(tl.minimum(H - i_u * BLOCK_U, BLOCK_U), 1)
        N_U: tl.constexpr = (H + BLOCK_U - 1) // BLOCK_U  # programs owning units
        p_pc, m_pc = _part_at(part_c, o_b, m_b, i_u, N_U)
        _ln_partials(b_c, m_hb, n_p, p_pc, m_pc)
    if ZONE_C:
        b_c = _zone(b_cp, b_c, rng, t, z_stream, o_h, o_b, H, z_c, thr_c, 1, HAS_RNG)
    tl.store(cs + s_out * B * H + o_c, tl.where(m_live, b_c, b_cp), mask=m_hb)
    if STORE_GATES:
        p_gates = gates + t64 * B * G * H + o_b[None, :] * (G * H) + o_h[:, None]
        _store_gate_blocks(p_gates, b_i, b_f, b_g, b_o, m_hb, H, COUPLED)
    if HAS_LNC:
        pass  # h needs LN_c's statistics of the whole row: the output phase forms it
    elif HAS_PROJ:
        tl.store(ms + t64 * B * H + o_c, b_m.to(ms.dtype.element_ty), mask=m_hb)
    else:
        _lstm_h_out(
            hs, y, hd, drop, rng, b_m, b_hp, m_live, s_out, slot_out, t, t64, o_h, o_b, o_c,
            m_hb, B, R, z_stream, z_h, thr_h, HAS_LEN, HAS_RNG, ZONE_H, HAS_DROP,
        )  # fmt: skip


@triton.heuristics(
    {
        "HAS_PEEP": lambda a: a["w_ch"] is not None,
        "HAS_LEN": lambda a: a["lengths"] is not None,
        "HAS_PROJ": lambda a: a["w_hr"] is not None,
        "STORE_GATES": lambda a: a["gates"] is not None,
        "HAS_LN": lambda a: a["ln_hh"] is not None,
        "HAS_LNC": lambda a: a["ln_c_w"] is not None,
        **_OPTION_HEURISTICS,
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
    rng,  # (2,) int64 (seed, offset) of the zoneout masks (training), or None
    drop,  # (B, R) ACC: recurrent dropout's mask on h where it meets W_hh, or None
    hd,  # (2, B, R) input dtype, with drop: h ⊙ mask; slot s % 2 holds the state entering
    #      processing step s (slot 0 written by the launcher), read back by all programs
    ln_hh,  # (G*H,) input dtype or None: LN_hh's gains (layer norm; its bias is in gx)
    ln_c_w,  # (H,) input dtype or None: LN_c's gain (with ln_hh only)
    ln_c_b,  # (H,) input dtype or None: LN_c's bias
    aux,  # (T or 1, B, G*H + 3) ACC, layer norm: u (own columns) -> û in place, rstd at G*H,
    #       LN_c's mean and rstd at G*H + 1, G*H + 2 (program 0 writes the row statistics)
    part,  # (B, programs, 2) ACC, layer norm: each program's mean and M2 of its values of u
    part_c,  # (B, programs, 2) ACC, LN_c: each program's mean and M2 of its units' c̃
    co,  # (B, 2H) ACC, LN_c: c̃ and o of the step (each program writes and reads its units)
    cnt,  # (1,) int32, zeroed: the grid barrier's counter
    T,
    B,
    z_stream,  # layer-direction index in the zoneout masks' counters (not `stream`: reserved)
    z_c,  # zoneout probability of c (ZONE_C: > 0), the expectation's weight in evaluation
    z_h,  # zoneout probability of h
    thr_c,  # int32 thresholds of the masks (_common.zoneout_threshold)
    thr_h,
    ln_ts,  # step stride of aux: B * (G*H + 3), or 0 (one slot reused: no backward)
    H: tl.constexpr,
    R: tl.constexpr,
    G: tl.constexpr,
    COUPLED: tl.constexpr,
    REVERSE: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_U: tl.constexpr,  # units per program, all their gates: 4 * BLOCK_U rows of the MMA
    BLOCK_P: tl.constexpr,  # rows of h per program, with projection
    BLOCK_B: tl.constexpr,  # sequences per product: the batch is looped over in such chunks
    MAX_K: tl.constexpr,  # widest chunk of a reduction (_common.k_chunks)
    HAS_PEEP: tl.constexpr,
    HAS_LEN: tl.constexpr,
    HAS_PROJ: tl.constexpr,
    STORE_GATES: tl.constexpr,
    HAS_RNG: tl.constexpr,
    HAS_DROP: tl.constexpr,
    ZONE_C: tl.constexpr,
    ZONE_H: tl.constexpr,
    HAS_LN: tl.constexpr,
    HAS_LNC: tl.constexpr,
):
    """The whole forward sequence; program i_u owns units o_h (with projection also rows o_q
    of h) for every sequence. Barrier k (1-based) waits for k * num_programs arrivals.

    Step: a = [W_i; W_f; W_g; W_o][o_h] h_{t-1}^T, one (4 BLOCK_U, R) x (R, BLOCK_B) product
    (the gates of the program's units interleaved on M, row 4 u + g; coupled: f, g, o and a
    zero block), split into the gate tiles for the cell update.

    Phases of a step, each after a grid barrier (PH per step): the product and, without layer
    norm, the cell; with layer norm (LN_hh) the normalisation of the product and the cell, the
    statistics of each row's G*H values merged from every program's partials; with LN_c the
    output m = o ⊙ tanh(LN_c(c̃)), likewise over the H units; with projection h = m W_hr^T.
    Zoneout is element-wise where c and h are formed; recurrent dropout: the programs that
    form h_t also store h_t ⊙ mask (hd), which the next step's product reads in place of h."""
    GI: tl.constexpr = 0  # gate row blocks (GI unused when coupled)
    GF: tl.constexpr = 0 if COUPLED else 1
    GG: tl.constexpr = GF + 1
    GO: tl.constexpr = GF + 2
    LD: tl.constexpr = G * H + 3  # row stride of aux
    # barriers of a step, in order: 0 (h_{t-1} written), LN_hh's partials, LN_c's, m_t
    I_LNC: tl.constexpr = 2 if HAS_LN else 1
    I_PROJ: tl.constexpr = I_LNC + 1 if HAS_LNC else I_LNC
    PH: tl.constexpr = I_PROJ + 1 if HAS_PROJ else I_PROJ
    N_U: tl.constexpr = (H + BLOCK_U - 1) // BLOCK_U  # programs owning units (their partials)
    # the cell phase forms h itself (no LN_c, no projection) and needs h_{t-1} of its units
    HP_CELL: tl.constexpr = (ZONE_H or HAS_LEN) and not (HAS_PROJ or HAS_LNC)
    HP_OUT: tl.constexpr = (ZONE_H or HAS_LEN) and not HAS_PROJ  # the same for LN_c's phase
    i_u = tl.program_id(0)
    n_prog = tl.num_programs(0)
    o_h = i_u * BLOCK_U + tl.arange(0, BLOCK_U)
    m_h = o_h < H

    # rows of W_hh for the units' gates, interleaved: row 4 u + g is gate block g (< G; the
    # rest zero) of unit u. Loaded once, kept on chip
    o_m = tl.arange(0, 4 * BLOCK_U)
    o_mg = o_m % 4
    o_mu = i_u * BLOCK_U + o_m // 4
    m_m = (o_mg < G) & (o_mu < H)
    b_w = _k_tiles(w_hh + (o_mg * H + o_mu) * R, m_m, 1, R, MAX_K, False, "")
    b_pi, b_pf, b_po = _lstm_peepholes(w_ch, o_h, m_h, H, COUPLED, HAS_PEEP, ACC)
    if HAS_PROJ:
        # rows o_q of W_hr: this program's rows of h = m W_hr^T
        o_q = i_u * BLOCK_P + tl.arange(0, BLOCK_P)
        m_q = o_q < R
        b_wr = _k_tiles(w_hr + o_q * H, m_q, 1, H, MAX_K, False, "")
    else:
        o_q, m_q = o_h, m_h
    # values of u a batch row has in this program (1 for a program without units: never merged)
    n_own = G * tl.maximum(tl.minimum(H - i_u * BLOCK_U, BLOCK_U), 1)

    # num_stages=1: no software pipelining, which could issue the next step's loads of
    # other programs' data before that step's barrier
    for s in tl.range(0, T, num_stages=1):
        t = T - 1 - s if REVERSE else s
        t64 = t.to(tl.int64)
        s_in = t64 + 1 if REVERSE else t64
        s_out = t64 if REVERSE else t64 + 1
        slot_in = s % 2  # hd: the slot holding h_{t-1} ⊙ mask, and the one h_t's goes to
        slot_out = 1 - slot_in
        if HAS_DROP:
            p_h = hd + slot_in * B * R
        else:
            p_h = hs + s_in * B * R
        if s > 0:
            _grid_barrier(cnt, PH * s * n_prog)  # h_{t-1} of every unit is written
        for b0 in tl.range(0, B, BLOCK_B, num_stages=1):
            o_b = b0 + tl.arange(0, BLOCK_B)
            m_b = o_b < B
            if HAS_LN:
                # u = (h ⊙ mask) W_hh^T for the units' gate rows, into aux (normalised in the
                # next phase), with its partial statistics per batch row
                b_ht = _k_tiles(p_h + o_b * R, m_b, 1, R, MAX_K, True, ".cg")
                b_u = _dot_tiles(b_w, b_ht, tl.zeros([4 * BLOCK_U, BLOCK_B], dtype=ACC), DOT_PREC)
                m_u = m_m[:, None] & m_b[None, :]
                o_u = o_b[None, :] * LD + (o_mg * H + o_mu)[:, None]
                tl.store(aux + t64 * ln_ts + o_u, b_u, mask=m_u)
                p_pu, m_pu = _part_at(part, o_b, m_b, i_u, N_U)
                _ln_partials(b_u, m_u, n_own, p_pu, m_pu)
            else:
                m_hb = m_h[:, None] & m_b[None, :]
                o_c = o_b[None, :] * H + o_h[:, None]  # this program's elements of (B, H)
                o_g = o_b[None, :] * (G * H) + o_h[:, None]  # ... of gate block 0 of (B, G*H)
                # every load of the step before the product: this program's own data (gx_t,
                # c and h written by it a step ago) and h_{t-1} of all units (from L2)
                b_gi, b_gf, b_gg, b_go = _load_gate_blocks(
                    gx + t64 * B * G * H + o_g, m_hb, H, COUPLED, ACC
                )
                b_c = tl.load(cs + s_in * B * H + o_c, mask=m_hb, other=0.0)
                m_live = _live(lengths, t, o_b, m_b, HAS_LEN)
                if HP_CELL:
                    b_hp = tl.load(hs + s_in * B * R + o_c, mask=m_hb, other=0.0)  # R == H
                else:
                    b_hp = 0.0
                b_ht = _k_tiles(p_h + o_b * R, m_b, 1, R, MAX_K, True, ".cg")
                b_a = _dot_tiles(b_w, b_ht, tl.zeros([4 * BLOCK_U, BLOCK_B], dtype=ACC), DOT_PREC)
                b_a0, b_a1, b_a2, b_a3 = _split_gates(b_a, BLOCK_U)
                if COUPLED:  # blocks f, g, o (i = 1 - f: its slot unused)
                    b_ai, b_af, b_ag, b_ao = b_a0, b_a0, b_a1, b_a2
                else:
                    b_ai, b_af, b_ag, b_ao = b_a0, b_a1, b_a2, b_a3
                _lstm_fwd_tail(
                    b_ai, b_af, b_ag, b_ao, b_gi, b_gf, b_gg, b_go, b_c, b_hp, b_pi, b_pf, b_po,
                    m_live, cs, gates, ms, co, part_c, hs, y, hd, drop, rng, t, t64, s_in, s_out,
                    slot_out, i_u, o_h, m_h, o_b, m_b, B, H, R, z_stream, z_c, z_h, thr_c, thr_h,
                    G, COUPLED, BLOCK_U, HAS_PEEP, HAS_LEN, HAS_PROJ, STORE_GATES, HAS_RNG,
                    HAS_DROP, ZONE_C, ZONE_H, HAS_LNC,
                )  # fmt: skip
        if HAS_LN:
            _grid_barrier(cnt, (PH * s + 1) * n_prog)  # u's partials of every program
            for b0 in tl.range(0, B, BLOCK_B, num_stages=1):
                o_b = b0 + tl.arange(0, BLOCK_B)
                m_b = o_b < B
                m_hb = m_h[:, None] & m_b[None, :]
                o_c = o_b[None, :] * H + o_h[:, None]
                o_g = o_b[None, :] * (G * H) + o_h[:, None]
                b_gi, b_gf, b_gg, b_go = _load_gate_blocks(
                    gx + t64 * B * G * H + o_g, m_hb, H, COUPLED, ACC
                )
                b_c = tl.load(cs + s_in * B * H + o_c, mask=m_hb, other=0.0)
                m_live = _live(lengths, t, o_b, m_b, HAS_LEN)
                if HP_CELL:
                    b_hp = tl.load(hs + s_in * B * R + o_c, mask=m_hb, other=0.0)
                else:
                    b_hp = 0.0
                b_mean, b_rstd = _ln_stats_all(part, o_b, m_b, G * H, N_U, G * BLOCK_U, ACC)
                # a = gx + γ ⊙ û, û = (u - mean) rstd stored back for backward
                p_u = aux + t64 * ln_ts + o_b[None, :] * LD + o_h[:, None]
                b_af = _ln_gate(p_u + GF * H, ln_hh + GF * H + o_h, m_h, m_hb, b_mean, b_rstd)
                b_ag = _ln_gate(p_u + GG * H, ln_hh + GG * H + o_h, m_h, m_hb, b_mean, b_rstd)
                b_ao = _ln_gate(p_u + GO * H, ln_hh + GO * H + o_h, m_h, m_hb, b_mean, b_rstd)
                if COUPLED:
                    b_ai = b_af
                else:
                    b_ai = _ln_gate(p_u + GI * H, ln_hh + GI * H + o_h, m_h, m_hb, b_mean, b_rstd)
                if i_u == 0:
                    tl.store(aux + t64 * ln_ts + o_b * LD + G * H, b_rstd, mask=m_b)
                _lstm_fwd_tail(
                    b_ai, b_af, b_ag, b_ao, b_gi, b_gf, b_gg, b_go, b_c, b_hp, b_pi, b_pf, b_po,
                    m_live, cs, gates, ms, co, part_c, hs, y, hd, drop, rng, t, t64, s_in, s_out,
                    slot_out, i_u, o_h, m_h, o_b, m_b, B, H, R, z_stream, z_c, z_h, thr_c, thr_h,
                    G, COUPLED, BLOCK_U, HAS_PEEP, HAS_LEN, HAS_PROJ, STORE_GATES, HAS_RNG,
                    HAS_DROP, ZONE_C, ZONE_H, HAS_LNC,
                )  # fmt: skip
        if HAS_LNC:
            _grid_barrier(cnt, (PH * s + I_LNC) * n_prog)  # c̃'s partials of every program
            for b0 in tl.range(0, B, BLOCK_B, num_stages=1):
                o_b = b0 + tl.arange(0, BLOCK_B)
                m_b = o_b < B
                m_hb = m_h[:, None] & m_b[None, :]
                o_c = o_b[None, :] * H + o_h[:, None]
                m_live = _live(lengths, t, o_b, m_b, HAS_LEN)
                if HP_OUT:
                    b_hp = tl.load(hs + s_in * B * R + o_c, mask=m_hb, other=0.0)
                else:
                    b_hp = 0.0
                b_mean, b_rstd = _ln_stats_all(part_c, o_b, m_b, H, N_U, BLOCK_U, ACC)
                if i_u == 0:
                    p_st = aux + t64 * ln_ts + o_b * LD + G * H
                    tl.store(p_st + 1, b_mean, mask=m_b)
                    tl.store(p_st + 2, b_rstd, mask=m_b)
                b_m = _lstm_ln_c_out(co, ln_c_w, ln_c_b, o_h, m_h, o_b, m_hb, b_mean, b_rstd, H,
                                     ACC)  # fmt: skip
                if HAS_PROJ:
                    tl.store(ms + t64 * B * H + o_c, b_m.to(ms.dtype.element_ty), mask=m_hb)
                else:
                    _lstm_h_out(hs, y, hd, drop, rng, b_m, b_hp, m_live, s_out, slot_out, t, t64,
                                o_h, o_b, o_c, m_hb, B, R, z_stream, z_h, thr_h, HAS_LEN,
                                HAS_RNG, ZONE_H, HAS_DROP)  # fmt: skip
        if HAS_PROJ:
            _grid_barrier(cnt, (PH * s + I_PROJ) * n_prog)  # m_t of every unit is written
            for b0 in tl.range(0, B, BLOCK_B, num_stages=1):
                o_b = b0 + tl.arange(0, BLOCK_B)
                m_b = o_b < B
                m_live = _live(lengths, t, o_b, m_b, HAS_LEN)
                o_hq = o_b[None, :] * R + o_q[:, None]  # this program's elements of (B, R)
                m_qb = m_q[:, None] & m_b[None, :]
                if ZONE_H or HAS_LEN:
                    b_hp = tl.load(hs + s_in * B * R + o_hq, mask=m_qb, other=0.0)
                else:
                    b_hp = 0.0
                b_mt = _k_tiles(ms + t64 * B * H + o_b * H, m_b, 1, H, MAX_K, True, ".cg")
                b_hn = _dot_tiles(b_wr, b_mt, tl.zeros([BLOCK_P, BLOCK_B], dtype=ACC), DOT_PREC)
                _lstm_h_out(hs, y, hd, drop, rng, b_hn, b_hp, m_live, s_out, slot_out, t, t64,
                            o_q, o_b, o_hq, m_qb, B, R, z_stream, z_h, thr_h, HAS_LEN, HAS_RNG,
                            ZONE_H, HAS_DROP)  # fmt: skip


@triton.jit
def _lstm_bwd_du(du, dgx, aux, ln_hh, pb, t64, o_h, m_h, o_b, m_b, B, N_PB: tl.constexpr,
                 G: tl.constexpr, H: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Layer norm's last backward phase of step t for units o_h (all G gates) of rows o_b:
    du = LN_hh'(da) = rstd (γ da - mean(γ da) - û mean(γ da û)) into du ((B, G*H), the
    operand of the next step's product), the row means merged from every program's sums in pb
    (`_common._ln_du`)."""
    LD: tl.constexpr = G * H + 3
    b_s1, b_s2 = _ln_sums_all(pb, o_b, m_b, N_PB, ACC)
    p_aux = aux + t64 * B * LD
    b_rstd = tl.load(p_aux + o_b * LD + G * H, mask=m_b, other=0.0)
    _ln_du(du, dgx + t64 * B * G * H, p_aux, ln_hh, b_s1 / (G * H), b_s2 / (G * H), b_rstd, o_h,
           m_h, o_b, m_b, G * H, G * H, LD, G, H, ACC)  # fmt: skip


@triton.heuristics(
    {
        "HAS_PEEP": lambda a: a["w_ch"] is not None,
        "HAS_LEN": lambda a: a["lengths"] is not None,
        "HAS_PROJ": lambda a: a["w_hr"] is not None,
        "HAS_LN": lambda a: a["ln_hh"] is not None,
        "HAS_LNC": lambda a: a["ln_c_w"] is not None,
        **_OPTION_HEURISTICS,
    }
)
@triton.jit
def _lstm_bwd_persistent_kernel(
    dgx,  # (T, B, G*H) input dtype, out: da of every step (zero when dead), read back by all
    gates,  # (T, B, G*H) ACC: activated gates from forward
    cs,  # (T+1, B, H) ACC: cell states in time order
    dh,  # (B, R) ACC, in/out: dh_T; on exit the gradient reaching the state after the last step
    #      (with zoneout of h: the part of it that reaches h_0 past the first step's cell)
    dc,  # (B, H) ACC, in/out: dc_T; on exit dc_0
    dy,  # (T, B, R) input dtype
    dhs,  # (T, B, P) input dtype, out, with projection: total gradient of h_t (read back by all)
    w_hh,  # (G*H, R) input dtype
    w_hr,  # (P, H) input dtype or None
    w_ch,  # (3*H,) or (2*H,) input dtype, or None: peepholes
    lengths,  # (B,) int64 or None
    rng,  # (2,) int64 (seed, offset) of the zoneout masks, or None
    drop,  # (B, R) ACC: recurrent dropout's mask, or None
    ln_hh,  # (G*H,) input dtype or None: LN_hh's gains (layer norm)
    ln_c_w,  # (H,) input dtype or None: LN_c's gain
    ln_c_b,  # (H,) input dtype or None: LN_c's bias
    aux,  # (T, B, G*H + 3) ACC, layer norm: forward's û, rstd, LN_c's mean and rstd
    pb,  # (B, programs, 2) ACC, layer norm: each program's row sums of γ da and γ da û
    pc,  # (B, programs, 2) ACC, LN_c: each program's row sums of γ_c dq and γ_c dq ĉ
    dqs,  # (T, B, H) ACC, out, LN_c: dq, the gradient of LN_c's output
    du,  # (B, G*H) input dtype, layer norm: LN_hh'(da) of the step just done, read back by all
    cnt,  # (1,) int32, zeroed: the grid barrier's counter
    T,
    B,
    z_stream,  # layer-direction index in the zoneout masks' counters (not `stream`: reserved)
    z_c,  # zoneout probabilities of c and h
    z_h,
    thr_c,  # int32 thresholds of the masks
    thr_h,
    H: tl.constexpr,
    R: tl.constexpr,
    G: tl.constexpr,
    COUPLED: tl.constexpr,
    REVERSE: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_U: tl.constexpr,  # units per program
    BLOCK_P: tl.constexpr,  # rows of h (columns of W_hh) per program, with projection
    BLOCK_B: tl.constexpr,  # sequences per product: the batch is looped over in such chunks
    MAX_K: tl.constexpr,  # widest chunk of a reduction (_common.k_chunks)
    HAS_PEEP: tl.constexpr,
    HAS_LEN: tl.constexpr,
    HAS_PROJ: tl.constexpr,
    HAS_RNG: tl.constexpr,
    HAS_DROP: tl.constexpr,
    ZONE_C: tl.constexpr,
    ZONE_H: tl.constexpr,
    HAS_LN: tl.constexpr,
    HAS_LNC: tl.constexpr,
):
    """The whole reverse sequence; program i_u owns units o_h and columns o_q of W_hh (o_q = o_h
    without projection) for every sequence. dh, dc between steps live in their (B, *) buffers.

    Step: dh_{t}[:, o_q] = Σ_g da_{t+1, g} W_g[:, o_q], one (4 BLOCK_Q, H) x (H, 4 BLOCK_B)
    product: W_g^T's rows o_q interleaved on M (row 4 q + g), the gates' da side by side on N,
    the sum of its diagonal gate blocks (_diag_sum); coupled: f, g, o and zero blocks.

    Phases of a step, each after a grid barrier (PH per step): the product, dh (⊙ the dropout
    mask; zoneout of h splits the gradient of h_t into (1 - d) ⊙ it for the cell and d ⊙ it,
    kept in dh, which reaches h_{t-1} directly) and, without projection and LN_c, the cell;
    with projection dm = dh_t W_hr and the cell; with LN_c first dm -> da_o and dq with
    per-program row sums, then (after a barrier: the sums of every program) the cell; with
    layer norm du = LN_hh'(da) of the program's units, from every program's row sums: the next
    step's product runs over du instead of da."""
    I_LNC: tl.constexpr = 2 if HAS_PROJ else 1  # barriers of a step, as in the forward kernel
    I_LN: tl.constexpr = I_LNC + 1 if HAS_LNC else I_LNC
    PH: tl.constexpr = I_LN + 1 if HAS_LN else I_LN
    BLOCK_Q: tl.constexpr = BLOCK_P if HAS_PROJ else BLOCK_U
    N_U: tl.constexpr = (H + BLOCK_U - 1) // BLOCK_U  # programs owning units (their sums)
    i_u = tl.program_id(0)
    n_prog = tl.num_programs(0)
    o_h = i_u * BLOCK_U + tl.arange(0, BLOCK_U)
    o_q = i_u * BLOCK_Q + tl.arange(0, BLOCK_Q)
    m_h, m_q = o_h < H, o_q < R

    # columns o_q of every gate block of W_hh, interleaved: row 4 q + g is W_g[:, q] (stride
    # R; g >= G zero), loaded once
    o_m = tl.arange(0, 4 * BLOCK_Q)
    o_mg = o_m % 4
    o_mq = i_u * BLOCK_Q + o_m // 4
    b_wt = _k_tiles(w_hh + o_mg * H * R + o_mq, (o_mg < G) & (o_mq < R), R, H, MAX_K, False, "")
    b_pi, b_pf, b_po = _lstm_peepholes(w_ch, o_h, m_h, H, COUPLED, HAS_PEEP, ACC)
    if HAS_PROJ:
        # columns o_h of W_hr (rows of W_hr^T, stride H): dm = dh W_hr for units o_h
        b_wrt = _k_tiles(w_hr + o_h, m_h, H, R, MAX_K, False, "")
    # columns of the right-hand side: n = (gate n // BLOCK_B, sequence b0 + n % BLOCK_B)
    o_n = tl.arange(0, 4 * BLOCK_B)
    o_ng = o_n // BLOCK_B
    o_nb = o_n % BLOCK_B

    # num_stages=1: no software pipelining, which could issue the next step's loads of
    # other programs' data before that step's barrier
    for k in tl.range(0, T, num_stages=1):
        t = k if REVERSE else T - 1 - k
        t64 = t.to(tl.int64)
        s_in = t64 + 1 if REVERSE else t64
        s_out = t64 if REVERSE else t64 + 1
        t_next = t - 1 if REVERSE else t + 1  # processed at k - 1
        if k > 0:
            _grid_barrier(cnt, PH * k * n_prog)  # da_{t_next} (du) of every unit is written
        for b0 in tl.range(0, B, BLOCK_B, num_stages=1):
            o_b = b0 + tl.arange(0, BLOCK_B)
            m_b = o_b < B
            m_hb = m_h[:, None] & m_b[None, :]
            m_qb = m_q[:, None] & m_b[None, :]
            o_dq = o_b[None, :] * R + o_q[:, None]  # this program's elements of a (B, R) slab
            # every load of the step before the product. This program's own data: dh as the
            # previous step left it (dh_T at k = 0; only read where a dead step passes it on,
            # or it holds zoneout's direct part), dy; without projection also what the cell
            # backward needs
            m_dh = m_qb if (HAS_LEN or ZONE_H) else m_qb & (k == 0)
            b_dh = tl.load(dh + o_dq, mask=m_dh, other=0.0)
            b_dy = tl.load(dy + t64 * B * R + o_dq, mask=m_qb, other=0.0).to(ACC)
            m_live = _live(lengths, t, o_b, m_b, HAS_LEN)
            if not HAS_PROJ:
                o_c = o_b[None, :] * H + o_h[:, None]
                o_g = t64 * B * G * H + o_b[None, :] * (G * H) + o_h[:, None]
                b_i, b_f, b_g, b_o, b_cp, b_c = _lstm_load_saved(
                    gates + o_g, cs, s_in, s_out, o_c, m_hb, B, H, COUPLED, ACC
                )
                b_dc = tl.load(dc + o_c, mask=m_hb, other=0.0)
            if k > 0:
                # da_{t_next} (layer norm: du) of every unit and gate (the others', from L2)
                o_nbb = b0 + o_nb
                if HAS_LN:
                    p_da = du + o_nbb * (G * H) + o_ng * H
                else:
                    p_da = dgx + t_next.to(tl.int64) * B * G * H + o_nbb * (G * H) + o_ng * H
                b_da = _k_tiles(p_da, (o_nbb < B) & (o_ng < G), 1, H, MAX_K, True, ".cg")
                b_acc = tl.zeros([4 * BLOCK_Q, 4 * BLOCK_B], dtype=ACC)
                b_rec = _diag_sum(_dot_tiles(b_wt, b_da, b_acc, DOT_PREC), BLOCK_Q, BLOCK_B)
                if HAS_DROP:  # W_hh met h ⊙ mask
                    b_rec *= tl.load(drop + o_dq, mask=m_qb, other=0.0)
                if ZONE_H:  # dh holds what step t_next passed to h_t past its cell
                    b_dh = tl.where(_live(lengths, t_next, o_b, m_b, HAS_LEN), b_rec, 0.0) + b_dh
                elif HAS_LEN:  # a dead step t_next passed dh through unchanged
                    b_dh = tl.where(_live(lengths, t_next, o_b, m_b, HAS_LEN), b_rec, b_dh)
                else:
                    b_dh = b_rec
            b_tot = b_dh + b_dy
            # read back by the next step (where a step is dead, or zoneout's direct part), and
            # by the caller after the last
            if ZONE_H:
                b_d = _zoneout_factor(rng, t, z_stream, o_q, o_b, R, z_h, thr_h, 0, HAS_RNG, ACC)
                tl.store(dh + o_dq, tl.where(m_live, b_d * b_tot, b_dh), mask=m_qb)
                b_tot = (1.0 - b_d) * b_tot
            else:
                tl.store(dh + o_dq, b_dh, mask=m_qb)
            if HAS_PROJ:
                b_dq = tl.where(m_live, b_tot, 0.0)
                tl.store(dhs + t64 * B * R + o_dq, b_dq.to(dhs.dtype.element_ty), mask=m_qb)
            elif HAS_LNC:
                p_pc, m_pc = _part_at(pc, o_b, m_b, i_u, N_U)
                _lstm_ln_out_bwd(b_tot, b_i, b_f, b_g, b_o, b_cp, m_live, dgx, dqs, p_pc, m_pc,
                                 aux, ln_c_w, ln_c_b, t64, o_h, m_h, o_b, m_b, B, H, G, COUPLED,
                                 ACC)  # fmt: skip
            else:
                _lstm_bwd_tail(
                    b_tot, b_i, b_f, b_g, b_o, b_cp, b_c, b_dc, b_pi, b_pf, b_po, m_live, dgx, dc,
                    pb, pc, aux, dqs, ln_hh, ln_c_w, rng, t, t64, i_u, o_h, m_h, o_b, m_b, B, H,
                    N_U, z_stream, z_c, thr_c, G, COUPLED, ACC, HAS_PEEP, HAS_RNG, ZONE_C,
                    HAS_LN, HAS_LNC, True,
                )  # fmt: skip
        if HAS_PROJ:
            _grid_barrier(cnt, (PH * k + 1) * n_prog)  # dh_t of every row of h is written
            for b0 in tl.range(0, B, BLOCK_B, num_stages=1):
                o_b = b0 + tl.arange(0, BLOCK_B)
                m_b = o_b < B
                m_hb = m_h[:, None] & m_b[None, :]
                o_c = o_b[None, :] * H + o_h[:, None]
                o_g = t64 * B * G * H + o_b[None, :] * (G * H) + o_h[:, None]
                b_i, b_f, b_g, b_o, b_cp, b_c = _lstm_load_saved(
                    gates + o_g, cs, s_in, s_out, o_c, m_hb, B, H, COUPLED, ACC
                )
                b_dc = tl.load(dc + o_c, mask=m_hb, other=0.0)
                m_live = _live(lengths, t, o_b, m_b, HAS_LEN)
                # dm = dh_t W_hr for units o_h: W_hr^T's rows o_h times dh_t^T over P
                b_dht = _k_tiles(dhs + t64 * B * R + o_b * R, m_b, 1, R, MAX_K, True, ".cg")
                b_dm = _dot_tiles(b_wrt, b_dht, tl.zeros([BLOCK_U, BLOCK_B], dtype=ACC), DOT_PREC)
                if HAS_LNC:
                    p_pc, m_pc = _part_at(pc, o_b, m_b, i_u, N_U)
                    _lstm_ln_out_bwd(b_dm, b_i, b_f, b_g, b_o, b_cp, m_live, dgx, dqs, p_pc,
                                     m_pc, aux, ln_c_w, ln_c_b, t64, o_h, m_h, o_b, m_b, B, H, G,
                                     COUPLED, ACC)  # fmt: skip
                else:
                    _lstm_bwd_tail(
                        b_dm, b_i, b_f, b_g, b_o, b_cp, b_c, b_dc, b_pi, b_pf, b_po, m_live, dgx,
                        dc, pb, pc, aux, dqs, ln_hh, ln_c_w, rng, t, t64, i_u, o_h, m_h, o_b, m_b,
                        B, H, N_U, z_stream, z_c, thr_c, G, COUPLED, ACC, HAS_PEEP, HAS_RNG,
                        ZONE_C, HAS_LN, HAS_LNC, True,
                    )  # fmt: skip
        if HAS_LNC:
            _grid_barrier(cnt, (PH * k + I_LNC) * n_prog)  # dq's row sums of every program
            for b0 in tl.range(0, B, BLOCK_B, num_stages=1):
                o_b = b0 + tl.arange(0, BLOCK_B)
                m_b = o_b < B
                m_hb = m_h[:, None] & m_b[None, :]
                o_c = o_b[None, :] * H + o_h[:, None]
                o_g = t64 * B * G * H + o_b[None, :] * (G * H) + o_h[:, None]
                b_i, b_f, b_g, b_o, b_cp, b_c = _lstm_load_saved(
                    gates + o_g, cs, s_in, s_out, o_c, m_hb, B, H, COUPLED, ACC
                )
                b_dc = tl.load(dc + o_c, mask=m_hb, other=0.0)
                m_live = _live(lengths, t, o_b, m_b, HAS_LEN)
                _lstm_bwd_tail(
                    0.0, b_i, b_f, b_g, b_o, b_cp, b_c, b_dc, b_pi, b_pf, b_po, m_live, dgx, dc,
                    pb, pc, aux, dqs, ln_hh, ln_c_w, rng, t, t64, i_u, o_h, m_h, o_b, m_b, B, H,
                    N_U, z_stream, z_c, thr_c, G, COUPLED, ACC, HAS_PEEP, HAS_RNG, ZONE_C,
                    HAS_LN, HAS_LNC, True,
                )  # fmt: skip
        if HAS_LN:
            _grid_barrier(cnt, (PH * k + I_LN) * n_prog)  # da's row sums of every program
            for b0 in tl.range(0, B, BLOCK_B, num_stages=1):
                o_b = b0 + tl.arange(0, BLOCK_B)
                _lstm_bwd_du(du, dgx, aux, ln_hh, pb, t64, o_h, m_h, o_b, o_b < B, B, N_U, G, H,
                             ACC)  # fmt: skip


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


def _persistent_tiles(H: int, B: int, G: int, P: int, x, backward: bool):
    """The tilings a persistent launch tries, in order (_common.persistent_tile_choices)."""
    props = None if is_interpreter() else device_props(x.device)
    return persistent_tile_choices(
        H, B, G=G, P=P, elt=x.element_size(), backward=backward, props=props
    )


def _option_args(rng, zoneout_c, zoneout_h, stream, drop, proj: bool):
    """Keyword arguments of the stepwise kernels for zoneout and recurrent dropout: (those of the
    cell kernels, those of the projection's forward and dh kernels). With a projection h is
    zoned by the latter (z_h = 0 for the cell kernels)."""
    z_h = float(zoneout_h)
    common = dict(rng=rng, z_stream=int(stream))
    cell = dict(common, drop=drop, z_c=float(zoneout_c), z_h=0.0 if proj else z_h,
                thr_c=zoneout_threshold(zoneout_c), thr_h=zoneout_threshold(zoneout_h))  # fmt: skip
    return cell, dict(common, z_h=z_h, thr_h=zoneout_threshold(zoneout_h))


def _persistent_option_args(options, ln) -> dict:
    """Keyword arguments of the persistent kernels for the options (`lstm_fwd`'s and
    `lstm_bwd`'s (rng, zoneout_c, zoneout_h, stream, drop) and layer norm's (ln_hh, ln_c_w,
    ln_c_b), or None): one kernel forms c and h, so z_h is h's wherever it is formed."""
    rng, zoneout_c, zoneout_h, stream, drop = options
    ln_hh, ln_c_w, ln_c_b = ln if ln is not None else (None, None, None)
    if ln_hh is None:
        ln_c_w = ln_c_b = None  # LN_c comes with LN_hh only
    return dict(rng=rng, drop=drop, ln_hh=ln_hh, ln_c_w=ln_c_w, ln_c_b=ln_c_b,
                z_stream=int(stream), z_c=float(zoneout_c), z_h=float(zoneout_h),
                thr_c=zoneout_threshold(zoneout_c), thr_h=zoneout_threshold(zoneout_h))  # fmt: skip


def _barriers(T: int, per_step: int) -> int:
    """Grid barriers a persistent launch crosses: per_step each step, none before the first."""
    return per_step * T - 1


def _lstm_fwd_persistent(gx, hs, cs, y, gates, ms, w_hh, w_hr, w_ch, lengths, reverse, coupled,
                         options=(None, 0.0, 0.0, 0, None), ln=None, aux=None):  # fmt: skip
    """One persistent launch over the sequence; False (nothing run) if it cannot run safely.
    `options` and `ln` (ln_hh, ln_c_w, ln_c_b) as `lstm_fwd`'s; `aux` layer norm's buffer
    ((T or 1, B, G*H + 3), one slot reused without a backward)."""
    T, B, GH, G, H, R = _dims(gx, w_hh, coupled)
    proj = w_hr is not None
    tiles = _persistent_tiles(H, B, G, R if proj else 0, gx, backward=False)
    n = tiles[0].programs  # every choice has the same units, and so programs
    opt = _persistent_option_args(options, ln)
    acc, dev = cs.dtype, gx.device
    drop, hd = opt["drop"], None
    if drop is not None:  # h0 ⊙ mask: what the first step's product reads
        hd = torch.empty((2, B, R), dtype=gx.dtype, device=dev)
        s0, _ = _state_index(T, reverse)
        hd[0] = (hs[s0].to(acc) * drop).to(gx.dtype)
    part = part_c = co = None
    ln_on, lnc_on = opt["ln_hh"] is not None, opt["ln_c_w"] is not None
    if ln_on:
        part = torch.empty((B, n, 2), dtype=acc, device=dev)
    if lnc_on:
        part_c = torch.empty((B, n, 2), dtype=acc, device=dev)
        co = torch.empty((B, 2 * H), dtype=acc, device=dev)
    per_step = 1 + int(ln_on) + int(lnc_on) + int(proj)
    return launch_persistent(
        _lstm_fwd_persistent_kernel, tiles, barriers=_barriers(T, per_step), device=dev,
        gx=gx, hs=hs, cs=cs, y=y, gates=gates, ms=ms, w_hh=w_hh, w_hr=w_hr, w_ch=w_ch,
        lengths=lengths, hd=hd, aux=aux, part=part, part_c=part_c, co=co, T=T, B=B,
        ln_ts=(B * (GH + 3) if aux is not None and aux.shape[0] == T else 0), H=H, R=R, G=G,
        COUPLED=coupled, REVERSE=reverse, ACC=_TL_ACC[acc], DOT_PREC=dot_precision(gx.dtype),
        **opt,
    )  # fmt: skip


def lstm_fwd(
    gx, h0, c0, w_hh, w_hr, w_ch, lengths, reverse, coupled, store_gates, rng=None,
    zoneout_c=0.0, zoneout_h=0.0, stream=0, drop=None, ln_hh=None, ln_c_w=None, ln_c_b=None, *,
    persistent=False,
):  # fmt: skip
    """Runs the forward recurrence; returns (y, hs, cs, gates, ms) (see the file docstring),
    and with layer norm a sixth element aux (T, B, G*H + 3) [û | rstd | mean_c, rstd_c] (None
    without `store_gates`).

    Options: zoneout of c and h (masks from `rng` (2,) int64 in training, the expectation
    without it) in layer-direction `stream`, recurrent dropout's (B, R) mask `drop` in the
    accumulation dtype, layer norm: gains `ln_hh` of the recurrent product and LN_c's `ln_c_w`,
    `ln_c_b` (stepwise: phase 1 `_common._ln_rec_kernel` before the cell kernel and
    `_lstm_fwd_ln_out_kernel` after it; persistent: more phases per step, file docstring).
    persistent=True: one persistent launch when it can run safely, else the stepwise loop.
    """
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
    aux = None
    if ln_hh is not None:
        # without a backward one slot serves every step
        aux = new_output((T if store_gates else 1, B, GH + 3), acc, dev)
        if ln_c_w is None:
            aux[..., GH + 1 :] = 0.0  # no LN_c statistics
    done = (y, hs, cs, gates, ms) + (() if ln_hh is None else (aux if store_gates else None,))
    options = (rng, zoneout_c, zoneout_h, stream, drop)
    if persistent and _lstm_fwd_persistent(
        gx, hs, cs, y, gates, ms, w_hh, w_hr, w_ch, lengths, reverse, coupled, options,
        (ln_hh, ln_c_w, ln_c_b), aux,
    ):  # fmt: skip
        return done

    kw = dict(REVERSE=reverse, ACC=_TL_ACC[acc], DOT_PREC=dot_precision(dt))
    opt_cell, opt_proj = _option_args(rng, zoneout_c, zoneout_h, stream, drop, w_hr is not None)
    cell_grid, cell_kw = _stepwise_meta(B, H, R, "BLOCK_H")
    ln = dict(ln_hh=None, lnb=None, part=None, co=None, part_c=None, n_ln=0, ln_bn=0, LD=0,
              ln_ts=0)  # fmt: skip
    rec = out = None
    if ln_hh is not None:
        LD = GH + 3
        ts = B * LD if store_gates else 0
        rec_grid, rec_kw = _stepwise_meta(B, GH, R, "BLOCK_N")
        part = torch.empty((rec_grid[0], B, 2), dtype=acc, device=dev)
        rec = step_launcher(
            _ln_rec_kernel, rec_grid, ("t", "s_in"), hs=hs, w_hh=w_hh, drop=drop, lnb=aux,
            part=part, B=B, N=GH, R=R, LD=LD, TS=ts, ACC=kw["ACC"], DOT_PREC=kw["DOT_PREC"],
            **rec_kw,
        )  # fmt: skip
        ln.update(ln_hh=ln_hh, lnb=aux, part=part, n_ln=rec_grid[0], ln_bn=rec_kw["BLOCK_N"],
                  LD=LD, ln_ts=ts)  # fmt: skip
        if ln_c_w is not None:
            co = torch.empty((B, 2 * H), dtype=acc, device=dev)
            part_c = torch.empty((cell_grid[0], B, 2), dtype=acc, device=dev)
            ln.update(co=co, part_c=part_c)
            out = step_launcher(
                _lstm_fwd_ln_out_kernel, cell_grid, ("t",), co=co, part_c=part_c, ln_c_w=ln_c_w,
                ln_c_b=ln_c_b, lnb=aux, hs=hs, y=y, ms=ms, lengths=lengths, rng=rng, B=B, H=H,
                GH=GH, n_pc=cell_grid[0], LD=LD, ln_ts=ts, z_stream=opt_cell["z_stream"],
                z_h=opt_cell["z_h"], thr_h=opt_cell["thr_h"], REVERSE=reverse, ACC=kw["ACC"],
                BLOCK_H=cell_kw["BLOCK_H"], BLOCK_B=cell_kw["BLOCK_B"],
                num_warps=cell_kw["num_warps"],
            )  # fmt: skip
    cell = step_launcher(
        _lstm_fwd_cell_kernel, cell_grid, ("t",), gx=gx, hs=hs, cs=cs, y=y, gates=gates, ms=ms,
        w_hh=w_hh, w_ch=w_ch, lengths=lengths, B=B, H=H, R=R, G=G, COUPLED=coupled, **kw,
        **cell_kw, **opt_cell, **ln,
    )  # fmt: skip
    if w_hr is not None:
        proj_grid, proj_kw = _stepwise_meta(B, R, H, "BLOCK_P")
        proj = step_launcher(
            _lstm_fwd_proj_kernel, proj_grid, ("t",), ms=ms, w_hr=w_hr, hs=hs, y=y,
            lengths=lengths, B=B, H=H, P=R, **kw, **proj_kw, **opt_proj,
        )  # fmt: skip
    for s in range(T):
        t = T - 1 - s if reverse else s
        if rec is not None:
            rec(t, t + 1 if reverse else t)
        cell(t)
        if out is not None:
            out(t)
        if w_hr is not None:
            proj(t)
    return done


def _lstm_bwd_persistent(dy, dh, dc, dgx, dhs, cs, gates, w_hh, w_hr, w_ch, lengths, reverse,
                         coupled, options=(None, 0.0, 0.0, 0, None), ln=None):  # fmt: skip
    """One persistent launch over the reversed sequence. Returns (ran, dqs): ran False when
    nothing ran (the launch cannot be made safe); dqs (T, B, H), LN_c's output gradients, or
    None. Leaves in dh, dc and dgx what the stepwise loop leaves there. `ln`: (ln_hh, aux,
    ln_c_w, ln_c_b) or None, as `_lstm_bwd_stepwise`'s."""
    T, B, GH, G, H, R = _dims(gates, w_hh, coupled)
    proj = w_hr is not None
    tiles = _persistent_tiles(H, B, G, R if proj else 0, dy, backward=True)
    n = tiles[0].programs
    ln_hh, aux, ln_c_w, ln_c_b = ln if ln is not None else (None, None, None, None)
    opt = _persistent_option_args(options, (ln_hh, ln_c_w, ln_c_b))
    acc, dev = cs.dtype, dy.device
    pb = pc = dqs = du = None
    if opt["ln_hh"] is not None:
        pb = torch.empty((B, n, 2), dtype=acc, device=dev)
        du = torch.empty((B, GH), dtype=dy.dtype, device=dev)
    if opt["ln_c_w"] is not None:
        pc = torch.empty((B, n, 2), dtype=acc, device=dev)
        dqs = new_output((T, B, H), acc, dev)
    per_step = 1 + int(proj) + int(pc is not None) + int(pb is not None)
    ran = launch_persistent(
        _lstm_bwd_persistent_kernel, tiles, barriers=_barriers(T, per_step), device=dev,
        dgx=dgx, gates=gates, cs=cs, dh=dh, dc=dc, dy=dy, dhs=dhs, w_hh=w_hh, w_hr=w_hr,
        w_ch=w_ch, lengths=lengths, aux=aux, pb=pb, pc=pc, dqs=dqs, du=du, T=T, B=B, H=H, R=R,
        G=G, COUPLED=coupled, REVERSE=reverse, ACC=_TL_ACC[acc],
        DOT_PREC=dot_precision(dy.dtype), **opt,
    )  # fmt: skip
    return ran, dqs


def lstm_bwd(
    dy, dhT, dcT, hs, cs, gates, ms, w_hh, w_hr, w_ch, lengths, reverse, coupled, needs,
    aux=None, rng=None, zoneout_c=0.0, zoneout_h=0.0, stream=0, drop=None, ln_hh=None,
    ln_c_w=None, ln_c_b=None, *, persistent=False,
):  # fmt: skip
    """Reverse-time loop; returns (dgx, dh0, dc0, dw_hh, dw_hr, dw_ch) (None where not needed),
    and the layer-norm gradients (dln_hh, dln_c_w, dln_c_b) when `needs` has their 3 flags.

    The options as `lstm_fwd`'s (the same rng, stream and mask: the zoneout masks are drawn
    again, not stored; `aux` is forward's with layer norm, from either strategy). persistent=True:
    one persistent launch when it can run safely, else the stepwise loop.
    """
    options = (rng, zoneout_c, zoneout_h, stream, drop)
    ln = None if ln_hh is None else (ln_hh, aux, ln_c_w, ln_c_b)
    T, B, GH = gates.shape
    R = w_hh.shape[1]
    dt, acc = hs.dtype, cs.dtype
    dev = hs.device

    dgx = new_output((T, B, GH), dt, dev)
    # (B, R) and (B, H), updated in place by the kernels: always fresh copies, never the caller's
    dh = dhT.to(dtype=acc, memory_format=torch.contiguous_format, copy=True)
    dc = dcT.to(dtype=acc, memory_format=torch.contiguous_format, copy=True)
    dhs = new_output((T, B, R), dt, dev) if w_hr is not None else None
    ran, dqs = False, None
    if persistent:
        ran, dqs = _lstm_bwd_persistent(dy, dh, dc, dgx, dhs, cs, gates, w_hh, w_hr, w_ch,
                                        lengths, reverse, coupled, options, ln)  # fmt: skip
    if not ran:
        dqs = _lstm_bwd_stepwise(dy, dh, dc, dgx, dhs, cs, gates, w_hh, w_hr, w_ch, lengths,
                                 reverse, coupled, options, ln)  # fmt: skip
    grads = _lstm_bwd_weights(dgx, dh, dc, dhs, hs, cs, ms, w_hh, lengths, reverse, coupled,
                              needs[:6], gates, options, ln)  # fmt: skip
    if ln is None:
        return grads + (None,) * (len(needs) - 6)
    return grads + _lstm_bwd_ln_grads(dgx, dqs, cs, gates, aux, ln_c_w, reverse, coupled, needs)


def _lstm_bwd_stepwise(dy, dh, dc, dgx, dhs, cs, gates, w_hh, w_hr, w_ch, lengths, reverse,
                       coupled, options=(None, 0.0, 0.0, 0, None), ln=None):  # fmt: skip
    """One launch (two with a projection) per step, reverse time order; with LN_c one more
    (`_lstm_bwd_ln_out_kernel`, before the cell kernel). Returns dqs (T, B, H), LN_c's output
    gradients, or None."""
    T, B, GH, G, H, R = _dims(gates, w_hh, coupled)
    kw = dict(REVERSE=reverse, ACC=_TL_ACC[cs.dtype], DOT_PREC=dot_precision(dy.dtype))
    opt_cell, opt_dh = _option_args(*options, w_hr is not None)
    cell_grid, cell_kw = _stepwise_meta(B, H, R if w_hr is not None else GH, "BLOCK_H")
    ln_kw = dict(ln_hh=None, aux=None, pb=None, n_pb=0, LD=0)
    lnc_kw = dict(ln_c_w=None, ln_c_b=None, dqs=None, pc=None)
    if ln is not None:
        ln_hh, aux, ln_c_w, ln_c_b = ln
        pb = torch.empty((cell_grid[0], B, 2), dtype=cs.dtype, device=cs.device)
        ln_kw = dict(ln_hh=ln_hh, aux=aux, pb=pb, n_pb=cell_grid[0], LD=GH + 3)
        if ln_c_w is not None:
            dqs = new_output((T, B, H), cs.dtype, cs.device)
            pc = torch.empty((cell_grid[0], B, 2), dtype=cs.dtype, device=cs.device)
            lnc_kw = dict(ln_c_w=ln_c_w, ln_c_b=ln_c_b, dqs=dqs, pc=pc)
    out_kw = None
    if lnc_kw["dqs"] is not None:
        out_kw = dict(
            dgx=dgx, gates=gates, cs=cs, dh=dh, dy=dy, dhs=dhs, w_hh=w_hh, w_hr=w_hr,
            lengths=lengths, B=B, H=H, R=R, G=G, COUPLED=coupled, **kw, **cell_kw, **opt_cell,
            **ln_kw, **lnc_kw,
        )  # fmt: skip
        out_kw.pop("w_ch", None)
    cell_kw.update(
        dgx=dgx, gates=gates, cs=cs, dc=dc, dh=dh, dy=dy, dhs=dhs, w_hh=w_hh, w_hr=w_hr,
        w_ch=w_ch, lengths=lengths, B=B, H=H, R=R, G=G, COUPLED=coupled, **kw, **opt_cell,
        **ln_kw, **lnc_kw,
    )  # fmt: skip
    if w_hr is not None:
        dh_grid, dh_kw = _stepwise_meta(B, R, GH, "BLOCK_P")
        dh_kw.update(dgx=dgx, w_hh=w_hh, dh=dh, dy=dy, dhs=dhs, lengths=lengths, B=B, GH=GH, P=R,
                     drop=options[4], **kw, **opt_dh, **ln_kw)  # fmt: skip
    # the first step processed (s = T - 1) has no later step to take dh from: its own variant
    t = 0 if reverse else T - 1
    if w_hr is not None:
        _lstm_bwd_dh_kernel[dh_grid](t=t, USE_NEXT=False, **dh_kw)
        dh_step = step_launcher(_lstm_bwd_dh_kernel, dh_grid, ("t",), USE_NEXT=True, **dh_kw)
    if out_kw is not None:
        _lstm_bwd_ln_out_kernel[cell_grid](t=t, USE_NEXT=False, **out_kw)
        out = step_launcher(_lstm_bwd_ln_out_kernel, cell_grid, ("t",), USE_NEXT=True, **out_kw)
    _lstm_bwd_cell_kernel[cell_grid](t=t, USE_NEXT=False, **cell_kw)
    cell = step_launcher(_lstm_bwd_cell_kernel, cell_grid, ("t",), USE_NEXT=True, **cell_kw)
    for s in range(T - 2, -1, -1):
        t = T - 1 - s if reverse else s
        if w_hr is not None:
            dh_step(t)
        if out_kw is not None:
            out(t)
        cell(t)
    return lnc_kw["dqs"]


def _lstm_bwd_ln_grads(dgx, dqs, cs, gates, aux, ln_c_w, reverse, coupled, needs):
    """(dγ_hh, dγ_c, dβ_c) after the reverse loop: Σ da ⊙ û, Σ dq ⊙ ĉ, Σ dq over steps and rows
    (None where `needs` does not ask, or without LN_c)."""
    T, B, GH = dgx.shape
    G = 3 if coupled else 4
    H = GH // G
    dt, acc = dgx.dtype, cs.dtype
    flags = list(needs[6:9]) + [False] * (9 - len(needs))
    dln = dcw = dcb = None
    if flags[0]:
        dln = (dgx.to(acc) * aux[..., :GH]).sum((0, 1)).to(dt)
    if ln_c_w is not None and (flags[1] or flags[2]):
        c_prev = cs[1:] if reverse else cs[:-1]
        blocks = gates.view(T, B, G, H)
        gf = 0 if coupled else 1
        i = 1.0 - blocks[:, :, 0] if coupled else blocks[:, :, 0]
        c_til = blocks[:, :, gf] * c_prev + i * blocks[:, :, gf + 1]
        c_hat = (c_til - aux[..., GH + 1 : GH + 2]) * aux[..., GH + 2 :]
        dcw = (dqs * c_hat).sum((0, 1)).to(dt) if flags[1] else None
        dcb = dqs.sum((0, 1)).to(dt) if flags[2] else None
    return (dln, dcw, dcb)[: max(len(needs) - 6, 0)]


def _lstm_bwd_weights(dgx, dh, dc, dhs, hs, cs, ms, w_hh, lengths, reverse, coupled, needs,
                      gates=None, options=(None, 0.0, 0.0, 0, None), ln=None):  # fmt: skip
    """After the reverse loop: dh0, dc0 and the weight gradients, one GEMM / reduction each over
    all steps (dead steps have da = 0). Returns (dgx, dh0, dc0, dw_hh, dw_hr, dw_ch).

    Recurrent dropout: W_hh met h ⊙ mask. Zoneout of h: dh holds what the first step processed
    passed to h0 past its cell. Zoneout of c: the peephole of o saw the candidate c̃ = f c + i g
    (recomputed from `gates`), not the zoned state in cs. Layer norm: W_hh met du = LN_hh'(da)
    = rstd (γ da - mean(γ da) - û mean(γ da û)), not da."""
    T, B, GH, G, H, R = _dims(dgx, w_hh, coupled)
    dt, acc = hs.dtype, cs.dtype
    need_gx, need_h0, need_c0, need_whh, need_whr, need_wch = needs
    _, zoneout_c, zoneout_h, _, drop = options
    du = dgx
    if ln is not None:  # the gradient of the product, from that of LN_hh's output
        ln_hh, aux = ln[0], ln[1]
        dv = dgx.to(acc) * ln_hh.to(acc)
        u_hat, rstd = aux[..., :GH], aux[..., GH : GH + 1]
        du = rstd * (dv - dv.mean(-1, keepdim=True) - u_hat * (dv * u_hat).mean(-1, keepdim=True))
    h_prev = hs[1:] if reverse else hs[:-1]  # (T, B, R): the state each step read
    c_prev = cs[1:] if reverse else cs[:-1]
    c_new = cs[:-1] if reverse else cs[1:]
    dh0 = dc0 = dw_hh = dw_hr = dw_ch = None
    if need_h0:
        t0 = T - 1 if reverse else 0  # the first step processed read h0
        dh0 = du[t0].to(acc) @ w_hh.to(acc)
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
        if ln is not None:
            dw_hh = (du.reshape(T * B, GH).t() @ h_prev.reshape(T * B, R).to(acc)).to(dt)
        else:
            dw_hh = dgx.reshape(T * B, GH).t() @ h_prev.reshape(T * B, R)
    if need_whr:
        dw_hr = dhs.reshape(T * B, R).t() @ ms.reshape(T * B, H)
    if need_wch:
        da = dgx.view(T, B, G, H).to(acc)
        gf = 0 if coupled else 1
        if zoneout_c > 0 or (ln is not None and ln[2] is not None):
            blocks = gates.view(T, B, G, H)
            i = 1.0 - blocks[:, :, 0] if coupled else blocks[:, :, 0]
            c_new = blocks[:, :, gf] * c_prev + i * blocks[:, :, gf + 1]
        parts = [] if coupled else [(da[:, :, 0] * c_prev).sum((0, 1))]
        parts += [(da[:, :, gf] * c_prev).sum((0, 1)), (da[:, :, gf + 2] * c_new).sum((0, 1))]
        dw_ch = torch.cat(parts).to(dt)
    return (dgx if need_gx else None), dh0, dc0, dw_hh, dw_hr, dw_ch
