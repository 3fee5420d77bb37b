"""Second-order gradients through the recurrences, on every backend.

`torch.autograd.grad(..., create_graph=True)` through a fused_rnn layer gives gradients that are
themselves differentiable (gradient penalties, meta-learning, Hessian-vector products): the
operators' autograd formula recomputes the layer with differentiable torch ops when a graph of
the gradient is asked for (fused_rnn._ops).

* gradgradcheck (float64, central differences) of the operators' entry points
  (fused_rnn.recurrence) for every cell and option: in full on the torch backend; on the fused
  backends (Triton kernels under the interpreter on CPU) in gradcheck's fast mode, which checks
  random projections of the same Jacobians at a fraction of the kernel launches.
* The modules, forced onto each fused backend, against torch.nn's own second-order gradients on
  CPU (torch's CPU RNNs are twice differentiable): Hessian-vector products w.r.t. the input and
  every parameter, and a gradient penalty (create_graph, then backward) as in WGAN-GP training.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
from torch import nn  # noqa: E402

import fused_rnn  # noqa: E402
from fused_rnn import dispatch  # noqa: E402
from fused_rnn.recurrence import gru_recurrence, lstm_recurrence, rnn_recurrence  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FUSED = [b for b in ("stepwise", "persistent") if b in dispatch.available_backends(DEVICE)]
F64 = dict(dtype=torch.float64, device=DEVICE)
# float64 everywhere: the recomputed second-order graph and torch.nn's run the same maths in
# another order, so they agree to float64 rounding (~1e-15 relative; 1e-9 leaves a margin for
# the sums over T steps and the batch)
TOL = dict(rtol=1e-9, atol=1e-10)


def _leaf(*shape, scale=1.0):
    return (torch.randn(*shape, **F64) * scale).requires_grad_()


# (name, builder of (function, inputs)); tiny shapes: gradgradcheck differentiates every element
def _lstm(peep=False, coupled=False, proj=0, lens=False, reverse=False):
    def build(backend):
        T, B, H = 2, 2, 2
        G, R = (3 if coupled else 4), proj or H
        lengths = torch.tensor([2, 1], device=DEVICE) if lens else None
        ins = [_leaf(T, B, G * H), _leaf(B, R), _leaf(B, H), _leaf(G * H, R, scale=0.5)]
        ins += [_leaf(proj, H, scale=0.5)] if proj else []
        ins += [_leaf((G - 1) * H, scale=0.5)] if peep else []

        def f(gx, h0, c0, w_hh, *rest):
            rest = list(rest)
            w_hr = rest.pop(0) if proj else None
            w_ch = rest.pop(0) if peep else None
            return lstm_recurrence(gx, h0, c0, w_hh, w_hr=w_hr, w_ch=w_ch, coupled=coupled,
                                   lengths=lengths, reverse=reverse, backend=backend)  # fmt: skip

        return f, ins

    return build


def _gru(lens=False, reverse=False):
    def build(backend):
        T, B, H = 2, 2, 2
        lengths = torch.tensor([1, 2], device=DEVICE) if lens else None
        ins = [_leaf(T, B, 3 * H), _leaf(B, H), _leaf(3 * H, H, scale=0.5), _leaf(H)]

        def f(gx, h0, w_hh, b_hn):
            return gru_recurrence(gx, h0, w_hh, b_hn, lengths=lengths, reverse=reverse,
                                  backend=backend)  # fmt: skip

        return f, ins

    return build


def _rnn(act, lens=False):
    def build(backend):
        T, B, H = 3, 2, 2
        lengths = torch.tensor([3, 1], device=DEVICE) if lens else None
        ins = [_leaf(T, B, H), _leaf(B, H), _leaf(H, H, scale=0.5)]

        def f(gx, h0, w_hh):
            return rnn_recurrence(gx, h0, w_hh, nonlinearity=act, lengths=lengths,
                                  backend=backend)  # fmt: skip

        return f, ins

    return build


CASES = {
    "LSTM": _lstm(),
    "LSTM-proj-lens-rev": _lstm(proj=1, lens=True, reverse=True),
    "LSTM-peephole-lens": _lstm(peep=True, lens=True),
    "LSTM-coupled-peephole-rev": _lstm(peep=True, coupled=True, reverse=True),
    "GRU": _gru(),
    "GRU-lens-rev": _gru(lens=True, reverse=True),
    "RNN-tanh-lens": _rnn("tanh", lens=True),
    "RNN-relu": _rnn("relu"),
}
# on the fused backends: every cell, every option at least once
FUSED_CASES = ["LSTM-proj-lens-rev", "LSTM-coupled-peephole-rev", "GRU-lens-rev", "RNN-tanh-lens",
               "RNN-relu"]  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_gradgradcheck_torch_backend(case):
    f, ins = CASES[case]("torch")
    assert torch.autograd.gradgradcheck(f, ins)


@pytest.mark.skipif(not FUSED, reason="no fused backend can run here")
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("case", FUSED_CASES)
def test_gradgradcheck_fused(case, backend):
    f, ins = CASES[case](backend)
    assert torch.autograd.gradgradcheck(f, ins, fast_mode=True)


# ----------------------------------------------------------------------------- modules vs torch.nn

MODULES = {
    "LSTM": ("LSTM", dict(num_layers=2, bidirectional=True)),
    "LSTM-proj": ("LSTM", dict(proj_size=2, batch_first=True)),
    "GRU": ("GRU", dict(num_layers=2)),
    "RNN": ("RNN", dict(nonlinearity="relu", bidirectional=True)),
    "LSTMCell": ("LSTMCell", {}),
    "GRUCell": ("GRUCell", {}),
    "RNNCell": ("RNNCell", {}),
}


def _pair(name, backend):
    cls, kw = MODULES[name]
    ref = getattr(nn, cls)(3, 4, **kw).to(**F64)
    ours = getattr(fused_rnn, cls)(3, 4, **kw, backend=backend).to(**F64)
    ours.load_state_dict(ref.state_dict())
    x = _leaf(2, 3) if cls.endswith("Cell") else _leaf(3, 2, 3)
    return ref, ours, x


def _outputs(out):
    if isinstance(out, torch.Tensor):
        return [out]
    y, h = out
    return [y, *h] if isinstance(h, tuple) else [y, h]


def _hvp(module, x, seed=0):
    """(H v) w.r.t. x and every parameter, for L = sum(out * u): grad with create_graph=True,
    then the gradient of <grad, v>."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    outs = _outputs(module(x))
    loss = sum((o * torch.randn(o.shape, generator=g, **F64)).sum() for o in outs)
    wrt = [x, *module.parameters()]
    grads = torch.autograd.grad(loss, wrt, create_graph=True)
    dot = sum((gr * torch.randn(gr.shape, generator=g, **F64)).sum() for gr in grads)
    return torch.autograd.grad(dot, wrt, allow_unused=True)


