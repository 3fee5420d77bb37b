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
(peephole, coupled gates: no torch.nn op), for the regularised and normalised recurrences
(zoneout, recurrent dropout, layer norm: no torch.nn op either) and under torch.compile /
torch.export.

Random numbers of the options, per forward call in training (torch's default generator of the
input's device; reproducible under torch.manual_seed):
    1. zoneout on: one `torch.randint` draw of a (seed, offset) pair (fused_rnn._rng.draw) for
       the whole call; every layer-direction's masks derive from it (counter-based Philox, the
       same bits on every backend);
    2. per layer, per direction: recurrent dropout's (B, R) mask (one `bernoulli_` draw), then,
       after the layer, the inter-layer dropout of torch.nn's `dropout` argument.
Masks are indexed by the batch row of the sorted batch a PackedSequence runs in. In evaluation
nothing is drawn (zoneout uses its expectation, recurrent dropout is off). A cell call draws (1)
once per call.

On CUDA the fused backends run the stack's layer-directions concurrently where they are
independent (fused_rnn._schedule: both directions of a layer at once, or the layers of a
unidirectional stack as a wavefront of chunks, on CUDA streams); the draws above and their
order are the same on every schedule, and so, up to rounding, are the results.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import _VF, Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import _ops, _rng, _schedule, dispatch
from .reference import CellWeights

__all__ = ["lstm", "gru", "rnn", "lstm_cell", "gru_cell", "rnn_cell", "CellWeights", "gate_count"]

MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")

_log = logging.getLogger("fused_rnn")

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


def _foldable(mode: str, b: Tensor) -> Tensor:
    """The part of a recurrent-side bias that folds into gx: all of it, but the GRU's n block
    (r multiplies it) is zero."""
    if mode != "GRU":
        return b
    H = b.shape[0] // 3
    return torch.cat([b[: 2 * H], b.new_zeros(H)])


def _input_gates(mode: str, x: Tensor, w: CellWeights) -> Tensor:
    """gx = x W_ih^T + b_ih + the part of b_hh that folds (all of it but GRU's b_hn).

    With layer norm, gx = LN_ih(x W_ih^T) + b_ih + (the foldable parts of b_hh and of LN_hh's
    bias): the input side is normalised here, over all steps at once (torch ops, autograd)."""
    bias = None
    if w.b_ih is not None:
        bias = w.b_ih + _foldable(mode, w.b_hh)
    if w.w_ln_ih is None:
        return F.linear(x, w.w_ih, bias)
    gx = F.layer_norm(F.linear(x, w.w_ih), (w.w_ih.shape[0],), w.w_ln_ih, w.b_ln_ih, LN_EPS)
    fold = _foldable(mode, w.b_ln_hh)
    return gx + (fold if bias is None else bias + fold)


LN_EPS = 1e-5  # nn.LayerNorm's default, for every layer norm of the recurrences


class Options(NamedTuple):
    """The regularisation and normalisation options of one call (all off by default).

    zoneout: (z_c, z_h), the zoneout probabilities of the LSTM's cell state (0 for the other
    cells) and of h. rng: the (2,) int64 (seed, offset) of the zoneout masks in training, None in
    evaluation (the expectation). recurrent_dropout: p of the variational dropout of h where it
    meets W_hh (training only). Layer norm is on when the weights hold its parameters.
    """

    zoneout: tuple[float, float] = (0.0, 0.0)
    rng: Tensor | None = None
    recurrent_dropout: float = 0.0
    training: bool = False

    @property
    def on(self) -> bool:
        return self.zoneout != (0.0, 0.0) or (self.training and self.recurrent_dropout > 0)


NO_OPTIONS = Options()


