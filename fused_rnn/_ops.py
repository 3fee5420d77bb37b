"""The recurrences as torch.library custom operators: one opaque node per layer and direction.

Four operators, one recurrence contract, three implementations chosen by the last argument
`backend`: "torch" (fused_rnn._loop: per-step torch ops, any device), "stepwise" and
"persistent" (the Triton launchers of fused_rnn.kernels). GRU and Elman RNN share operators
through the integer `cell` (0 GRU, 1 RNN tanh, 2 RNN relu: `CELLS`):

    fused_rnn::lstm_fwd(Tensor gx, Tensor h0, Tensor c0, Tensor w_hh, Tensor? w_hr,
        Tensor? w_ch, Tensor? lengths, bool reverse, bool coupled, bool store, str backend,
        <LSTM options>) -> (y, h_T, c_T, hs, cs, gates, ms, aux)
    fused_rnn::lstm_bwd(Tensor dy, Tensor dhT, Tensor dcT, Tensor hs, Tensor cs, Tensor gates,
        Tensor ms, Tensor w_hh, Tensor? w_hr, Tensor? w_ch, Tensor? lengths, bool reverse,
        bool coupled, bool[] needs, str backend, Tensor? aux=None, <LSTM options>)
        -> (dgx, dh0, dc0, dw_hh, dw_hr, dw_ch, dln_hh, dln_c_w, dln_c_b)
    fused_rnn::gru_fwd(Tensor gx, Tensor h0, Tensor w_hh, Tensor? b_hn, Tensor? lengths,
        bool reverse, int cell, bool store, str backend, <GRU options>)
        -> (y, h_T, hs, ws, aux)
    fused_rnn::gru_bwd(Tensor dy, Tensor dhT, Tensor hs, Tensor ws, Tensor w_hh,
        Tensor? lengths, bool reverse, int cell, bool[] needs, str backend, Tensor? aux=None,
        <GRU options>) -> (dgx, dh0, dw_hh, db_hn, dln_hh)

    <LSTM options> = Tensor? rng=None, float zoneout_c=0., float zoneout_h=0., int stream=0,
        Tensor? drop=None, Tensor? ln_hh=None, Tensor? ln_c_w=None, Tensor? ln_c_b=None
    <GRU options>  = Tensor? rng=None, float zoneout=0., int stream=0, Tensor? drop=None,
        Tensor? ln_hh=None

The options (zoneout, recurrent dropout, layer norm; see `_LSTM_OPTS` below) are optional
arguments at the end, off by default, so calls without them are the calls of before. `needs`
holds 6 (LSTM) or 4 (GRU) flags, or with the layer-norm gradients 9 or 5.

The forward operators return what backward needs (hs, cs, gates, ms / hs, ws, and aux, layer
norm's normalised products and statistics: see the kernel files' docstrings) as extra,
non-differentiable outputs; a schema cannot return None, so a buffer that does not exist
(gates without `store`, ms without a projection, ws for the RNN without zoneout, aux without
layer norm) is an empty tensor, and so is a gradient that `needs` did not ask for. `store`
(keep what backward needs) is decided by the caller, from grad mode and requires_grad, outside
the operator.

The autograd formula is registered on the forward operators (`register_autograd`): eager and
compiled runs share it, and torch.compile / torch.export see one opaque node per layer and
direction whatever the sequence length, with a fake implementation for shapes (symbolic in T).
First-order gradients run the backward operator, which draws the zoneout masks again from the
saved (seed, offset) `rng` (nothing of size T x B x H is kept for them). Gradients of gradients
(`create_graph=True`:
gradient penalties, meta-learning, Hessian-vector products) are formed by recomputing the layer
with differentiable torch ops (`_loop.recurrence_autograd`) from the saved inputs, so every
backend is differentiable twice; first-order speed is unchanged, at the cost of keeping gx (the
operator's input, T x B x G x H elements) alive until backward.

`lstm_recurrence` and `gru_recurrence` below call the operators without checking shapes (the
stack in fused_rnn.functional, and fused_rnn.recurrence after its checks). This module is the
one place where the operators' inputs are made contiguous and checked for one dtype and device
(`normalize`). Triton is imported only when a fused operator runs, so importing this module
(registering the operators) needs only torch.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from . import _graphs, _loop

__all__ = [
    "lstm_recurrence",
    "gru_recurrence",
    "cell_of",
    "normalize",
    "IMPLS",
    "FUSED_IMPLS",
    "CELLS",
]

IMPLS = ("torch", "stepwise", "persistent")  # the `backend` argument of the operators
FUSED_IMPLS = ("stepwise", "persistent")
CELLS = {"GRU": _loop.CELL_GRU, "RNN_TANH": _loop.CELL_RNN_TANH, "RNN_RELU": _loop.CELL_RNN_RELU}
_CELL_NAMES = {v: ("GRU" if k == "GRU" else "RNN") for k, v in CELLS.items()}


def cell_of(mode: str) -> int:
    """The `cell` argument of the GRU operators for mode "GRU", "RNN_TANH" or "RNN_RELU"."""
    return CELLS[mode]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return _loop.acc_dtype(dtype)


# The stepwise loops of sequences at least this long replay as CUDA graphs (fused_rnn._graphs):
# shorter ones launch directly, where building the cache key costs about as much as the launches
# it saves. A starting point, not yet tuned on a GPU.
GRAPH_MIN_STEPS = 16


def _graph_worthy(backend: str, steps: int) -> bool:
    """Whether a CUDA launch of `backend` over `steps` time steps goes through the graph cache:
    the stepwise loops of long sequences (a persistent launch is one launch already)."""
    return backend == "stepwise" and steps >= GRAPH_MIN_STEPS


def _run(name: str, backend: str, *args):
    """Runs implementation `name` ("lstm_fwd", "gru_bwd", ...) of `backend` on `args`.

    Triton launchers run on the device of their tensors: Triton compiles for and launches on the
    current CUDA device and stream, which need not be the tensors' (a model on cuda:1). On CUDA
    the stepwise loops of long sequences are captured once per shape and replayed as CUDA graphs.
    """
    if backend == "torch":
        return getattr(_loop, name)(*args)
    if backend not in FUSED_IMPLS:
        raise ValueError(f"fused_rnn: unknown backend {backend!r} for a recurrence operator")
    module = importlib.import_module(f"fused_rnn.kernels.{name.partition('_')[0]}")
    fn, kwargs = getattr(module, name), {"persistent": backend == "persistent"}
    first = next(a for a in args if isinstance(a, Tensor))  # gx or dy: (T, B, ...)
    if first.device.type != "cuda":
        return fn(*args, **kwargs)
    with torch.cuda.device(first.device):
        if _graph_worthy(backend, first.shape[0]):
            # what steers the recorded launches besides the arguments: the dot precision (from
            # torch's TF32 flags) and the NaN poison of the outputs (tests). And the stream:
            # a replay runs on the current stream, and replays of one entry from two streams
            # wait for each other (they share its static buffers), so the lanes of a wavefront
            # (fused_rnn._schedule), whose chunk calls have equal arguments, each get their own
            common = importlib.import_module("fused_rnn.kernels._common")
            extra = (common.dot_precision(first.dtype), common.poison_enabled(),
                     torch.cuda.current_stream().stream_id)  # fmt: skip
            return _graphs.graphed(fn, args, kwargs, key_extra=extra)
        return fn(*args, **kwargs)


def normalize(*tensors: Tensor | None, dtype: torch.dtype | None = None, op: str = "fused_rnn"):
    """Contiguous versions of `tensors` (None passes through), all of one dtype and device.

    The dtype is `dtype` or that of the first tensor; a mismatch raises TypeError rather than
    casting silently (the caller decides where a cast belongs, autograd must see it). `op` names
    the layer in the messages.
    """
    first = next((t for t in tensors if t is not None), None)
    if first is None:
        return tensors
    dtype = first.dtype if dtype is None else dtype
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        if t.dtype != dtype:
            raise TypeError(f"{op}: expected all tensors in {dtype}, got one in {t.dtype}")
        if t.device != first.device:
            raise RuntimeError(
                f"{op}: expected all tensors on {first.device}, got one on {t.device}"
            )
        out.append(t.contiguous())
    return tuple(out)


def _prepare(op: str, lengths: Tensor | None, gx: Tensor, *tensors, dtype=None):
    """Contiguous tensors of one dtype and device (`normalize`), int64 lengths; `op` ("LSTM",
    "GRU" or "RNN") names the layer in errors."""
    out = normalize(gx, *tensors, dtype=dtype, op=f"fused_rnn {op}")
    if lengths is not None:
        lengths = lengths.to(device=gx.device, dtype=torch.int64).contiguous()
    return (*out, lengths)


def _empty(like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return like.new_empty((0,), dtype=dtype)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _internal_backward(op: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"fused_rnn {op}: the backward operator is not differentiable itself; gradients of "
            "gradients come from the forward operator's formula (torch.autograd.grad with "
            "create_graph=True)"
        )

    return backward


def _zeros_if_none(g: Tensor | None, like: Tensor, shape) -> Tensor:
    return like.new_zeros(shape) if g is None else g


def _second_order(ctx, inputs, positions, recompute, cotangents):
    """Gradients of the layer w.r.t. `inputs` (the operator's differentiable tensor inputs, at
    `positions` among its arguments; None where absent) as differentiable functions of the
    inputs and of `cotangents`: the layer is recomputed with differentiable torch ops and
    differentiated with create_graph=True."""
    n_in = len(ctx.needs_input_grad)
    needs = [bool(ctx.needs_input_grad[k]) if k < n_in else False for k in positions]
    wanted = [x for x, n in zip(inputs, needs) if n]
    with torch.enable_grad():
        outs = recompute()
    pairs = [(o, g) for o, g in zip(outs, cotangents) if o is not None and g is not None]
    grads = iter(
        torch.autograd.grad(
            [o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True,
            allow_unused=True,
        )
    )  # fmt: skip
    return [next(grads) if n else None for n in needs]


# =========================================================================== LSTM

# The options (zoneout, recurrent dropout, layer norm) are optional arguments at the end of each
# schema, off by default: `rng` (2,) int64 (seed, offset) of the zoneout masks (fused_rnn._rng),
# None in evaluation (the expectation is used); the zoneout probabilities; `stream` the
# layer-direction index in the masks' counters; `drop` (B, R) recurrent dropout multiplier in the
# accumulation dtype; `ln_hh` (G*H,) gain of the recurrent product's layer norm (its bias is
# folded into gx and b_hn by the caller); the LSTM's `ln_c_w`, `ln_c_b` (H,) of the cell
# state's norm in the output. `aux` is what backward needs of the layer norms.
_LSTM_OPTS = (
    "Tensor? rng=None, float zoneout_c=0., float zoneout_h=0., int stream=0, Tensor? drop=None, "
    "Tensor? ln_hh=None, Tensor? ln_c_w=None, Tensor? ln_c_b=None"
)
_GRU_OPTS = (
    "Tensor? rng=None, float zoneout=0., int stream=0, Tensor? drop=None, Tensor? ln_hh=None"
)


def _rng_arg(rng: Tensor | None, like: Tensor) -> Tensor | None:
    return None if rng is None else rng.to(device=like.device, dtype=torch.int64).contiguous()


def _drop_arg(drop: Tensor | None, like: Tensor) -> Tensor | None:
    acc = _acc(like.dtype)
    return None if drop is None else drop.to(device=like.device, dtype=acc).contiguous()


def _lstm_aux_shape(T: int, B: int, GH: int) -> tuple[int, int, int]:
    return (T, B, GH + 3)  # normalised recurrent product | its rstd | mean and rstd of c̃


@torch.library.custom_op(
    "fused_rnn::lstm_fwd",
    mutates_args=(),
    schema="(Tensor gx, Tensor h0, Tensor c0, Tensor w_hh, Tensor? w_hr, Tensor? w_ch, "
    "Tensor? lengths, bool reverse, bool coupled, bool store, str backend, " + _LSTM_OPTS + ") "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def lstm_fwd(gx, h0, c0, w_hh, w_hr, w_ch, lengths, reverse, coupled, store, backend, rng=None,
             zoneout_c=0.0, zoneout_h=0.0, stream=0, drop=None, ln_hh=None, ln_c_w=None,
             ln_c_b=None):  # fmt: skip
    gx, h0, c0, w_hh, w_hr, w_ch, ln_hh, ln_c_w, ln_c_b, lengths = _prepare(
        "LSTM", lengths, gx, h0, c0, w_hh, w_hr, w_ch, ln_hh, ln_c_w, ln_c_b
    )
    rng, drop = _rng_arg(rng, gx), _drop_arg(drop, gx)
    args = [gx, h0, c0, w_hh, w_hr, w_ch, lengths, reverse, coupled, store]
    if rng is not None or zoneout_c or zoneout_h or drop is not None or ln_hh is not None:
        args += [rng, zoneout_c, zoneout_h, stream, drop, ln_hh, ln_c_w, ln_c_b]
    y, hs, cs, gates, ms, *aux = _run("lstm_fwd", backend, *args)  # plain: the plain signature
    s_T = 0 if reverse else gx.shape[0]
    h_T = hs[s_T].clone()
    c_T = cs[s_T].to(gx.dtype, copy=True)
    gates = _empty(gx, _acc(gx.dtype)) if gates is None else gates
    ms = _empty(gx) if ms is None else ms
    aux = aux[0] if aux and aux[0] is not None else _empty(gx, _acc(gx.dtype))
    return y, h_T, c_T, hs, cs, gates, ms, aux


@lstm_fwd.register_fake
def _(gx, h0, c0, w_hh, w_hr, w_ch, lengths, reverse, coupled, store, backend, rng=None,
      zoneout_c=0.0, zoneout_h=0.0, stream=0, drop=None, ln_hh=None, ln_c_w=None,
      ln_c_b=None):  # fmt: skip
    T, B, GH = gx.shape
    H, R = GH // (3 if coupled else 4), w_hh.shape[1]
    acc = _acc(gx.dtype)
    return (
        gx.new_empty((T, B, R)),
        gx.new_empty((B, R)),
        gx.new_empty((B, H)),
        gx.new_empty((T + 1, B, R)),
        gx.new_empty((T + 1, B, H), dtype=acc),
        gx.new_empty((T, B, GH), dtype=acc) if store else _empty(gx, acc),
        gx.new_empty((T, B, H)) if w_hr is not None else _empty(gx),
        gx.new_empty(_lstm_aux_shape(T, B, GH), dtype=acc)
        if store and ln_hh is not None
        else _empty(gx, acc),
    )


@torch.library.custom_op(
    "fused_rnn::lstm_bwd",
    mutates_args=(),
    schema="(Tensor dy, Tensor dhT, Tensor dcT, Tensor hs, Tensor cs, Tensor gates, Tensor ms, "
    "Tensor w_hh, Tensor? w_hr, Tensor? w_ch, Tensor? lengths, bool reverse, bool coupled, "
    "bool[] needs, str backend, Tensor? aux=None, " + _LSTM_OPTS + ") "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def lstm_bwd(dy, dhT, dcT, hs, cs, gates, ms, w_hh, w_hr, w_ch, lengths, reverse, coupled, needs,
             backend, aux=None, rng=None, zoneout_c=0.0, zoneout_h=0.0, stream=0, drop=None,
             ln_hh=None, ln_c_w=None, ln_c_b=None):  # fmt: skip
    dy, dhT, dcT, w_hh, w_hr, w_ch, ln_hh, ln_c_w, ln_c_b, lengths = _prepare(
        "LSTM", lengths, dy, dhT, dcT, w_hh, w_hr, w_ch, ln_hh, ln_c_w, ln_c_b, dtype=hs.dtype
    )
    rng, drop = _rng_arg(rng, hs), _drop_arg(drop, hs)
    needs = tuple(needs) + (False,) * (9 - len(needs))
    args = [dy, dhT, dcT, hs, cs, gates, ms if w_hr is not None else None, w_hh, w_hr, w_ch,
            lengths, reverse, coupled]  # fmt: skip
    if rng is None and not zoneout_c and not zoneout_h and drop is None and ln_hh is None:
        grads = _run("lstm_bwd", backend, *args, needs[:6])  # the launchers' plain signature
    else:
        grads = _run("lstm_bwd", backend, *args, needs, aux if ln_hh is not None else None,
                     rng, zoneout_c, zoneout_h, stream, drop, ln_hh, ln_c_w, ln_c_b)  # fmt: skip
    grads = tuple(grads) + (None,) * (9 - len(grads))
    return tuple(_empty(hs) if g is None else g for g in grads)


@lstm_bwd.register_fake
def _(dy, dhT, dcT, hs, cs, gates, ms, w_hh, w_hr, w_ch, lengths, reverse, coupled, needs,
      backend, aux=None, rng=None, zoneout_c=0.0, zoneout_h=0.0, stream=0, drop=None, ln_hh=None,
      ln_c_w=None, ln_c_b=None):  # fmt: skip
    T, B, R = dy.shape
    H = cs.shape[-1]
    shapes = [gates.shape, (B, R), (B, H), w_hh.shape]
    shapes += [None if w_hr is None else w_hr.shape, None if w_ch is None else w_ch.shape]
    shapes += [None if t is None else t.shape for t in (ln_hh, ln_c_w, ln_c_b)]
    needs = list(needs) + [False] * (9 - len(needs))
    return tuple(
        hs.new_empty(s) if need and s is not None else _empty(hs) for s, need in zip(shapes, needs)
    )


_LSTM_N_IN = 19  # tensor and option inputs of lstm_fwd
_LSTM_GRAD_IN = (0, 1, 2, 3, 4, 5, 16, 17, 18)  # gx, h0, c0, w_hh, w_hr, w_ch, ln_hh, ln_c_w/b


def _lstm_setup(ctx, inputs, output):
    inputs = list(inputs) + [None, 0.0, 0.0, 0, None, None, None, None][len(inputs) - 11 :]
    (gx, h0, c0, w_hh, w_hr, w_ch, lengths, reverse, coupled, store, backend, rng, zoneout_c,
     zoneout_h, stream, drop, ln_hh, ln_c_w, ln_c_b) = inputs  # fmt: skip
    _, _, _, hs, cs, gates, ms, aux = output
    ctx.mark_non_differentiable(hs, cs, gates, ms, aux)
    ctx.set_materialize_grads(False)
    ctx.reverse, ctx.coupled, ctx.store, ctx.backend = reverse, coupled, store, backend
    ctx.zoneout, ctx.stream = (zoneout_c, zoneout_h), stream
    ctx.save_for_backward(hs, cs, gates, ms, w_hh, w_hr, w_ch, lengths, gx, h0, c0, aux, rng,
                          drop, ln_hh, ln_c_w, ln_c_b)  # fmt: skip


def _lstm_backward(ctx, dy, dhT, dcT, *_buffers):
    if not ctx.store:
        raise RuntimeError("fused_rnn LSTM: the forward kept nothing for backward (store=False)")
    (hs, cs, gates, ms, w_hh, w_hr, w_ch, lengths, gx, h0, c0, aux, rng, drop, ln_hh, ln_c_w,
     ln_c_b) = ctx.saved_tensors  # fmt: skip
    n_in = len(ctx.needs_input_grad)
    zoneout_c, zoneout_h = ctx.zoneout
    if torch.is_grad_enabled():  # create_graph=True: differentiable gradients
        inputs = (gx, h0, c0, w_hh, w_hr, w_ch, ln_hh, ln_c_w, ln_c_b)
        grads = _second_order(
            ctx, inputs, _LSTM_GRAD_IN,
            lambda: _loop.recurrence_autograd(
                "LSTM", gx, h0, c0, w_hh, w_hr, w_ch, None, lengths, ctx.reverse, ctx.coupled,
                rng, zoneout_c, zoneout_h, ctx.stream, drop, ln_hh, ln_c_w, ln_c_b,
            ),
            (dy, dhT, dcT),
        )  # fmt: skip
        return _scatter(grads, _LSTM_GRAD_IN, n_in)
    T1, B, R = hs.shape
    dy = _zeros_if_none(dy, hs, (T1 - 1, B, R))
    dhT = _zeros_if_none(dhT, hs, (B, R))
    dcT = _zeros_if_none(dcT, hs, (B, cs.shape[-1]))
    needs = [bool(ctx.needs_input_grad[k]) if k < n_in else False for k in _LSTM_GRAD_IN]
    grads = torch.ops.fused_rnn.lstm_bwd(
        dy, dhT, dcT, hs, cs, gates, ms, w_hh, w_hr, w_ch, lengths, ctx.reverse, ctx.coupled,
        needs, ctx.backend, aux if ln_hh is not None else None, rng, zoneout_c, zoneout_h,
        ctx.stream, drop, ln_hh, ln_c_w, ln_c_b,
    )  # fmt: skip
    return _scatter([g if n else None for g, n in zip(grads, needs)], _LSTM_GRAD_IN, n_in)


def _scatter(grads, positions, n_in: int):
    """The gradients of the inputs at `positions` in a tuple of n_in (None elsewhere)."""
    out = [None] * n_in
    for g, k in zip(grads, positions):
        if k < n_in:
            out[k] = g
    return tuple(out)


lstm_fwd.register_autograd(_lstm_backward, setup_context=_lstm_setup)
lstm_bwd.register_autograd(_internal_backward("LSTM"))


def lstm_recurrence(gx, h0, c0, w_hh, w_hr=None, w_ch=None, lengths=None, reverse=False,
                    coupled=False, backend="stepwise", *, rng=None, zoneout_c=0.0,
                    zoneout_h=0.0, stream=0, drop=None, ln_hh=None, ln_c_w=None,
                    ln_c_b=None):  # fmt: skip
    """y (T, B, R), h_T (B, R), c_T (B, H) of one LSTM layer-direction, through the op.

    No shape checks here (the caller's): gx (T, B, G*H), h0 (B, R), c0 (B, H), w_hh (G*H, R),
    w_hr (P, H) or None, w_ch ((G-1)*H,) or None, lengths (B,) or None; one floating dtype.
    Options (module comment above `_LSTM_OPTS`) are passed to the operator only when set, so
    a plain call is the operator's plain signature.
    """
    store = _needs_grad(gx, h0, c0, w_hh, w_hr, w_ch, ln_hh, ln_c_w, ln_c_b)
    opts = {}
    if rng is not None or zoneout_c or zoneout_h or drop is not None or ln_hh is not None:
        opts = dict(rng=rng, zoneout_c=float(zoneout_c), zoneout_h=float(zoneout_h),
                    stream=int(stream), drop=drop, ln_hh=ln_hh, ln_c_w=ln_c_w,
                    ln_c_b=ln_c_b)  # fmt: skip
    y, h_T, c_T, *_ = torch.ops.fused_rnn.lstm_fwd(
        gx, h0, c0, w_hh, w_hr, w_ch, lengths, bool(reverse), bool(coupled), store, backend,
        **opts,
    )  # fmt: skip
    return y, h_T, c_T


# =========================================================================== GRU and RNN


@torch.library.custom_op(
    "fused_rnn::gru_fwd",
    mutates_args=(),
    schema="(Tensor gx, Tensor h0, Tensor w_hh, Tensor? b_hn, Tensor? lengths, bool reverse, "
    "int cell, bool store, str backend, " + _GRU_OPTS + ") "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def gru_fwd(gx, h0, w_hh, b_hn, lengths, reverse, cell, store, backend, rng=None, zoneout=0.0,
            stream=0, drop=None, ln_hh=None):  # fmt: skip
    op = _CELL_NAMES[cell]
    gx, h0, w_hh, b_hn, ln_hh, lengths = _prepare(op, lengths, gx, h0, w_hh, b_hn, ln_hh)
    rng, drop = _rng_arg(rng, gx), _drop_arg(drop, gx)
    args = [cell, gx, h0, w_hh, b_hn, lengths, reverse, store]
    if rng is not None or zoneout or drop is not None or ln_hh is not None:
        args += [rng, zoneout, stream, drop, ln_hh]
    y, hs, ws, *aux = _run("gru_fwd", backend, *args)  # plain: the plain signature
    h_T = hs[0 if reverse else gx.shape[0]].clone()
    acc = _acc(gx.dtype)
    aux = aux[0] if aux and aux[0] is not None else _empty(gx, acc)
    return y, h_T, hs, _empty(gx, acc) if ws is None else ws, aux


def _gru_ws_shape(cell: int, store: bool, zoneout: float, T: int, B: int, H: int):
    """The shape of ws, or None where it is empty: the GRU's r | z | n | hn when a gradient is
    wanted, the RNN's unzoned h̃ when one is wanted under zoneout."""
    if not store:
        return None
    if cell == _loop.CELL_GRU:
        return (T, B, 4 * H)
    return (T, B, H) if zoneout > 0 else None


@gru_fwd.register_fake
def _(gx, h0, w_hh, b_hn, lengths, reverse, cell, store, backend, rng=None, zoneout=0.0,
      stream=0, drop=None, ln_hh=None):  # fmt: skip
    T, B, GH = gx.shape
    H = h0.shape[-1]
    acc = _acc(gx.dtype)
    ws_shape = _gru_ws_shape(cell, store, zoneout, T, B, H)
    ws = _empty(gx, acc) if ws_shape is None else gx.new_empty(ws_shape, dtype=acc)
    aux = gx.new_empty((T, B, GH + 1), dtype=acc) if store and ln_hh is not None else None
    return (gx.new_empty((T, B, H)), gx.new_empty((B, H)), gx.new_empty((T + 1, B, H)), ws,
            _empty(gx, acc) if aux is None else aux)  # fmt: skip


@torch.library.custom_op(
    "fused_rnn::gru_bwd",
    mutates_args=(),
    schema="(Tensor dy, Tensor dhT, Tensor hs, Tensor ws, Tensor w_hh, Tensor? lengths, "
    "bool reverse, int cell, bool[] needs, str backend, Tensor? aux=None, " + _GRU_OPTS + ") "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def gru_bwd(dy, dhT, hs, ws, w_hh, lengths, reverse, cell, needs, backend, aux=None, rng=None,
            zoneout=0.0, stream=0, drop=None, ln_hh=None):  # fmt: skip
    dy, dhT, w_hh, ln_hh, lengths = _prepare(
        _CELL_NAMES[cell], lengths, dy, dhT, w_hh, ln_hh, dtype=hs.dtype
    )
    rng, drop = _rng_arg(rng, hs), _drop_arg(drop, hs)
    needs = tuple(needs) + (False,) * (5 - len(needs))
    ws = ws if ws.numel() > 0 else None  # the RNN's: empty unless zoneout kept h̃
    args = [cell, dy, dhT, hs, ws, w_hh, lengths, reverse]
    if rng is None and not zoneout and drop is None and ln_hh is None:
        grads = _run("gru_bwd", backend, *args, needs[:4])  # the launchers' plain signature
    else:
        grads = _run("gru_bwd", backend, *args, needs, aux if ln_hh is not None else None, rng,
                     zoneout, stream, drop, ln_hh)  # fmt: skip
    grads = tuple(grads) + (None,) * (5 - len(grads))
    return tuple(_empty(hs) if g is None else g for g in grads)


@gru_bwd.register_fake
def _(dy, dhT, hs, ws, w_hh, lengths, reverse, cell, needs, backend, aux=None, rng=None,
      zoneout=0.0, stream=0, drop=None, ln_hh=None):  # fmt: skip
    T, B, H = dy.shape
    G = w_hh.shape[0] // H
    shapes = [(T, B, G * H), (B, H), w_hh.shape, (H,), (G * H,)]
    needs = list(needs) + [False] * (5 - len(needs))
    return tuple(hs.new_empty(s) if need else _empty(hs) for s, need in zip(shapes, needs))


_GRU_GRAD_IN = (0, 1, 2, 3, 13)  # gx, h0, w_hh, b_hn, ln_hh


def _gru_setup(ctx, inputs, output):
    inputs = list(inputs) + [None, 0.0, 0, None, None][len(inputs) - 9 :]
    (gx, h0, w_hh, b_hn, lengths, reverse, cell, store, backend, rng, zoneout, stream, drop,
     ln_hh) = inputs  # fmt: skip
    _, _, hs, ws, aux = output
    ctx.mark_non_differentiable(hs, ws, aux)
    ctx.set_materialize_grads(False)
    ctx.reverse, ctx.cell, ctx.store, ctx.backend = reverse, cell, store, backend
    ctx.zoneout, ctx.stream = zoneout, stream
    ctx.save_for_backward(hs, ws, w_hh, lengths, gx, h0, b_hn, aux, rng, drop, ln_hh)


def _gru_backward(ctx, dy, dhT, *_buffers):
    if not ctx.store:
        raise RuntimeError(
            f"fused_rnn {_CELL_NAMES[ctx.cell]}: the forward kept nothing for backward "
            "(store=False)"
        )
    hs, ws, w_hh, lengths, gx, h0, b_hn, aux, rng, drop, ln_hh = ctx.saved_tensors
    n_in = len(ctx.needs_input_grad)
    if torch.is_grad_enabled():  # create_graph=True: differentiable gradients
        mode = next(k for k, v in CELLS.items() if v == ctx.cell)
        grads = _second_order(
            ctx, (gx, h0, w_hh, b_hn, ln_hh), _GRU_GRAD_IN,
            lambda: _loop.recurrence_autograd(
                mode, gx, h0, None, w_hh, None, None, b_hn, lengths, ctx.reverse, False, rng,
                0.0, ctx.zoneout, ctx.stream, drop, ln_hh,
            )[:2],
            (dy, dhT),
        )  # fmt: skip
        return _scatter(grads, _GRU_GRAD_IN, n_in)
    T1, B, H = hs.shape
    dy = _zeros_if_none(dy, hs, (T1 - 1, B, H))
    dhT = _zeros_if_none(dhT, hs, (B, H))
    needs = [bool(ctx.needs_input_grad[k]) if k < n_in else False for k in _GRU_GRAD_IN]
    grads = torch.ops.fused_rnn.gru_bwd(
        dy, dhT, hs, ws, w_hh, lengths, ctx.reverse, ctx.cell, needs, ctx.backend,
        aux if ln_hh is not None else None, rng, ctx.zoneout, ctx.stream, drop, ln_hh,
    )  # fmt: skip
    return _scatter([g if n else None for g, n in zip(grads, needs)], _GRU_GRAD_IN, n_in)


gru_fwd.register_autograd(_gru_backward, setup_context=_gru_setup)
gru_bwd.register_autograd(_internal_backward("GRU/RNN"))


def gru_recurrence(cell, gx, h0, w_hh, b_hn=None, lengths=None, reverse=False,
                   backend="stepwise", *, rng=None, zoneout=0.0, stream=0, drop=None,
                   ln_hh=None):  # fmt: skip
    """y (T, B, H), h_T (B, H) of one GRU or RNN layer-direction (`cell`: see `cell_of`).

    No shape checks here (the caller's): gx (T, B, G*H) with G = 3 (GRU) or 1 (RNN), h0 (B, H),
    w_hh (G*H, H), b_hn (H,) or None (always None for the RNN), lengths (B,) or None. Options
    as `lstm_recurrence` (one zoneout probability, of h; layer norm for the GRU only).
    """
    store = _needs_grad(gx, h0, w_hh, b_hn, ln_hh)
    opts = {}
    if rng is not None or zoneout or drop is not None or ln_hh is not None:
        opts = dict(rng=rng, zoneout=float(zoneout), stream=int(stream), drop=drop, ln_hh=ln_hh)
    y, h_T, *_ = torch.ops.fused_rnn.gru_fwd(
        gx, h0, w_hh, b_hn, lengths, bool(reverse), int(cell), store, backend, **opts
    )
    return y, h_T
