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


# =========================================================================== LSTM


def lstm_fwd(gx, h0, c0, w_hh, w_hr, w_ch, lengths, reverse, coupled, store):
    """The forward recurrence; returns (y, hs, cs, gates, ms) like kernels.lstm.lstm_fwd.

    gx (T, B, G*H), h0 (B, R), c0 (B, H), w_hh (G*H, R), w_hr (P, H) or None, w_ch or None,
    lengths (B,) int64 or None. gates is None unless `store`; ms is None without a projection.
    """
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


def lstm_bwd(dy, dhT, dcT, hs, cs, gates, ms, w_hh, w_hr, w_ch, lengths, reverse, coupled, needs):
    """The reverse loop; returns (dgx, dh0, dc0, dw_hh, dw_hr, dw_ch) like kernels.lstm.lstm_bwd
    (None where `needs` does not ask). Per step, with dm the gradient reaching m = o tanh(c'):

        da_o = dm K_o,   dc += dm K_c (+ p_o da_o),   [da_i, da_f, da_g] = dc [K_i, K_f, K_g],
        dc_prev = dc F (+ p_i da_i + p_f da_f),   dh_prev = da W_hh

    where K_o = tanh(c') o(1-o), K_c = o (1 - tanh²c'), K_i = g i(1-i), K_f = c f(1-f)
    (coupled: (c - g) f(1-f)), K_g = i (1-g²), F = f, all zero (F one) at dead steps, whose dh
    and dc pass through unchanged.
    """
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
        parts = [] if coupled else [(da4[:, :, 0] * c_prev).sum((0, 1))]
        parts += [(da4[:, :, G - 3] * c_prev).sum((0, 1))]
        parts += [(da4[:, :, G - 1] * c_new).sum((0, 1))]
        dw_ch = torch.cat(parts).to(dt)
    return (
        dgx if need_gx else None,
        dh.to(dt) if need_h0 else None,
        dc.to(dt) if need_c0 else None,
        dw_hh,
        dw_hr,
        dw_ch,
    )


# =========================================================================== GRU and RNN


def gru_fwd(cell, gx, h0, w_hh, b_hn, lengths, reverse, store):
    """The forward recurrence of the GRU (cell 0) or the Elman RNN (1 tanh, 2 relu); returns
    (y, hs, ws) like kernels.gru.gru_fwd: ws (T, B, 4H) [r | z | n | hn] for the GRU when
    `store`, else None."""
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


def gru_bwd(cell, dy, dhT, hs, ws, w_hh, lengths, reverse, needs):
    """The reverse loop; returns (dgx, dh0, dw_hh, db_hn) like kernels.gru.gru_bwd.

    GRU, with dh the gradient reaching h': [dr_pre, dz_pre, dhn] = dh [K_r, K_z, K_hn] (dhn the
    gradient of W_hn h + b_hn), dn_pre = dh K_n, dh_prev = dh z + [dr_pre, dz_pre, dhn] W_hh, with
    K_n = (1-z)(1-n²), K_z = (h - n) z(1-z), K_hn = K_n r, K_r = K_n hn r(1-r).
    RNN: dpre = dh act'(h'), dh_prev = dpre W_hh. Dead steps pass dh through.
    """
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


def _lstm_step(a: Tensor, c: Tensor, w_ch: Tensor | None, coupled: bool):
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
    return torch.sigmoid(o) * torch.tanh(c_new), c_new


def _step(mode, gx_t, h, c, w_hh, w_hr, w_ch, b_hn, coupled):
    rec = torch.mm(h, w_hh.t())
    if mode == "LSTM":
        m, c_new = _lstm_step(gx_t + rec, c, w_ch, coupled)
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
                        reverse=False, coupled=False):  # fmt: skip
    """One layer and direction as a differentiable per-step loop (autograd through every step).

    Same semantics as the operators: gx (T, B, G*H) with the foldable biases in it, h0 (B, R),
    c0 (B, H) or None, b_hn (H,) the GRU's n block of b_hh or None, lengths (B,) or None (steps
    t >= lengths[b] leave b's state unchanged and output zeros). Returns y (T, B, R), h_T, c_T
    (or None). Each step reads its own slice of gx (`unbind`), so autograd's gradient of gx is
    built once, not as a full-size zero tensor per step.
    """
    T = gx.shape[0]
    live = _live(lengths, T, gx.device)
    h, c = h0, c0
    xs = gx.unbind(0)
    ys: list[Tensor | None] = [None] * T
    for t in _steps(T, reverse):
        h_new, c_new = _step(mode, xs[t], h, c, w_hh, w_hr, w_ch, b_hn, coupled)
        if live is None:
            h, c, ys[t] = h_new, c_new, h_new
        else:
            h = torch.where(live[t], h_new, h)
            if c is not None:
                c = torch.where(live[t], c_new, c)
            ys[t] = h_new * live[t]
    return torch.stack(ys), h, c