def _recurrence_for(backend: str):
    """The recurrence of one layer-direction on concrete `backend` ("torch", "stepwise" or
    "persistent"), through the fused_rnn:: custom operators (fused_rnn._ops).

    One autograd formula (registered on the operators) serves eager and torch.compile /
    torch.export runs; the operators are opaque nodes with fake implementations in a graph.
    """

    def run(mode, gx, h0, c0, w: CellWeights, lengths, reverse, coupled, stream=0, drop=None,
            opts: Options = NO_OPTIONS):  # fmt: skip
        kw = {}
        if opts.on or w.w_ln_hh is not None:
            kw = dict(rng=opts.rng, stream=stream, drop=drop, ln_hh=w.w_ln_hh)
        if mode == "LSTM":
            if kw:
                kw.update(zoneout_c=opts.zoneout[0], zoneout_h=opts.zoneout[1],
                          ln_c_w=w.w_ln_c, ln_c_b=w.b_ln_c)  # fmt: skip
            return _ops.lstm_recurrence(
                gx, h0, c0, w.w_hh, w.w_hr, w.w_ch, lengths, reverse, coupled, backend, **kw
            )
        b_hn = None
        if mode == "GRU":
            H = w.w_hh.shape[1]
            if w.b_hh is not None:
                b_hn = w.b_hh[2 * H :]  # r multiplies (W_hn h + b_hn): cannot fold
            if w.b_ln_hh is not None:  # nor can the n block of LN_hh's bias
                b_hn = w.b_ln_hh[2 * H :] if b_hn is None else b_hn + w.b_ln_hh[2 * H :]
        if kw:
            kw.update(zoneout=opts.zoneout[1])
        y, h = _ops.gru_recurrence(
            _ops.cell_of(mode), gx, h0, w.w_hh, b_hn, lengths, reverse, backend, **kw
        )
        return y, h, None

    return run


def _cast_weights(weights: Sequence[CellWeights], dtype) -> list[CellWeights]:
    return [CellWeights(*(None if p is None else p.to(dtype) for p in w)) for w in weights]


def _recurrent_dropout_mask(p: float, h0: Tensor) -> Tensor:
    """A (B, R) variational dropout mask like h0 (B, R): 0 with probability p, else 1/(1-p), in
    the accumulation dtype; one `bernoulli_` draw of torch's generator."""
    acc = _ops._acc(h0.dtype)
    keep = torch.empty(h0.shape, dtype=acc, device=h0.device).bernoulli_(1.0 - p)
    return keep.div_(1.0 - p)


def _stack(mode, x, h0, c0, weights, num_layers, bidirectional, dropout, training, lengths,
           coupled, run, opts: Options = NO_OPTIONS, backend: str = "torch"):  # fmt: skip
    """The network on a padded sequence x (T, B, I); see reference.stack for the layout.

    Random numbers, in this order for each layer: per direction, the recurrent dropout mask of
    that layer-direction (training with recurrent_dropout > 0), then the inter-layer dropout of
    the layer's output (training, dropout > 0, not after the last layer). The zoneout masks take
    none here: they come from opts.rng, drawn once per forward by the caller.

    The layer-directions run on the schedule `_schedule.decide` picks for `backend` (serial,
    both directions of a layer at once, or the layers of a unidirectional stack as a wavefront
    of chunks): the same function on every schedule, the same random numbers in the same order
    (see `_wavefront` for the one difference in how they are drawn), the same results up to
    rounding (a chunked input GEMM may sum in another order).
    """
    D = 2 if bidirectional else 1
    if lengths is not None:
        lengths = lengths.to(device=x.device, non_blocking=True)
    compiling = torch.compiler.is_compiling()
    capturing = not compiling and x.is_cuda and torch.cuda.is_current_stream_capturing()
    sched = _schedule.decide(x.device.type, backend, compiling, num_layers, D, x.shape[0],
                             capturing=capturing)  # fmt: skip
    if not compiling:
        dispatch.note_schedule(sched.label(), sched.reason)
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("%s: %d layer(s) x %d direction(s), T=%d, backend %s: schedule %s (%s)",
                       mode, num_layers, D, x.shape[0], backend, sched.label(),
                       sched.reason)  # fmt: skip
    args = (mode, x, h0, c0, weights, num_layers, D, dropout, training, lengths, coupled, run, opts)
    if sched.name == _schedule.WAVEFRONT:
        return _wavefront(*args, chunk=sched.chunk)
    if sched.name == _schedule.DIRECTIONS:
        return _directions(*args)
    return _serial(*args)


