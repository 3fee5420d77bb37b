"""Functional recurrent networks: layers x directions, dropout, packing, backend choice.

Only the sequential part of a layer is backend specific. Everything parallel over time is one
GEMM done by torch, so autograd handles it:

    gx = x @ W_ih^T + b_ih (+ b_hh where it folds)          # (T, B, G*H), one GEMM per layer
    y, h_T, c_T = recurrence(gx, h0, c0, W_hh, ...)         # a fused_rnn:: operator

`lstm`, `gru` and `rnn` take a 3-D input (T, B, I) (or (B, T, I) with batch_first) or a
PackedSequence, the initial state(s) (or None for zeros) and the weights of each layer and
direction in torch's order, and return what torch.nn's modules return. The modules in
`fused_rnn.modules` validate their inputs and call these.

With backend="torch" the standard cells run torch's native RNN ops (the same function as
torch.nn, including its dropout). Everything else runs the generic stack below on padded
sequences with per-sequence lengths, one operator per layer and direction: the fused backends'
Triton kernels, or the operators' torch implementation (fused_rnn._loop) for the LSTM variants
(peephole, coupled gates: no torch.nn op) and under torch.compile / torch.export.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import _VF, Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import _ops, dispatch
from .reference import CellWeights

__all__ = ["lstm", "gru", "rnn", "lstm_cell", "gru_cell", "rnn_cell", "CellWeights", "gate_count"]

MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")

# backend="torch" runs torch's native RNN ops for the standard cells, except under torch.compile /
# torch.export, where the operators' torch implementation runs (one opaque node per layer and
# direction: torch's native ops would be traced step by step into a graph that grows with T).
# Tests switch this off to run the generic stack (the one the fused backends use) on CPU.
USE_NATIVE = True


def _native_ok(variant: bool) -> bool:
    return USE_NATIVE and not variant and not torch.compiler.is_compiling()


def gate_count(mode: str, coupled: bool = False) -> int:
    if mode == "LSTM":
        return 3 if coupled else 4
    return 3 if mode == "GRU" else 1


# --------------------------------------------------------------------------------------------
# the generic stack (the operators: fused backends, variants, compiled code)


def _input_gates(mode: str, x: Tensor, w: CellWeights) -> Tensor:
    """gx = x W_ih^T + b_ih + the part of b_hh that folds (all of it but GRU's b_hn)."""
    bias = None
    if w.b_ih is not None:
        if mode == "GRU":
            H = w.b_hh.shape[0] // 3
            bias = w.b_ih + torch.cat([w.b_hh[: 2 * H], w.b_hh.new_zeros(H)])
        else:
            bias = w.b_ih + w.b_hh
    return F.linear(x, w.w_ih, bias)


def _recurrence_for(backend: str):
    """The recurrence of one layer-direction on concrete `backend` ("torch", "stepwise" or
    "persistent"), through the fused_rnn:: custom operators (fused_rnn._ops).

    One autograd formula (registered on the operators) serves eager and torch.compile /
    torch.export runs; the operators are opaque nodes with fake implementations in a graph.
    """

    def run(mode, gx, h0, c0, w: CellWeights, lengths, reverse, coupled):
        if mode == "LSTM":
            return _ops.lstm_recurrence(
                gx, h0, c0, w.w_hh, w.w_hr, w.w_ch, lengths, reverse, coupled, backend
            )
        b_hn = None
        if mode == "GRU" and w.b_hh is not None:
            b_hn = w.b_hh[2 * w.w_hh.shape[1] :]  # r multiplies (W_hn h + b_hn): cannot fold
        y, h = _ops.gru_recurrence(
            _ops.cell_of(mode), gx, h0, w.w_hh, b_hn, lengths, reverse, backend
        )
        return y, h, None

    return run


def _cast_weights(weights: Sequence[CellWeights], dtype) -> list[CellWeights]:
    return [CellWeights(*(None if p is None else p.to(dtype) for p in w)) for w in weights]


def _stack(mode, x, h0, c0, weights, num_layers, bidirectional, dropout, training, lengths,
           coupled, run):  # fmt: skip
    """The network on a padded sequence x (T, B, I); see reference.stack for the layout."""
    D = 2 if bidirectional else 1
    if lengths is not None:
        lengths = lengths.to(device=x.device, non_blocking=True)
    hn, cn = [], []
    layer_in = x
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            k = layer * D + d
            gx = _input_gates(mode, layer_in, weights[k])
            y, h, c = run(
                mode, gx, h0[k], None if c0 is None else c0[k], weights[k], lengths, d == 1, coupled
            )
            outs.append(y)
            hn.append(h)
            cn.append(c)
        layer_in = outs[0] if D == 1 else torch.cat(outs, dim=-1)
        if training and dropout > 0 and layer < num_layers - 1:
            layer_in = F.dropout(layer_in, dropout, training=True)
    return layer_in, torch.stack(hn), None if c0 is None else torch.stack(cn)


def _autocast_dtype(device: torch.device, mode: str, cell: bool):
    """The dtype torch.nn runs the recurrent op of `mode` in under autocast, or None (no cast).

    CUDA: cuDNN's autocast wrapper of the full layers (`_cudnn_rnn`, ATen/cudnn/AutocastRNN.cpp)
    casts to float16 whatever the autocast dtype; the cell ops (lstm_cell, gru_cell, rnn_*_cell)
    are on the lower-precision list, so they take the autocast dtype. CPU (the interpreter), as
    torch 2.13 behaves: lstm is on CPU autocast's lower-precision list; the Elman RNN and RNNCell
    come out in the autocast dtype because they are built of listed GEMMs and a tanh/relu; GRU,
    GRUCell and LSTMCell return float32.
    """
    if not torch.is_autocast_enabled(device.type):
        return None
    if device.type == "cuda":
        return torch.get_autocast_dtype("cuda") if cell else torch.float16
    if mode.startswith("RNN") or (mode == "LSTM" and not cell):
        return torch.get_autocast_dtype(device.type)
    return None


def _autocast_scope(device: torch.device, mode: str, cell: bool, tensors, weights):
    """Casts for the fused path as torch.nn's op is cast under autocast (see `_autocast_dtype`);
    returns (tensors, weights, context): the fused path runs with autocast off, so that the
    input GEMMs keep the dtype chosen here."""
    if not torch.is_autocast_enabled(device.type):
        return tensors, weights, contextlib.nullcontext()
    # where torch.nn's op is not cast, its arguments may still differ (e.g. a bf16 input from an
    # earlier autocast op and fp32 weights): the kernels then run in the input's dtype
    cast = _autocast_dtype(device, mode, cell) or tensors[0].dtype
    tensors = [None if t is None else t.to(cast) for t in tensors]  # no-ops where it already is
    return tensors, _cast_weights(weights, cast), torch.autocast(device.type, enabled=False)


def _run(mode, input, h0, c0, weights, *, num_layers, bidirectional, batch_first, dropout,
         training, coupled, variant, backend):  # fmt: skip
    """Shared body of lstm/gru/rnn once the state is shaped (L*D, B, R) and in sorted order."""
    packed = isinstance(input, PackedSequence)
    data = input.data if packed else input
    batch = h0.shape[1]
    which = dispatch.resolve(
        backend, mode, data.device, dtype=_autocast_dtype(data.device, mode, False) or data.dtype,
        steps=input.batch_sizes.shape[0] if packed else data.shape[1 if batch_first else 0],
        batch=batch, input_size=data.shape[-1], hidden=(h0 if c0 is None else c0).shape[-1],
        proj=0 if weights[0].w_hr is None else h0.shape[-1], layers=num_layers,
        bidirectional=bidirectional, peephole=weights[0].w_ch is not None, coupled=coupled,
        grad=dispatch.needs_grad(data, h0, c0, *weights))  # fmt: skip
    if which != "torch" and batch == 0:
        which = "torch"  # nothing to launch: an empty batch returns empty tensors
    if which == "torch" and _native_ok(variant):
        return _native(mode, input, h0, c0, weights, num_layers, bidirectional, batch_first,
                       dropout, training)  # fmt: skip

    if packed:
        x, lengths = pad_packed_sequence(PackedSequence(data, input.batch_sizes))
    else:
        x, lengths = (data.transpose(0, 1) if batch_first else data), None
    if x.shape[0] == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
    scope = contextlib.nullcontext()
    if which != "torch":
        (x, h0, c0), weights, scope = _autocast_scope(x.device, mode, False, (x, h0, c0), weights)
    with scope:
        out, hn, cn = _stack(mode, x, h0, c0, weights, num_layers, bidirectional, dropout,
                             training, lengths, coupled, _recurrence_for(which))  # fmt: skip
    if packed:
        out = pack_padded_sequence(out, lengths).data
    elif batch_first:
        out = out.transpose(0, 1)
    return out, hn, cn


def _native(mode, input, h0, c0, weights, num_layers, bidirectional, batch_first, dropout,
            training):  # fmt: skip
    """torch's own RNN ops: the same function (and dropout stream) as torch.nn."""
    has_bias = weights[0].b_ih is not None
    flat = [p for w in weights for p in w if p is not None]
    fn = {"LSTM": _VF.lstm, "GRU": _VF.gru, "RNN_TANH": _VF.rnn_tanh, "RNN_RELU": _VF.rnn_relu}
    hx = (h0, c0) if mode == "LSTM" else h0
    if isinstance(input, PackedSequence):
        res = fn[mode](input.data, input.batch_sizes, hx, flat, has_bias, num_layers,
                       float(dropout), training, bidirectional)  # fmt: skip
    else:
        res = fn[mode](input, hx, flat, has_bias, num_layers, float(dropout), training,
                       bidirectional, batch_first)  # fmt: skip
    if mode == "LSTM":
        return res[0], res[1], res[2]
    return res[0], res[1], None


# --------------------------------------------------------------------------------------------
# public functional API


def _layer_weights(weights, bias: bool, proj: bool, peephole: bool,
                   groups: int | None = None) -> list[CellWeights]:  # fmt: skip
    """The weights of each layer and direction as CellWeights, checked against the layout.

    `weights` holds one list per layer and direction (index layer * num_directions + direction),
    each with the tensors in torch's order, as torch.nn's `all_weights` holds them:
    [w_ih, w_hh] + [b_ih, b_hh] with bias + [w_hr] with a projection + [w_ch] with peepholes.
    `groups` is the number of lists expected (num_layers * num_directions), checked when given.
    A layout that does not fit raises an error naming the expected layout and what came:
    TypeError for a wrong kind of object (a tensor or a flat list of tensors instead of a list
    of lists), ValueError for a wrong count or a tensor of the wrong rank.
    """
    names = ["w_ih", "w_hh"]
    names += ["b_ih", "b_hh"] if bias else []
    names += ["w_hr"] if proj else []
    names += ["w_ch"] if peephole else []
    count = "num_layers*num_directions" + ("" if groups is None else f" (= {groups})")
    layout = (
        f"weights must be a list of {count} lists [{', '.join(names)}], one per layer and "
        "direction in torch's order (as torch.nn's all_weights holds them)"
    )
    example = "[[w_ih_l0, w_hh_l0, ...], [w_ih_l1, w_hh_l1, ...]]"
    if isinstance(weights, Tensor):
        raise TypeError(f"{layout}; got a Tensor of shape {tuple(weights.shape)}")
    if isinstance(weights, dict):
        raise TypeError(f"{layout}; got a dict (a state_dict?): pass the module's all_weights")
    try:
        weights = list(weights)
    except TypeError:
        raise TypeError(f"{layout}; got {type(weights).__name__}") from None
    if weights and all(isinstance(w, Tensor) for w in weights):
        raise TypeError(
            f"{layout}; got a flat list of {len(weights)} tensors: group them per layer and "
            f"direction, {example}"
        )
    if groups is not None and len(weights) != groups:
        raise ValueError(f"{layout}; got {len(weights)} list{'' if len(weights) == 1 else 's'}")
    out = []
    for k, ws in enumerate(weights):
        if isinstance(ws, Tensor):
            raise TypeError(f"{layout}; weights[{k}] is a Tensor of shape {tuple(ws.shape)}")
        if not isinstance(ws, (list, tuple)):
            raise TypeError(f"{layout}; weights[{k}] is a {type(ws).__name__}")
        if len(ws) != len(names):
            hint = ""
            if bias and len(ws) == len(names) - 2:
                hint = " (no biases? pass bias=False)"
            elif not bias and len(ws) == len(names) + 2:
                hint = " (with biases, pass bias=True)"
            raise ValueError(
                f"{layout}; weights[{k}] holds {len(ws)} tensors, expected {len(names)}{hint}"
            )
        for i, (w, name) in enumerate(zip(ws, names, strict=True)):
            if not isinstance(w, Tensor):
                what = "None" if w is None else f"a {type(w).__name__}"
                raise TypeError(f"{layout}; weights[{k}][{i}] ({name}) is {what}, not a Tensor")
            dims = 1 if name in ("b_ih", "b_hh", "w_ch") else 2
            if w.dim() != dims:
                raise ValueError(
                    f"{layout}; weights[{k}][{i}] ({name}) must be {dims}-D, got shape "
                    f"{tuple(w.shape)}"
                )
        by_name = dict(zip(names, ws, strict=True))
        out.append(CellWeights(*(by_name.get(n) for n in CellWeights._fields)))
    return out


def _generic(mode, input, hx, weights, *, bias, num_layers, dropout, training, bidirectional,
             batch_first, proj_size=0, peephole=False, coupled=False, backend="auto"):  # fmt: skip
    dispatch.check_backend(backend)
    D = 2 if bidirectional else 1
    cw = _layer_weights(weights, bias, proj_size > 0, peephole, groups=num_layers * D)
    packed = isinstance(input, PackedSequence)
    data = input.data if packed else input
    if packed:
        batch = int(input.batch_sizes[0])
    else:
        if data.dim() != 3:
            raise ValueError(f"{mode}: expected a 3-D input or a PackedSequence, got {data.dim()}D")
        batch = data.shape[0 if batch_first else 1]
    _check_devices(data, cw, "Input and parameter tensors are not at the same device, found "
                   "input tensor at {} and parameter tensor at {}")  # fmt: skip
    H = cw[0].w_hh.shape[0] // gate_count(mode, coupled)
    R = proj_size if proj_size > 0 else H
    if hx is None:
        h0 = data.new_zeros(num_layers * D, batch, R)
        c0 = data.new_zeros(num_layers * D, batch, H) if mode == "LSTM" else None
    else:
        h0, c0 = hx if mode == "LSTM" else (hx, None)
        if packed and input.sorted_indices is not None:  # the caller's batch order -> sorted
            h0 = h0.index_select(1, input.sorted_indices)
            c0 = None if c0 is None else c0.index_select(1, input.sorted_indices)
    out, hn, cn = _run(mode, input, h0, c0, cw, num_layers=num_layers, bidirectional=bidirectional,
                       batch_first=batch_first, dropout=dropout, training=training,
                       coupled=coupled, variant=peephole or coupled, backend=backend)  # fmt: skip
    if packed:
        if input.unsorted_indices is not None:
            hn = hn.index_select(1, input.unsorted_indices)
            cn = None if cn is None else cn.index_select(1, input.unsorted_indices)
        out = PackedSequence(out, input.batch_sizes, input.sorted_indices, input.unsorted_indices)
    return out, hn, cn


def lstm(input, hx, weights, *, bias=True, num_layers=1, dropout=0.0, training=False,
         bidirectional=False, batch_first=False, proj_size=0, peephole=False,
         coupled_gates=False, backend="auto"):  # fmt: skip
    """A multi-layer LSTM; returns (output, (h_n, c_n)) like torch.nn.LSTM.

    Args:
        input: (T, B, I), (B, T, I) with batch_first, or a PackedSequence.
        hx: (h_0 (L*D, B, R), c_0 (L*D, B, H)) in the caller's batch order, or None for zeros.
        weights: per layer and direction (index layer*D + direction), the tensors in torch's
            order: w_ih (G*H, I), w_hh (G*H, R), [b_ih, b_hh (G*H,)], [w_hr (P, H)],
            [w_ch (3H,) or (2H,) with coupled gates]. Gates (i, f, g, o); (f, g, o) when coupled.
        backend: "auto", "torch", "stepwise" or "persistent" (see fused_rnn.dispatch).
    """
    out, hn, cn = _generic("LSTM", input, hx, weights, bias=bias, num_layers=num_layers,
                           dropout=dropout, training=training, bidirectional=bidirectional,
                           batch_first=batch_first, proj_size=proj_size, peephole=peephole,
                           coupled=coupled_gates, backend=backend)  # fmt: skip
    return out, (hn, cn)


def gru(input, hx, weights, *, bias=True, num_layers=1, dropout=0.0, training=False,
        bidirectional=False, batch_first=False, backend="auto"):  # fmt: skip
    """A multi-layer GRU; returns (output, h_n) like torch.nn.GRU. Gates (r, z, n)."""
    out, hn, _ = _generic("GRU", input, hx, weights, bias=bias, num_layers=num_layers,
                          dropout=dropout, training=training, bidirectional=bidirectional,
                          batch_first=batch_first, backend=backend)  # fmt: skip
    return out, hn


def rnn(input, hx, weights, *, nonlinearity="tanh", bias=True, num_layers=1, dropout=0.0,
        training=False, bidirectional=False, batch_first=False, backend="auto"):  # fmt: skip
    """A multi-layer Elman RNN (tanh or relu); returns (output, h_n) like torch.nn.RNN."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
    mode = "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU"
    out, hn, _ = _generic(mode, input, hx, weights, bias=bias, num_layers=num_layers,
                          dropout=dropout, training=training, bidirectional=bidirectional,
                          batch_first=batch_first, backend=backend)  # fmt: skip
    return out, hn


# --------------------------------------------------------------------------------------------
# cells: one step, (B, I) input, (B, H) state


def _check_devices(input: Tensor, weights: Sequence[CellWeights], msg: str) -> None:
    """torch.nn's device check of the weights against the input (its message, `msg`, formatted
    with the input's device and the first other device), on every path alike."""
    for w in weights:
        for p in w:
            if p is not None and p.device != input.device:
                raise RuntimeError(msg.format(input.device, p.device))


def _cell(mode, input, h, c, w: CellWeights, coupled, variant, backend):
    _check_devices(input, [w], "Tensor on device {1} is not on the expected device {0}!")
    which = dispatch.resolve(
        backend, mode, input.device, dtype=_autocast_dtype(input.device, mode, True) or input.dtype,
        steps=1, batch=input.shape[0], input_size=input.shape[-1], hidden=h.shape[-1],
        peephole=w.w_ch is not None, coupled=coupled, grad=dispatch.needs_grad(input, h, c, w),
        cell=True)  # fmt: skip
    if which != "torch" and input.shape[0] == 0:
        which = "torch"
    if which == "torch" and _native_ok(variant):
        if mode == "LSTM":
            return _VF.lstm_cell(input, (h, c), w.w_ih, w.w_hh, w.b_ih, w.b_hh)
        fn = {"GRU": _VF.gru_cell, "RNN_TANH": _VF.rnn_tanh_cell, "RNN_RELU": _VF.rnn_relu_cell}
        return fn[mode](input, h, w.w_ih, w.w_hh, w.b_ih, w.b_hh), None
    scope = contextlib.nullcontext()
    if which != "torch":
        (input, h, c), (w,), scope = _autocast_scope(input.device, mode, True, (input, h, c), [w])
    with scope:
        gx = _input_gates(mode, input.unsqueeze(0), w)
        _, h_new, c_new = _recurrence_for(which)(mode, gx, h, c, w, None, False, coupled)
    return h_new, c_new


def lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, *, w_ch=None, coupled_gates=False,
              backend="auto"):  # fmt: skip
    """One LSTM step on (B, I) input and hx = (h (B, H), c (B, H)); returns (h', c')."""
    dispatch.check_backend(backend)
    w = CellWeights(w_ih, w_hh, b_ih, b_hh, None, w_ch)
    variant = w_ch is not None or coupled_gates
    return _cell("LSTM", input, hx[0], hx[1], w, coupled_gates, variant, backend)


def gru_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, *, backend="auto"):
    """One GRU step on (B, I) input and h (B, H); returns h'."""
    dispatch.check_backend(backend)
    return _cell("GRU", input, hx, None, CellWeights(w_ih, w_hh, b_ih, b_hh), False, False,
                 backend)[0]  # fmt: skip


def rnn_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, *, nonlinearity="tanh",
             backend="auto"):  # fmt: skip
    """One Elman RNN step (tanh or relu) on (B, I) input and h (B, H); returns h'."""
    dispatch.check_backend(backend)
    if nonlinearity not in ("tanh", "relu"):
        raise RuntimeError(f"Unknown nonlinearity: {nonlinearity}")
    mode = "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU"
    return _cell(mode, input, hx, None, CellWeights(w_ih, w_hh, b_ih, b_hh), False, False,
                 backend)[0]  # fmt: skip
