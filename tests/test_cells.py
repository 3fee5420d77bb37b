"""fused_rnn.RNNCell / GRUCell / LSTMCell against torch.nn on CPU.

As in test_modules.py every comparison runs on the default path (backend="torch" -> the ATen
cell op torch.nn calls) and on the generic path (`native_off`: the input GEMM plus one step of
the torch loop, the code the fused backends share). Weights are copied with a strict
load_state_dict.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import fused_rnn

# native: the same ATen op on the same tensors -> bit-identical.
# generic, float64: one step, only the operation order differs (b_ih + b_hh folded before the
#   GEMM, addcmul/lerp): rounding at 1e-16 scale, far below 1e-10.
# generic, float32: the same in float32 (eps 1.2e-7) on O(1) values and <= 8-term sums: a few
#   ulp; 1e-5 is loose enough for that and far tighter than any real error (O(0.1)).
TOL = {
    ("native", torch.float64): dict(rtol=0, atol=0),
    ("native", torch.float32): dict(rtol=0, atol=0),
    ("generic", torch.float64): dict(rtol=1e-10, atol=1e-12),
    ("generic", torch.float32): dict(rtol=1e-5, atol=1e-5),
}
I, H, N = 3, 5, 4

KINDS = ["RNNCell-tanh", "RNNCell-relu", "GRUCell", "LSTMCell"]


def build(lib, kind, input_size=I, hidden_size=H, bias=True, **kw):
    if kind.startswith("RNNCell"):
        # positional: torch's RNNCell takes bias BEFORE nonlinearity
        return lib.RNNCell(input_size, hidden_size, bias, kind.split("-")[1], **kw)
    return getattr(lib, kind)(input_size, hidden_size, bias, **kw)


def make_pair(kind, dtype=torch.float64, **kw):
    ref = build(nn, kind, dtype=dtype, **kw)
    ours = build(fused_rnn, kind, dtype=dtype, **kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def as_list(kind, out):
    if kind == "LSTMCell":
        assert type(out) is tuple and len(out) == 2
        return list(out)
    assert isinstance(out, torch.Tensor)
    return [out]


CASES = [
    pytest.param(kind, batched, given_hx, bias, dtype,
                 id=f"{kind}-{'batched' if batched else 'unbatched'}-{'hx' if given_hx else 'nohx'}"
                 f"{'' if bias else '-nobias'}-{'fp64' if dtype == torch.float64 else 'fp32'}")
    for kind, batched, given_hx, bias, dtype in itertools.product(
        KINDS, [True, False], [True, False], [True, False], [torch.float64, torch.float32]
    )
    if dtype == torch.float64 or (given_hx and bias)  # float32: a representative subset
]  # fmt: skip


@pytest.mark.parametrize("kind,batched,given_hx,bias,dtype", CASES)
def test_cell_matches_torch(kind, batched, given_hx, bias, dtype, path):
    ours, ref = make_pair(kind, dtype=dtype, bias=bias)
    shape = (N,) if batched else ()
    x = torch.randn(*shape, I, dtype=dtype, requires_grad=True)
    leaves = [x]
    hx = None
    if given_hx:
        hs = [torch.randn(*shape, H, dtype=dtype, requires_grad=True)
              for _ in range(2 if kind == "LSTMCell" else 1)]  # fmt: skip
        leaves += hs
        hx = tuple(hs) if kind == "LSTMCell" else hs[0]
    tol = TOL[(path, dtype)]

    def run(m):
        outs = as_list(kind, m(x, hx))
        g = torch.Generator().manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=g, dtype=dtype)).sum() for o in outs)
        return outs, torch.autograd.grad(loss, leaves + list(m.parameters()))

    outs, grads = run(ours)
    outs_r, grads_r = run(ref)
    for o, o_r in zip(outs, outs_r, strict=True):
        assert o.shape == o_r.shape == (*shape, H)
        torch.testing.assert_close(o, o_r, **tol)
    names = ["x", "h", "c"][: len(leaves)] + [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, grads, grads_r, strict=True):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"grad {name}: {m}")
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]


@pytest.mark.parametrize("kind", KINDS)
def test_default_hx_is_zeros(kind, path):
    ours, _ = make_pair(kind)
    x = torch.randn(N, I, dtype=torch.float64)
    z = torch.zeros(N, H, dtype=torch.float64)
    a = as_list(kind, ours(x))
    b = as_list(kind, ours(x, (z, z) if kind == "LSTMCell" else z))
    for u, v in zip(a, b, strict=True):
        assert u.dtype == torch.float64
        assert torch.equal(u, v)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sizes", [(I, 0), (0, H), (0, 0)], ids=["H0", "I0", "I0-H0"])
def test_zero_sizes_work(kind, sizes, path):
    """Cells validate nothing: input_size=0 and hidden_size=0 build and run like torch's."""
    i, h = sizes
    ours, ref = make_pair(kind, input_size=i, hidden_size=h)
    x = torch.randn(N, i, dtype=torch.float64)
    outs, outs_r = as_list(kind, ours(x)), as_list(kind, ref(x))
    for o, o_r in zip(outs, outs_r, strict=True):
        assert o.shape == o_r.shape == (N, h)
        torch.testing.assert_close(o, o_r, **TOL[(path, torch.float64)])