@pytest.mark.skipif(not FUSED, reason="no fused backend can run here")
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", list(MODULES))
def test_hessian_vector_products_match_torch_nn(name, backend):
    ref, ours, x = _pair(name, backend)
    expected, got = _hvp(ref, x), _hvp(ours, x)
    assert len(expected) == len(got)
    for a, b in zip(got, expected, strict=True):
        if b is None:  # a parameter the second-order term does not reach (e.g. a bias)
            assert a is None or torch.count_nonzero(a) == 0
        else:
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.skipif(not FUSED, reason="no fused backend can run here")
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", ["LSTM", "GRU", "LSTMCell"])
def test_gradient_penalty_training_step(name, backend):
    """loss = L + ||dL/dx||², then loss.backward(): parameter gradients as torch.nn's."""

    def step(module, x):
        outs = _outputs(module(x))
        base = sum((o * o).sum() for o in outs)
        (gx,) = torch.autograd.grad(base, [x], create_graph=True)
        (base + (gx * gx).sum()).backward()
        return [p.grad for p in module.parameters()]

    ref, ours, x = _pair(name, backend)
    for a, b in zip(step(ours, x), step(ref, x.detach().requires_grad_()), strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_first_order_backward_runs_no_recompute(monkeypatch):
    """Without create_graph the backward operator runs: the differentiable recompute is only for
    gradients of gradients."""
    from fused_rnn import _loop

    def boom(*a, **k):
        raise AssertionError("recomputed without create_graph")

    monkeypatch.setattr(_loop, "recurrence_autograd", boom)
    f, ins = CASES["LSTM-peephole-lens"]("torch")
    sum(o.sum() for o in f(*ins)).backward()
    assert all(t.grad is not None for t in ins)