def _serial(mode, x, h0, c0, weights, num_layers, D, dropout, training, lengths, coupled, run,
            opts):  # fmt: skip
    """One layer-direction after the other, each a full pass over T, on the current stream."""
    hn, cn = [], []
    layer_in = x
    p_rec = opts.recurrent_dropout if opts.training else 0.0
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            k = layer * D + d
            gx = _input_gates(mode, layer_in, weights[k])
            drop = _recurrent_dropout_mask(p_rec, h0[k]) if p_rec > 0 else None
            y, h, c = run(
                mode, gx, h0[k], None if c0 is None else c0[k], weights[k], lengths, d == 1,
                coupled, k, drop, opts,
            )  # fmt: skip
            outs.append(y)
            hn.append(h)
            cn.append(c)
        layer_in = outs[0] if D == 1 else torch.cat(outs, dim=-1)
        if training and dropout > 0 and layer < num_layers - 1:
            layer_in = F.dropout(layer_in, dropout, training=True)
    return layer_in, torch.stack(hn), None if c0 is None else torch.stack(cn)


def _directions(mode, x, h0, c0, weights, num_layers, D, dropout, training, lengths, coupled,
                run, opts):  # fmt: skip
    """Both directions of each layer at once: the reverse one (its input GEMM and its operator
    call) on a side stream, the forward one on the caller's stream, which waits for the side
    stream before the layer's outputs are joined. Layers follow one another (module docstring
    of fused_rnn._schedule: a bidirectional layer needs all of the layer below).

    Random numbers as `_serial`: the two recurrent dropout masks (forward, reverse) are drawn
    before either direction starts, then the inter-layer dropout, on the caller's stream."""
    streams = _schedule.streams_for(x.device)
    here = streams.current(x.device)
    side = streams.side(x.device, 1)
    hn, cn = [], []
    layer_in = x
    p_rec = opts.recurrent_dropout if opts.training else 0.0
    for layer in range(num_layers):
        kf, kr = 2 * layer, 2 * layer + 1
        drops = [_recurrent_dropout_mask(p_rec, h0[k]) if p_rec > 0 else None for k in (kf, kr)]
        c0f, c0r = (None, None) if c0 is None else (c0[kf], c0[kr])
        # the side stream reads what the caller's stream made: layer_in, states, masks, weights
        streams.wait(side, here)
        streams.record([layer_in, h0[kr], c0r, drops[1], lengths, opts.rng, *weights[kr]], side)
        with streams.use(side):
            gx = _input_gates(mode, layer_in, weights[kr])
            y_r, h_r, c_r = run(mode, gx, h0[kr], c0r, weights[kr], lengths, True, coupled, kr,
                                drops[1], opts)  # fmt: skip
        gx = _input_gates(mode, layer_in, weights[kf])
        y_f, h_f, c_f = run(mode, gx, h0[kf], c0f, weights[kf], lengths, False, coupled, kf,
                            drops[0], opts)  # fmt: skip
        streams.wait(here, side)
        streams.record([y_r, h_r, c_r], here)  # made on the side stream, read on the caller's
        hn += [h_f, h_r]
        cn += [c_f, c_r]
        layer_in = torch.cat([y_f, y_r], dim=-1)
        if training and dropout > 0 and layer < num_layers - 1:
            layer_in = F.dropout(layer_in, dropout, training=True)
    return layer_in, torch.stack(hn), None if c0 is None else torch.stack(cn)


def _chunk_rngs(rng: Tensor | None, starts: Tensor) -> Tensor | None:
    """(n, 2) int64: the zoneout (seed, offset) of each chunk, the chunk's first step t0 in the
    offset's high word (fused_rnn._rng: the masks' step counter is t + (offset >> 32)), so
    every chunk draws the masks the whole sequence would draw at its steps."""
    if rng is None:
        return None
    out = rng.to(torch.int64).repeat(starts.shape[0], 1)
    out[:, 1] += starts << 32
    return out