@pytest.mark.parametrize("kind", KINDS)
def test_batch_zero(kind, path):
    ours, ref = make_pair(kind)
    x = torch.randn(0, I, dtype=torch.float64)
    for o, o_r in zip(as_list(kind, ours(x)), as_list(kind, ref(x)), strict=True):
        assert o.shape == o_r.shape == (0, H)


def test_rnncell_unknown_nonlinearity_fails_at_forward():
    for lib in (nn, fused_rnn):
        cell = lib.RNNCell(I, H, nonlinearity="foo")  # builds fine
        assert cell.nonlinearity == "foo"
        with pytest.raises(RuntimeError, match="Unknown nonlinearity: foo"):
            cell(torch.randn(N, I))


def test_rnncell_positional_order():
    """RNNCell(I, H, bias, nonlinearity): bias first (the reverse of RNN's order)."""
    for lib in (nn, fused_rnn):
        cell = lib.RNNCell(I, H, False, "relu")
        assert cell.bias is False and cell.nonlinearity == "relu"
        assert cell.bias_ih is None and cell.bias_hh is None
    x = torch.randn(N, I, dtype=torch.float64)
    ours, ref = make_pair("RNNCell-relu", bias=False)
    assert torch.equal(ours(x), ref(x))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_parameters_init_and_state_dict(kind, bias):
    torch.manual_seed(5)
    ref = build(nn, kind, bias=bias)
    torch.manual_seed(5)
    ours = build(fused_rnn, kind, bias=bias)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        assert a.shape == b.shape and torch.equal(a, b), f"{n} differs for the same seed"
    if not bias:
        assert ours.bias_ih is None and ours.bias_hh is None
        assert "bias_ih" in dict(ours._parameters)  # registered as None, like torch
    assert (ours.input_size, ours.hidden_size, ours.bias) == (I, H, bias)
    # strict loads both ways
    with torch.no_grad():
        for p in ours.parameters():
            p.mul_(2)
    ref.load_state_dict(ours.state_dict(), strict=True)
    ours2 = build(fused_rnn, kind, bias=bias)
    ours2.load_state_dict(ref.state_dict(), strict=True)
    for a, b in zip(ours2.parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kind,kw",
    [("RNNCell-tanh", {}), ("RNNCell-relu", dict(bias=False)), ("GRUCell", dict(bias=False)),
     ("LSTMCell", {}), ("LSTMCell", dict(bias=1))],
    ids=["RNNCell", "RNNCell-relu-nobias", "GRUCell-nobias", "LSTMCell", "LSTMCell-bias1"],
)  # fmt: skip
def test_repr_matches_torch(kind, kw):
    assert repr(build(fused_rnn, kind, **kw)) == repr(build(nn, kind, **kw))


@pytest.mark.parametrize("kind", ["GRUCell", "LSTMCell"])
def test_weights_read_on_every_forward(kind, path):
    ours, ref = make_pair(kind)
    tol = TOL[(path, torch.float64)]
    x = torch.randn(N, I, dtype=torch.float64)
    before = as_list(kind, ours(x))[0]
    with torch.no_grad():
        ours.weight_hh.mul_(-2)
        ref.weight_hh.mul_(-2)
    h0 = torch.randn(N, H, dtype=torch.float64)
    hx = (h0, h0) if kind == "LSTMCell" else h0
    torch.testing.assert_close(as_list(kind, ours(x, hx))[0], as_list(kind, ref(x, hx))[0], **tol)
    assert (as_list(kind, ours(x))[0] - before).abs().max() == 0  # h0 = 0: W_hh unused
    params = {n: torch.randn_like(p, requires_grad=True) for n, p in ref.named_parameters()}
    y = as_list(kind, torch.func.functional_call(ours, params, (x, hx)))[0]
    y_r = as_list(kind, torch.func.functional_call(ref, params, (x, hx)))[0]
    torch.testing.assert_close(y, y_r, **tol)
    g = torch.autograd.grad(y.sum(), list(params.values()))
    g_r = torch.autograd.grad(y_r.sum(), list(params.values()))
    for a, b in zip(g, g_r, strict=True):
        torch.testing.assert_close(a, b, **tol)
    ours.weight_ih = nn.Parameter(torch.zeros_like(ours.weight_ih))
    ref.weight_ih = nn.Parameter(torch.zeros_like(ref.weight_ih))
    y, y_r = as_list(kind, ours(x, hx))[0], as_list(kind, ref(x, hx))[0]
    torch.testing.assert_close(y, y_r, **tol)
    y.sum().backward()
    y_r.sum().backward()
    torch.testing.assert_close(ours.weight_ih.grad, ref.weight_ih.grad, **tol)


@pytest.mark.parametrize("kind", KINDS)
def test_double_and_backward_twice(kind, path):
    torch.manual_seed(9)
    ref = build(nn, kind).double()
    torch.manual_seed(9)
    ours = build(fused_rnn, kind).double()
    x = torch.randn(N, I, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(as_list(kind, ours(x))[0], as_list(kind, ref(x))[0],
                               **TOL[(path, torch.float64)])  # fmt: skip
    loss = sum(o.square().sum() for o in as_list(kind, ours(x)))
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    assert first.abs().max() > 0
    torch.testing.assert_close(x.grad, 2 * first, rtol=1e-12, atol=0)
