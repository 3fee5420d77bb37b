"""LSTM variants (peephole, coupled input/forget gates) on the CPU path and in the reference."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence

import fused_rnn
from fused_rnn import reference
from fused_rnn.reference import CellWeights

VARIANTS = [(True, False), (False, True), (True, True)]
VARIANT_IDS = ["peephole", "cifg", "peephole-cifg"]

# float64 throughout: the loop path and the reference do the same arithmetic in a different
# order, so they agree to a few ulps of the values involved.
RTOL, ATOL = 1e-10, 1e-12


def hand_step(x, h, c, w_ih, w_hh, b, p, coupled):
    """An independent per-step LSTM with the variants, written gate by gate from the row blocks."""
    H = c.shape[-1]
    rows = ["f", "g", "o"] if coupled else ["i", "f", "g", "o"]
    pre = {}
    for k, name in enumerate(rows):
        sl = slice(k * H, (k + 1) * H)
        pre[name] = x @ w_ih[sl].T + h @ w_hh[sl].T + (0 if b is None else b[sl])
    peep = {}
    if p is not None:
        names = ["f", "o"] if coupled else ["i", "f", "o"]
        peep = {name: p[k * H : (k + 1) * H] for k, name in enumerate(names)}
    f = torch.sigmoid(pre["f"] + peep.get("f", 0) * c)
    i = 1 - f if coupled else torch.sigmoid(pre["i"] + peep.get("i", 0) * c)
    c_new = f * c + i * torch.tanh(pre["g"])
    o = torch.sigmoid(pre["o"] + peep.get("o", 0) * c_new)
    return o * torch.tanh(c_new), c_new


@pytest.mark.parametrize("peephole,coupled", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_reference_matches_hand_formula(peephole, coupled, bias):
    B, I, H, T = 3, 5, 7, 6
    G = 3 if coupled else 4
    dt = torch.float64
    w = CellWeights(
        torch.randn(G * H, I, dtype=dt),
        torch.randn(G * H, H, dtype=dt),
        torch.randn(G * H, dtype=dt) if bias else None,
        torch.randn(G * H, dtype=dt) if bias else None,
        None,
        torch.randn((2 if coupled else 3) * H, dtype=dt) if peephole else None,
    )
    x = torch.randn(T, B, I, dtype=dt)
    h0, c0 = torch.randn(B, H, dtype=dt), torch.randn(B, H, dtype=dt)
    y, hT, cT = reference.recurrence("LSTM", x, h0, c0, w, coupled=coupled)
    h, c = h0, c0
    b = None if not bias else w.b_ih + w.b_hh
    for t in range(T):
        h, c = hand_step(x[t], h, c, w.w_ih, w.w_hh, b, w.w_ch, coupled)
        torch.testing.assert_close(y[t], h, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(hT, h, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(cT, c, rtol=RTOL, atol=ATOL)


def test_variants_off_is_nn_lstm():
    torch.manual_seed(3)
    a = nn.LSTM(4, 6, 2)
    torch.manual_seed(3)
    b = fused_rnn.LSTM(4, 6, 2, peephole=False, coupled_gates=False)
    assert list(a.state_dict()) == list(b.state_dict())
    x = torch.randn(5, 2, 4)
    torch.testing.assert_close(b(x)[0], a(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("peephole,coupled", VARIANTS, ids=VARIANT_IDS)
def test_parameter_layout(peephole, coupled):
    m = fused_rnn.LSTM(4, 6, 2, bidirectional=True, proj_size=3, peephole=peephole,
                       coupled_gates=coupled)  # fmt: skip
    G = 3 if coupled else 4
    sd = m.state_dict()
    assert sd["weight_ih_l0"].shape == (G * 6, 4)
    assert sd["weight_hh_l0_reverse"].shape == (G * 6, 3)
    assert sd["bias_ih_l1"].shape == (G * 6,)
    assert sd["weight_ih_l1"].shape == (G * 6, 2 * 3)
    stems = [n.split("_l0")[0] for n in sd if n.endswith("_l0")]
    assert stems == ["weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"] + (
        ["weight_ch"] if peephole else []
    )
    if peephole:
        assert sd["weight_ch_l1_reverse"].shape == ((2 if coupled else 3) * 6,)
        bound = 1 / 6**0.5
        assert sd["weight_ch_l0"].abs().max() <= bound
        assert sd["weight_ch_l0"].abs().max() > 0
    else:
        assert not any("weight_ch" in k for k in sd)
    # round trip into a fresh module of the same kind
    m2 = fused_rnn.LSTM(4, 6, 2, bidirectional=True, proj_size=3, peephole=peephole,
                        coupled_gates=coupled)  # fmt: skip
    m2.load_state_dict(sd, strict=True)
    x = torch.randn(3, 2, 4)
    torch.testing.assert_close(m2(x)[0], m(x)[0], rtol=0, atol=0)


def _module_reference(m, x, h0, c0, lengths=None):
    return reference.stack(
        "LSTM", x, h0, c0, m._cell_weights(), m.num_layers, m.bidirectional, lengths,
        coupled=m.coupled_gates,
    )  # fmt: skip


@pytest.mark.parametrize("peephole,coupled", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize(
    "layers,bidir,proj,batch_first",
    [(1, False, 0, False), (2, True, 0, True), (2, False, 3, False), (1, True, 4, True)],
    ids=["L1", "L2-bidir-bf", "L2-proj", "L1-bidir-proj-bf"],
)
def test_module_matches_reference(peephole, coupled, layers, bidir, proj, batch_first):
    dt = torch.float64
    m = fused_rnn.LSTM(5, 6, layers, bidirectional=bidir, proj_size=proj, batch_first=batch_first,
                       peephole=peephole, coupled_gates=coupled, dtype=dt)  # fmt: skip
    D = 2 if bidir else 1
    R = proj or 6
    T, B = 4, 3
    x = torch.randn(B, T, 5, dtype=dt) if batch_first else torch.randn(T, B, 5, dtype=dt)
    h0 = torch.randn(layers * D, B, R, dtype=dt, requires_grad=True)
    c0 = torch.randn(layers * D, B, 6, dtype=dt, requires_grad=True)
    x.requires_grad_(True)
    y, (hn, cn) = m(x, (h0, c0))
    xr = x.transpose(0, 1) if batch_first else x
    y_ref, hn_ref, cn_ref = _module_reference(m, xr, h0, c0)
    y_ref = y_ref.transpose(0, 1) if batch_first else y_ref
    for a, b in ((y, y_ref), (hn, hn_ref), (cn, cn_ref)):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    dy, dh, dc = torch.randn_like(y), torch.randn_like(hn), torch.randn_like(cn)
    inputs = [x, h0, c0, *m.parameters()]
    g = torch.autograd.grad((y * dy).sum() + (hn * dh).sum() + (cn * dc).sum(), inputs)
    g_ref = torch.autograd.grad(
        (y_ref * dy).sum() + (hn_ref * dh).sum() + (cn_ref * dc).sum(), inputs
    )
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("peephole,coupled", VARIANTS, ids=VARIANT_IDS)
def test_packed_variants(peephole, coupled):
    dt = torch.float64
    m = fused_rnn.LSTM(3, 5, 2, bidirectional=True, peephole=peephole, coupled_gates=coupled,
                       dtype=dt)  # fmt: skip
    seqs = [torch.randn(n, 3, dtype=dt) for n in (2, 5, 1, 4)]
    packed = pack_sequence(seqs, enforce_sorted=False)
    h0 = torch.randn(4, 4, 5, dtype=dt)
    c0 = torch.randn(4, 4, 5, dtype=dt)
    out, (hn, cn) = m(packed, (h0, c0))
    assert torch.equal(out.sorted_indices, packed.sorted_indices)
    y, lengths = pad_packed_sequence(out)
    x = nn.utils.rnn.pad_sequence(seqs)
    y_ref, hn_ref, cn_ref = _module_reference(m, x, h0, c0, torch.tensor([2, 5, 1, 4]))
    torch.testing.assert_close(y, y_ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(hn, hn_ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(cn, cn_ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("peephole,coupled", VARIANTS, ids=VARIANT_IDS)
def test_gradcheck(peephole, coupled):
    dt = torch.float64
    m = fused_rnn.LSTM(2, 3, 2, bidirectional=True, proj_size=2, peephole=peephole,
                       coupled_gates=coupled, dtype=dt)  # fmt: skip
    x = torch.randn(3, 2, 2, dtype=dt, requires_grad=True)
    h0 = torch.randn(4, 2, 2, dtype=dt, requires_grad=True)
    c0 = torch.randn(4, 2, 3, dtype=dt, requires_grad=True)
    params = dict(m.named_parameters())
    names = list(params)

    def f(x, h0, c0, *ps):
        y, (hn, cn) = torch.func.functional_call(m, dict(zip(names, ps)), (x, (h0, c0)))
        return y, hn, cn

    assert torch.autograd.gradcheck(f, (x, h0, c0, *params.values()))


@pytest.mark.parametrize("peephole,coupled", VARIANTS, ids=VARIANT_IDS)
def test_cell_matches_hand_formula(peephole, coupled):
    dt = torch.float64
    cell = fused_rnn.LSTMCell(4, 5, peephole=peephole, coupled_gates=coupled, dtype=dt)
    x = torch.randn(3, 4, dtype=dt)
    h, c = torch.randn(3, 5, dtype=dt), torch.randn(3, 5, dtype=dt)
    h1, c1 = cell(x, (h, c))
    p = cell.weight_ch if peephole else None
    h_ref, c_ref = hand_step(x, h, c, cell.weight_ih, cell.weight_hh,
                             cell.bias_ih + cell.bias_hh, p, coupled)  # fmt: skip
    torch.testing.assert_close(h1, h_ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(c1, c_ref, rtol=RTOL, atol=ATOL)
    # unbatched
    h2, c2 = cell(x[0], (h[0], c[0]))
    torch.testing.assert_close(h2, h_ref[0], rtol=RTOL, atol=ATOL)
    assert "weight_ch" in dict(cell.named_parameters()) if peephole else True
    g = torch.autograd.grad(h1.sum() + c1.sum(), list(cell.parameters()))
    assert all(torch.isfinite(t).all() and t.abs().sum() > 0 for t in g)


def test_variant_construction_errors():
    with pytest.raises(TypeError):
        fused_rnn.LSTM(3, 4, peephole=1)
    with pytest.raises(TypeError):
        fused_rnn.LSTMCell(3, 4, coupled_gates="yes")
    with pytest.raises(TypeError):
        fused_rnn.GRU(3, 4, peephole=True)
    with pytest.raises(TypeError):
        fused_rnn.RNN(3, 4, coupled_gates=True)
    with pytest.raises(TypeError):
        fused_rnn.LSTM(3, 4, 1, True, False, 0.0, False, 0, None, None, True)  # keyword-only
    with pytest.raises(ValueError):
        fused_rnn.LSTM(3, 4, peephole=True, backend="bogus")
    assert "peephole=True, coupled_gates=True" in repr(
        fused_rnn.LSTM(3, 4, peephole=True, coupled_gates=True)
    )


def test_variant_state_dict_rejected_by_nn_lstm():
    m = fused_rnn.LSTM(3, 4, peephole=True)
    with pytest.raises(RuntimeError, match="weight_ch_l0"):
        nn.LSTM(3, 4).load_state_dict(m.state_dict())