def _wavefront(mode, x, h0, c0, weights, num_layers, D, dropout, training, lengths, coupled,
               run, opts, *, chunk: int):  # fmt: skip
    """A unidirectional stack as a pipeline of chunks (fused_rnn._schedule): layer l on lane l
    (lane 0 the caller's stream, the others side streams), in chunks of `chunk` steps,
    layer-major inside a chunk. Chunk c of layer l+1 waits for an event recorded after chunk
    c of layer l, then computes its own input GEMM from that chunk alone. Each chunk is one
    operator call from the state the previous chunk left, with the lengths shifted to the chunk
    ((lengths - t0).clamp(0, K): a sequence that ended before t0 passes its state through);
    the recurrent dropout mask of a layer is drawn once and passed to all its chunks, and the
    zoneout masks are those of the whole sequence (`_chunk_rngs`). Layer 0's input GEMM runs
    once over all steps (its input exists from the start).

    Random numbers: every draw happens up front, on the caller's stream, in `_serial`'s order:
    per layer, the recurrent dropout mask, then the inter-layer dropout mask, drawn as
    F.dropout of a tensor of ones shaped and typed like the layer's output (the same draws as
    F.dropout of the output itself: the mask does not depend on the values), applied chunk by
    chunk as y * mask. So a fixed seed gives the serial schedule's masks. On CPU F.dropout is
    input * mask, so the products are bitwise the same; on CUDA torch's fused dropout kernel
    forms the product itself, and in fp16 / bf16 the two may differ by a rounding.
    """
    T, B = x.shape[0], x.shape[1]
    L, K = num_layers, chunk
    n = -(-T // K)
    dev = x.device
    streams = _schedule.streams_for(dev)
    lanes = [streams.current(dev)] + [streams.side(dev, lane) for lane in range(1, L)]
    here = lanes[0]

    p_rec = opts.recurrent_dropout if opts.training else 0.0
    drops, masks = [], []
    for layer in range(L):
        drops.append(_recurrent_dropout_mask(p_rec, h0[layer]) if p_rec > 0 else None)
        if training and dropout > 0 and layer < L - 1:
            ones = x.new_ones((T, B, h0.shape[-1]))
            masks.append(F.dropout(ones, dropout, training=True))
        else:
            masks.append(None)
    starts = torch.arange(n, device=dev, dtype=torch.int64) * K
    clens = None if lengths is None else (lengths[None, :] - starts[:, None]).clamp_(0, K)
    rngs = _chunk_rngs(opts.rng, starts)
    gx0 = _input_gates(mode, x, weights[0])

    for layer in range(1, L):
        streams.wait(lanes[layer], here)  # states, masks, chunk lengths and rngs, weights
        streams.record([h0[layer], None if c0 is None else c0[layer], drops[layer],
                        masks[layer - 1], clens, rngs, *weights[layer]], lanes[layer])  # fmt: skip
    h = list(h0.unbind(0))
    c = None if c0 is None else list(c0.unbind(0))
    ys = [[None] * n for _ in range(L)]
    ready = [[None] * n for _ in range(L)]
    for i in range(n):
        t0, t1 = i * K, min(T, (i + 1) * K)
        lens = None if clens is None else clens[i]
        chunk_opts = opts if rngs is None else opts._replace(rng=rngs[i])
        for layer in range(L):
            lane = lanes[layer]
            with streams.use(lane):
                if layer == 0:
                    gx = gx0[t0:t1]
                else:
                    streams.wait_event(lane, ready[layer - 1][i])
                    below = ys[layer - 1][i]
                    streams.record([below], lane)  # made on the lane below
                    if masks[layer - 1] is not None:
                        below = below * masks[layer - 1][t0:t1]
                    gx = _input_gates(mode, below, weights[layer])
                y, h[layer], c_new = run(
                    mode, gx, h[layer], None if c is None else c[layer], weights[layer], lens,
                    False, coupled, layer, drops[layer], chunk_opts,
                )  # fmt: skip
                if c is not None:
                    c[layer] = c_new
                ys[layer][i] = y
                if layer < L - 1:
                    ready[layer][i] = streams.event(lane)
    for layer in range(1, L):
        streams.wait(here, lanes[layer])
        streams.record([h[layer], None if c is None else c[layer]], here)
    if L > 1:
        streams.record(ys[L - 1], here)
    out = ys[L - 1][0] if n == 1 else torch.cat(ys[L - 1], dim=0)
    return out, torch.stack(h), None if c is None else torch.stack(c)


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
         training, coupled, variant, backend, opts: Options = NO_OPTIONS):  # fmt: skip
    """Shared body of lstm/gru/rnn once the state is shaped (L*D, B, R) and in sorted order."""
    regularised = opts.on or weights[0].w_ln_hh is not None
    packed = isinstance(input, PackedSequence)
    data = input.data if packed else input
    batch = h0.shape[1]
    which = dispatch.resolve(
        backend, mode, data.device, dtype=_autocast_dtype(data.device, mode, False) or data.dtype,
        steps=input.batch_sizes.shape[0] if packed else data.shape[1 if batch_first else 0],
        batch=batch, input_size=data.shape[-1], hidden=(h0 if c0 is None else c0).shape[-1],
        proj=0 if weights[0].w_hr is None else h0.shape[-1], layers=num_layers,
        bidirectional=bidirectional, peephole=weights[0].w_ch is not None, coupled=coupled,
        grad=dispatch.needs_grad(data, h0, c0, *weights), regularised=regularised)  # fmt: skip
    if which != "torch" and batch == 0:
        which = "torch"  # nothing to launch: an empty batch returns empty tensors
    if which == "torch" and _native_ok(variant or regularised):
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
    if training and opts.zoneout != (0.0, 0.0):
        opts = opts._replace(rng=_rng.draw(x.device))  # once per forward: every layer's masks
    with scope:
        out, hn, cn = _stack(mode, x, h0, c0, weights, num_layers, bidirectional, dropout,
                             training, lengths, coupled, _recurrence_for(which), opts,
                             which)  # fmt: skip
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
                   groups: int | None = None, layer_norm: bool = False,
                   mode: str = "LSTM") -> list[CellWeights]:  # fmt: skip
    """The weights of each layer and direction as CellWeights, checked against the layout.

    `weights` holds one list per layer and direction (index layer * num_directions + direction),
    each with the tensors in torch's order, as torch.nn's `all_weights` holds them:
    [w_ih, w_hh] + [b_ih, b_hh] with bias + [w_hr] with a projection + [w_ch] with peepholes
    + [w_ln_ih, b_ln_ih, w_ln_hh, b_ln_hh] with layer norm (+ [w_ln_c, b_ln_c] for the LSTM).
    `groups` is the number of lists expected (num_layers * num_directions), checked when given.
    A layout that does not fit raises an error naming the expected layout and what came:
    TypeError for a wrong kind of object (a tensor or a flat list of tensors instead of a list
    of lists), ValueError for a wrong count or a tensor of the wrong rank.
    """
    names = ["w_ih", "w_hh"]
    names += ["b_ih", "b_hh"] if bias else []
    names += ["w_hr"] if proj else []
    names += ["w_ch"] if peephole else []
    if layer_norm:
        names += ["w_ln_ih", "b_ln_ih", "w_ln_hh", "b_ln_hh"]
        names += ["w_ln_c", "b_ln_c"] if mode == "LSTM" else []
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
            dims = 2 if name in ("w_ih", "w_hh", "w_hr") else 1
            if w.dim() != dims:
                raise ValueError(
                    f"{layout}; weights[{k}][{i}] ({name}) must be {dims}-D, got shape "
                    f"{tuple(w.shape)}"
                )
        by_name = dict(zip(names, ws, strict=True))
        out.append(CellWeights(*(by_name.get(n) for n in CellWeights._fields)))
    return out


