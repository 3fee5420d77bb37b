"""Plain-torch maths of every cell: the test oracle.

Written for clarity, not speed. Works in any floating dtype (float64 for the tests) and shares
no code with torch's native RNN ops, with the CPU path of `fused_rnn.functional` or with the
Triton kernels, so that it can check all of them.

Notation: T steps, B batch, I input features, H hidden units, P = proj_size (R = P or H is the
width of h), G gates (RNN 1, GRU 3, LSTM 4, coupled LSTM 3). Weights are torch's: a row block of
a stacked weight per gate, ``x W^T + b``.

    RNN   h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh)                 act = tanh | relu
    GRU   r = σ(x W_ir^T + b_ir + h W_hr^T + b_hr)
          z = σ(x W_iz^T + b_iz + h W_hz^T + b_hz)
          n = tanh(x W_in^T + b_in + r ⊙ (h W_hn^T + b_hn))
          h' = (1 - z) ⊙ n + z ⊙ h
    LSTM  i, f, g, o = x W_ih^T + b_ih + h W_hh^T + b_hh              (row blocks i | f | g | o)
          i += p_i ⊙ c;  f += p_f ⊙ c                                 (peephole only)
          i = σ(i);  f = σ(f);  g = tanh(g)                           (coupled: no i row, i = 1 - f)
          c' = f ⊙ c + i ⊙ g
          o = σ(o + p_o ⊙ c')                                         (p_o only with peephole)
          h' = σ(o) ⊙ tanh(c'), then h' = h' W_hr^T with proj_size

Regularised and normalised recurrences (options of `recurrence` / `stack`, all off by default):

    recurrent dropout (Gal & Ghahramani 2016)   h̄ = h ⊙ m replaces h where it meets W_hh, one
        mask m (B, R) per sequence, layer and direction (0 or 1/(1-p)); the GRU's carry z ⊙ h
        keeps the undropped h
    layer norm (Ba, Kiros & Hinton 2016)        LN(u) = (u - mean(u)) / sqrt(var(u) + 1e-5) ⊙ γ + β
        over each row's G*H gate values (biased variance), separately for the two products:
        a = LN_ih(x W_ih^T) + b_ih + LN_hh(h̄ W_hh^T) + b_hh      (GRU: r multiplies the n block
        of LN_hh(h̄ W_hh^T) + b_hh);  LSTM: h' = σ(o) ⊙ tanh(LN_c(c')) over the H units of c',
        while c' itself is carried unnormalised
    zoneout (Krueger et al. 2016)               h_t = d ⊙ h_{t-1} + (1 - d) ⊙ h̃_t, the same for c
        with its own d; h̃, c̃ the cell's usual outputs (h̃ computed from c̃). d is 0/1 (training)
        or the probability itself (evaluation: the expectation)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "CellWeights",
    "rnn_cell",
    "gru_cell",
    "lstm_cell",
    "layer_norm",
    "cell",
    "recurrence",
    "stack",
]


class CellWeights(NamedTuple):
    """The weights of one layer and direction (absent ones are None).

    w_ih (G*H, I), w_hh (G*H, R), b_ih (G*H,), b_hh (G*H,), w_hr (P, H) with proj_size,
    w_ch (3*H,) peephole weights (i, f, o) or (2*H,) (f, o) with coupled gates.
    Layer norm (all None without it): gains w_ln_* and biases b_ln_* of LN_ih and LN_hh (G*H,)
    and, for the LSTM, of LN_c (H,).
    """

    w_ih: Tensor
    w_hh: Tensor
    b_ih: Tensor | None = None
    b_hh: Tensor | None = None
    w_hr: Tensor | None = None
    w_ch: Tensor | None = None
    w_ln_ih: Tensor | None = None
    b_ln_ih: Tensor | None = None
    w_ln_hh: Tensor | None = None
    b_ln_hh: Tensor | None = None
    w_ln_c: Tensor | None = None
    b_ln_c: Tensor | None = None


def _linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    y = x @ w.t()
    return y if b is None else y + b


def layer_norm(u: Tensor, gain: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """Normalises each row of u over its last dimension (biased variance), then gain and bias."""
    mean = u.mean(-1, keepdim=True)
    var = ((u - mean) ** 2).mean(-1, keepdim=True)
    return (u - mean) / torch.sqrt(var + eps) * gain + bias


def _products(x: Tensor, h: Tensor, w: CellWeights, drop: Tensor | None):
    """(input part, recurrent part) of the pre-activations, each with its bias: plain, or with
    LN_ih / LN_hh applied to the products before the biases; h ⊙ drop feeds W_hh."""
    hd = h if drop is None else h * drop
    xi, hh = x @ w.w_ih.t(), hd @ w.w_hh.t()
    if w.w_ln_ih is not None:
        xi = layer_norm(xi, w.w_ln_ih, w.b_ln_ih)
        hh = layer_norm(hh, w.w_ln_hh, w.b_ln_hh)
    if w.b_ih is not None:
        xi, hh = xi + w.b_ih, hh + w.b_hh
    return xi, hh


def rnn_cell(x: Tensor, h: Tensor, w: CellWeights, nonlinearity: str = "tanh",
             drop: Tensor | None = None) -> Tensor:  # fmt: skip
    xi, hh = _products(x, h, w, drop)
    pre = xi + hh
    if nonlinearity == "tanh":
        return torch.tanh(pre)
    if nonlinearity == "relu":
        return torch.relu(pre)
    raise ValueError(f"Unknown nonlinearity '{nonlinearity}'")


def gru_cell(x: Tensor, h: Tensor, w: CellWeights, drop: Tensor | None = None) -> Tensor:
    xi, hh = _products(x, h, w, drop)
    x_r, x_z, x_n = xi.chunk(3, dim=-1)
    h_r, h_z, h_n = hh.chunk(3, dim=-1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h


def lstm_cell(
    x: Tensor, h: Tensor, c: Tensor, w: CellWeights, coupled: bool = False,
    drop: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    xi, hh = _products(x, h, w, drop)
    gates = xi + hh
    if coupled:
        f, g, o = gates.chunk(3, dim=-1)
        i = None
    else:
        i, f, g, o = gates.chunk(4, dim=-1)
    p_i = p_f = p_o = None
    if w.w_ch is not None:
        if coupled:
            p_f, p_o = w.w_ch.chunk(2)
        else:
            p_i, p_f, p_o = w.w_ch.chunk(3)
        f = f + p_f * c
        if i is not None:
            i = i + p_i * c
    f = torch.sigmoid(f)
    i = 1 - f if coupled else torch.sigmoid(i)
    c_new = f * c + i * torch.tanh(g)
    if p_o is not None:
        o = o + p_o * c_new
    c_out = c_new if w.w_ln_c is None else layer_norm(c_new, w.w_ln_c, w.b_ln_c)
    h_new = torch.sigmoid(o) * torch.tanh(c_out)
    if w.w_hr is not None:
        h_new = h_new @ w.w_hr.t()
    return h_new, c_new


def cell(
    mode: str,
    x: Tensor,
    h: Tensor,
    c: Tensor | None,
    w: CellWeights,
    coupled: bool = False,
    drop: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """One step of `mode` ('LSTM', 'GRU', 'RNN_TANH', 'RNN_RELU'); returns (h', c' or None).
    `drop` (B, R) multiplies h where it enters W_hh (recurrent dropout)."""
    if mode == "LSTM":
        return lstm_cell(x, h, c, w, coupled, drop)
    if mode == "GRU":
        return gru_cell(x, h, w, drop), None
    if mode in ("RNN_TANH", "RNN_RELU"):
        return rnn_cell(x, h, w, "tanh" if mode == "RNN_TANH" else "relu", drop), None
    raise ValueError(f"unknown mode {mode!r}")


def _zone(d: Tensor | None, old: Tensor, new: Tensor) -> Tensor:
    """Zoneout: d ⊙ old + (1 - d) ⊙ new (d a 0/1 mask or a probability), or new without d."""
    return new if d is None else d * old + (1 - d) * new


def recurrence(
    mode: str,
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    w: CellWeights,
    lengths: Tensor | None = None,
    reverse: bool = False,
    coupled: bool = False,
    *,
    zone_h: Tensor | float | None = None,
    zone_c: Tensor | float | None = None,
    drop: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer and direction over a padded sequence.

    x (T, B, I), h0 (B, R), c0 (B, H) for LSTM. With `lengths` (B,), sequence b only runs over
    its steps t < lengths[b]: its state is frozen outside them and its output there is zero, so
    the forward state stops at its own end and the reverse direction starts at its own last step.
    Options: `zone_h` (T, B, R) / `zone_c` (T, B, H) zoneout masks d of each step indexed by t
    (1 = keep the previous value), or a float probability (the evaluation-mode expectation);
    `drop` (B, R) recurrent dropout multiplier; layer norm when `w` holds its weights.
    Returns y (T, B, R) (the zoned states), h_T (B, R), c_T (B, H) or None.
    """
    T = x.shape[0]
    h, c = h0, c0
    ys = [None] * T
    steps = range(T - 1, -1, -1) if reverse else range(T)
    for t in steps:
        h_new, c_new = cell(mode, x[t], h, c, w, coupled, drop)
        if zone_h is not None:
            h_new = _zone(zone_h if isinstance(zone_h, float) else zone_h[t], h, h_new)
        if zone_c is not None and c is not None:
            c_new = _zone(zone_c if isinstance(zone_c, float) else zone_c[t], c, c_new)
        if lengths is None:
            h, c, ys[t] = h_new, c_new, h_new
        else:
            live = (t < lengths).to(x.device).unsqueeze(-1)
            h = torch.where(live, h_new, h)
            if c is not None:
                c = torch.where(live, c_new, c)
            ys[t] = torch.where(live, h_new, torch.zeros_like(h_new))
    return torch.stack(ys), h, c


