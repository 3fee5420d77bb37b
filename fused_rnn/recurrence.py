"""One layer and direction of a recurrent network, differentiable, on a chosen backend.

These are the building blocks under the modules: the input projection of every step is done
by the caller (one GEMM), these run the sequential part:

    gx = x @ W_ih^T + b_ih + b_hh                              # LSTM and RNN; GRU: see below
    y, h_T, c_T = lstm_recurrence(gx, h0, c0, w_hh, backend="stepwise")

`backend` is "stepwise" or "persistent" (the Triton kernels of fused_rnn.kernels) or "torch"
(the same recurrence in per-step torch ops, fused_rnn._loop, on any device), through the
fused_rnn:: custom operators (fused_rnn._ops), so they are opaque nodes under torch.compile and
torch.export. Shapes are checked here, once; the
operators make the inputs contiguous and check that they share one dtype and device.
"""

from __future__ import annotations

from torch import Tensor

from . import _ops, dispatch

__all__ = ["lstm_recurrence", "gru_recurrence", "rnn_recurrence"]

_RNN_MODES = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}


def _check_shapes(expect: dict, lengths: Tensor | None, B: int) -> None:
    for name, (ten, shape) in expect.items():
        if tuple(ten.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(ten.shape)}")
    if lengths is not None and tuple(lengths.shape) != (B,):
        raise ValueError(f"lengths must have shape ({B},), got {tuple(lengths.shape)}")


def _check_gx(gx: Tensor, G: int) -> tuple[int, int, int]:
    if gx.dim() != 3:
        raise ValueError(f"gx must be (T, B, {G}*H), got shape {tuple(gx.shape)}")
    T, B, GH = gx.shape
    if T < 1:
        raise ValueError("gx must have at least one time step")
    if GH % G:
        raise ValueError(f"gx's last dim {GH} is not a multiple of {G} gates")
    return T, B, GH // G


def _backend(backend: str, mode: str, device) -> str:
    if backend not in _ops.IMPLS:
        raise ValueError(f"backend must be one of {_ops.IMPLS}, got {backend!r}")
    return dispatch.resolve(backend, mode, device)


def lstm_recurrence(gx, h0, c0, w_hh, *, w_hr=None, w_ch=None, coupled=False, lengths=None,
                    reverse=False, backend="stepwise"):  # fmt: skip
    """The LSTM recurrence of one layer and direction.

    Args:
        gx: (T, B, G*H) ``x @ W_ih^T + b_ih + b_hh``; G = 4 (rows i | f | g | o) or 3 when
            `coupled` (rows f | g | o, i = 1 - f).
        h0: (B, R) with R = P if `w_hr` is given, else H.   c0: (B, H).
        w_hh: (G*H, R).   w_hr: (P, H) projection (proj_size), optional.
        w_ch: peephole weights, (3H,) in order (i, f, o), or (2H,) (f, o) when coupled.
        lengths: (B,) integer tensor: sequence b runs steps t < lengths[b]; its state is frozen
            and its output zero elsewhere (reverse starts at its own last step).
        reverse: run time from T-1 down to 0.
        backend: "stepwise" (a launch per step), "persistent" (one launch for the sequence;
            the stepwise kernels run instead where its grid could not be co-resident) or
            "torch" (per-step torch ops).
    All floating inputs share one dtype (fp16, bf16, fp32; fp64 under the interpreter).
    Returns y (T, B, R), h_T (B, R), c_T (B, H) in gx's dtype, differentiable (twice) w.r.t.
    gx, h0, c0, w_hh, w_hr, w_ch.

    Example::

        y, h_T, c_T = lstm_recurrence(x @ w_ih.t() + b_ih + b_hh, h0, c0, w_hh)
    """
    G = 3 if coupled else 4
    T, B, H = _check_gx(gx, G)
    R = H if w_hr is None else w_hr.shape[0]
    expect = {"h0": (h0, (B, R)), "c0": (c0, (B, H)), "w_hh": (w_hh, (G * H, R))}
    if w_hr is not None:
        expect["w_hr"] = (w_hr, (R, H))
    if w_ch is not None:
        expect["w_ch"] = (w_ch, ((G - 1) * H,))
    _check_shapes(expect, lengths, B)
    which = _backend(backend, "LSTM", gx.device)
    return _ops.lstm_recurrence(
        gx, h0, c0, w_hh, w_hr, w_ch, lengths, bool(reverse), bool(coupled), which
    )


def _gru_like(mode, G, gx, h0, w_hh, b_hn, lengths, reverse, backend):
    T, B, _ = _check_gx(gx, G)
    H = w_hh.shape[-1]
    expect = {"gx": (gx, (T, B, G * H)), "h0": (h0, (B, H)), "w_hh": (w_hh, (G * H, H))}
    if b_hn is not None:
        expect["b_hn"] = (b_hn, (H,))
    _check_shapes(expect, lengths, B)
    which = _backend(backend, mode, gx.device)
    return _ops.gru_recurrence(
        _ops.cell_of(mode), gx, h0, w_hh, b_hn, lengths, bool(reverse), which
    )


def gru_recurrence(gx, h0, w_hh, b_hn=None, *, lengths=None, reverse=False, backend="stepwise"):
    """The GRU recurrence of one layer and direction.

    Args:
        gx: (T, B, 3H) ``x @ W_ih^T + b_ih + [b_hr | b_hz | 0]``, row blocks r | z | n.
        h0: (B, H) initial state.
        w_hh: (3H, H) recurrent weights, row blocks r | z | n.
        b_hn: (H,) the n block of b_hh (multiplied by r, so it cannot fold into gx), or None.
        lengths, reverse, backend: as `lstm_recurrence`.
    Returns y (T, B, H), h_T (B, H) in gx's dtype, differentiable w.r.t. gx, h0, w_hh, b_hn.

    Example::

        gx = x @ w_ih.t() + b_ih + torch.cat([b_hh[: 2 * H], b_hh.new_zeros(H)])
        y, h_T = gru_recurrence(gx, h0, w_hh, b_hh[2 * H :])
    """
    return _gru_like("GRU", 3, gx, h0, w_hh, b_hn, lengths, reverse, backend)


def rnn_recurrence(gx, h0, w_hh, *, nonlinearity="tanh", lengths=None, reverse=False,
                   backend="stepwise"):  # fmt: skip
    """The Elman RNN recurrence of one layer and direction, ``h' = act(gx_t + h W_hh^T)``.

    Args:
        gx: (T, B, H) ``x @ W_ih^T + b_ih + b_hh``.   h0: (B, H).   w_hh: (H, H).
        nonlinearity: "tanh" or "relu".
        lengths, reverse, backend: as `lstm_recurrence`.
    Returns y (T, B, H), h_T (B, H), differentiable w.r.t. gx, h0, w_hh.

    Example::

        y, h_T = rnn_recurrence(x @ w_ih.t() + b_ih + b_hh, h0, w_hh, nonlinearity="relu")
    """
    if nonlinearity not in _RNN_MODES:
        raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
    return _gru_like(_RNN_MODES[nonlinearity], 1, gx, h0, w_hh, None, lengths, reverse, backend)
