"""Elman RNN recurrence (tanh or relu), stepwise: one fused Triton launch per timestep.

Legend
    T  time steps         B  batch         H  hidden units

Forward, for each step t in processing order (T-1 .. 0 when reverse), per sequence b:
    h' = act(gx_t + h W_hh^T)        gx_t = x_t W_ih^T + b_ih + b_hh (caller),  act = tanh | relu
With `lengths`, step t is live for b only when t < lengths[b]; a dead step keeps h and writes
y_t[b] = 0.

Backward, per step in reverse processing order, with dh the gradient reaching h':
    dgx_t = dh ⊙ act'(h')  (1 - h'² for tanh, [h' > 0] for relu)
    dh_prev = dgx_t W_hh;   dW_hh = Σ_t dgx_t^T h_{t-1} (one GEMM after the loop)
A dead step passes dh through unchanged and has dgx = 0.

The kernels (stepwise and persistent), launchers and custom operator are the GRU's (gru.py)
with the constexpr `CELL` = CELL_RNN_TANH | CELL_RNN_RELU: one gate block, no direct term, no
b_hn. Forward keeps only hs (T+1, B, H), every h including h0, for backward (act' is read off
h').
"""

from __future__ import annotations

from .gru import CELL_RNN_RELU, CELL_RNN_TANH, _recurrence

__all__ = ["rnn_recurrence", "rnn_recurrence_persistent"]

_CELLS = {"tanh": CELL_RNN_TANH, "relu": CELL_RNN_RELU}


def rnn_recurrence(gx, h0, w_hh, *, nonlinearity="tanh", lengths=None, reverse=False):
    """The Elman RNN recurrence of one layer and direction, in fused Triton kernels.

    Args:
        gx: (T, B, H) ``x @ W_ih^T + b_ih + b_hh``.
        h0: (B, H) initial state.
        w_hh: (H, H) recurrent weights.
        nonlinearity: "tanh" or "relu".
        lengths: (B,) integer tensor on gx's device: sequence b runs steps t < lengths[b]; its
            state is frozen and its output zero elsewhere (reverse starts at its own last step).
        reverse: run time from T-1 down to 0.
    All floating inputs share one dtype (fp16, bf16, fp32; fp64 under the interpreter).
    Returns y (T, B, H), h_T (B, H) in gx's dtype; differentiable once w.r.t. gx, h0, w_hh.

    Example::

        y, h_T = rnn_recurrence(x @ w_ih.t() + b_ih + b_hh, h0, w_hh, nonlinearity="relu")
    """
    if nonlinearity not in _CELLS:
        raise ValueError(f"Unknown nonlinearity '{nonlinearity}'")
    return _recurrence(_CELLS[nonlinearity], gx, h0, w_hh, None, lengths, reverse)


def rnn_recurrence_persistent(gx, h0, w_hh, *, nonlinearity="tanh", lengths=None, reverse=False):
    """`rnn_recurrence` with the persistent kernels: one launch for the whole sequence forward
    and one backward. Same arguments, results and gradients; runs the stepwise kernels where the
    grid could not be co-resident on the device (never risks a hang).
    """
    if nonlinearity not in _CELLS:
        raise ValueError(f"Unknown nonlinearity '{nonlinearity}'")
    return _recurrence(_CELLS[nonlinearity], gx, h0, w_hh, None, lengths, reverse, persistent=True)
