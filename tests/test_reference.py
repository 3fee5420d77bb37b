"""fused_rnn.reference (the plain-torch oracle of the kernels) against torch.nn, in float64.

The reference shares no code with torch's RNN ops, so agreement here is what lets the kernel
tests compare against the reference alone. Checked: the cells, one layer and direction
(`recurrence`), the whole network (`stack`) for every mode with proj_size and bidirectional,
per-sequence lengths against packed sequences, and gradients through all of it.

Tolerance: float64 throughout; the reference computes the same maths in a different operation
order (separate GEMMs for x and h, explicit gate arithmetic), so differences are rounding at
the 1e-16 level accumulated over a few steps and layers: rtol 1e-10 / atol 1e-12 is ample, and
any real error (a gate in the wrong place) is many orders larger.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fused_rnn import reference
from fused_rnn.reference import CellWeights

TOL = dict(rtol=1e-10, atol=1e-12)
DT = torch.float64
I, H, P = 3, 5, 2
MODES = ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"]


def torch_module(mode, input_size=I, **kw):
    if mode.startswith("RNN"):
        kw["nonlinearity"] = "tanh" if mode == "RNN_TANH" else "relu"
        return nn.RNN(input_size, H, dtype=DT, **kw)
    return getattr(nn, mode)(input_size, H, dtype=DT, **kw)


def weights_of(m):
    """The module's weights as reference.CellWeights, one per (layer, direction)."""
    out = []
    for names in m._all_weights:
        w = {n.split("_l")[0]: getattr(m, n) for n in names}
        out.append(CellWeights(w["weight_ih"], w["weight_hh"], w.get("bias_ih"),
                               w.get("bias_hh"), w.get("weight_hr")))  # fmt: skip
    return out


def torch_cell(mode, bias):
    if mode.startswith("RNN"):
        return nn.RNNCell(I, H, bias, "tanh" if mode == "RNN_TANH" else "relu", dtype=DT)
    return getattr(nn, f"{mode}Cell")(I, H, bias, dtype=DT)


# ------------------------------------------------------------------------------------------------
# cells


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("mode", MODES)
def test_cell(mode, bias):
    tc = torch_cell(mode, bias)
    w = CellWeights(tc.weight_ih, tc.weight_hh, tc.bias_ih, tc.bias_hh)
    x = torch.randn(4, I, dtype=DT, requires_grad=True)
    h = torch.randn(4, H, dtype=DT, requires_grad=True)
    c = torch.randn(4, H, dtype=DT, requires_grad=True) if mode == "LSTM" else None
    h_ref, c_ref = reference.cell(mode, x, h, c, w)
    if mode == "LSTM":
        h_t, c_t = tc(x, (h, c))
        torch.testing.assert_close(c_ref, c_t, **TOL)
    else:
        h_t, c_t = tc(x, h), None
        assert c_ref is None
    torch.testing.assert_close(h_ref, h_t, **TOL)
    leaves = [x, h] + ([c] if c is not None else []) + list(tc.parameters())
    loss = lambda hh, cc: hh.square().sum() + (0 if cc is None else cc.sin().sum())  # noqa: E731
    for a, b in zip(torch.autograd.grad(loss(h_ref, c_ref), leaves),
                    torch.autograd.grad(loss(h_t, c_t), leaves), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, **TOL)


def test_named_cells_and_gru_new_gate():
    """rnn_cell/gru_cell/lstm_cell agree with `cell`, and GRU's r multiplies (W_hn h + b_hn)."""
    tc = nn.GRUCell(I, H, dtype=DT)
    w = CellWeights(tc.weight_ih, tc.weight_hh, tc.bias_ih, tc.bias_hh)
    x, h = torch.randn(2, I, dtype=DT), torch.randn(2, H, dtype=DT)
    torch.testing.assert_close(reference.gru_cell(x, h, w), tc(x, h), **TOL)
    with torch.no_grad():
        tc.bias_hh[2 * H :] += 1.0  # b_hn: inside the r-product, so it cannot fold into b_in
        tc.bias_ih[2 * H :] -= 1.0
    moved = reference.gru_cell(x, h, w)
    torch.testing.assert_close(moved, tc(x, h), **TOL)
    with pytest.raises(ValueError):
        reference.rnn_cell(x, h, w, "sigmoid")
    with pytest.raises(ValueError):
        reference.cell("NOPE", x, h, None, w)