def _zoneout_pair(mode: str, zoneout) -> tuple[float, float]:
    """(z_c, z_h) from a module's or a call's `zoneout` (a float, or (z_c, z_h) for the LSTM)."""
    if isinstance(zoneout, (tuple, list)):
        return float(zoneout[0]), float(zoneout[1])
    z = float(zoneout)
    return (z if mode == "LSTM" else 0.0), z


def check_zoneout(mode: str, zoneout) -> tuple[float, float]:
    """Validates `zoneout` for `mode` ('LSTM', 'GRU', 'RNN_*'); returns (z_c, z_h). A float in
    [0, 1) (for the LSTM both states), or for the LSTM a pair (z_c, z_h) of such floats."""
    pair = isinstance(zoneout, (tuple, list))
    values = list(zoneout) if pair else [zoneout]
    if pair and (mode != "LSTM" or len(values) != 2):
        what = "a pair (z_c, z_h) or a number" if mode == "LSTM" else "a number"
        raise ValueError(f"zoneout should be {what} in range [0, 1), got {zoneout!r}")
    for z in values:
        if isinstance(z, bool) or not isinstance(z, (int, float)) or not 0 <= z < 1:
            raise ValueError(
                "zoneout should be a number in range [0, 1) (for the LSTM, or a pair (z_c, z_h) "
                f"of them) representing the probability of a unit keeping its state, got "
                f"{zoneout!r}"
            )
    return _zoneout_pair(mode, zoneout)


