"""The recurrences in plain torch, per step: the "torch" backend of the fused_rnn:: operators.

Two forms of the same maths (fused_rnn.reference states it; kernels/lstm.py and kernels/gru.py
derive the backward):

1. The operators' contract, for any device: `lstm_fwd` / `lstm_bwd` and `gru_fwd` / `gru_bwd`
   take and return exactly what the Triton launchers of fused_rnn.kernels take and return (the
   same buffers: hs, cs, gates, ms for the LSTM; hs, ws for the GRU; see the kernel files), so
   the custom operators run them interchangeably. The forward loop keeps the activated gates and
   every state; the backward is the analytic one, a reverse loop whose per-step work is a few
   element-wise ops and one GEMM: everything that does not depend on the incoming gradient
   (activation derivatives, the masks of finished sequences) is computed for all steps at once
   before the loop. No autograd graph is built per step, so time and memory grow linearly in T.
   This is what the LSTM variants (no torch.nn op) run on CPU, and what every cell runs on the
   torch backend under torch.compile / torch.export (one opaque operator per layer and
   direction whatever T is).
2. `recurrence_autograd`: the same loop written with differentiable torch ops (autograd records
   every step). Used where gradients of gradients are needed (the operators' double backward)
   and as a readable statement of the operators' semantics.

Numerics follow the kernels: states and gates in the accumulation dtype (fp32 for fp16/bf16
inputs, else the input's), h rounded to the input dtype every step (the kernels store it so),
GEMM operands converted to the accumulation dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _rng

__all__ = [
    "CELL_GRU",
    "CELL_RNN_TANH",
    "CELL_RNN_RELU",
    "lstm_fwd",
    "lstm_bwd",
    "gru_fwd",
    "gru_bwd",
    "recurrence_autograd",
]

# values of the `cell` argument of the GRU operators (kernels/gru.py's CELL_* constexpr values;
# tests/test_ops_torch.py checks they agree)
CELL_GRU = 0
CELL_RNN_TANH = 1
CELL_RNN_RELU = 2


# nn.LayerNorm's default epsilon, used by every layer norm of the recurrences
LN_EPS = 1e-5


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / cell-state dtype: fp32, except fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _steps(T: int, reverse: bool) -> range:
    return range(T - 1, -1, -1) if reverse else range(T)


def _slots(T: int, reverse: bool):
    """(slice of the states entering each step, slice of the states leaving it) in the (T+1, ...)
    state buffers, indexed by time: the entering state of step t is index t (forward) or t + 1
    (reverse)."""
    return (slice(1, T + 1), slice(0, T)) if reverse else (slice(0, T), slice(1, T + 1))


def _live(lengths: Tensor | None, T: int, device) -> Tensor | None:
    """(T, B, 1) bool: step t is live for sequence b (t < lengths[b]); None without lengths."""
    if lengths is None:
        return None
    steps = torch.arange(T, device=device).unsqueeze(1)
    return (steps < lengths.to(device).unsqueeze(0)).unsqueeze(-1)


def _peepholes(w_ch: Tensor | None, coupled: bool, acc):
    """(p_i, p_f, p_o) in acc (p_i None when coupled), or Nones without peepholes."""
    if w_ch is None:
        return None, None, None
    w = w_ch.to(acc)
    if coupled:
        p_f, p_o = w.chunk(2)
        return None, p_f, p_o
    return w.chunk(3)


# =========================================================================== options


class Zoneout:
    """The zoneout factors d of one state of one layer-direction, step by step (fused_rnn._rng).

    p = 0: None (no zoneout). Evaluation (rng None): the float p, the expectation. Training:
    the (B, W) 0/1 masks of the generator in `acc`, made CHUNK steps at a time (time indices
    t // CHUNK * CHUNK ...), never for the whole sequence at once, and none past step T - 1.
    """

    CHUNK = 32

    def __init__(self, rng, p: float, stream: int, which: int, B: int, W: int, acc, T: int):
        self.rng, self.p, self.stream, self.which = rng, float(p), int(stream), which
        self.B, self.W, self.acc, self.T = B, W, acc, T
        self._base, self._masks = None, None

    def __bool__(self) -> bool:
        return self.p > 0

    def __call__(self, t: int):
        if self.p == 0:
            return None
        if self.rng is None:
            return self.p
        base = t - t % self.CHUNK
        if base != self._base:
            steps = range(base, min(base + self.CHUNK, self.T))
            keep = _rng.keep_masks(self.rng, steps, self.B, self.W, self.stream, self.which, self.p)
            self._base, self._masks = base, keep.to(self.acc)
        return self._masks[t - base]


def _zone(d, old: Tensor, new: Tensor) -> Tensor:
    """d ⊙ old + (1 - d) ⊙ new; new where d is None."""
    return new if d is None else torch.lerp(new, old, d)


def _row_stats(u: Tensor, eps: float = LN_EPS) -> tuple[Tensor, Tensor]:
    """(mean, rstd) of each row of u over its last dimension (biased variance), keepdim."""
    mean = u.mean(-1, keepdim=True)
    dev = u - mean
    return mean, torch.rsqrt((dev * dev).mean(-1, keepdim=True) + eps)


def _ln_bwd(dn: Tensor, n: Tensor, rstd: Tensor) -> Tensor:
    """Gradient of u from that of n = (u - mean) * rstd, row-wise over the last dimension."""
    return rstd * (dn - dn.mean(-1, keepdim=True) - n * (dn * n).mean(-1, keepdim=True))


# =========================================================================== LSTM


def lstm_fwd(gx, h0, c0, w_hh, w_hr, w_ch, lengths, reverse, coupled, store, rng=None,
             zoneout_c=0.0, zoneout_h=0.0, stream=0, drop=None, ln_hh=None, ln_c_w=None,
             ln_c_b=None):  # fmt: skip
    """The forward recurrence; returns (y, hs, cs, gates, ms[, aux]) like kernels.lstm.lstm_fwd.

    gx (T, B, G*H), h0 (B, R), c0 (B, H), w_hh (G*H, R), w_hr (P, H) or None, w_ch or None,
    lengths (B,) int64 or None. gates is None unless `store`; ms is None without a projection.
    Options (fused_rnn._ops): zoneout of c and h (masks from `rng`, or the expectation without
    it), recurrent dropout `drop` (B, R), layer norm: gains `ln_hh` (G*H,) of the recurrent
    product (its bias is folded into gx by the caller) and `ln_c_w`, `ln_c_b` (H,) of the cell
    state in the output. With layer norm a sixth element aux: (T, B, G*H + 3) in the
    accumulation dtype when `store` (normalised recurrent product | its rstd | mean and rstd of
    c̃), else None.
    """
    if rng is None and not zoneout_c and not zoneout_h and drop is None and ln_hh is None:
        return _lstm_fwd_plain(gx, h0, c0, w_hh, w_hr, w_ch, lengths, reverse, coupled, store)
    T, B, GH = gx.shape
    G = 3 if coupled else 4
    H, R = GH // G, w_hh.shape[1]
    dt, acc = gx.dtype, acc_dtype(gx.dtype)
    GF = 0 if coupled else 1  # gate blocks: (i,) f, g, o
    f_, g_, o_ = (slice(k * H, (k + 1) * H) for k in (GF, GF + 1, GF + 2))

    hs = gx.new_empty((T + 1, B, R))
    cs = gx.new_empty((T + 1, B, H), dtype=acc)
    s0 = T if reverse else 0
    hs[s0] = h0
    cs[s0] = c0
    gates = gx.new_empty((T, B, GH), dtype=acc)  # the activations, kept for backward if `store`
    ms = gx.new_empty((T, B, H)) if w_hr is not None else None
    gx_acc, w_t = gx.to(acc), w_hh.to(acc).t()
    w_rt = None if w_hr is None else w_hr.to(acc).t()
    p_i, p_f, p_o = _peepholes(w_ch, coupled, acc)
    live = _live(lengths, T, gx.device)
    zc = Zoneout(rng, zoneout_c, stream, _rng.WHICH_C, B, H, acc, T)
    zh = Zoneout(rng, zoneout_h, stream, _rng.WHICH_H, B, R, acc, T)
    mask = None if drop is None else drop.to(acc)
    g_hh = None if ln_hh is None else ln_hh.to(acc)
    g_c = None if ln_c_w is None else ln_c_w.to(acc)
    b_c = None if ln_c_b is None else ln_c_b.to(acc)
    aux = gx.new_empty((T, B, GH + 3), dtype=acc) if g_hh is not None and store else None

    h, c = hs[s0].to(acc), cs[s0]
    for t in _steps(T, reverse):
        s_in, s_out = (t + 1, t) if reverse else (t, t + 1)
        hd = h if mask is None else h * mask
        if g_hh is None:
            a = torch.addmm(gx_acc[t], hd, w_t)  # (B, G*H) pre-activations
        else:
            u = hd @ w_t
            mean, rstd = _row_stats(u)
            u_hat = (u - mean) * rstd
            a = torch.addcmul(gx_acc[t], u_hat, g_hh)
            if aux is not None:
                aux[t, :, :GH] = u_hat
                aux[t, :, GH : GH + 1] = rstd
        if p_f is not None:
            if not coupled:
                a[:, :H].addcmul_(p_i, c)
            a[:, f_].addcmul_(p_f, c)
        act = gates[t]
        torch.sigmoid(a, out=act)
        torch.tanh(a[:, g_], out=act[:, g_])
        f, g, o = act[:, f_], act[:, g_], act[:, o_]
        i = 1.0 - f if coupled else act[:, :H]
        c_new = torch.addcmul(f * c, i, g)
        if p_o is not None:
            torch.sigmoid(a[:, o_].addcmul_(p_o, c_new), out=o)
        if g_c is None:
            m = o * torch.tanh(c_new)
        else:
            mean_c, rstd_c = _row_stats(c_new)
            m = o * torch.tanh(torch.addcmul(b_c, (c_new - mean_c) * rstd_c, g_c))
            if aux is not None:
                aux[t, :, GH + 1 : GH + 2] = mean_c
                aux[t, :, GH + 2 :] = rstd_c
        if w_rt is not None:
            ms[t] = m
            m = ms[t].to(acc) @ w_rt  # h = m W_hr^T on the stored (rounded) m
        c_new = _zone(zc(t), c, c_new)
        m = _zone(zh(t), h, m)
        if live is None:
            c = c_new
            hs[s_out] = m
        else:
            c = torch.where(live[t], c_new, c)
            hs[s_out] = torch.where(live[t], m.to(dt), hs[s_in])
        cs[s_out] = c
        h = hs[s_out].to(acc)
    _, out = _slots(T, reverse)
    y = hs[out].clone() if live is None else hs[out] * live
    res = (y, hs, cs, gates if store else None, ms)
    return res if g_hh is None else (*res, aux)


def lstm_bwd(dy, dhT, dcT, hs, cs, gates, ms, w_hh, w_hr, w_ch, lengths, reverse, coupled, needs,
             aux=None, rng=None, zoneout_c=0.0, zoneout_h=0.0, stream=0, drop=None, ln_hh=None,
             ln_c_w=None, ln_c_b=None):  # fmt: skip
    """The reverse loop; returns (dgx, dh0, dc0, dw_hh, dw_hr, dw_ch, dln_hh, dln_c_w, dln_c_b)
    like kernels.lstm.lstm_bwd (None where `needs`, 6 or 9 flags, does not ask). Per step, with dm
    the gradient reaching m = o tanh(c'):

        da_o = dm K_o,   dc += dm K_c (+ p_o da_o),   [da_i, da_f, da_g] = dc [K_i, K_f, K_g],
        dc_prev = dc F (+ p_i da_i + p_f da_f),   dh_prev = da W_hh

    where K_o = tanh(c') o(1-o), K_c = o (1 - tanh²c'), K_i = g i(1-i), K_f = c f(1-f)
    (coupled: (c - g) f(1-f)), K_g = i (1-g²), F = f, all zero (F one) at dead steps, whose dh
    and dc pass through unchanged. The options (zoneout, recurrent dropout, layer norm) take the
    general loop `_lstm_bwd_options`.
    """
    if rng is not None or zoneout_c or zoneout_h or drop is not None or ln_hh is not None:
        return _lstm_bwd_options(dy, dhT, dcT, hs, cs, gates, ms, w_hh, w_hr, w_ch, lengths,
                                 reverse, coupled, needs, aux, rng, zoneout_c, zoneout_h, stream,
                                 drop, ln_hh, ln_c_w, ln_c_b)  # fmt: skip
    grads = _lstm_bwd_plain(dy, dhT, dcT, hs, cs, gates, ms, w_hh, w_hr, w_ch, lengths, reverse,
                            coupled, needs[:6])  # fmt: skip
    return grads + (None,) * (len(needs) - 6)


def _lstm_dw_ch(da: Tensor, c_prev: Tensor, c_new: Tensor, coupled: bool, G: int, H: int):
    """Peephole gradients: Σ da_i c, Σ da_f c, Σ da_o c' over steps and rows."""
    T, B, _ = da.shape
    blocks = da.view(T, B, G, H)
    parts = [] if coupled else [(blocks[:, :, 0] * c_prev).sum((0, 1))]
    parts += [(blocks[:, :, G - 3] * c_prev).sum((0, 1))]
    parts += [(blocks[:, :, G - 1] * c_new).sum((0, 1))]
    return torch.cat(parts)


def _lstm_bwd_options(dy, dhT, dcT, hs, cs, gates, ms, w_hh, w_hr, w_ch, lengths, reverse,
                      coupled, needs, aux, rng, zoneout_c, zoneout_h, stream, drop, ln_hh,
                      ln_c_w, ln_c_b):  # fmt: skip
    """`lstm_bwd` with zoneout, recurrent dropout and / or layer norm. Per step, dh and dc the
    gradients reaching the (zoned) states h_t, c_t and d_h, d_c the zoneout factors:

        dh̃ = (1 - d_h) dh  →  dm (through W_hr)     dh_{t-1} ⊇ d_h dh,   dc_{t-1} ⊇ d_c dc
        da_o = dm tanh(q) o(1-o),   dq = dm o (1 - tanh²q),   q = LN_c(c̃) (or c̃)
        dc̃ = (1 - d_c) dc + LN_c'(dq) + p_o da_o           LN_c'(dq) = rstd_c (γ_c dq - mean(γ_c
             dq) - ĉ mean(γ_c dq ĉ)) with ĉ = (c̃ - mean_c) rstd_c (or dq without layer norm)
        da_i, da_f, da_g from dc̃ as without options;   dc_{t-1} ⊇ dc̃ f + p_i da_i + p_f da_f
        du = LN_hh'(da) (or da),   dh_{t-1} ⊇ (du W_hh) ⊙ m_drop

    c̃ = f c_{t-1} + i g is recomputed from the gates (cs holds the zoned c). Weight gradients
    after the loop: dW_hh = Σ du^T (h ⊙ m_drop), dγ_hh = Σ da ⊙ û, dγ_c = Σ dq ⊙ ĉ, dβ_c = Σ dq.
    """
    T, B, GH = gates.shape
    G = 3 if coupled else 4
    H, R = GH // G, w_hh.shape[1]
    dt, acc = hs.dtype, cs.dtype
    flags = list(needs) + [False] * (9 - len(needs))
    need_gx, need_h0, need_c0, need_whh, need_whr, need_wch, need_lnh, need_lncw, need_lncb = flags
    ins, outs = _slots(T, reverse)
    c_prev, h_prev = cs[ins], hs[ins].to(acc)
    blocks = gates.view(T, B, G, H).unbind(2)
    f, g, o = blocks[-3:]
    i = 1.0 - f if coupled else blocks[0]
    live = _live(lengths, T, hs.device)
    c_til = torch.addcmul(f * c_prev, i, g)  # the candidate c̃, before zoneout
    g_hh = None if ln_hh is None else ln_hh.to(acc)
    g_c = None if ln_c_w is None else ln_c_w.to(acc)
    if g_c is not None:
        c_hat = (c_til - aux[..., GH + 1 : GH + 2]) * aux[..., GH + 2 :]
        q = torch.addcmul(ln_c_b.to(acc), c_hat, g_c)
    else:
        q = c_til
    tq = torch.tanh(q)
    k_o = tq * o * (1.0 - o)
    k_q = o * (1.0 - tq * tq)
    k_f = (c_prev - g if coupled else c_prev) * f * (1.0 - f)
    k_g = i * (1.0 - g * g)
    k_in = torch.stack([k_f, k_g] if coupled else [g * i * (1.0 - i), k_f, k_g], dim=2)
    p_i, p_f, p_o = _peepholes(w_ch, coupled, acc)
    zc = Zoneout(rng, zoneout_c, stream, _rng.WHICH_C, B, H, acc, T)
    zh = Zoneout(rng, zoneout_h, stream, _rng.WHICH_H, B, R, acc, T)
    mask = None if drop is None else drop.to(acc)
    if g_hh is not None:
        u_hat, rstd = aux[..., :GH], aux[..., GH : GH + 1]

    da = hs.new_zeros((T, B, GH), dtype=acc)
    dhs = hs.new_empty((T, B, R), dtype=acc) if w_hr is not None else None
    dqs = hs.new_zeros((T, B, H), dtype=acc) if g_c is not None else None
    w, w_r = w_hh.to(acc), None if w_hr is None else w_hr.to(acc)
    dy = dy.to(acc)
    dh, dc = dhT.to(acc), dcT.to(acc, copy=True)
    for t in reversed(_steps(T, reverse)):
        lv = None if live is None else live[t]
        dtot = dh + dy[t]
        d_h, d_c = zh(t), zc(t)
        dh_keep = None if d_h is None else dtot * d_h  # reaches h_{t-1} past the cell
        dh_new = dtot if d_h is None else dtot * (1.0 - d_h)
        if lv is not None:
            dh_new = dh_new * lv
        if w_r is not None:
            dhs[t] = dh_new
            dm = dh_new @ w_r
        else:
            dm = dh_new
        da_t = da[t]
        da_o = torch.mul(dm, k_o[t], out=da_t[:, (G - 1) * H :])
        dq = dm * k_q[t]
        if g_c is not None:
            dqs[t] = dq
            dq = _ln_bwd(dq * g_c, c_hat[t], aux[t, :, GH + 2 :])
        dct = dc if d_c is None else dc * (1.0 - d_c)
        if lv is not None:
            dct = dct * lv
        dct = dct + dq
        if p_o is not None:
            dct.addcmul_(p_o, da_o)
        da_in = torch.mul(dct.unsqueeze(1), k_in[t], out=da_t[:, : (G - 1) * H].view(B, G - 1, H))
        dc_prev = dct * f[t]
        if p_f is not None:
            dc_prev.addcmul_(p_f, da_in[:, 0 if coupled else 1])
            if not coupled:
                dc_prev.addcmul_(p_i, da_in[:, 0])
        if d_c is not None:
            dc_prev = dc_prev + dc * d_c
        du = da_t if g_hh is None else _ln_bwd(da_t * g_hh, u_hat[t], rstd[t])
        dh_prev = du @ w
        if mask is not None:
            dh_prev = dh_prev * mask
        if dh_keep is not None:
            dh_prev = dh_prev + dh_keep
        if lv is None:
            dh, dc = dh_prev, dc_prev
        else:
            dh, dc = torch.where(lv, dh_prev, dh), torch.where(lv, dc_prev, dc)

    dgx = da.to(dt)
    dw_hh = dw_hr = dw_ch = dln_hh = dln_c_w = dln_c_b = None
    if need_whh:
        du = da if g_hh is None else _ln_bwd(da * g_hh, u_hat, rstd)
        hd = h_prev if mask is None else h_prev * mask
        dw_hh = (du.reshape(T * B, GH).t() @ hd.reshape(T * B, R)).to(dt)
    if need_whr:
        dw_hr = (dhs.reshape(T * B, R).t() @ ms.reshape(T * B, H).to(acc)).to(dt)
    if need_wch:
        dw_ch = _lstm_dw_ch(da, c_prev, c_til, coupled, G, H).to(dt)
    if need_lnh:
        dln_hh = (da * u_hat).sum((0, 1)).to(dt)
    if need_lncw:
        dln_c_w = (dqs * c_hat).sum((0, 1)).to(dt)
    if need_lncb:
        dln_c_b = dqs.sum((0, 1)).to(dt)
    grads = (
        dgx if need_gx else None,
        dh.to(dt) if need_h0 else None,
        dc.to(dt) if need_c0 else None,
        dw_hh,
        dw_hr,
        dw_ch,
        dln_hh,
        dln_c_w,
        dln_c_b,
    )
    return grads[: max(len(needs), 6)]


# =========================================================================== GRU and RNN


def gru_fwd(cell, gx, h0, w_hh, b_hn, lengths, reverse, store, rng=None, zoneout=0.0, stream=0,
            drop=None, ln_hh=None):  # fmt: skip
    """The forward recurrence of the GRU (cell 0) or the Elman RNN (1 tanh, 2 relu); returns
    (y, hs, ws[, aux]) like kernels.gru.gru_fwd: ws (T, B, 4H) [r | z | n | hn] for the GRU when
    `store` (the RNN with zoneout: (T, B, H), its unzoned h̃), else None; with layer norm (gains
    `ln_hh`, GRU only) a fourth element aux (T, B, 3H + 1) [normalised recurrent product | its
    rstd] when `store`, else None. Zoneout of h from `rng` (or its expectation), recurrent
    dropout `drop` (B, H) on h where it meets W_hh (the GRU's carry z ⊙ h keeps the undropped
    h)."""
    if rng is None and not zoneout and drop is None and ln_hh is None:
        return _gru_fwd_plain(cell, gx, h0, w_hh, b_hn, lengths, reverse, store)
    T, B, GH = gx.shape
    H = h0.shape[1]
    dt, acc = gx.dtype, acc_dtype(gx.dtype)
    hs = gx.new_empty((T + 1, B, H))
    s0 = T if reverse else 0
    hs[s0] = h0
    gru = cell == CELL_GRU
    zh = Zoneout(rng, zoneout, stream, _rng.WHICH_H, B, H, acc, T)
    if gru:
        ws = gx.new_empty((T, B, 4 * H), dtype=acc)
    else:
        ws = gx.new_empty((T, B, H), dtype=acc) if zh and store else None
    gx_acc, w_t = gx.to(acc), w_hh.to(acc).t()
    bias = None
    if gru and b_hn is not None:
        bias = torch.cat([b_hn.new_zeros(2 * H), b_hn]).to(acc)  # only the n block's b_hn
    act = torch.tanh if cell == CELL_RNN_TANH else torch.relu
    live = _live(lengths, T, gx.device)
    mask = None if drop is None else drop.to(acc)
    g_hh = None if ln_hh is None else ln_hh.to(acc)
    aux = gx.new_empty((T, B, GH + 1), dtype=acc) if g_hh is not None and store else None

    h = hs[s0].to(acc)
    for t in _steps(T, reverse):
        s_in, s_out = (t + 1, t) if reverse else (t, t + 1)
        hd = h if mask is None else h * mask
        if g_hh is not None:
            u = hd @ w_t
            mean, rstd = _row_stats(u)
            u_hat = (u - mean) * rstd
            a = u_hat * g_hh if bias is None else torch.addcmul(bias, u_hat, g_hh)
            if aux is not None:
                aux[t, :, :GH] = u_hat
                aux[t, :, GH:] = rstd
        elif gru:
            a = torch.mm(hd, w_t) if bias is None else torch.addmm(bias, hd, w_t)
        if gru:
            w4 = ws[t]
            rz = torch.sigmoid(gx_acc[t, :, : 2 * H] + a[:, : 2 * H], out=w4[:, : 2 * H])
            hn = w4[:, 3 * H :]
            hn.copy_(a[:, 2 * H :])
            n = torch.tanh(
                torch.addcmul(gx_acc[t, :, 2 * H :], rz[:, :H], hn), out=w4[:, 2 * H : 3 * H]
            )
            h_new = torch.lerp(n, h, rz[:, H:])
        else:
            h_new = act(torch.addmm(gx_acc[t], hd, w_t) if g_hh is None else gx_acc[t] + a)
            if ws is not None:
                ws[t] = h_new
        h_new = _zone(zh(t), h, h_new)
        if live is None:
            hs[s_out] = h_new
        else:
            hs[s_out] = torch.where(live[t], h_new.to(dt), hs[s_in])
        h = hs[s_out].to(acc)
    _, out = _slots(T, reverse)
    y = hs[out].clone() if live is None else hs[out] * live
    res = (y, hs, ws if store else None)
    return res if g_hh is None else (*res, aux)


def gru_bwd(cell, dy, dhT, hs, ws, w_hh, lengths, reverse, needs, aux=None, rng=None,
            zoneout=0.0, stream=0, drop=None, ln_hh=None):  # fmt: skip
    """The reverse loop; returns (dgx, dh0, dw_hh, db_hn[, dln_hh]) like kernels.gru.gru_bwd
    (`needs`: 4 or 5 flags).

    GRU, with dh the gradient reaching h': [dr_pre, dz_pre, dhn] = dh [K_r, K_z, K_hn] (dhn the
    gradient of W_hn h + b_hn), dn_pre = dh K_n, dh_prev = dh z + [dr_pre, dz_pre, dhn] W_hh, with
    K_n = (1-z)(1-n²), K_z = (h - n) z(1-z), K_hn = K_n r, K_r = K_n hn r(1-r).
    RNN: dpre = dh act'(h'), dh_prev = dpre W_hh. Dead steps pass dh through.
    Options: zoneout splits dh into (1 - d) dh, which enters the cell as above, and d dh, which
    reaches h_{t-1} directly; recurrent dropout multiplies the W_hh part of dh_prev by the mask
    (dW_hh pairs with h ⊙ mask); layer norm turns dgh into du = LN_hh'(dgh) = rstd (γ dgh -
    mean(γ dgh) - û mean(γ dgh û)) for W_hh and adds dγ_hh = Σ dgh ⊙ û.
    """
    if rng is None and not zoneout and drop is None and ln_hh is None:
        grads = _gru_bwd_plain(cell, dy, dhT, hs, ws, w_hh, lengths, reverse, needs[:4])
        return grads + (None,) * (len(needs) - 4)
    flags = list(needs) + [False] * (5 - len(needs))
    need_gx, need_h0, need_whh, need_bhn, need_lnh = flags
    T, B, H = dy.shape
    gru = cell == CELL_GRU
    G = 3 if gru else 1
    dt, acc = hs.dtype, acc_dtype(hs.dtype)
    ins, outs = _slots(T, reverse)
    h_prev = hs[ins].to(acc)
    live = _live(lengths, T, hs.device)
    zh = Zoneout(rng, zoneout, stream, _rng.WHICH_H, B, H, acc, T)
    mask = None if drop is None else drop.to(acc)
    g_hh = None if ln_hh is None else ln_hh.to(acc)
    options = bool(zh) or mask is not None or g_hh is not None
    if gru:
        r, z, n, hn = ws.view(T, B, 4, H).unbind(2)
        k_n = (1.0 - z) * (1.0 - n * n)
        k_hn = k_n * r
        coef = torch.stack([k_hn * hn * (1.0 - r), (h_prev - n) * z * (1.0 - z), k_hn], dim=2)
        carry = z
    else:
        h_new = hs[outs].to(acc) if ws is None else ws
        k = 1.0 - h_new * h_new if cell == CELL_RNN_TANH else (h_new > 0).to(acc)
        coef = k.unsqueeze(2)
        carry = None
    if live is not None:
        coef = coef * live.unsqueeze(-1)
        dead = (~live).to(acc)
        if gru:
            carry = carry * live
    if g_hh is not None:
        u_hat, rstd = aux[..., : G * H], aux[..., G * H :]

    dgh = hs.new_empty((T, B, G * H), dtype=acc)  # the gradient of h W_hh^T (+ b_hn)
    dtots = hs.new_empty((T, B, H), dtype=acc) if gru else None
    w = w_hh.to(acc)
    dy = dy.to(acc)
    dh = dhT.to(acc)
    for t in reversed(_steps(T, reverse)):
        dtot = dh + dy[t]
        if live is not None:
            dtot = dtot * live[t]
        d = zh(t)
        keep = None
        if d is not None:
            keep = dtot * d  # reaches h_{t-1} past the cell
            dtot = dtot * (1.0 - d)
        g_t = torch.mul(dtot.unsqueeze(1), coef[t], out=dgh[t].view(B, G, H))
        base = None
        if gru:
            dtots[t] = dtot
            base = dtot * carry[t]
        if keep is not None:
            base = keep if base is None else base + keep
        if live is not None:
            base = dh * dead[t] if base is None else base.addcmul_(dh, dead[t])
        g_t = g_t.view(B, G * H)
        if not options:
            dh = torch.mm(g_t, w) if base is None else torch.addmm(base, g_t, w)
            continue
        du = g_t if g_hh is None else _ln_bwd(g_t * g_hh, u_hat[t], rstd[t])
        rec = du @ w
        if mask is not None:
            rec = rec * mask
        if live is not None:
            rec = rec * live[t]  # a dead step's du is zero, but not LN_hh'(0)'s rounding
        dh = rec if base is None else base + rec

    dgx = dw_hh = db_hn = dln_hh = None
    if need_gx:
        dgx = dgh.to(dt, copy=True)
        if gru:  # the n block of dgx is dn_pre, not dhn
            k_n_live = k_n if live is None else k_n * live
            dgx[..., 2 * H :] = dtots * k_n_live
    if need_whh:
        du = dgh if g_hh is None else _ln_bwd(dgh * g_hh, u_hat, rstd)
        hd = h_prev if mask is None else h_prev * mask
        dw_hh = (du.reshape(T * B, G * H).t() @ hd.reshape(T * B, H)).to(dt)
    if need_bhn:
        db_hn = dgh[..., 2 * H :].sum((0, 1)).to(dt)
    if need_lnh:
        dln_hh = (dgh * u_hat).sum((0, 1)).to(dt)
    grads = (dgx, dh.to(dt) if need_h0 else None, dw_hh, db_hn, dln_hh)
    return grads[: max(len(needs), 4)]


# =========================================================================== the plain loops

# Speed of the loops: on a CPU every torch op costs microseconds of dispatch, so the per-step
# work is a handful of ops on views prepared once per call (`unbind`: one view per step and
# gate block), with results written in place through `out=`; no indexing inside the loops.


def _steps_of(x: Tensor) -> tuple[Tensor, ...]:
    return x.unbind(0)


def _blocks(x: Tensor, G: int) -> list[tuple[Tensor, ...]]:
    """Per gate block k, the per-step views x[t, :, k*H:(k+1)*H] of a (T, B, G*H) buffer."""
    T, B, GH = x.shape
    v = x.view(T, B, G, GH // G)
    return [v[:, :, k].unbind(0) for k in range(G)]


def _lstm_fwd_plain(gx, h0, c0, w_hh, w_hr, w_ch, lengths, reverse, coupled, store):
    """`lstm_fwd` without options: the tuned loop of the common case."""
    T, B, GH = gx.shape
    G = 3 if coupled else 4
    H, R = GH // G, w_hh.shape[1]
    dt, acc = gx.dtype, acc_dtype(gx.dtype)
    same = dt == acc

    hs = gx.new_empty((T + 1, B, R))
    cs = gx.new_empty((T + 1, B, H), dtype=acc)
    s0 = T if reverse else 0
    hs[s0] = h0
    cs[s0] = c0
    gates = gx.new_empty((T, B, GH), dtype=acc)  # the activations, kept for backward if `store`
    ms = gx.new_empty((T, B, H)) if w_hr is not None else None
    w_t = w_hh.to(acc).t()
    w_rt = None if w_hr is None else w_hr.to(acc).t()
    p_i, p_f, p_o = _peepholes(w_ch, coupled, acc)
    live = _live(lengths, T, gx.device)

    # per-step views, made once
    xs, acts = _steps_of(gx.to(acc)), _steps_of(gates)
    h_slots, c_slots = _steps_of(hs), _steps_of(cs)
    *i_s, f_s, g_s, o_s = _blocks(gates, G)
    a = gx.new_empty((B, GH), dtype=acc)  # pre-activations of the current step
    *a_i, a_f, a_g, a_o = a.view(B, G, H).unbind(1)
    lives = None if live is None else _steps_of(live)
    m_slots = None if ms is None else _steps_of(ms)
    c_new, tc, m = (gx.new_empty((B, H), dtype=acc) for _ in range(3))
    h_proj = None if w_rt is None else gx.new_empty((B, R), dtype=acc)
    direct = same and live is None and w_rt is None  # h' = o tanh(c') straight into its slot

    h, c = hs[s0].to(acc), c_slots[s0]
    for t in _steps(T, reverse):
        s_in, s_out = (t + 1, t) if reverse else (t, t + 1)
        torch.addmm(xs[t], h, w_t, out=a)
        if p_f is not None:
            if not coupled:
                a_i[0].addcmul_(p_i, c)
            a_f.addcmul_(p_f, c)
        torch.sigmoid(a, out=acts[t])
        f, g, o = f_s[t], g_s[t], o_s[t]
        torch.tanh(a_g, out=g)
        if coupled:  # i = 1 - f: c' = f c + (1 - f) g = g + f (c - g)
            torch.sub(c, g, out=c_new)
            torch.addcmul(g, f, c_new, out=c_new)
        else:
            torch.mul(f, c, out=c_new)
            c_new.addcmul_(i_s[0][t], g)
        if p_o is not None:
            torch.sigmoid(a_o.addcmul_(p_o, c_new), out=o)
        torch.tanh(c_new, out=tc)
        if direct:
            torch.mul(o, tc, out=h_slots[s_out])
        else:
            h_new = torch.mul(o, tc, out=m)
            if w_rt is not None:
                m_slots[t].copy_(m)
                h_new = torch.mm(m_slots[t].to(acc), w_rt, out=h_proj)  # on the stored m
            if lives is None:
                h_slots[s_out].copy_(h_new)
            else:
                torch.where(lives[t], h_new.to(dt), h_slots[s_in], out=h_slots[s_out])
        if lives is None:
            c_slots[s_out].copy_(c_new)
        else:
            torch.where(lives[t], c_new, c_slots[s_in], out=c_slots[s_out])
        c = c_slots[s_out]
        h = h_slots[s_out] if same else h_slots[s_out].to(acc)
    _, out = _slots(T, reverse)
    y = hs[out].clone() if live is None else hs[out] * live
    return y, hs, cs, gates if store else None, ms


def _lstm_bwd_plain(
    dy, dhT, dcT, hs, cs, gates, ms, w_hh, w_hr, w_ch, lengths, reverse, coupled, needs
):
    """`lstm_bwd` without options: the tuned loop of the common case (six gradients)."""
    T, B, GH = gates.shape
    G = 3 if coupled else 4
    H, R = GH // G, w_hh.shape[1]
    dt, acc = hs.dtype, cs.dtype
    need_gx, need_h0, need_c0, need_whh, need_whr, need_wch = needs
    ins, outs = _slots(T, reverse)
    c_prev, c_new, h_prev = cs[ins], cs[outs], hs[ins]
    blocks = gates.view(T, B, G, H).unbind(2)
    f, g, o = blocks[-3:]
    i = 1.0 - f if coupled else blocks[0]
    live = _live(lengths, T, hs.device)

    # what does not depend on the incoming gradient, for every step at once
    tc = torch.tanh(c_new)
    k_o = tc * o * (1.0 - o)
    k_c = o * (1.0 - tc * tc)
    k_f = (c_prev - g if coupled else c_prev) * f * (1.0 - f)
    k_g = i * (1.0 - g * g)
    k_in = [k_f, k_g] if coupled else [g * i * (1.0 - i), k_f, k_g]
    k_in = torch.stack(k_in, dim=2)  # (T, B, G-1, H), the gate blocks before o
    f_pass = f
    if live is not None:
        k_o, k_c, k_in = k_o * live, k_c * live, k_in * live.unsqueeze(-1)
        f_pass = torch.where(live, f, 1.0)
    p_i, p_f, p_o = _peepholes(w_ch, coupled, acc)

    da = hs.new_empty((T, B, GH), dtype=acc)
    dhs = hs.new_empty((T, B, R), dtype=acc) if w_hr is not None else None
    w, w_r = w_hh.to(acc), None if w_hr is None else w_hr.to(acc)

    # per-step views, made once
    dys, das = _steps_of(dy.to(acc)), _steps_of(da)
    da4 = da.view(T, B, G, H)
    da_o_s, da_in_s = da4[:, :, G - 1].unbind(0), da4[:, :, : G - 1].unbind(0)
    da_f_s = da4[:, :, G - 3].unbind(0)
    da_i_s = None if coupled else da4[:, :, 0].unbind(0)
    k_o_s, k_c_s, k_in_s, f_s = (_steps_of(k) for k in (k_o, k_c, k_in, f_pass))
    lives = None if live is None else _steps_of(live.to(acc))
    deads = None if live is None else _steps_of((~live).to(acc))
    dhs_s = None if dhs is None else _steps_of(dhs)
    dc = dcT.to(acc, copy=True)  # updated in place
    dc3 = dc.view(B, 1, H)
    dh = dhT.to(acc)
    dtot = dh.new_empty((B, R))
    for t in reversed(_steps(T, reverse)):
        torch.add(dh, dys[t], out=dtot if dhs is None else dhs_s[t])
        dm = dtot if dhs is None else dhs_s[t]
        if lives is not None:
            dm.mul_(lives[t])
        if w_r is not None:
            dm = dm @ w_r
        da_o = torch.mul(dm, k_o_s[t], out=da_o_s[t])
        dc.addcmul_(dm, k_c_s[t])
        if p_o is not None:
            dc.addcmul_(p_o, da_o)
        torch.mul(dc3, k_in_s[t], out=da_in_s[t])
        dc.mul_(f_s[t])
        if p_f is not None:
            dc.addcmul_(p_f, da_f_s[t])
            if not coupled:
                dc.addcmul_(p_i, da_i_s[t])
        if deads is None:
            dh = torch.mm(das[t], w)
        else:
            dh = torch.addmm(dh * deads[t], das[t], w)

    dgx = da.to(dt)
    dw_hh = dw_hr = dw_ch = None
    if need_whh:
        dw_hh = (da.reshape(T * B, GH).t() @ h_prev.reshape(T * B, R).to(acc)).to(dt)
    if need_whr:
        dw_hr = (dhs.reshape(T * B, R).t() @ ms.reshape(T * B, H).to(acc)).to(dt)
    if need_wch:
        dw_ch = _lstm_dw_ch(da, c_prev, c_new, coupled, G, H).to(dt)
    return (
        dgx if need_gx else None,
        dh.to(dt) if need_h0 else None,
        dc.to(dt) if need_c0 else None,
        dw_hh,
        dw_hr,
        dw_ch,
    )


def _gru_fwd_plain(cell, gx, h0, w_hh, b_hn, lengths, reverse, store):
    """`gru_fwd` without options: the tuned loop of the common case."""
    T, B, GH = gx.shape
    H = h0.shape[1]
    dt, acc = gx.dtype, acc_dtype(gx.dtype)
    same = dt == acc
    hs = gx.new_empty((T + 1, B, H))
    s0 = T if reverse else 0
    hs[s0] = h0
    gru = cell == CELL_GRU
    ws = gx.new_empty((T, B, 4 * H), dtype=acc) if gru else None
    w_t = w_hh.to(acc).t()
    bias = None
    if gru and b_hn is not None:
        bias = torch.cat([b_hn.new_zeros(2 * H), b_hn]).to(acc)  # only the n block's b_hn
    tanh = cell == CELL_RNN_TANH  # else relu, as clamp_min(x, 0) (torch.relu has no out=)
    live = _live(lengths, T, gx.device)

    # per-step views, made once
    xs, h_slots = _steps_of(gx.to(acc)), _steps_of(hs)
    lives = None if live is None else _steps_of(live)
    a = gx.new_empty((B, GH), dtype=acc)
    h_new = a if not gru else gx.new_empty((B, H), dtype=acc)
    direct = same and live is None  # h' written straight into its slot
    if gru:
        x_rz = [x[:, : 2 * H] for x in xs]
        x_n = [x[:, 2 * H :] for x in xs]
        w4 = ws.view(T, B, 4, H)
        rz_s = ws[:, :, : 2 * H].unbind(0)
        r_s, z_s, n_s, hn_s = (w4[:, :, k].unbind(0) for k in range(4))
        a_rz, a_n = a[:, : 2 * H], a[:, 2 * H :]

    h = hs[s0].to(acc)
    for t in _steps(T, reverse):
        s_in, s_out = (t + 1, t) if reverse else (t, t + 1)
        if gru:
            if bias is None:
                torch.mm(h, w_t, out=a)
            else:
                torch.addmm(bias, h, w_t, out=a)
            torch.sigmoid(torch.add(x_rz[t], a_rz, out=rz_s[t]), out=rz_s[t])
            hn_s[t].copy_(a_n)
            n = torch.tanh(torch.addcmul(x_n[t], r_s[t], a_n, out=n_s[t]), out=n_s[t])
            torch.lerp(n, h, z_s[t], out=h_slots[s_out] if direct else h_new)
        else:
            pre = torch.addmm(xs[t], h, w_t, out=a)
            dst = h_slots[s_out] if direct else h_new
            if tanh:
                torch.tanh(pre, out=dst)
            else:
                torch.clamp_min(pre, 0.0, out=dst)
        if not direct:
            if lives is None:
                h_slots[s_out].copy_(h_new)
            else:
                torch.where(lives[t], h_new.to(dt), h_slots[s_in], out=h_slots[s_out])
        h = h_slots[s_out] if same else h_slots[s_out].to(acc)
    _, out = _slots(T, reverse)
    y = hs[out].clone() if live is None else hs[out] * live
    return y, hs, ws if store else None


def _gru_bwd_plain(cell, dy, dhT, hs, ws, w_hh, lengths, reverse, needs):
    """`gru_bwd` without options: the tuned loop of the common case (four gradients)."""
    need_gx, need_h0, need_whh, need_bhn = needs
    T, B, H = dy.shape
    gru = cell == CELL_GRU
    G = 3 if gru else 1
    dt, acc = hs.dtype, acc_dtype(hs.dtype)
    ins, outs = _slots(T, reverse)
    h_prev = hs[ins].to(acc)
    live = _live(lengths, T, hs.device)
    if gru:
        r, z, n, hn = ws.view(T, B, 4, H).unbind(2)
        k_n = (1.0 - z) * (1.0 - n * n)
        k_hn = k_n * r
        coef = torch.stack([k_hn * hn * (1.0 - r), (h_prev - n) * z * (1.0 - z), k_hn], dim=2)
    else:
        h_new = hs[outs].to(acc)
        k = 1.0 - h_new * h_new if cell == CELL_RNN_TANH else (h_new > 0).to(acc)
        coef = k.unsqueeze(2)
    if live is not None:
        coef = coef * live.unsqueeze(-1)

    dgh = hs.new_empty((T, B, G * H), dtype=acc)  # the gradient of h W_hh^T (+ b_hn)
    dtots = hs.new_empty((T, B, H), dtype=acc)
    w = w_hh.to(acc)

    # per-step views, made once
    dys, dgh_s, dgh3_s = _steps_of(dy.to(acc)), _steps_of(dgh), dgh.view(T, B, G, H).unbind(0)
    dtot_s, dtot3_s = _steps_of(dtots), dtots.view(T, B, 1, H).unbind(0)
    coef_s = _steps_of(coef)
    z_s = _steps_of(z) if gru else None
    lives = None if live is None else _steps_of(live.to(acc))
    deads = None if live is None else _steps_of((~live).to(acc))
    dh = dhT.to(acc)
    for t in reversed(_steps(T, reverse)):
        dtot = torch.add(dh, dys[t], out=dtot_s[t])
        if lives is not None:
            dtot.mul_(lives[t])
        torch.mul(dtot3_s[t], coef_s[t], out=dgh3_s[t])
        base = None
        if gru:
            base = dtot * z_s[t]
        if deads is not None:
            base = dh * deads[t] if base is None else base.addcmul_(dh, deads[t])
        dh = torch.mm(dgh_s[t], w) if base is None else torch.addmm(base, dgh_s[t], w)

    dgx = dw_hh = db_hn = None
    if need_gx:
        dgx = dgh.to(dt, copy=True)
        if gru:  # the n block of dgx is dn_pre, not dhn (dtots is zero at dead steps)
            dgx[..., 2 * H :] = dtots * k_n
    if need_whh:
        dw_hh = (dgh.reshape(T * B, G * H).t() @ h_prev.reshape(T * B, H)).to(dt)
    if need_bhn:
        db_hn = dgh[..., 2 * H :].sum((0, 1)).to(dt)
    return dgx, dh.to(dt) if need_h0 else None, dw_hh, db_hn


# =========================================================================== differentiable loop


def _lstm_step(a: Tensor, c: Tensor, w_ch: Tensor | None, coupled: bool, ln_c=None):
    if coupled:
        f, g, o = a.chunk(3, dim=-1)
        i = None
    else:
        i, f, g, o = a.chunk(4, dim=-1)
    if w_ch is not None:
        if coupled:
            p_f, p_o = w_ch.chunk(2)
        else:
            p_i, p_f, p_o = w_ch.chunk(3)
            i = torch.addcmul(i, p_i, c)
        f = torch.addcmul(f, p_f, c)
    f = torch.sigmoid(f)
    i = 1 - f if coupled else torch.sigmoid(i)
    c_new = torch.addcmul(f * c, i, torch.tanh(g))
    if w_ch is not None:
        o = torch.addcmul(o, p_o, c_new)
    q = c_new
    if ln_c is not None:
        mean, rstd = _row_stats(c_new)
        q = torch.addcmul(ln_c[1], (c_new - mean) * rstd, ln_c[0])
    return torch.sigmoid(o) * torch.tanh(q), c_new


def _step(mode, gx_t, h, c, w_hh, w_hr, w_ch, b_hn, coupled, drop=None, ln_hh=None, ln_c=None):
    rec = torch.mm(h if drop is None else h * drop, w_hh.t())
    if ln_hh is not None:
        mean, rstd = _row_stats(rec)
        rec = (rec - mean) * rstd * ln_hh
    if mode == "LSTM":
        m, c_new = _lstm_step(gx_t + rec, c, w_ch, coupled, ln_c)
        return (m if w_hr is None else torch.mm(m, w_hr.t())), c_new
    if mode == "GRU":
        x_r, x_z, x_n = gx_t.chunk(3, dim=-1)
        h_r, h_z, h_n = rec.chunk(3, dim=-1)
        if b_hn is not None:
            h_n = h_n + b_hn
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(torch.addcmul(x_n, r, h_n))
        return torch.lerp(n, h, z), None
    act = torch.tanh if mode == "RNN_TANH" else torch.relu
    return act(gx_t + rec), None


def recurrence_autograd(mode, gx, h0, c0, w_hh, w_hr=None, w_ch=None, b_hn=None, lengths=None,
                        reverse=False, coupled=False, rng=None, zoneout_c=0.0, zoneout_h=0.0,
                        stream=0, drop=None, ln_hh=None, ln_c_w=None,
                        ln_c_b=None):  # fmt: skip
    """One layer and direction as a differentiable per-step loop (autograd through every step).

    Same semantics as the operators: gx (T, B, G*H) with the foldable biases in it, h0 (B, R),
    c0 (B, H) or None, b_hn (H,) the GRU's n block of b_hh or None, lengths (B,) or None (steps
    t >= lengths[b] leave b's state unchanged and output zeros); the options of the operators
    (zoneout of c (LSTM) and h with masks from `rng` or their expectation, recurrent dropout
    `drop` (B, R), layer-norm gains `ln_hh` and the LSTM's output norm `ln_c_w`, `ln_c_b`).
    Returns y (T, B, R), h_T, c_T (or None). Each step reads its own slice of gx (`unbind`), so
    autograd's gradient of gx is built once, not as a full-size zero tensor per step.
    """
    T, B = gx.shape[:2]
    live = _live(lengths, T, gx.device)
    h, c = h0, c0
    xs = gx.unbind(0)
    ys: list[Tensor | None] = [None] * T
    dtype = gx.dtype
    zh = Zoneout(rng, zoneout_h, stream, _rng.WHICH_H, B, h0.shape[-1], dtype, T)
    zc = Zoneout(
        rng, zoneout_c, stream, _rng.WHICH_C, B, 0 if c0 is None else c0.shape[-1], dtype, T
    )
    ln_c = None if ln_c_w is None else (ln_c_w, ln_c_b)
    for t in _steps(T, reverse):
        h_new, c_new = _step(mode, xs[t], h, c, w_hh, w_hr, w_ch, b_hn, coupled, drop, ln_hh, ln_c)
        h_new = _zone(zh(t), h, h_new)
        if c is not None:
            c_new = _zone(zc(t), c, c_new)
        if live is None:
            h, c, ys[t] = h_new, c_new, h_new
        else:
            h = torch.where(live[t], h_new, h)
            if c is not None:
                c = torch.where(live[t], c_new, c)
            ys[t] = h_new * live[t]
    return torch.stack(ys), h, c