def stack(
    mode: str,
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    weights: list[CellWeights],
    num_layers: int,
    bidirectional: bool,
    lengths: Tensor | None = None,
    coupled: bool = False,
    *,
    zone_h: list | None = None,
    zone_c: list | None = None,
    drop: list | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The multi-layer (and bidirectional) network without inter-layer dropout.

    x (T, B, I); h0 (L*D, B, R); c0 (L*D, B, H); weights[l*D + d]. Layer l>0 reads the output of
    layer l-1, `[forward | reverse]` on the feature axis. `zone_h`, `zone_c`, `drop`: per layer
    and direction (index l*D + d), what `recurrence` takes. Returns output (T, B, D*R),
    h_n (L*D, B, R), c_n (L*D, B, H) or None.
    """
    D = 2 if bidirectional else 1
    hn, cn = [], []
    layer_in = x
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            k = layer * D + d
            y, h, c = recurrence(
                mode,
                layer_in,
                h0[k],
                None if c0 is None else c0[k],
                weights[k],
                lengths,
                reverse=d == 1,
                coupled=coupled,
                zone_h=None if zone_h is None else zone_h[k],
                zone_c=None if zone_c is None else zone_c[k],
                drop=None if drop is None else drop[k],
            )
            outs.append(y)
            hn.append(h)
            cn.append(c)
        layer_in = torch.cat(outs, dim=-1)
    return layer_in, torch.stack(hn), None if c0 is None else torch.stack(cn)