def check_recurrent_dropout(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(
            "recurrent_dropout should be a number in range [0, 1) representing the probability "
            f"of an element of h being zeroed where it enters W_hh, got {p!r}"
        )
    return float(p)


def _generic(mode, input, hx, weights, *, bias, num_layers, dropout, training, bidirectional,
             batch_first, proj_size=0, peephole=False, coupled=False, backend="auto",
             zoneout=0.0, recurrent_dropout=0.0, layer_norm=False):  # fmt: skip
    dispatch.check_backend(backend)
    D = 2 if bidirectional else 1
    opts = Options(check_zoneout(mode, zoneout), None, check_recurrent_dropout(recurrent_dropout),
                   bool(training))  # fmt: skip
    if layer_norm and mode not in ("LSTM", "GRU"):
        raise ValueError(f"layer_norm is defined for the LSTM and the GRU, not {mode}")
    cw = _layer_weights(weights, bias, proj_size > 0, peephole, groups=num_layers * D,
                        layer_norm=layer_norm, mode=mode)  # fmt: skip
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
                       coupled=coupled, variant=peephole or coupled, backend=backend,
                       opts=opts)  # fmt: skip
    if packed:
        if input.unsorted_indices is not None:
            hn = hn.index_select(1, input.unsorted_indices)
            cn = None if cn is None else cn.index_select(1, input.unsorted_indices)
        out = PackedSequence(out, input.batch_sizes, input.sorted_indices, input.unsorted_indices)
    return out, hn, cn


_OPTIONS_DOC = """
    Regularisation and normalisation (keyword-only, off by default):
        zoneout: probability that a unit keeps its previous state at a step (Krueger et al.
            2016): h_t = d ⊙ h_{t-1} + (1 - d) ⊙ h̃_t, d ~ Bernoulli(zoneout) per step, row and
            unit in training, the expectation d = zoneout in evaluation. For the LSTM a float
            (both states) or a pair (z_c, z_h). The masks come from one (seed, offset) pair
            drawn per call from torch's generator (fused_rnn._rng).
        recurrent_dropout: p of variational dropout on h where it enters W_hh (Gal & Ghahramani
            2016): one mask per sequence, layer and direction, the same at every step, scaled by
            1/(1-p); training only.
        layer_norm: LSTM and GRU (Ba, Kiros & Hinton 2016): the input and recurrent products are
            normalised separately over each row's G*H gate values before the biases are added;
            the LSTM also normalises c in the output, h = o ⊙ tanh(LN_c(c)). `weights` then also
            holds, per layer and direction, [w_ln_ih, b_ln_ih, w_ln_hh, b_ln_hh] (G*H,) and for
            the LSTM [w_ln_c, b_ln_c] (H,), after the other tensors.
"""