def test_lstm_cell_with_projection():
    """One step of nn.LSTM(proj_size=P) is lstm_cell with w_hr: h' = (o*tanh(c')) W_hr^T."""
    m = torch_module("LSTM", proj_size=P)
    (w,) = weights_of(m)
    x = torch.randn(1, 4, I, dtype=DT)
    h0, c0 = torch.randn(1, 4, P, dtype=DT), torch.randn(1, 4, H, dtype=DT)
    out, (hn, cn) = m(x, (h0, c0))
    h1, c1 = reference.lstm_cell(x[0], h0[0], c0[0], w)
    assert h1.shape == (4, P) and c1.shape == (4, H)
    torch.testing.assert_close(h1, hn[0], **TOL)
    torch.testing.assert_close(c1, cn[0], **TOL)
    torch.testing.assert_close(h1, out[0], **TOL)


# ------------------------------------------------------------------------------------------------
# one layer and direction


@pytest.mark.parametrize("mode", MODES)
def test_recurrence_forward_and_reverse(mode):
    """recurrence(reverse=False/True) are the two halves of a 1-layer bidirectional nn module."""
    m = torch_module(mode, bidirectional=True)
    wf, wr = weights_of(m)
    T, B = 6, 3
    x = torch.randn(T, B, I, dtype=DT)
    h0 = torch.randn(2, B, H, dtype=DT)
    c0 = torch.randn(2, B, H, dtype=DT) if mode == "LSTM" else None
    out, hid = m(x, (h0, c0) if mode == "LSTM" else h0)
    hn, cn = hid if mode == "LSTM" else (hid, None)
    for d, w in enumerate((wf, wr)):
        y, h, c = reference.recurrence(mode, x, h0[d], None if c0 is None else c0[d], w,
                                       reverse=d == 1)  # fmt: skip
        torch.testing.assert_close(y, out[..., d * H : (d + 1) * H], **TOL)
        torch.testing.assert_close(h, hn[d], **TOL)
        if mode == "LSTM":
            torch.testing.assert_close(c, cn[d], **TOL)
    # reverse h_n is the state after t=0, not output[-1]
    assert not torch.allclose(hn[1], out[-1, :, H:])


# ------------------------------------------------------------------------------------------------
# the whole network


STACK = [
    (mode, layers, bidir, bias, proj)
    for mode in MODES
    for layers, bidir, bias, proj in [
        (1, False, True, 0), (2, True, True, 0), (3, False, False, 0), (3, True, True, 0),
        (1, True, False, 0),
    ] + ([(1, False, True, P), (2, True, True, P), (3, True, False, P)] if mode == "LSTM" else [])
]  # fmt: skip


def _sid(mode, layers, bidir, bias, proj):
    return f"{mode}-L{layers}" + "-bidir" * bidir + "-nobias" * (not bias) + "-proj" * bool(proj)


def _net(mode, layers, bidir, bias, proj):
    kw = dict(num_layers=layers, bidirectional=bidir, bias=bias)
    if proj:
        kw["proj_size"] = proj
    return torch_module(mode, **kw)


def _states(mode, layers, bidir, proj, B):
    D = 2 if bidir else 1
    h0 = torch.randn(layers * D, B, proj or H, dtype=DT, requires_grad=True)
    c0 = torch.randn(layers * D, B, H, dtype=DT, requires_grad=True) if mode == "LSTM" else None
    return h0, c0


