"""GRU and Elman RNN recurrences in Triton: stepwise (one launch per step) and persistent.

Legend
    T  time steps         B  batch         H  hidden units
    G  gates: 3 for the GRU (r | z | n, torch's row order), 1 for the RNN

Forward, for each step t in processing order (T-1 .. 0 when reverse), per sequence b:
    GRU   a   = h W_hh^T  (3 row blocks: a_r | a_z | a_n)
          gx_t = x_t W_ih^T + b_ih + [b_hr | b_hz | 0]     (the caller folds b_hh's r, z parts)
          r  = σ(gx_r + a_r);   z = σ(gx_z + a_z)
          hn = a_n + b_hn                                  (b_hn cannot fold: r multiplies it)
          n  = tanh(gx_n + r ⊙ hn)
          h' = (1 - z) ⊙ n + z ⊙ h
    RNN   h' = act(gx_t + h W_hh^T)          act = tanh | relu, gx_t includes b_ih + b_hh
With `lengths`, step t is live for b only when t < lengths[b]; a dead step keeps h and writes
y_t[b] = 0, so the reverse direction starts at each sequence's own last step.

Backward, per step in reverse processing order, with dh the gradient reaching h' (from y_t, from
the step that read h' through W_hh, and the direct term `carry` below):
    GRU   dn_pre = dh ⊙ (1 - z) ⊙ (1 - n²)      = dgx_n
          dz_pre = dh ⊙ (h - n) ⊙ z(1 - z)       = dgx_z
          dhn    = dn_pre ⊙ r                    gradient of W_hn h + b_hn
          dr_pre = dn_pre ⊙ hn ⊙ r(1 - r)        = dgx_r
          carry  = dh ⊙ z                        the part of dh_prev that skips W_hh
          dh_prev = carry + [dr_pre | dz_pre | dhn] W_hh
    RNN   dpre = dh ⊙ act'(h')  (1 - h'² | h' > 0) = dgx;   carry = 0;   dh_prev = dpre W_hh
    dW_hh = Σ_t dgh_t^T h_{t-1} with dgh = [dr_pre | dz_pre | dhn] (GRU) or dpre (RNN), one GEMM
    per row block after the loop;  db_hn = Σ_{t,b} dhn.
A dead step passes dh through unchanged (carry = dh) and has dgx = dgh = 0.

Both cells share the kernels below: `CELL` (a constexpr) picks the GRU or the RNN maths, so
the RNN needs no file of its own. Kernels work on (hidden, batch) tiles: hidden units on
the MMA's M side, the small batch on N, padded to 16 with masks; one `tl.dot` per gate block.
The per-step maths is written once, as jit helpers (`_gru_cell`, `_gru_cell_bwd`, their loads
and stores), for both strategies (DESIGN.md):

stepwise, one launch per step: `_fwd_step_kernel`, `_bwd_step_kernel`. Backward launch for
step t first completes dh for its units from the previous launch's dgh (dgh_{t+1} W_hh[:, j], a
`tl.dot` over G*H), then does the pointwise part; a last launch with no step (HAS_STEP=False)
forms dh0.

persistent, one launch per sequence and direction: `_fwd_persistent_kernel` and
`_bwd_persistent_kernel`. Program i owns a block of units, all their gates, for every sequence
(the batch is looped over in chunks inside): the grid holds W_hh once, each program its units'
rows (forward) or columns (backward), loaded once, gates interleaved on the MMA's M side (the
GRU's 3 plus a zero block, as in kernels/lstm.py; the RNN's one block of 64 units). Programs
meet at a grid barrier each step, after which h_{t-1} (backward: dgh_{t+1}) of every unit is
read from L2 before the step's one product. The persistent backward writes dgh = dr | dz | dhn
of a step as one (T, B, 3H) slab (dhn is its n block), so that a step reads one operand.
dh0 = carry + dgh_{t0} W_hh is one GEMM after the backward launch. The launchers run the
stepwise kernels instead where the launch cannot be made safe (_common.launch_persistent).

What forward keeps for backward (buffers in "time order": the state entering step t is index t,
the one leaving it t + 1; reversed with reverse=True, so h0 sits at T there):
    hs  (T+1, B, H) input dtype: every h including h0 (the dW_hh GEMM reads h_{t-1} from it;
        the RNN's act' reads h').
    ws  (T, B, 4H) fp32 (fp64 for fp64 input), GRU only: r | z | n | hn of every step, so
        backward recomputes neither the recurrent product nor a transcendental. fp32 because
        the backward products of gates lose accuracy in bf16.
ws is only written when a gradient is needed. Backward writes dgx (T, B, G*H) in the input dtype
(it is both the returned gradient and, for the r, z (or RNN) blocks, dgh) and for the GRU dhn
(T, B, H), the n block of dgh (persistent: the n block of the (T, B, 3H) dgh slab).

Options (both strategies, the same buffers: either backward accepts either forward):
    zoneout     h_t = d ⊙ h_{t-1} + (1 - d) ⊙ h̃_t (Krueger et al. 2016), d the 0/1 Philox masks
                of _common._zoneout_keep (drawn again in backward) in training, the probability
                in evaluation; y_t = h_t. Backward: (1 - d) ⊙ dh enters the cell, d ⊙ dh joins
                carry. The RNN's backward needs act'(h̃), which the zoned state no longer shows:
                with zoneout it keeps h̃ in ws (T, B, H).
    recurrent dropout   h ⊙ m meets W_hh, m (B, H) of 0 and 1/(1-p) per sequence (Gal &
                Ghahramani 2016), in all three GRU products; the carry z ⊙ h keeps h. The
                persistent forward's programs that form h_t also store h_t ⊙ m (the (2, B, H)
                buffer hd, by step parity), which the next step's product reads in place of h.
    layer norm  (GRU) a = γ ⊙ û + [0 | 0 | b_hn], û = LN(h W_hh^T) over the row's 3H values
                (Ba, Kiros & Hinton 2016; kernels/_common.py, "layer norm"); aux (T, B, 3H + 1)
                fp32: û | rstd. Stepwise: phase 1 `_common._ln_rec_kernel` then the step kernel,
                two launches per step; backward stays one launch per step: it forms
                du = LN'(dgh) inside the product from per-program row sums the previous launch
                left (two slots by step parity, as one launch reads one step's and writes the
                next's). Persistent: two phases and two grid barriers per step both ways, the
                second after every program's partials are written; the backward's second phase
                forms du of its units (`_common._ln_du`), which the next step's product reads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    _diag_sum,
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
    persistent_tile_choices,
    zoneout_threshold,
)
from ._launch import step_launcher

__all__ = [
    "gru_fwd",
    "gru_bwd",
    "CELL_GRU",
    "CELL_RNN_TANH",
    "CELL_RNN_RELU",
]

# values of the CELL constexpr
CELL_GRU = 0
CELL_RNN_TANH = 1
CELL_RNN_RELU = 2

_TL_ACC = {torch.float64: tl.float64, torch.float32: tl.float32}


# =========================================================================== kernels


@triton.jit
def _gru_load_gx(p, m_hb, H, CELL: tl.constexpr, ACC: tl.constexpr):
    """Input gates of one step, (BLOCK_H, BLOCK_B) each in ACC, p at gate block 0 of the tile:
    GRU (r, z, n) blocks; RNN its one block three times (the last two unused)."""
    b_g0 = tl.load(p, mask=m_hb, other=0.0).to(ACC)
    if CELL == 0:
        b_gz = tl.load(p + H, mask=m_hb, other=0.0).to(ACC)
        b_gn = tl.load(p + 2 * H, mask=m_hb, other=0.0).to(ACC)
        return b_g0, b_gz, b_gn
    else:
        return b_g0, b_g0, b_g0


@triton.jit
def _gru_cell(b_g0, b_gz, b_gn, b_a0, b_az, b_an, b_h, CELL: tl.constexpr):
    """One forward step from the input gates g, the recurrent products a (a_n includes b_hn)
    and h = h_{t-1}. Returns (h', r, z, n) in ACC; the RNN returns h' four times."""
    if CELL == 0:
        b_r = _sigmoid(b_g0 + b_a0)
        b_z = _sigmoid(b_gz + b_az)
        b_n = _tanh(b_gn + b_r * b_an)
        return b_n + b_z * (b_h - b_n), b_r, b_z, b_n
    else:
        if CELL == 1:
            b_hnew = _tanh(b_g0 + b_a0)
        else:
            b_hnew = tl.maximum(b_g0 + b_a0, 0.0)
        return b_hnew, b_hnew, b_hnew, b_hnew


@triton.jit
def _gru_store_ws(p, b_r, b_z, b_n, b_an, m_hb, H):
    """r | z | n | hn of one step into its (B, 4H) slab of ws, p at block 0 of the tile."""
    tl.store(p, b_r, mask=m_hb)
    tl.store(p + H, b_z, mask=m_hb)
    tl.store(p + 2 * H, b_n, mask=m_hb)
    tl.store(p + 3 * H, b_an, mask=m_hb)


@triton.jit
def _gru_fwd_step(b_g0, b_gz, b_gn, b_a0, b_az, b_an, b_h, m_live, p_h, p_y, ws, o_ws, m_hb, H,
                  CELL: tl.constexpr, ACC: tl.constexpr, STORE_WS: tl.constexpr):  # fmt: skip
    """`_gru_cell` from h = b_h (in hs's dtype), then h' stored at p_h (h where the step is dead),
    y_t at p_y (0 where dead) and, with STORE_WS, r | z | n | hn at ws + o_ws. Returns h'."""
    b_hnew, b_r, b_z, b_n = _gru_cell(b_g0, b_gz, b_gn, b_a0, b_az, b_an, b_h.to(ACC), CELL)
    if STORE_WS:
        _gru_store_ws(ws + o_ws, b_r, b_z, b_n, b_an, m_hb, H)
    b_hnew = b_hnew.to(p_h.dtype.element_ty)
    b_h = tl.where(m_live, b_hnew, b_h)
    tl.store(p_h, b_h, mask=m_hb)
    tl.store(p_y, tl.where(m_live, b_hnew, 0.0), mask=m_hb)
    return b_h


@triton.jit
def _gru_load_saved(ws, o_ws, p_h, p_hnew, m_hb, H, CELL: tl.constexpr, ACC: tl.constexpr):
    """What backward reads of forward at one step: GRU (r, z, n, hn) at ws + o_ws and h_{t-1}
    at p_h; RNN h' at p_hnew, in all five places (four unused). ws is None for the RNN."""
    if CELL == 0:
        p_ws = ws + o_ws
        b_r = tl.load(p_ws, mask=m_hb, other=0.0)
        b_z = tl.load(p_ws + H, mask=m_hb, other=0.0)
        b_n = tl.load(p_ws + 2 * H, mask=m_hb, other=0.0)
        b_hn = tl.load(p_ws + 3 * H, mask=m_hb, other=0.0)
        b_h = tl.load(p_h, mask=m_hb, other=0.0).to(ACC)
        return b_r, b_z, b_n, b_hn, b_h
    else:
        b_hnew = tl.load(p_hnew, mask=m_hb, other=0.0).to(ACC)
        return b_hnew, b_hnew, b_hnew, b_hnew, b_hnew


@triton.jit
def _gru_cell_bwd(b_dh, b_r, b_z, b_n, b_hn, b_h, m_live, CELL: tl.constexpr):
    """One backward step from dh (the gradient reaching h', dy included) and `_gru_load_saved`'s
    values. Returns (dg0, dgz, dgn, dhn, carry): the gate pre-activation gradients (dgx blocks;
    the RNN's one block three times), the gradient of W_hn h + b_hn, and the part of dh_{t-1}
    that skips W_hh. A dead step gives zeros and carry = dh."""
    if CELL == 0:
        b_dn = tl.where(m_live, b_dh * (1.0 - b_z) * (1.0 - b_n * b_n), 0.0)
        b_dz = tl.where(m_live, b_dh * (b_h - b_n) * b_z * (1.0 - b_z), 0.0)
        b_dr = b_dn * b_hn * b_r * (1.0 - b_r)
        b_carry = tl.where(m_live, b_dh * b_z, b_dh)
        return b_dr, b_dz, b_dn, b_dn * b_r, b_carry
    else:
        b_hnew = b_r
        if CELL == 1:
            b_dpre = b_dh * (1.0 - b_hnew * b_hnew)
        else:
            b_dpre = tl.where(b_hnew > 0.0, b_dh, 0.0)
        b_dpre = tl.where(m_live, b_dpre, 0.0)
        return b_dpre, b_dpre, b_dpre, b_dpre, tl.where(m_live, 0.0, b_dh)


@triton.jit
def _gru_store_dgx(p_dgx, dhn, o_dhn, b_d0, b_dz, b_dn, b_dhn, m_hb, H, CELL: tl.constexpr):
    """dgx blocks of one step at p_dgx (GRU r, z, n; RNN one) and the GRU's dhn at dhn + o_dhn,
    cast to their dtype. dhn is None for the RNN."""
    DT: tl.constexpr = p_dgx.dtype.element_ty
    tl.store(p_dgx, b_d0.to(DT), mask=m_hb)
    if CELL == 0:
        tl.store(p_dgx + H, b_dz.to(DT), mask=m_hb)
        tl.store(p_dgx + 2 * H, b_dn.to(DT), mask=m_hb)
        tl.store(dhn + o_dhn, b_dhn.to(dhn.dtype.element_ty), mask=m_hb)


@triton.jit
def _gru_bwd_step(b_dh, b_dy, b_r, b_z, b_n, b_hn, b_h, m_live, p_dgx, dhn, o_dhn, m_hb, H,
                  CELL: tl.constexpr):  # fmt: skip
    """dy_t added to dh where the step is live (y_t is a constant 0 where it is dead: its gradient
    goes nowhere), `_gru_cell_bwd`, and `_gru_store_dgx` at p_dgx, dhn + o_dhn. Returns carry."""
    b_dh += tl.where(m_live, b_dy, 0.0)
    b_d0, b_dz, b_dn, b_dhn, b_carry = _gru_cell_bwd(b_dh, b_r, b_z, b_n, b_hn, b_h, m_live, CELL)
    _gru_store_dgx(p_dgx, dhn, o_dhn, b_d0, b_dz, b_dn, b_dhn, m_hb, H, CELL)
    return b_carry


_OPTION_HEURISTICS = {
    "HAS_RNG": lambda a: a["rng"] is not None,
    "HAS_DROP": lambda a: a["drop"] is not None,
    "ZONE_H": lambda a: a["z_h"] > 0,
}


@triton.heuristics(
    {
        "HAS_B_HN": lambda a: a["b_hn"] is not None,
        "HAS_LEN": lambda a: a["lengths"] is not None,
        "STORE_WS": lambda a: a["ws"] is not None,
        "HAS_LN": lambda a: a["ln_hh"] is not None,
        **_OPTION_HEURISTICS,
    }
)
@triton.jit(do_not_specialize=["t", "s_in", "s_out"])
def _fwd_step_kernel(
    gx,  # (T, B, G*H) input gates of every step, row blocks r | z | n (GRU)
    hs,  # (T+1, B, H) states in time order: reads slot s_in, writes slot s_out
    w_hh,  # (G*H, H) row-major
    b_hn,  # (H,) or None: the GRU's b_hh n block
    lengths,  # (B,) int64 or None
    y,  # (T, B, H) output
    ws,  # (T, B, 4*H) ACC or None: GRU r | z | n | hn for backward; RNN with zoneout (T, B, H) h̃
    rng,  # (2,) int64 (seed, offset) of the zoneout masks (training), or None
    drop,  # (B, H) ACC: recurrent dropout's mask on h where it meets W_hh, or None
    ln_hh,  # (G*H,) input dtype or None: LN_hh's gains (layer norm; its bias is in gx, b_hn)
    lnb,  # (T or 1, B, LD) ACC, layer norm: u of the step (phase 1) -> û in place, rstd at G*H
    part,  # (n_ln, B, 2) ACC, layer norm: phase 1's partial statistics
    t,  # step
    s_in,  # hs slot of h (t, or t + 1 with reverse)
    s_out,  # hs slot of h' (t + 1, or t with reverse)
    B,
    H,
    z_stream,  # layer-direction index in the zoneout masks' counters (not `stream`: reserved)
    z_h,  # zoneout probability (ZONE_H: > 0), the expectation's weight in evaluation
    thr_h,  # int32 threshold of the masks (_common.zoneout_threshold)
    n_ln,  # number of phase-1 blocks (partials per row)
    ln_bn,  # rows of G*H per phase-1 block
    LD,  # row stride of lnb (G*H + 1)
    ln_ts,  # step stride of lnb (B * LD, or 0 when one slot is reused)
    CELL: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_B_HN: tl.constexpr,
    HAS_LEN: tl.constexpr,
    STORE_WS: tl.constexpr,
    HAS_RNG: tl.constexpr,
    HAS_DROP: tl.constexpr,
    ZONE_H: tl.constexpr,
    HAS_LN: tl.constexpr,
):
    """One step for hidden units o_h of sequences o_b: h' into hs[s_out], y_t, (ws_t).

    Recurrent dropout: h ⊙ mask meets W_hh (all three products of the GRU; its carry z ⊙ h
    keeps h). Zoneout: h' = d ⊙ h + (1 - d) ⊙ h̃ after the cell's h̃. Layer norm (GRU): the
    products come normalised from phase 1 (`_common._ln_rec_kernel`, which applied the dropout
    mask): a_g = γ_g ⊙ û_g, and b_hn is added to the n block after the norm."""
    i_h, i_b = tl.program_id(0), tl.program_id(1)
    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    m_h, m_b = o_h < H, o_b < B
    m_hb = m_h[:, None] & m_b[None, :]
    i_t = t.to(tl.int64)
    G: tl.constexpr = 3 if CELL == 0 else 1
    p_hin = hs + s_in.to(tl.int64) * B * H
    # (BLOCK_H, BLOCK_B) offsets of element (b, j) in a (B, H) and a (B, G*H) slab
    o_bh = o_b[None, :] * H + o_h[:, None]
    o_bg = o_b[None, :] * (G * H) + o_h[:, None]
    p_gx = gx + i_t * B * G * H + o_bg

    # recurrent products a_g = (h W_g^T)^T, one tl.dot per gate block over h
    b_z0 = tl.zeros([BLOCK_H, BLOCK_B], dtype=ACC)
    if HAS_LN:
        b_mean, b_rstd = _ln_stats(part, o_b, m_b, B, G * H, n_ln, ln_bn, ACC)
        p_u = lnb + i_t * ln_ts + o_b[None, :] * LD + o_h[:, None]
        b_a0 = _ln_gate(p_u, ln_hh + o_h, m_h, m_hb, b_mean, b_rstd)
        b_az = _ln_gate(p_u + H, ln_hh + H + o_h, m_h, m_hb, b_mean, b_rstd)
        b_an = _ln_gate(p_u + 2 * H, ln_hh + 2 * H + o_h, m_h, m_hb, b_mean, b_rstd)
        if i_h == 0:
            tl.store(lnb + i_t * ln_ts + o_b * LD + G * H, b_rstd, mask=m_b)
    else:  # drop: recurrent dropout's mask, None without it (HAS_DROP)
        b_a0 = _mm_tile(b_z0, w_hh, p_hin, H, 1, H, o_h, m_h, o_b, m_b, H, DOT_PREC, BLOCK_K,
                        drop)  # fmt: skip
    b_h = tl.load(p_hin + o_bh, mask=m_hb, other=0.0)
    if not HAS_LN:
        b_az, b_an = b_a0, b_a0  # the RNN has one gate block
    if CELL == 0:
        if not HAS_LN:
            b_az = _mm_tile(b_z0, w_hh + H * H, p_hin, H, 1, H, o_h, m_h, o_b, m_b, H, DOT_PREC,
                            BLOCK_K, drop)  # fmt: skip
            b_an = _mm_tile(b_z0, w_hh + 2 * H * H, p_hin, H, 1, H, o_h, m_h, o_b, m_b, H,
                            DOT_PREC, BLOCK_K, drop)  # fmt: skip
        if HAS_B_HN:
            b_an += tl.load(b_hn + o_h, mask=m_h, other=0.0).to(ACC)[:, None]
    b_g0, b_gz, b_gn = _gru_load_gx(p_gx, m_hb, H, CELL, ACC)
    m_live = _live(lengths, t, o_b, m_b, HAS_LEN)
    p_hout = hs + s_out.to(tl.int64) * B * H + o_bh
    o_ws = i_t * B * 4 * H + o_b[None, :] * (4 * H) + o_h[:, None]
    if ZONE_H:
        b_hnew, b_r, b_z, b_n = _gru_cell(b_g0, b_gz, b_gn, b_a0, b_az, b_an, b_h.to(ACC), CELL)
        if STORE_WS:
            if CELL == 0:
                _gru_store_ws(ws + o_ws, b_r, b_z, b_n, b_an, m_hb, H)
            else:  # the RNN's backward needs act'(h̃), which the zoned state no longer shows
                tl.store(ws + i_t * B * H + o_bh, b_hnew, mask=m_hb)
        b_hnew = _zone(b_h, b_hnew, rng, t, z_stream, o_h, o_b, H, z_h, thr_h, 0, HAS_RNG)
        b_hnew = b_hnew.to(hs.dtype.element_ty)
        tl.store(p_hout, tl.where(m_live, b_hnew, b_h), mask=m_hb)
        tl.store(y + i_t * B * H + o_bh, tl.where(m_live, b_hnew, 0.0), mask=m_hb)
    else:
        _gru_fwd_step(
            b_g0, b_gz, b_gn, b_a0, b_az, b_an, b_h, m_live, p_hout, y + i_t * B * H + o_bh, ws,
            o_ws, m_hb, H, CELL, ACC, STORE_WS,
        )  # fmt: skip


@triton.heuristics(
    {
        "HAS_LEN": lambda a: a["lengths"] is not None,
        "HAS_LN": lambda a: a["ln_hh"] is not None,
        **_OPTION_HEURISTICS,
    }
)
@triton.jit(do_not_specialize=["t", "t_next", "s_in", "s_out"])
def _bwd_step_kernel(
    dy,  # (T, B, H) gradient of y
    hs,  # (T+1, B, H) states in time order (forward's)
    ws,  # (T, B, 4*H) ACC, GRU: r | z | n | hn; the RNN's (T, B, H) h̃ with zoneout, else None
    w_hh,  # (G*H, H) row-major
    lengths,  # (B,) int64 or None
    carry,  # (B, H) ACC, in place: the part of the gradient reaching h' that skips W_hh
    dgx,  # (T, B, G*H) out: dgx_t; step t_next (previous launch) is read for dgh W_hh
    dhn,  # (T, B, H) out, GRU: n block of dgh (r ⊙ dn_pre); None for the RNN
    dh0,  # (B, H) out when not HAS_STEP: the gradient reaching the state before t_next
    rng,  # (2,) int64 (seed, offset) of the zoneout masks, or None
    drop,  # (B, H) ACC: recurrent dropout's mask, or None
    ln_hh,  # (G*H,) input dtype or None: LN_hh's gains (layer norm)
    lnb,  # (T, B, LD) ACC, layer norm: forward's û (columns [0, G*H)) and rstd (column G*H)
    pb,  # (2, n_programs(0), B, 2) ACC, layer norm: per program, the row sums of γ dgh and
    #      γ dgh û of its units; two slots by step parity (a launch reads t_next's, writes t's)
    t,  # step (HAS_STEP)
    t_next,  # step processed by the previous launch (HAS_NEXT)
    s_in,  # hs slot of h_{t-1}
    s_out,  # hs slot of h'
    B,
    H,
    z_stream,  # layer-direction index in the zoneout masks' counters (not `stream`: reserved)
    z_h,  # zoneout probability
    thr_h,  # int32 threshold of the masks
    LD,  # row stride of lnb (G*H + 1)
    CELL: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_NEXT: tl.constexpr,
    HAS_STEP: tl.constexpr,
    HAS_LEN: tl.constexpr,
    HAS_RNG: tl.constexpr,
    HAS_DROP: tl.constexpr,
    ZONE_H: tl.constexpr,
    HAS_LN: tl.constexpr,
):
    """dh for units o_h of sequences o_b, then (HAS_STEP) step t's dgx, dhn and carry.

    Recurrent dropout: the W_hh part of dh is multiplied by the mask. Zoneout: the gradient of
    h' splits into (1 - d) ⊙ it, the cell's, and d ⊙ it, added to carry. Layer norm (GRU): the
    product runs over du_{t_next} = LN_hh'(dgh_{t_next}), formed chunk by chunk
    (`_common._mm_tile_ln`) from the row sums the previous launch left in pb; this launch
    leaves those of step t."""
    i_h, i_b = tl.program_id(0), tl.program_id(1)
    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    m_h, m_b = o_h < H, o_b < B
    m_hb = m_h[:, None] & m_b[None, :]
    G: tl.constexpr = 3 if CELL == 0 else 1
    o_bh = o_b[None, :] * H + o_h[:, None]
    o_bg = o_b[None, :] * (G * H) + o_h[:, None]

    b_dh = tl.load(carry + o_bh, mask=m_hb, other=0.0)
    if HAS_NEXT:
        # dh += (dgh_{t_next} W_hh)[:, o_h]: W_hh^T tiles (rows o_h = columns of W_hh) times
        # dgh^T, per gate block; the GRU's n block of dgh is dhn, not dgx_n
        i_n = t_next.to(tl.int64)
        p_dg = dgx + i_n * B * G * H
        b_rec = b_dh
        if HAS_DROP or HAS_LN:
            b_rec = tl.zeros([BLOCK_H, BLOCK_B], dtype=ACC)
        if HAS_LN:  # the GRU's
            b_s1, b_s2 = _ln_sums(
                pb + (t_next % 2) * tl.num_programs(0) * B * 2, o_b, m_b, B, tl.num_programs(0),
                ACC,
            )  # fmt: skip
            p_xh = lnb + i_n * B * LD
            b_rstd = tl.load(p_xh + o_b * LD + G * H, mask=m_b, other=0.0)
            b_s1, b_s2 = b_s1 / (G * H), b_s2 / (G * H)
            b_rec = _mm_tile_ln(
                b_rec, w_hh, p_dg, p_xh, ln_hh, 1, H, G * H, LD, o_h, m_h, o_b, m_b, H, b_rstd,
                b_s1, b_s2, DOT_PREC, BLOCK_K,
            )  # fmt: skip
            b_rec = _mm_tile_ln(
                b_rec, w_hh + H * H, p_dg + H, p_xh + H, ln_hh + H, 1, H, G * H, LD, o_h, m_h,
                o_b, m_b, H, b_rstd, b_s1, b_s2, DOT_PREC, BLOCK_K,
            )  # fmt: skip
            b_rec = _mm_tile_ln(
                b_rec, w_hh + 2 * H * H, dhn + i_n * B * H, p_xh + 2 * H, ln_hh + 2 * H, 1, H, H,
                LD, o_h, m_h, o_b, m_b, H, b_rstd, b_s1, b_s2, DOT_PREC, BLOCK_K,
            )  # fmt: skip
        else:
            b_rec = _mm_tile(
                b_rec, w_hh, p_dg, 1, H, G * H, o_h, m_h, o_b, m_b, H, DOT_PREC, BLOCK_K
            )
        if CELL == 0 and not HAS_LN:
            b_rec = _mm_tile(
                b_rec, w_hh + H * H, p_dg + H, 1, H, G * H, o_h, m_h, o_b, m_b, H, DOT_PREC,
                BLOCK_K,
            )  # fmt: skip
            b_rec = _mm_tile(
                b_rec, w_hh + 2 * H * H, dhn + i_n * B * H, 1, H, H, o_h, m_h, o_b, m_b, H,
                DOT_PREC, BLOCK_K,
            )  # fmt: skip
        if HAS_DROP:
            b_rec *= tl.load(drop + o_bh, mask=m_hb, other=0.0)
        if HAS_DROP or HAS_LN:
            b_dh += b_rec
        else:
            b_dh = b_rec

    if HAS_STEP:
        i_t = t.to(tl.int64)
        m_live = _live(lengths, t, o_b, m_b, HAS_LEN)
        b_dy = tl.load(dy + i_t * B * H + o_bh, mask=m_hb, other=0.0).to(ACC)
        p_hnew = hs + s_out.to(tl.int64) * B * H + o_bh
        if ZONE_H and CELL != 0:
            p_hnew = ws + i_t * B * H + o_bh  # the RNN's h̃ (hs holds the zoned state)
        b_r, b_z, b_n, b_hn, b_h = _gru_load_saved(
            ws, i_t * B * 4 * H + o_b[None, :] * (4 * H) + o_h[:, None],
            hs + s_in.to(tl.int64) * B * H + o_bh, p_hnew, m_hb, H, CELL, ACC,
        )  # fmt: skip
        if ZONE_H or HAS_LN:
            b_tot = b_dh + tl.where(m_live, b_dy, 0.0)
            b_cell = b_tot
            if ZONE_H:
                b_d = _zoneout_factor(rng, t, z_stream, o_h, o_b, H, z_h, thr_h, 0, HAS_RNG, ACC)
                b_cell = (1.0 - b_d) * b_tot
            b_d0, b_dz, b_dn, b_dhn, b_carry = _gru_cell_bwd(
                b_cell, b_r, b_z, b_n, b_hn, b_h, m_live, CELL
            )
            _gru_store_dgx(
                dgx + i_t * B * G * H + o_bg, dhn, i_t * B * H + o_bh, b_d0, b_dz, b_dn, b_dhn,
                m_hb, H, CELL,
            )  # fmt: skip
            if ZONE_H:
                b_carry = tl.where(m_live, b_carry + b_d * b_tot, b_dh)
            if HAS_LN:  # this program's row sums of γ dgh and γ dgh û, for the next launch
                p_xh = lnb + i_t * B * LD + o_b[None, :] * LD + o_h[:, None]
                p_pb = pb + ((t % 2) * tl.num_programs(0) * B + i_h * B + o_b) * 2
                _gru_ln_partials(p_pb, ln_hh, p_xh, o_h, m_h, m_b, m_hb, b_d0, b_dz, b_dhn, H,
                                 ACC)  # fmt: skip
        else:
            b_carry = _gru_bwd_step(
                b_dh, b_dy, b_r, b_z, b_n, b_hn, b_h, m_live, dgx + i_t * B * G * H + o_bg, dhn,
                i_t * B * H + o_bh, m_hb, H, CELL,
            )  # fmt: skip
        tl.store(carry + o_bh, b_carry, mask=m_hb)
    else:
        tl.store(dh0 + o_bh, b_dh.to(dh0.dtype.element_ty), mask=m_hb)


@triton.jit
def _gru_fwd_out(b_g0, b_gz, b_gn, b_a0, b_az, b_an, b_h, m_live, hs, y, ws, hd, drop, rng, t, i_t,
                 s_out, slot_out, o_h, o_b, m_hb, B, H, z_stream, z_h, thr_h, CELL: tl.constexpr,
                 ACC: tl.constexpr, STORE_WS: tl.constexpr, HAS_RNG: tl.constexpr,
                 ZONE_H: tl.constexpr, HAS_DROP: tl.constexpr):  # fmt: skip
    """A persistent forward step's cell for units o_h of rows o_b, from the input gates g, the
    recurrent pre-activations a (a_n with b_hn) and h_{t-1} = b_h (hs's dtype): h' (zoned with
    h_{t-1}: ZONE_H) into slot s_out of hs, y_t, ws (GRU: r | z | n | hn; the RNN with zoneout
    its h̃, which backward's act' needs) and, with recurrent dropout, h' ⊙ mask into slot
    slot_out of hd (what the next step's product reads)."""
    o_bh = o_b[None, :] * H + o_h[:, None]
    p_hout = hs + s_out * B * H + o_bh
    o_ws = i_t * B * 4 * H + o_b[None, :] * (4 * H) + o_h[:, None]
    if ZONE_H:
        b_hnew, b_r, b_z, b_n = _gru_cell(b_g0, b_gz, b_gn, b_a0, b_az, b_an, b_h.to(ACC), CELL)
        if STORE_WS:
            if CELL == 0:
                _gru_store_ws(ws + o_ws, b_r, b_z, b_n, b_an, m_hb, H)
            else:
                tl.store(ws + i_t * B * H + o_bh, b_hnew, mask=m_hb)
        b_hnew = _zone(b_h, b_hnew, rng, t, z_stream, o_h, o_b, H, z_h, thr_h, 0, HAS_RNG)
        b_hnew = b_hnew.to(hs.dtype.element_ty)
        b_st = tl.where(m_live, b_hnew, b_h)
        tl.store(p_hout, b_st, mask=m_hb)
        tl.store(y + i_t * B * H + o_bh, tl.where(m_live, b_hnew, 0.0), mask=m_hb)
    else:
        b_st = _gru_fwd_step(
            b_g0, b_gz, b_gn, b_a0, b_az, b_an, b_h, m_live, p_hout, y + i_t * B * H + o_bh, ws,
            o_ws, m_hb, H, CELL, ACC, STORE_WS,
        )  # fmt: skip
    if HAS_DROP:
        b_s = tl.load(drop + o_bh, mask=m_hb, other=0.0)
        p_hd = hd + slot_out * B * H + o_bh
        tl.store(p_hd, (b_st.to(b_s.dtype) * b_s).to(hd.dtype.element_ty), mask=m_hb)


@triton.heuristics(
    {
        "HAS_B_HN": lambda a: a["b_hn"] is not None,
        "HAS_LEN": lambda a: a["lengths"] is not None,
        "STORE_WS": lambda a: a["ws"] is not None,
        "HAS_LN": lambda a: a["ln_hh"] is not None,
        **_OPTION_HEURISTICS,
    }
)
@triton.jit
def _fwd_persistent_kernel(
    gx,  # (T, B, G*H) input gates of every step, row blocks r | z | n (GRU)
    hs,  # (T+1, B, H) states in time order: h0 in place; every state written, read back by all
    w_hh,  # (G*H, H) row-major
    b_hn,  # (H,) or None: the GRU's b_hh n block
    lengths,  # (B,) int64 or None
    y,  # (T, B, H) output
    ws,  # (T, B, 4*H) ACC or None: GRU r | z | n | hn for backward; RNN with zoneout (T, B, H) h̃
    rng,  # (2,) int64 (seed, offset) of the zoneout masks (training), or None
    drop,  # (B, H) ACC: recurrent dropout's mask on h where it meets W_hh, or None
    hd,  # (2, B, H) input dtype, with drop: h ⊙ mask; slot s % 2 holds the state entering
    #      processing step s (slot 0 written by the launcher), read back by all programs
    ln_hh,  # (G*H,) input dtype or None: LN_hh's gains (GRU; its bias is in gx and b_hn)
    aux,  # (T or 1, B, G*H + 1) ACC, layer norm: u (own columns) -> û in place, rstd at G*H
    part,  # (B, programs, 2) ACC, layer norm: each program's mean and M2 of its values of u
    cnt,  # (1,) int32, zeroed: the grid barrier's counter
    T,
    B,
    z_stream,  # layer-direction index in the zoneout masks' counters (not `stream`: reserved)
    z_h,  # zoneout probability (ZONE_H: > 0), the expectation's weight in evaluation
    thr_h,  # int32 threshold of the masks (_common.zoneout_threshold)
    ln_ts,  # step stride of aux: B * (G*H + 1), or 0 (one slot reused: no backward)
    H: tl.constexpr,
    CELL: tl.constexpr,
    REVERSE: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_U: tl.constexpr,  # units per program, all their gates
    BLOCK_B: tl.constexpr,  # sequences per product: the batch is looped over in such chunks
    MAX_K: tl.constexpr,  # widest chunk of a reduction (_common.k_chunks)
    HAS_B_HN: tl.constexpr,
    HAS_LEN: tl.constexpr,
    STORE_WS: tl.constexpr,
    HAS_RNG: tl.constexpr,
    HAS_DROP: tl.constexpr,
    ZONE_H: tl.constexpr,
    HAS_LN: tl.constexpr,
):
    """The whole forward sequence; program i_u owns units o_h for every sequence and keeps
    their rows of W_hh on chip. Barrier k (1-based) waits for k * num_programs arrivals.

    Step: one (GP BLOCK_U, H) x (H, BLOCK_B) product of the units' rows of W_r, W_z, W_n and a
    zero block, interleaved (GRU, GP = 4, row 4 u + g), or of W (RNN, GP = 1) with h_{t-1}^T,
    split into gate tiles. Layer norm (GRU): a second phase per step, after a barrier, merges
    every program's partial statistics of the rows' 3H products and normalises. Zoneout is
    element-wise where h is formed; recurrent dropout: the programs that form h_t also store
    h_t ⊙ mask (hd), which the next step's product reads in place of h."""
    G: tl.constexpr = 3 if CELL == 0 else 1
    GP: tl.constexpr = 4 if CELL == 0 else 1  # gate blocks on M (the GRU's 4th is zero)
    LD: tl.constexpr = G * H + 1  # row stride of aux
    PH: tl.constexpr = 2 if HAS_LN else 1  # barriers per step
    N_U: tl.constexpr = (H + BLOCK_U - 1) // BLOCK_U  # programs owning units (their partials)
    i_u = tl.program_id(0)
    n_prog = tl.num_programs(0)
    o_h = i_u * BLOCK_U + tl.arange(0, BLOCK_U)
    m_h = o_h < H

    # rows of W_hh for the units' gates, interleaved (row GP u + g: gate g of unit u; the GRU's
    # 4th zero): loaded once, kept on chip
    o_m = tl.arange(0, GP * BLOCK_U)
    o_mg = o_m % GP
    o_mu = i_u * BLOCK_U + o_m // GP
    m_m = (o_mg < G) & (o_mu < H)
    b_w = _k_tiles(w_hh + (o_mg * H + o_mu) * H, m_m, 1, H, MAX_K, False, "")
    if CELL == 0:
        if HAS_B_HN:
            b_bhn = tl.load(b_hn + o_h, mask=m_h, other=0.0).to(ACC)[:, None]
        else:
            b_bhn = tl.zeros([BLOCK_U, 1], dtype=ACC)
    # values of u a batch row has in this program
    n_own = G * tl.minimum(H - i_u * BLOCK_U, BLOCK_U)
    # num_stages=1: no software pipelining, which could issue the next step's loads of
    # other programs' data before that step's barrier
    for s in tl.range(0, T, num_stages=1):
        t = T - 1 - s if REVERSE else s
        i_t = t.to(tl.int64)
        s_in = i_t + 1 if REVERSE else i_t
        s_out = i_t if REVERSE else i_t + 1
        slot_in = s % 2  # hd: the slot holding h_{t-1} ⊙ mask, and the one h_t's goes to
        slot_out = 1 - slot_in
        if HAS_DROP:
            p_h = hd + slot_in * B * H
        else:
            p_h = hs + s_in * B * H
        if s > 0:
            _grid_barrier(cnt, PH * s * n_prog)  # h_{t-1} of every unit is written
        for b0 in tl.range(0, B, BLOCK_B, num_stages=1):
            o_b = b0 + tl.arange(0, BLOCK_B)
            m_b = o_b < B
            if HAS_LN:
                # u = (h ⊙ mask) W_hh^T for the units' gate rows, into aux (normalised in the
                # next phase), with its partial statistics per batch row
                b_ht = _k_tiles(p_h + o_b * H, m_b, 1, H, MAX_K, True, ".cg")
                b_u = _dot_tiles(b_w, b_ht, tl.zeros([GP * BLOCK_U, BLOCK_B], dtype=ACC), DOT_PREC)
                m_u = m_m[:, None] & m_b[None, :]
                o_u = o_b[None, :] * LD + (o_mg * H + o_mu)[:, None]
                tl.store(aux + i_t * ln_ts + o_u, b_u, mask=m_u)
                _ln_partials(b_u, m_u, n_own, part + (o_b * N_U + i_u) * 2, m_b)
            else:
                m_hb = m_h[:, None] & m_b[None, :]
                o_bh = o_b[None, :] * H + o_h[:, None]
                o_bg = o_b[None, :] * (G * H) + o_h[:, None]
                # every load of the step before the product: this program's own data (gx_t,
                # its units' h_{t-1}) and h_{t-1} of all units (the others', from L2)
                b_g0, b_gz, b_gn = _gru_load_gx(gx + i_t * B * G * H + o_bg, m_hb, H, CELL, ACC)
                b_h = tl.load(hs + s_in * B * H + o_bh, mask=m_hb, other=0.0)
                m_live = _live(lengths, t, o_b, m_b, HAS_LEN)
                b_ht = _k_tiles(p_h + o_b * H, m_b, 1, H, MAX_K, True, ".cg")
                b_a = _dot_tiles(b_w, b_ht, tl.zeros([GP * BLOCK_U, BLOCK_B], dtype=ACC), DOT_PREC)
                if CELL == 0:
                    b_a0, b_az, b_an, _ = _split_gates(b_a, BLOCK_U)
                    b_an += b_bhn
                else:
                    b_a0, b_az, b_an = b_a, b_a, b_a  # the RNN has one gate block
                _gru_fwd_out(
                    b_g0, b_gz, b_gn, b_a0, b_az, b_an, b_h, m_live, hs, y, ws, hd, drop, rng, t,
                    i_t, s_out, slot_out, o_h, o_b, m_hb, B, H, z_stream, z_h, thr_h, CELL, ACC,
                    STORE_WS, HAS_RNG, ZONE_H, HAS_DROP,
                )  # fmt: skip
        if HAS_LN:
            _grid_barrier(cnt, (PH * s + 1) * n_prog)  # u's partials of every program
            for b0 in tl.range(0, B, BLOCK_B, num_stages=1):
                o_b = b0 + tl.arange(0, BLOCK_B)
                m_b = o_b < B
                m_hb = m_h[:, None] & m_b[None, :]
                o_bh = o_b[None, :] * H + o_h[:, None]
                o_bg = o_b[None, :] * (G * H) + o_h[:, None]
                b_g0, b_gz, b_gn = _gru_load_gx(gx + i_t * B * G * H + o_bg, m_hb, H, CELL, ACC)
                b_h = tl.load(hs + s_in * B * H + o_bh, mask=m_hb, other=0.0)
                m_live = _live(lengths, t, o_b, m_b, HAS_LEN)
                b_mean, b_rstd = _ln_stats_all(part, o_b, m_b, G * H, N_U, G * BLOCK_U, ACC)
                # a_g = γ_g ⊙ û_g, û = (u - mean) rstd stored back for backward; b_hn after it
                p_u = aux + i_t * ln_ts + o_b[None, :] * LD + o_h[:, None]
                b_a0 = _ln_gate(p_u, ln_hh + o_h, m_h, m_hb, b_mean, b_rstd)
                b_az = _ln_gate(p_u + H, ln_hh + H + o_h, m_h, m_hb, b_mean, b_rstd)
                b_an = _ln_gate(p_u + 2 * H, ln_hh + 2 * H + o_h, m_h, m_hb, b_mean, b_rstd)
                b_an += b_bhn
                if i_u == 0:
                    tl.store(aux + i_t * ln_ts + o_b * LD + G * H, b_rstd, mask=m_b)
                _gru_fwd_out(
                    b_g0, b_gz, b_gn, b_a0, b_az, b_an, b_h, m_live, hs, y, ws, hd, drop, rng, t,
                    i_t, s_out, slot_out, o_h, o_b, m_hb, B, H, z_stream, z_h, thr_h, CELL, ACC,
                    STORE_WS, HAS_RNG, ZONE_H, HAS_DROP,
                )  # fmt: skip


@triton.jit
def _gru_ln_partials(p_pb, ln_hh, p_xh, o_h, m_h, m_b, m_hb, b_d0, b_dz, b_dhn, H,
                     ACC: tl.constexpr):  # fmt: skip
    """Stores at p_pb ((BLOCK_B,) pointers into a buffer of per-program sums) the row sums over
    units o_h of γ dgh and γ dgh û, dgh = dr | dz | dhn (ACC) the gradient of LN_hh's output;
    p_xh: û of the tile (ACC, row stride of aux)."""
    b_v0 = tl.load(ln_hh + o_h, mask=m_h, other=0.0).to(ACC)[:, None] * b_d0
    b_vz = tl.load(ln_hh + H + o_h, mask=m_h, other=0.0).to(ACC)[:, None] * b_dz
    b_vn = tl.load(ln_hh + 2 * H + o_h, mask=m_h, other=0.0).to(ACC)[:, None] * b_dhn
    b_p1 = tl.where(m_hb, b_v0 + b_vz + b_vn, 0.0)
    b_p2 = b_v0 * tl.load(p_xh, mask=m_hb, other=0.0)
    b_p2 += b_vz * tl.load(p_xh + H, mask=m_hb, other=0.0)
    b_p2 += b_vn * tl.load(p_xh + 2 * H, mask=m_hb, other=0.0)
    b_p2 = tl.where(m_hb, b_p2, 0.0)
    tl.store(p_pb, tl.sum(b_p1, axis=0), mask=m_b)
    tl.store(p_pb + 1, tl.sum(b_p2, axis=0), mask=m_b)


@triton.heuristics(
    {
        "HAS_LEN": lambda a: a["lengths"] is not None,
        "HAS_LN": lambda a: a["ln_hh"] is not None,
        **_OPTION_HEURISTICS,
    }
)
@triton.jit
def _bwd_persistent_kernel(
    dy,  # (T, B, H) gradient of y
    hs,  # (T+1, B, H) states in time order (forward's)
    ws,  # (T, B, 4*H) ACC, GRU: r | z | n | hn; the RNN's (T, B, H) h̃ with zoneout, else None
    w_hh,  # (G*H, H) row-major
    lengths,  # (B,) int64 or None
    carry,  # (B, H) ACC, in/out: dh_T; on exit the part of dh_0 that skips W_hh
    dgx,  # (T, B, G*H) out: dgx of every step (the RNN's is dgh, read back by all programs)
    dgh,  # (T, B, 3*H) out, GRU: dr | dz | dhn of every step, read back by all; None for the RNN
    rng,  # (2,) int64 (seed, offset) of the zoneout masks, or None
    drop,  # (B, H) ACC: recurrent dropout's mask, or None
    ln_hh,  # (G*H,) input dtype or None: LN_hh's gains (layer norm, GRU)
    aux,  # (T, B, G*H + 1) ACC, layer norm: forward's û and rstd
    pb,  # (B, programs, 2) ACC, layer norm: each program's row sums of γ dgh and γ dgh û
    du,  # (B, G*H) input dtype, layer norm: LN_hh'(dgh) of the step just done, read back by all
    cnt,  # (1,) int32, zeroed: the grid barrier's counter
    T,
    B,
    z_stream,  # layer-direction index in the zoneout masks' counters (not `stream`: reserved)
    z_h,  # zoneout probability
    thr_h,  # int32 threshold of the masks
    H: tl.constexpr,
    CELL: tl.constexpr,
    REVERSE: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_U: tl.constexpr,  # units per program
    BLOCK_B: tl.constexpr,  # sequences per product: the batch is looped over in such chunks
    MAX_K: tl.constexpr,  # widest chunk of a reduction (_common.k_chunks)
    HAS_LEN: tl.constexpr,
    HAS_RNG: tl.constexpr,
    HAS_DROP: tl.constexpr,
    ZONE_H: tl.constexpr,
    HAS_LN: tl.constexpr,
):
    """The whole reverse sequence; program i_u owns units o_h for every sequence and keeps
    columns o_h of W_hh on chip; carry between steps lives in its buffer. dh_0 = carry +
    dgh_{t0} W_hh (layer norm: du_{t0}, left in du; ⊙ the dropout mask) is left to the caller.

    Step: dh[:, o_h] = carry + Σ_g dgh_g W_g[:, o_h]: the GRU's as one (4 BLOCK_U, H) x
    (H, 4 BLOCK_B) product, W_g^T's rows o_h interleaved on M and dgh's blocks (dr | dz | dhn |
    0) side by side on N, summed over its diagonal blocks (_diag_sum); the RNN's one block
    plain. The GRU writes dgh whole (dr, dz as in dgx) so that the next step reads one slab.
    Recurrent dropout multiplies the product by the mask; zoneout splits the gradient of h'
    into (1 - d) ⊙ it, the cell's, and d ⊙ it, added to carry. Layer norm (GRU): a second phase
    per step, after a barrier, forms du = LN_hh'(dgh) of the program's units from every
    program's row sums; the next step's product runs over du instead of dgh."""
    G: tl.constexpr = 3 if CELL == 0 else 1
    GP: tl.constexpr = 4 if CELL == 0 else 1
    LD: tl.constexpr = G * H + 1  # row stride of aux
    PH: tl.constexpr = 2 if HAS_LN else 1  # barriers per step
    N_U: tl.constexpr = (H + BLOCK_U - 1) // BLOCK_U  # programs owning units (their sums)
    i_u = tl.program_id(0)
    n_prog = tl.num_programs(0)
    o_h = i_u * BLOCK_U + tl.arange(0, BLOCK_U)
    m_h = o_h < H

    # columns o_h of every gate block of W_hh, interleaved: row GP u + g is W_g[:, u] (stride
    # H; the GRU's 4th zero), loaded once
    o_m = tl.arange(0, GP * BLOCK_U)
    o_mg = o_m % GP
    o_mu = i_u * BLOCK_U + o_m // GP
    b_wt = _k_tiles(w_hh + o_mg * H * H + o_mu, (o_mg < G) & (o_mu < H), H, H, MAX_K, False, "")
    # columns of the right-hand side: n = (gate block n // BLOCK_B, sequence b0 + n % BLOCK_B)
    o_n = tl.arange(0, GP * BLOCK_B)
    o_ng = o_n // BLOCK_B
    o_nb = o_n % BLOCK_B
    # num_stages=1: no software pipelining, which could issue the next step's loads of
    # other programs' data before that step's barrier
    for k in tl.range(0, T, num_stages=1):
        t = k if REVERSE else T - 1 - k
        i_t = t.to(tl.int64)
        s_in = i_t + 1 if REVERSE else i_t
        s_out = i_t if REVERSE else i_t + 1
        if k > 0:
            _grid_barrier(cnt, PH * k * n_prog)  # dgh_{t_next} (du) of every unit is written
        for b0 in tl.range(0, B, BLOCK_B, num_stages=1):
            o_b = b0 + tl.arange(0, BLOCK_B)
            m_b = o_b < B
            m_hb = m_h[:, None] & m_b[None, :]
            o_bh = o_b[None, :] * H + o_h[:, None]
            o_bg = o_b[None, :] * (G * H) + o_h[:, None]
            # every load of the step before the product: this program's own data (dy,
            # forward's buffers, carry as the previous step left it) and dgh_{t_next} of all
            # units (the others', from L2)
            m_live = _live(lengths, t, o_b, m_b, HAS_LEN)
            b_dy = tl.load(dy + i_t * B * H + o_bh, mask=m_hb, other=0.0).to(ACC)
            p_hnew = hs + s_out * B * H + o_bh
            if ZONE_H and CELL != 0:
                p_hnew = ws + i_t * B * H + o_bh  # the RNN's h̃ (hs holds the zoned state)
            b_r, b_z, b_n, b_hn, b_h = _gru_load_saved(
                ws, i_t * B * 4 * H + o_b[None, :] * (4 * H) + o_h[:, None],
                hs + s_in * B * H + o_bh, p_hnew, m_hb, H, CELL, ACC,
            )  # fmt: skip
            b_dh = tl.load(carry + o_bh, mask=m_hb, other=0.0)
            # dgh_{t_next} (layer norm: du; nothing at k = 0: the loads are masked off, the
            # product is zero)
            i_n = (t - 1 if REVERSE else t + 1).to(tl.int64)
            o_nbb = b0 + o_nb
            m_n = (o_nbb < B) & (o_ng < G) & (k > 0)
            if HAS_LN:
                p_dg = du + o_nbb * (G * H) + o_ng * H
            else:
                p_dg = (dgh if CELL == 0 else dgx) + i_n * B * G * H + o_nbb * (G * H) + o_ng * H
            b_dg = _k_tiles(p_dg, m_n, 1, H, MAX_K, True, ".cg")
            b_acc = tl.zeros([GP * BLOCK_U, GP * BLOCK_B], dtype=ACC)
            b_acc = _dot_tiles(b_wt, b_dg, b_acc, DOT_PREC)
            if CELL == 0:
                b_rec = _diag_sum(b_acc, BLOCK_U, BLOCK_B)
            else:
                b_rec = b_acc
            if HAS_DROP:  # W_hh met h ⊙ mask
                b_rec *= tl.load(drop + o_bh, mask=m_hb, other=0.0)
            b_dh += b_rec
            # _gru_bwd_step, with dhn into dgh's n block and dr, dz also into dgh
            b_tot = b_dh + tl.where(m_live, b_dy, 0.0)
            b_cell = b_tot
            if ZONE_H:
                b_d = _zoneout_factor(rng, t, z_stream, o_h, o_b, H, z_h, thr_h, 0, HAS_RNG, ACC)
                b_cell = (1.0 - b_d) * b_tot
            b_d0, b_dz, b_dn, b_dhn, b_carry = _gru_cell_bwd(
                b_cell, b_r, b_z, b_n, b_hn, b_h, m_live, CELL
            )
            if ZONE_H:
                b_carry = tl.where(m_live, b_carry + b_d * b_tot, b_dh)
            o_dg = i_t * B * G * H + o_bg
            if CELL == 0:
                _gru_store_dgx(dgx + o_dg, dgh + 2 * H, o_dg, b_d0, b_dz, b_dn, b_dhn, m_hb, H, 0)
                tl.store(dgh + o_dg, b_d0.to(dgh.dtype.element_ty), mask=m_hb)
                tl.store(dgh + o_dg + H, b_dz.to(dgh.dtype.element_ty), mask=m_hb)
            else:
                _gru_store_dgx(dgx + o_dg, None, o_dg, b_d0, b_dz, b_dn, b_dhn, m_hb, H, CELL)
            tl.store(carry + o_bh, b_carry, mask=m_hb)
            if HAS_LN:  # this program's row sums of γ dgh and γ dgh û, for du
                p_xh = aux + i_t * B * LD + o_b[None, :] * LD + o_h[:, None]
                _gru_ln_partials(pb + (o_b * N_U + i_u) * 2, ln_hh, p_xh, o_h, m_h, m_b, m_hb,
                                 b_d0, b_dz, b_dhn, H, ACC)  # fmt: skip
        if HAS_LN:
            _grid_barrier(cnt, (PH * k + 1) * n_prog)  # dgh's row sums of every program
            for b0 in tl.range(0, B, BLOCK_B, num_stages=1):
                o_b = b0 + tl.arange(0, BLOCK_B)
                m_b = o_b < B
                b_s1, b_s2 = _ln_sums_all(pb, o_b, m_b, N_U, ACC)
                p_aux = aux + i_t * B * LD
                b_rstd = tl.load(p_aux + o_b * LD + G * H, mask=m_b, other=0.0)
                _ln_du(du, dgh + i_t * B * G * H, p_aux, ln_hh, b_s1 / (G * H), b_s2 / (G * H),
                       b_rstd, o_h, m_h, o_b, m_b, G * H, G * H, LD, G, H, ACC)  # fmt: skip


# =========================================================================== launchers


def _slots(t: int, reverse: bool) -> tuple[int, int]:
    """hs slots (state entering step t, state leaving it) in time order."""
    return (t + 1, t) if reverse else (t, t + 1)


# 4 warps: compiled for sm_90 (Triton 3.9), the GRU kernels on 16x16 tiles with BLOCK_K = 64 hit
# 255 registers and spill to the stack (up to 896 bytes in fp32 backward) with 1 or 2 warps; with
# 4 they use 56-201 registers and no stack, in fp32, fp16 and bf16.
_NUM_WARPS = 4


def _tiles(B: int, H: int):
    BLOCK_B = block_b(B)
    n_b = triton.cdiv(B, BLOCK_B)
    BLOCK_H = block_h(H, n_b)
    grid = (triton.cdiv(H, BLOCK_H), n_b)
    meta = dict(BLOCK_H=BLOCK_H, BLOCK_B=BLOCK_B, BLOCK_K=block_k(H))
    return grid, meta, _NUM_WARPS


def _persistent_tiles(B: int, H: int, cell: int, x, backward: bool):
    """The tilings a persistent launch tries, in order (_common.persistent_tile_choices)."""
    props = None if is_interpreter() else device_props(x.device)
    G = 3 if cell == CELL_GRU else 1
    return persistent_tile_choices(H, B, G=G, elt=x.element_size(), backward=backward, props=props)


def _option_args(rng, zoneout, stream, drop) -> dict:
    """Keyword arguments of the kernels (both strategies) for zoneout and recurrent dropout."""
    z = float(zoneout)
    return dict(rng=rng, drop=drop, z_stream=int(stream), z_h=z, thr_h=zoneout_threshold(z))


def _check_ln(cell: int, ln_hh) -> None:
    if ln_hh is not None and cell != CELL_GRU:
        raise ValueError("layer norm of the recurrence is the GRU's and the LSTM's, not the RNN's")


def _barriers(T: int, per_step: int) -> int:
    """Grid barriers a persistent launch crosses: per_step each step, none before the first."""
    return per_step * T - 1


def _gru_fwd_persistent(gx, hs, w_hh, b_hn, lengths, y, ws, reverse, kw, rng, zoneout, stream,
                        drop, ln_hh, aux) -> bool:  # fmt: skip
    """One persistent launch over the sequence; False (nothing run) if it cannot run safely.
    `aux`: layer norm's (T or 1, B, 3H + 1) buffer (one slot reused without a backward)."""
    T, B, GH = gx.shape
    H = hs.shape[-1]
    tiles = _persistent_tiles(B, H, kw["CELL"], gx, backward=False)
    acc = acc_dtype(gx.dtype)
    hd = part = None
    if drop is not None:  # h0 ⊙ mask: what the first step's product reads
        hd = torch.empty((2, B, H), dtype=gx.dtype, device=gx.device)
        hd[0] = (hs[T if reverse else 0].to(acc) * drop).to(gx.dtype)
    if ln_hh is not None:
        part = torch.empty((B, tiles[0].programs, 2), dtype=acc, device=gx.device)
    ts = B * (GH + 1) if aux is not None and aux.shape[0] == T else 0
    return launch_persistent(
        _fwd_persistent_kernel, tiles, barriers=_barriers(T, 1 if ln_hh is None else 2),
        device=gx.device, gx=gx, hs=hs, w_hh=w_hh, b_hn=b_hn, lengths=lengths, y=y, ws=ws,
        hd=hd, ln_hh=ln_hh, aux=aux, part=part, T=T, B=B, ln_ts=ts, H=H, REVERSE=reverse, **kw,
        **_option_args(rng, zoneout, stream, drop),
    )  # fmt: skip


def _ln_phase1(hs, w_hh, drop, lnb, B, N, R, LD, ts, dt, acc):
    """The lean launch of layer norm's phase 1 (`_common._ln_rec_kernel`) over a loop, and
    (number of blocks of rows, rows per block, the (n_blocks, B, 2) partials buffer)."""
    BLOCK_B = block_b(B)
    n_b = triton.cdiv(B, BLOCK_B)
    BLOCK_N = block_h(N, n_b)
    grid = (triton.cdiv(N, BLOCK_N), n_b)
    part = torch.empty((grid[0], B, 2), dtype=acc, device=hs.device)
    rec = step_launcher(
        _ln_rec_kernel, grid, ("t", "s_in"), hs=hs, w_hh=w_hh, drop=drop, lnb=lnb, part=part,
        B=B, N=N, R=R, LD=LD, TS=ts, ACC=_TL_ACC[acc], DOT_PREC=dot_precision(dt),
        BLOCK_N=BLOCK_N, BLOCK_B=BLOCK_B, BLOCK_K=block_k(R), num_warps=_NUM_WARPS,
    )  # fmt: skip
    return rec, grid[0], BLOCK_N, part


_NO_LN = dict(ln_hh=None, lnb=None, part=None, n_ln=0, ln_bn=0, LD=0, ln_ts=0)


def gru_fwd(cell, gx, h0, w_hh, b_hn, lengths, reverse, store, rng=None, zoneout=0.0, stream=0,
            drop=None, ln_hh=None, *, persistent=False):  # fmt: skip
    """Runs the time loop. Returns y (T, B, H), hs (T+1, B, H), ws (T, B, 4H) or None (the
    RNN with zoneout and `store`: (T, B, H), its unzoned h̃), and with layer norm a fourth
    element aux (T, B, 3H + 1) [û | rstd] (None without `store`).

    Options: zoneout of h (masks from `rng` (2,) int64 in training, the expectation without it)
    in layer-direction `stream`, recurrent dropout's (B, H) mask `drop` in the accumulation
    dtype, layer norm of the GRU's recurrent product with gains `ln_hh` (stepwise: two launches
    per step, `_common._ln_rec_kernel`, then the step kernel; persistent: two phases a step).
    persistent=True: one persistent launch when it can run safely, else one launch per step.
    """
    _check_ln(cell, ln_hh)
    T, B, GH = gx.shape
    H = h0.shape[1]
    dt, acc = gx.dtype, acc_dtype(gx.dtype)
    y = new_output((T, B, H), dt, gx.device)
    hs = new_output((T + 1, B, H), dt, gx.device)
    hs[T if reverse else 0].copy_(h0)
    ws = new_output((T, B, 4 * H), acc, gx.device) if store and cell == CELL_GRU else None
    if store and cell != CELL_GRU and zoneout > 0:
        ws = new_output((T, B, H), acc, gx.device)
    lnb = None
    if ln_hh is not None:  # without a backward one slot serves every step
        lnb = new_output((T if store else 1, B, GH + 1), acc, gx.device)
    done = (y, hs, ws) + (() if ln_hh is None else (lnb if store else None,))
    kw = dict(CELL=cell, ACC=_TL_ACC[acc], DOT_PREC=dot_precision(dt))
    if persistent and _gru_fwd_persistent(gx, hs, w_hh, b_hn, lengths, y, ws, reverse, kw, rng,
                                          zoneout, stream, drop, ln_hh, lnb):  # fmt: skip
        return done
    ln, rec = _NO_LN, None
    if ln_hh is not None:
        N, LD = GH, GH + 1
        ts = B * LD if store else 0
        rec, n_ln, ln_bn, part = _ln_phase1(hs, w_hh, drop, lnb, B, N, H, LD, ts, dt, acc)
        ln = dict(ln_hh=ln_hh, lnb=lnb, part=part, n_ln=n_ln, ln_bn=ln_bn, LD=LD, ln_ts=ts)
    grid, meta, warps = _tiles(B, H)
    step = step_launcher(
        _fwd_step_kernel, grid, ("t", "s_in", "s_out"), gx=gx, hs=hs, w_hh=w_hh, b_hn=b_hn,
        lengths=lengths, y=y, ws=ws, B=B, H=H, **kw, **meta, num_warps=warps,
        **_option_args(rng, zoneout, stream, drop), **ln,
    )  # fmt: skip
    d = int(reverse)  # _slots(t, reverse) == (t + d, t + 1 - d), inlined in this hot loop
    for t in range(T - 1, -1, -1) if reverse else range(T):
        if rec is not None:
            rec(t, t + d)
        step(t, t + d, t + 1 - d)
    return done


def gru_bwd(cell, dy, dhT, hs, ws, w_hh, lengths, reverse, needs, aux=None, rng=None,
            zoneout=0.0, stream=0, drop=None, ln_hh=None, *, persistent=False):  # fmt: skip
    """The reverse loop. Returns dgx, dh0, dw_hh, db_hn (None where `needs` says so), and
    dln_hh when `needs` has its fifth flag.

    The options as `gru_fwd`'s (the same rng, stream and mask: the zoneout masks are drawn
    again, not stored). persistent=True: one persistent launch when it can run safely, else one
    launch per step.
    """
    _check_ln(cell, ln_hh)
    extra = (None,) * (len(needs) - 4)
    need_gx, need_h0, need_whh, need_bhn = needs[:4]
    T, B, H = dy.shape
    G = 3 if cell == CELL_GRU else 1
    dt, acc = dy.dtype, acc_dtype(dy.dtype)
    carry = torch.empty((B, H), dtype=acc, device=dy.device).copy_(dhT)
    dgx = new_output((T, B, G * H), dt, dy.device)
    dh0 = None
    kw = dict(CELL=cell, ACC=_TL_ACC[acc], DOT_PREC=dot_precision(dt))
    ran = False
    if persistent:
        # the GRU's dgh = dr | dz | dhn of a step in one slab (dhn: its n block, a view)
        dgh = new_output((T, B, G * H), dt, dy.device) if cell == CELL_GRU else None
        tiles = _persistent_tiles(B, H, cell, dy, backward=True)
        opt, du, pb = _option_args(rng, zoneout, stream, drop), None, None
        if ln_hh is not None:
            pb = torch.empty((B, tiles[0].programs, 2), dtype=acc, device=dy.device)
            du = torch.empty((B, G * H), dtype=dt, device=dy.device)
        ran = launch_persistent(
            _bwd_persistent_kernel, tiles, barriers=_barriers(T, 1 if ln_hh is None else 2),
            device=dy.device, dy=dy, hs=hs, ws=ws, w_hh=w_hh, lengths=lengths, carry=carry,
            dgx=dgx, dgh=dgh, ln_hh=ln_hh, aux=aux, pb=pb, du=du, T=T, B=B, H=H,
            REVERSE=reverse, **kw, **opt,
        )  # fmt: skip
        dhn = dgh[..., 2 * H :] if ran and cell == CELL_GRU else None
        if ran and need_h0:
            # dh_0 = carry + (dgh_{t0} W_hh) ⊙ mask, t0 the last step processed (layer norm:
            # du_{t0}, which the kernel's last phase left in du): one GEMM
            t0 = T - 1 if reverse else 0
            dg0 = du if du is not None else dgh[t0] if cell == CELL_GRU else dgx[t0]
            if drop is None:
                dh0 = torch.addmm(carry, dg0.to(acc), w_hh.to(acc)).to(dt)
            else:
                dh0 = (carry + (dg0.to(acc) @ w_hh.to(acc)) * drop).to(dt)
    if not ran:
        dhn = new_output((T, B, H), dt, dy.device) if cell == CELL_GRU else None
        dh0 = new_output((B, H), dt, dy.device) if need_h0 else None
        grid, meta, warps = _tiles(B, H)
        ln = dict(ln_hh=None, lnb=None, pb=None, LD=0)
        if ln_hh is not None:
            pb = torch.empty((2, grid[0], B, 2), dtype=acc, device=dy.device)
            ln = dict(ln_hh=ln_hh, lnb=aux, pb=pb, LD=G * H + 1)
        common = dict(
            dy=dy, hs=hs, ws=ws, w_hh=w_hh, lengths=lengths, carry=carry, dgx=dgx, dhn=dhn,
            dh0=dh0, B=B, H=H, **kw, **meta, num_warps=warps,
            **_option_args(rng, zoneout, stream, drop), **ln,
        )  # fmt: skip
        # the first step processed has no later step to take dh from: its own variant
        t_next = 0 if reverse else T - 1
        s_in, s_out = _slots(t_next, reverse)
        _bwd_step_kernel[grid](
            t=t_next, t_next=0, s_in=s_in, s_out=s_out, HAS_NEXT=False, HAS_STEP=True, **common
        )
        step = step_launcher(
            _bwd_step_kernel, grid, ("t", "t_next", "s_in", "s_out"), HAS_NEXT=True,
            HAS_STEP=True, **common,
        )  # fmt: skip
        d = int(reverse)  # _slots(t, reverse) == (t + d, t + 1 - d), inlined in this hot loop
        for t in range(1, T) if reverse else range(T - 2, -1, -1):
            step(t, t_next, t + d, t + 1 - d)
            t_next = t
        if need_h0:
            _bwd_step_kernel[grid](
                t=0, t_next=t_next, s_in=0, s_out=0, HAS_NEXT=True, HAS_STEP=False, **common
            )
    dw_hh = db_hn = None
    if ln_hh is not None:
        return _gru_bwd_ln_weights(dgx, dh0, dhn, hs, aux, w_hh, ln_hh, drop, reverse, needs)
    if need_whh:
        h_prev = (hs[1:] if reverse else hs[:-1]).reshape(T * B, H)
        if drop is not None:  # W_hh met h ⊙ mask
            h_prev = (h_prev.view(T, B, H).to(acc) * drop).to(dt).reshape(T * B, H)
        dw_hh = torch.empty_like(w_hh)
        if cell == CELL_GRU:
            torch.mm(dgx[..., : 2 * H].reshape(T * B, 2 * H).t(), h_prev, out=dw_hh[: 2 * H])
            torch.mm(dhn.reshape(T * B, H).t(), h_prev, out=dw_hh[2 * H :])
        else:
            torch.mm(dgx.reshape(T * B, H).t(), h_prev, out=dw_hh)
    if need_bhn:
        db_hn = dhn.sum((0, 1), dtype=acc).to(dt)
    return ((dgx if need_gx else None), dh0, dw_hh, db_hn) + extra


def _gru_bwd_ln_weights(dgx, dh0, dhn, hs, aux, w_hh, ln_hh, drop, reverse, needs):
    """The GRU's weight gradients with layer norm, after the reverse loop: dgh = [dr | dz | dhn]
    is the gradient of LN_hh's output, du = rstd (γ dgh - mean(γ dgh) - û mean(γ dgh û)) that of
    the product, dW_hh = Σ_t du^T (h ⊙ mask), dγ = Σ dgh ⊙ û, db_hn = Σ dhn."""
    T, B, GH = dgx.shape
    H = GH // 3
    dt, acc = dgx.dtype, aux.dtype
    need_gx, need_h0, need_whh, need_bhn = needs[:4]
    dgh = torch.cat([dgx[..., : 2 * H], dhn], -1).to(acc)
    u_hat, rstd = aux[..., :GH], aux[..., GH:]
    dw_hh = db_hn = dln = None
    if need_whh:
        dv = dgh * ln_hh.to(acc)
        du = rstd * (dv - dv.mean(-1, keepdim=True) - u_hat * (dv * u_hat).mean(-1, keepdim=True))
        h_prev = (hs[1:] if reverse else hs[:-1]).to(acc)
        if drop is not None:
            h_prev = h_prev * drop
        dw_hh = (du.reshape(T * B, GH).t() @ h_prev.reshape(T * B, H)).to(dt)
    if need_bhn:
        db_hn = dgh[..., 2 * H :].sum((0, 1)).to(dt)
    if len(needs) > 4 and needs[4]:
        dln = (dgh * u_hat).sum((0, 1)).to(dt)
    grads = ((dgx if need_gx else None), dh0, dw_hh, db_hn, dln)
    return grads[: max(len(needs), 4)]