def lstm(input, hx, weights, *, bias=True, num_layers=1, dropout=0.0, training=False,
         bidirectional=False, batch_first=False, proj_size=0, peephole=False,
         coupled_gates=False, backend="auto", zoneout=0.0, recurrent_dropout=0.0,
         layer_norm=False):  # fmt: skip
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
                           coupled=coupled_gates, backend=backend, zoneout=zoneout,
                           recurrent_dropout=recurrent_dropout,
                           layer_norm=layer_norm)  # fmt: skip
    return out, (hn, cn)


def gru(input, hx, weights, *, bias=True, num_layers=1, dropout=0.0, training=False,
        bidirectional=False, batch_first=False, backend="auto", zoneout=0.0,
        recurrent_dropout=0.0, layer_norm=False):  # fmt: skip
    """A multi-layer GRU; returns (output, h_n) like torch.nn.GRU. Gates (r, z, n)."""
    out, hn, _ = _generic("GRU", input, hx, weights, bias=bias, num_layers=num_layers,
                          dropout=dropout, training=training, bidirectional=bidirectional,
                          batch_first=batch_first, backend=backend, zoneout=zoneout,
                          recurrent_dropout=recurrent_dropout,
                          layer_norm=layer_norm)  # fmt: skip
    return out, hn


def rnn(input, hx, weights, *, nonlinearity="tanh", bias=True, num_layers=1, dropout=0.0,
        training=False, bidirectional=False, batch_first=False, backend="auto", zoneout=0.0,
        recurrent_dropout=0.0):  # fmt: skip
    """A multi-layer Elman RNN (tanh or relu); returns (output, h_n) like torch.nn.RNN."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
    mode = "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU"
    out, hn, _ = _generic(mode, input, hx, weights, bias=bias, num_layers=num_layers,
                          dropout=dropout, training=training, bidirectional=bidirectional,
                          batch_first=batch_first, backend=backend, zoneout=zoneout,
                          recurrent_dropout=recurrent_dropout)  # fmt: skip
    return out, hn


for _fn in (lstm, gru):
    _fn.__doc__ += _OPTIONS_DOC
rnn.__doc__ += _OPTIONS_DOC.split("        layer_norm:")[0]


# --------------------------------------------------------------------------------------------
# cells: one step, (B, I) input, (B, H) state


def _check_devices(input: Tensor, weights: Sequence[CellWeights], msg: str) -> None:
    """torch.nn's device check of the weights against the input (its message, `msg`, formatted
    with the input's device and the first other device), on every path alike."""
    for w in weights:
        for p in w:
            if p is not None and p.device != input.device:
                raise RuntimeError(msg.format(input.device, p.device))


def _cell(mode, input, h, c, w: CellWeights, coupled, variant, backend, opts=NO_OPTIONS):
    _check_devices(input, [w], "Tensor on device {1} is not on the expected device {0}!")
    regularised = opts.on or w.w_ln_hh is not None
    which = dispatch.resolve(
        backend, mode, input.device, dtype=_autocast_dtype(input.device, mode, True) or input.dtype,
        steps=1, batch=input.shape[0], input_size=input.shape[-1], hidden=h.shape[-1],
        peephole=w.w_ch is not None, coupled=coupled, grad=dispatch.needs_grad(input, h, c, w),
        cell=True, regularised=regularised)  # fmt: skip
    if which != "torch" and input.shape[0] == 0:
        which = "torch"
    if which == "torch" and _native_ok(variant or regularised):
        if mode == "LSTM":
            return _VF.lstm_cell(input, (h, c), w.w_ih, w.w_hh, w.b_ih, w.b_hh)
        fn = {"GRU": _VF.gru_cell, "RNN_TANH": _VF.rnn_tanh_cell, "RNN_RELU": _VF.rnn_relu_cell}
        return fn[mode](input, h, w.w_ih, w.w_hh, w.b_ih, w.b_hh), None
    scope = contextlib.nullcontext()
    if which != "torch":
        (input, h, c), (w,), scope = _autocast_scope(input.device, mode, True, (input, h, c), [w])
    if opts.training and opts.zoneout != (0.0, 0.0):
        opts = opts._replace(rng=_rng.draw(input.device))
    with scope:
        gx = _input_gates(mode, input.unsqueeze(0), w)
        _, h_new, c_new = _recurrence_for(which)(mode, gx, h, c, w, None, False, coupled, 0,
                                                 None, opts)  # fmt: skip
    return h_new, c_new