@pytest.mark.parametrize("mode,layers,bidir,bias,proj", STACK, ids=[_sid(*s) for s in STACK])
def test_stack(mode, layers, bidir, bias, proj):
    m = _net(mode, layers, bidir, bias, proj)
    T, B = 5, 3
    x = torch.randn(T, B, I, dtype=DT, requires_grad=True)
    h0, c0 = _states(mode, layers, bidir, proj, B)
    out, hid = m(x, (h0, c0) if mode == "LSTM" else h0)
    hn, cn = hid if mode == "LSTM" else (hid, None)
    r_out, r_hn, r_cn = reference.stack(mode, x, h0, c0, weights_of(m), layers, bidir)
    torch.testing.assert_close(r_out, out, **TOL)
    torch.testing.assert_close(r_hn, hn, **TOL)
    if mode == "LSTM":
        torch.testing.assert_close(r_cn, cn, **TOL)
    else:
        assert r_cn is None

    leaves = [x, h0] + ([c0] if c0 is not None else []) + list(m.parameters())
    g = torch.Generator().manual_seed(1)
    dy, dh = (
        torch.randn(out.shape, generator=g, dtype=DT),
        torch.randn(hn.shape, generator=g, dtype=DT),
    )
    dc = torch.randn(hn.shape[:-1] + (H,), generator=g, dtype=DT) if mode == "LSTM" else None

    def loss(o, h, c):
        return (o * dy).sum() + (h * dh).sum() + (0 if c is None else (c * dc).sum())

    for a, b in zip(torch.autograd.grad(loss(r_out, r_hn, r_cn), leaves),
                    torch.autograd.grad(loss(out, hn, cn), leaves), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize(
    "mode,layers,bidir,bias,proj",
    [("LSTM", 2, True, True, 0), ("LSTM", 2, True, False, P), ("GRU", 3, True, True, 0),
     ("GRU", 1, False, True, 0), ("RNN_TANH", 2, True, False, 0), ("RNN_RELU", 2, False, True, 0)],
    ids=lambda v: str(v),
)  # fmt: skip
@pytest.mark.parametrize("order", ["unsorted", "sorted"])
def test_stack_with_lengths_equals_packed(mode, layers, bidir, bias, proj, order):
    """reference.stack(padded x, lengths) == torch.nn on the packed sequence: per-sequence final
    states (the reverse direction starting at each sequence's own last step), outputs on the
    valid steps, and exact zeros on the padding. The states are given in the user's order."""
    m = _net(mode, layers, bidir, bias, proj)
    T = 6
    lens = [3, 6, 1, 6, 4] if order == "unsorted" else [6, 6, 4, 3, 1]
    B = len(lens)
    x = torch.randn(T, B, I, dtype=DT, requires_grad=True)
    h0, c0 = _states(mode, layers, bidir, proj, B)
    packed = pack_padded_sequence(x, torch.tensor(lens), enforce_sorted=order == "sorted")
    out_p, hid = m(packed, (h0, c0) if mode == "LSTM" else h0)
    hn, cn = hid if mode == "LSTM" else (hid, None)
    out, out_lens = pad_packed_sequence(out_p, total_length=T)
    assert out_lens.tolist() == lens

    lengths = torch.tensor(lens)
    r_out, r_hn, r_cn = reference.stack(mode, x, h0, c0, weights_of(m), layers, bidir, lengths)
    valid = (torch.arange(T).unsqueeze(1) < lengths).unsqueeze(-1).expand_as(r_out)
    assert torch.equal(r_out[~valid], torch.zeros_like(r_out[~valid])), "padding must be zero"
    torch.testing.assert_close(r_out, out, **TOL)
    torch.testing.assert_close(r_hn, hn, **TOL)
    if mode == "LSTM":
        torch.testing.assert_close(r_cn, cn, **TOL)

    # lengths do matter: the unmasked reference on the same padded input differs
    unmasked_hn = reference.stack(mode, x, h0, c0, weights_of(m), layers, bidir)[1]
    assert (unmasked_hn - hn).abs().max() > 1e-6

    leaves = [x, h0] + ([c0] if c0 is not None else []) + list(m.parameters())
    g = torch.Generator().manual_seed(2)
    dy, dh = (
        torch.randn(out.shape, generator=g, dtype=DT),
        torch.randn(hn.shape, generator=g, dtype=DT),
    )

    def loss(o, h):
        return (o * dy).sum() + (h * dh).sum()

    for a, b in zip(torch.autograd.grad(loss(r_out, r_hn), leaves),
                    torch.autograd.grad(loss(out, hn), leaves), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("mode", MODES)
def test_stack_edge_sizes(mode):
    """T=1 and B=1, and lengths all equal to T (no masking in effect)."""
    m = _net(mode, 2, True, True, 0)
    x = torch.randn(1, 1, I, dtype=DT)
    h0, c0 = _states(mode, 2, True, 0, 1)
    out, hid = m(x, (h0, c0) if mode == "LSTM" else h0)
    hn = hid[0] if mode == "LSTM" else hid
    for lengths in (None, torch.tensor([1])):
        r_out, r_hn, _ = reference.stack(mode, x, h0, c0, weights_of(m), 2, True, lengths)
        torch.testing.assert_close(r_out, out, **TOL)
        torch.testing.assert_close(r_hn, hn, **TOL)