def _cell_ln(mode: str, layer_norm) -> dict:
    """The layer-norm fields of CellWeights from a cell call's `layer_norm` (None, or the tuple
    (w_ln_ih, b_ln_ih, w_ln_hh, b_ln_hh[, w_ln_c, b_ln_c]))."""
    if layer_norm is None:
        return {}
    names = ["w_ln_ih", "b_ln_ih", "w_ln_hh", "b_ln_hh"] + (
        ["w_ln_c", "b_ln_c"] if mode == "LSTM" else []
    )
    layer_norm = tuple(layer_norm)
    if len(layer_norm) != len(names) or not all(isinstance(t, Tensor) for t in layer_norm):
        raise TypeError(f"layer_norm must be None or a tuple of {len(names)} tensors "
                        f"({', '.join(names)})")  # fmt: skip
    return dict(zip(names, layer_norm))


def _cell_opts(mode: str, zoneout, training: bool) -> Options:
    return Options(check_zoneout(mode, zoneout), None, 0.0, bool(training))


def lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, *, w_ch=None, coupled_gates=False,
              backend="auto", zoneout=0.0, training=False, layer_norm=None):  # fmt: skip
    """One LSTM step on (B, I) input and hx = (h (B, H), c (B, H)); returns (h', c').

    zoneout (a float or (z_c, z_h)) with `training` as in `lstm`; layer_norm: None or the tuple
    (w_ln_ih, b_ln_ih, w_ln_hh, b_ln_hh (G*H,), w_ln_c, b_ln_c (H,)).
    """
    dispatch.check_backend(backend)
    w = CellWeights(w_ih, w_hh, b_ih, b_hh, None, w_ch, **_cell_ln("LSTM", layer_norm))
    variant = w_ch is not None or coupled_gates
    return _cell("LSTM", input, hx[0], hx[1], w, coupled_gates, variant, backend,
                 _cell_opts("LSTM", zoneout, training))  # fmt: skip


def gru_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, *, backend="auto", zoneout=0.0,
             training=False, layer_norm=None):  # fmt: skip
    """One GRU step on (B, I) input and h (B, H); returns h'. zoneout, training, layer_norm
    (w_ln_ih, b_ln_ih, w_ln_hh, b_ln_hh) as `lstm_cell`."""
    dispatch.check_backend(backend)
    w = CellWeights(w_ih, w_hh, b_ih, b_hh, **_cell_ln("GRU", layer_norm))
    return _cell("GRU", input, hx, None, w, False, False, backend,
                 _cell_opts("GRU", zoneout, training))[0]  # fmt: skip


def rnn_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, *, nonlinearity="tanh",
             backend="auto", zoneout=0.0, training=False):  # fmt: skip
    """One Elman RNN step (tanh or relu) on (B, I) input and h (B, H); returns h'. zoneout and
    training as `lstm_cell`."""
    dispatch.check_backend(backend)
    if nonlinearity not in ("tanh", "relu"):
        raise RuntimeError(f"Unknown nonlinearity: {nonlinearity}")
    mode = "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU"
    return _cell(mode, input, hx, None, CellWeights(w_ih, w_hh, b_ih, b_hh), False, False,
                 backend, _cell_opts(mode, zoneout, training))[0]  # fmt: skip
