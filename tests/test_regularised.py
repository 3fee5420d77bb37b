"""Zoneout, recurrent dropout and layer norm: every backend against the float64 reference.

* The generator: fused_rnn._rng's Philox4x32-10 against the published known-answer vectors
  (Salmon et al. 2011, Random123's kat_vectors), the Triton helper of the kernels against it bit
  for bit under the interpreter, the statistics of the masks, reproducibility under a seed.
* The modules (backend "torch", the generic stack and its operators) against
  fused_rnn.reference.stack in float64, outputs, final states and every gradient, with the
  masks replayed from the documented RNG consumption (one (seed, offset) draw per forward for
  zoneout, then one (B, R) bernoulli draw per layer-direction for recurrent dropout), for every
  option with layers, bidirectional, packed sequences, proj_size and the LSTM variants.
* Gradients: gradcheck and gradgradcheck (second order) of the operators' entry points.
* Statistics: the fraction of units kept, the evaluation-mode expectation (the mean of many
  training steps), the dropout masks' mean and variance.
* The module API: parameters (names, order, init, state_dict), extra_repr, the cells, errors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

import fused_rnn  # noqa: E402
from fused_rnn import _ops, _rng, reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64 = dict(dtype=torch.float64, device=DEVICE)
# float64 on both sides: the loop, its analytic backward and the reference do the same maths in
# another order, so they agree to float64 rounding (~1e-15 relative); 1e-10 leaves room for the
# sums over steps, rows and layers
TOL64 = 1e-10
CLASSES = {"LSTM": fused_rnn.LSTM, "GRU": fused_rnn.GRU, "RNN_TANH": fused_rnn.RNN}


# ============================================================================ the generator


# Random123's kat_vectors for philox4x32_10: counter (4 words), key (2 words), output (4 words)
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr, key, want", KAT)
def test_philox_known_answers(ctr, key, want):
    k = key[0] | (key[1] << 32)
    k = k - (1 << 64) if k >= 1 << 63 else k  # the int64 with those bits
    c0 = torch.tensor([ctr[0]], dtype=torch.int64)
    got = _rng.philox(k, c0, *ctr[1:])
    assert [int(v) for v in got] == list(want)


def test_keep_mask_statistics_and_streams():
    rng = torch.tensor([123456789, 42])
    B, W, T = 64, 48, 40
    for p in (0.1, 0.5, 0.9):
        keep = _rng.keep_masks(rng, range(T), B, W, 0, _rng.WHICH_H, p)
        n = keep.numel()
        frac = keep.double().mean().item()
        # binomial: 5 standard deviations of the mean of n Bernoulli(p) draws
        assert abs(frac - p) < 5 * (p * (1 - p) / n) ** 0.5
    # distinct streams (layer-direction, c or h) and steps are (nearly) uncorrelated
    a = _rng.keep_masks(rng, range(T), B, W, 0, _rng.WHICH_H, 0.5).double()
    others = [
        _rng.keep_masks(rng, range(T), B, W, 1, _rng.WHICH_H, 0.5),
        _rng.keep_masks(rng, range(T), B, W, 0, _rng.WHICH_C, 0.5),
        _rng.keep_masks(rng, range(1, T + 1), B, W, 0, _rng.WHICH_H, 0.5),
        _rng.keep_masks(torch.tensor([123456789, 43]), range(T), B, W, 0, _rng.WHICH_H, 0.5),
    ]
    for b in others:
        corr = torch.corrcoef(torch.stack([a.flatten(), b.double().flatten()]))[0, 1].item()
        assert abs(corr) < 5 / a.numel() ** 0.5
    # neighbouring units of a row, which share a Philox counter (four words of it), and the
    # units four apart, which do not, are uncorrelated
    for lag in (1, 2, 3, 4):
        x, y = a[..., :-lag].flatten(), a[..., lag:].flatten()
        corr = torch.corrcoef(torch.stack([x, y]))[0, 1].item()
        assert abs(corr) < 5 / x.numel() ** 0.5, lag
    # a chunk of steps is the steps one by one
    one = torch.stack([_rng.keep_mask(rng, t, B, W, 3, 1, 0.3) for t in range(5)])
    assert torch.equal(one, _rng.keep_masks(rng, range(5), B, W, 3, 1, 0.3))
    assert not _rng.keep_masks(rng, range(3), B, W, 0, 0, 0.0).any()


def test_mask_words_layout():
    """Element e = b * W + j takes word e mod 4 of Philox of counter (e >> 2, t, 2 * stream +
    which, offset): the documented layout, which the kernels' `_zoneout_keep` repeats."""
    rng = torch.tensor([987654321, (2 << 32) + 77])  # a step offset of 2 in the high word
    B, W, t, stream, which = 3, 7, 5, 2, _rng.WHICH_C
    words = _rng.philox(987654321, torch.arange(6), t + 2, 2 * stream + which, 77)
    for p in (0.2, 0.7):
        keep = _rng.keep_mask(rng, t, B, W, stream, which, p)
        for e in range(B * W):
            u = int(words[e % 4][e // 4])
            assert bool(keep[e // W, e % W]) == ((u >> 1) < _rng.threshold(p)), (p, e)


def test_draw_follows_the_seed():
    torch.manual_seed(5)
    a = _rng.draw("cpu")
    torch.manual_seed(5)
    b = _rng.draw("cpu")
    c = _rng.draw("cpu")
    assert torch.equal(a, b) and not torch.equal(b, c)
    assert a.dtype == torch.int64 and a.shape == (2,)
    assert 0 <= int(a[1]) < 2**31 and int(a[0]) >= 0


# ============================================================================ modules vs reference


def _module(mode, *, layers=2, bi=True, proj=0, peep=False, coupled=False, zone=(0.0, 0.0),
            p=0.0, ln=False, backend="torch", H=7):  # fmt: skip
    kw = dict(zoneout=zone if mode == "LSTM" else zone[1], recurrent_dropout=p)
    if ln:
        kw["layer_norm"] = True
    if mode == "LSTM":
        kw.update(proj_size=proj, peephole=peep, coupled_gates=coupled)
    m = CLASSES[mode](5, H, layers, bidirectional=bi, backend=backend, **F64, **kw)
    with torch.no_grad():  # gains and biases away from their init, so that they matter
        for name, q in m.named_parameters():
            if "_ln_" in name:
                q.add_(torch.randn_like(q) * 0.3)
    return m


def _replay(m, mode, T, B, train, zone, p):
    """The masks the module draws at the seed just set: the zoneout (seed, offset) first, then a
    dropout mask per layer-direction (in the batch order the stack runs in)."""
    D = 2 if m.bidirectional else 1
    R, H = m.proj_size or m.hidden_size, m.hidden_size
    rng = _rng.draw(DEVICE) if train and zone != (0.0, 0.0) else None
    zh, zc, drop = [], [], []
    for k in range(m.num_layers * D):
        if train and p > 0:
            drop.append(torch.empty(B, R, **F64).bernoulli_(1 - p) / (1 - p))
        if rng is None:
            zh.append(float(zone[1]))
            zc.append(float(zone[0]))
        else:
            zh.append(_rng.keep_masks(rng, range(T), B, R, k, _rng.WHICH_H, zone[1]).double())
            zc.append(_rng.keep_masks(rng, range(T), B, H, k, _rng.WHICH_C, zone[0]).double())
    return dict(zone_h=zh, zone_c=zc if mode == "LSTM" else None, drop=drop or None)


def _rel(a, b):
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def check_module(mode, *, train=True, lens=False, layers=2, bi=True, proj=0, peep=False,
                 coupled=False, zone=(0.3, 0.2), p=0.25, ln=True, backend="torch", tol=TOL64,
                 T=5, B=4, H=7):  # fmt: skip
    """The module (float64) against reference.stack: output, final states, all gradients."""
    if mode != "LSTM":
        zone = (0.0, zone[1])
    m = _module(mode, layers=layers, bi=bi, proj=proj, peep=peep, coupled=coupled, zone=zone,
                p=p, ln=ln, backend=backend, H=H).train(train)  # fmt: skip
    D = 2 if bi else 1
    R = proj or m.hidden_size
    x = torch.randn(T, B, 5, **F64, requires_grad=True)
    h0 = torch.randn(layers * D, B, R, **F64, requires_grad=True)
    c0 = torch.randn(layers * D, B, m.hidden_size, **F64, requires_grad=True)
    hx = (h0, c0) if mode == "LSTM" else h0
    # descending lengths: the packed batch order is the caller's, so the replayed masks line up
    lengths = torch.linspace(T, 1, B).round().long() if lens else None  # from T down to 1
    torch.manual_seed(77)
    if lens:
        out, hn = m(pack_padded_sequence(x, lengths), hx)
        out = pad_packed_sequence(out, total_length=T)[0]
    else:
        out, hn = m(x, hx)
    hn, cn = hn if mode == "LSTM" else (hn, None)

    torch.manual_seed(77)
    masks = _replay(m, mode, T, B, train, zone, p)
    ref_out, ref_hn, ref_cn = reference.stack(
        mode, x, h0, c0 if mode == "LSTM" else None, m._cell_weights(), layers, bi, lengths,
        coupled, **masks,
    )  # fmt: skip
    outs = [out, hn] + ([cn] if cn is not None else [])
    refs = [ref_out, ref_hn] + ([ref_cn] if cn is not None else [])
    cot = [torch.randn_like(r) for r in refs]
    leaves = [x, h0] + ([c0] if mode == "LSTM" else []) + list(m.parameters())
    grads = torch.autograd.grad(sum((o * c).sum() for o, c in zip(outs, cot)), leaves)
    ref_grads = torch.autograd.grad(sum((r * c).sum() for r, c in zip(refs, cot)), leaves)
    names = ["out", "h_n", "c_n"][: len(outs)] + ["dx", "dh0"] + (["dc0"] if cn is not None else [])
    names += ["d" + n for n, _ in m.named_parameters()]
    errs = {n: _rel(a, b) for n, a, b in zip(names, outs + list(grads), refs + list(ref_grads))}
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"relative errors over {tol:.0e}: {bad}"
    return m


MODES = ["LSTM", "GRU", "RNN_TANH"]


@pytest.mark.parametrize("lens", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", MODES)
def test_all_options_match_reference(native_off, mode, train, lens):
    check_module(mode, train=train, lens=lens, ln=mode != "RNN_TANH")


@pytest.mark.parametrize(
    "opts",
    [
        dict(zone=(0.3, 0.2), p=0.0, ln=False),
        dict(zone=(0.0, 0.0), p=0.3, ln=False),
        dict(zone=(0.0, 0.0), p=0.0, ln=True),
        dict(zone=(0.0, 0.4), p=0.0, ln=False),
        dict(zone=(0.5, 0.0), p=0.0, ln=True),
    ],
    ids=["zoneout", "rec-dropout", "layernorm", "zoneout-h", "zoneout-c-ln"],
)
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_each_option_alone(native_off, mode, opts):
    check_module(mode, layers=1, bi=False, **opts)


@pytest.mark.parametrize(
    "variant",
    [dict(proj=3), dict(peep=True), dict(coupled=True), dict(peep=True, coupled=True, proj=2)],
    ids=["proj", "peephole", "coupled", "peep-coupled-proj"],
)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_lstm_variants(native_off, variant, train):
    check_module("LSTM", train=train, lens=True, **variant)


def test_relu_rnn_and_one_direction(native_off):
    m = _module("RNN_TANH")
    assert m.mode == "RNN_TANH"
    check_module("RNN_TANH", bi=False, layers=3, ln=False)


def test_batch_first_and_unbatched_match_sequence_first():
    m = _module("LSTM", zone=(0.2, 0.3), p=0.2, ln=True, layers=1, bi=False)
    m.batch_first = True
    x = torch.randn(3, 4, 5, **F64)
    torch.manual_seed(3)
    y_bf, _ = m(x)
    m.batch_first = False
    torch.manual_seed(3)
    y_sf, _ = m(x.transpose(0, 1))
    assert torch.equal(y_bf, y_sf.transpose(0, 1))
    m.eval()
    y_one, _ = m(x[:, 0])  # unbatched (T, I): the evaluation path needs no masks
    torch.testing.assert_close(y_one, m(x[:, :1])[0][:, 0], rtol=0, atol=0)


# ============================================================================ determinism


@pytest.mark.parametrize("mode", MODES)
def test_same_seed_same_masks(mode):
    m = _module(mode, zone=(0.3, 0.3), p=0.3, ln=mode != "RNN_TANH")
    x = torch.randn(6, 3, 5, **F64)
    torch.manual_seed(11)
    a = m(x)[0]
    torch.manual_seed(11)
    b = m(x)[0]
    c = m(x)[0]
    assert torch.equal(a, b)
    assert not torch.equal(b, c)
    m.eval()
    assert torch.equal(m(x)[0], m(x)[0])


# ============================================================================ statistics


def test_zoneout_fraction_kept_in_the_states(native_off):
    """With W_hh = 0 and a constant input the candidate state is the same at every step, so the
    units that kept h0 show up exactly: their fraction is z at every step."""
    z = 0.3
    m = fused_rnn.GRU(2, 32, zoneout=z, backend="torch", **F64)
    with torch.no_grad():
        m.weight_hh_l0.zero_()
        m.bias_hh_l0.zero_()
    B, T = 256, 3
    x = torch.ones(T, B, 2, **F64)
    h0 = torch.full((1, B, 32), 5.0, **F64)  # far from any candidate (|h̃| < 5)
    y, _ = m(x, h0)
    kept = (y == 5.0).double()
    # a unit still at 5 kept at every step so far: z^(t+1)
    for t in range(T):
        frac = kept[t].mean().item()
        n = kept[t].numel()
        want = z ** (t + 1)
        assert abs(frac - want) < 5 * (want * (1 - want) / n) ** 0.5, (t, frac, want)


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_evaluation_is_the_expectation_of_training(native_off, mode):
    """One step: h_1 = d h0 + (1 - d) h̃ with h̃ independent of d, so the mean over many
    training forwards is z h0 + (1 - z) h̃, the evaluation output."""
    z = 0.4
    m = _module(mode, layers=1, bi=False, zone=(z, z), ln=mode != "RNN_TANH")
    x = torch.randn(1, 8, 5, **F64)
    h0 = torch.randn(1, 8, 7, **F64)
    hx = (h0, torch.randn(1, 8, 7, **F64)) if mode == "LSTM" else h0
    m.eval()
    want = m(x, hx)[0]
    m.train()
    n = 400
    runs = torch.stack([m(x, hx)[0] for _ in range(n)])
    # per element: the mean of n draws of d (h0 - h̃) + h̃, within 5 standard deviations
    spread = (h0 - (want - z * h0) / (1 - z)).abs() * (z * (1 - z) / n) ** 0.5
    assert ((runs.mean(0) - want).abs() <= 5 * spread + 1e-12).all()
    assert (runs.std(0) > 0).any()


def test_recurrent_dropout_masks():
    """One (B, R) mask per layer-direction: 0 with probability p, else 1/(1-p) (mean 1,
    variance p / (1 - p)), the same at every step and different between layer-directions."""
    from fused_rnn import functional

    p = 0.3
    h0 = torch.zeros(4000, 8, **F64)
    m = functional._recurrent_dropout_mask(p, h0)
    assert m.dtype == torch.float64
    assert set(m.unique().tolist()) <= {0.0, 1 / (1 - p)}
    n = m.numel()
    assert abs((m == 0).double().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5
    assert abs(m.mean().item() - 1) < 5 * (p / (1 - p) / n) ** 0.5
    assert abs(m.var().item() - p / (1 - p)) < 0.05
    assert not torch.equal(m, functional._recurrent_dropout_mask(p, h0))


def test_recurrent_dropout_is_per_sequence(native_off):
    """The same mask at every step: a module whose W_hh is the identity on one unit and zero
    elsewhere passes that unit's dropped h from step to step; dropped units read 0 every step."""
    m = fused_rnn.RNN(1, 16, recurrent_dropout=0.5, bias=False, backend="torch", **F64)
    with torch.no_grad():
        m.weight_ih_l0.fill_(0.0)
        m.weight_hh_l0.copy_(torch.eye(16, **F64) * 0.5)
    x = torch.zeros(5, 64, 1, **F64)
    h0 = torch.full((1, 64, 16), 0.5, **F64)
    y, _ = m(x, h0)
    dead = y[0] == 0  # units whose mask is 0: zero at step 0 ...
    assert dead.any() and (~dead).any()
    assert (y[:, dead] == 0).all()  # ... and at every later step
    assert (y[:, ~dead] != 0).all()


def test_training_without_options_draws_nothing():
    """Options off: no generator draw, so torch.nn's random stream is untouched."""
    m = fused_rnn.LSTM(5, 7, backend="torch")
    x = torch.randn(3, 2, 5)
    torch.manual_seed(1)
    m(x)
    after = torch.rand(1)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(1), after)


# ============================================================================ gradients


def _leaf(*shape, scale=1.0):
    return (torch.randn(*shape, **F64) * scale).requires_grad_()


def _op_case(mode, *, zone=0.3, train=True, drop=True, ln=True, proj=0, peep=False,
             lens=False, reverse=False):  # fmt: skip
    """(function, inputs) of one layer-direction through the operator entry points, tiny."""
    T, B, H = 3, 2, 3
    G = {"LSTM": 4, "GRU": 3}.get(mode, 1)
    R = proj or H
    rng = torch.tensor([987654321, 5], device=DEVICE) if train else None
    lengths = torch.tensor([3, 2], device=DEVICE) if lens else None
    mask = torch.tensor([[2.0, 0.0, 2.0], [0.0, 2.0, 2.0]], **F64)[:, :R] if drop else None
    ins = [_leaf(T, B, G * H), _leaf(B, R), _leaf(G * H, R, scale=0.5)]
    if mode == "LSTM":
        ins.insert(2, _leaf(B, H))
        ins += [_leaf(proj, H, scale=0.5) if proj else None]
        ins += [_leaf(3 * H, scale=0.5) if peep else None]
        ins += [_leaf(G * H, scale=0.5) + 1 if ln else None]
        ins += [_leaf(H, scale=0.5) + 1 if ln else None, _leaf(H, scale=0.3) if ln else None]
    elif mode == "GRU":
        ins += [_leaf(H), _leaf(G * H, scale=0.5) + 1 if ln else None]
    ins = [t.detach().requires_grad_() if t is not None else None for t in ins]
    names = [i for i, t in enumerate(ins) if t is not None]

    def f(*args):
        full = list(ins)
        for i, a in zip(names, args):
            full[i] = a
        if mode == "LSTM":
            gx, h0, c0, w_hh, w_hr, w_ch, ln_hh, ln_cw, ln_cb = full
            return _ops.lstm_recurrence(
                gx, h0, c0, w_hh, w_hr, w_ch, lengths, reverse, False, "torch", rng=rng,
                zoneout_c=zone, zoneout_h=zone / 2, stream=1, drop=mask, ln_hh=ln_hh,
                ln_c_w=ln_cw, ln_c_b=ln_cb,
            )  # fmt: skip
        if mode == "GRU":
            gx, h0, w_hh, b_hn, ln_hh = full
            return _ops.gru_recurrence(0, gx, h0, w_hh, b_hn, lengths, reverse, "torch",
                                       rng=rng, zoneout=zone, drop=mask, ln_hh=ln_hh)  # fmt: skip
        gx, h0, w_hh = full
        return _ops.gru_recurrence(1, gx, h0, w_hh, None, lengths, reverse, "torch", rng=rng,
                                   zoneout=zone, drop=mask)  # fmt: skip

    return f, [ins[i] for i in names]


GRAD_CASES = {
    "LSTM-all": ("LSTM", {}),
    "LSTM-eval-proj-peep-lens": ("LSTM", dict(train=False, proj=2, peep=True, lens=True)),
    "LSTM-train-lens-rev": ("LSTM", dict(lens=True, reverse=True)),
    "GRU-all": ("GRU", {}),
    "GRU-eval-lens-rev": ("GRU", dict(train=False, lens=True, reverse=True)),
    "RNN-all": ("RNN_TANH", dict(ln=False)),
    "RNN-eval-lens": ("RNN_TANH", dict(ln=False, train=False, lens=True)),
}


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_gradcheck_torch_operators(case):
    mode, kw = GRAD_CASES[case]
    f, ins = _op_case(mode, **kw)
    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("case", ["LSTM-all", "LSTM-eval-proj-peep-lens", "GRU-all", "RNN-all"])
def test_gradgradcheck_torch_operators(case):
    mode, kw = GRAD_CASES[case]
    f, ins = _op_case(mode, **kw)
    assert torch.autograd.gradgradcheck(f, ins, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_opcheck_with_options(mode):
    """The operators' schemas, fake implementations and autograd registration with options."""
    f, ins = _op_case(mode, ln=mode != "RNN_TANH", lens=True)
    T, B = ins[0].shape[:2]
    rng = torch.tensor([3, 4], device=DEVICE)
    drop = torch.ones(B, ins[1].shape[-1], **F64)
    if mode == "LSTM":
        gx, h0, c0, w_hh, ln_hh, ln_cw, ln_cb = ins
        args = (gx, h0, c0, w_hh, None, None, torch.tensor([3, 2]), False, False, True, "torch",
                rng, 0.2, 0.1, 2, drop, ln_hh, ln_cw, ln_cb)  # fmt: skip
        torch.library.opcheck(torch.ops.fused_rnn.lstm_fwd.default, args)
        with torch.no_grad():
            y, h_T, c_T, hs, cs, gates, ms, aux = torch.ops.fused_rnn.lstm_fwd(*args)
        assert aux.shape == (T, B, gx.shape[-1] + 3)
        bargs = (torch.randn_like(y), torch.randn_like(h_T), torch.randn_like(c_T), hs, cs,
                 gates, ms, w_hh.detach(), None, None, torch.tensor([3, 2]), False, False,
                 [True] * 4 + [False] * 2 + [True] * 3, "torch", aux, rng, 0.2, 0.1, 2, drop,
                 ln_hh.detach(), ln_cw.detach(), ln_cb.detach())  # fmt: skip
        torch.library.opcheck(torch.ops.fused_rnn.lstm_bwd.default, bargs)
    else:
        cell = _ops.cell_of(mode)
        gx, h0, w_hh, *rest = ins
        b_hn, ln_hh = (rest + [None, None])[:2]
        args = (gx, h0, w_hh, b_hn, torch.tensor([3, 2]), True, cell, True, "torch", rng, 0.3, 1,
                drop, ln_hh)  # fmt: skip
        torch.library.opcheck(torch.ops.fused_rnn.gru_fwd.default, args)
        with torch.no_grad():
            y, h_T, hs, ws, aux = torch.ops.fused_rnn.gru_fwd(*args)
        assert ws.numel() > 0  # the RNN keeps h̃ under zoneout
        needs = [True, True, True, b_hn is not None, ln_hh is not None]
        bargs = (torch.randn_like(y), torch.randn_like(h_T), hs, ws, w_hh.detach(),
                 torch.tensor([3, 2]), True, cell, needs, "torch",
                 aux if ln_hh is not None else None, rng, 0.3, 1, drop,
                 None if ln_hh is None else ln_hh.detach())  # fmt: skip
        torch.library.opcheck(torch.ops.fused_rnn.gru_bwd.default, bargs)


@pytest.mark.parametrize("backend", ["torch", "stepwise"])
def test_module_second_order(native_off, backend):
    """create_graph through a regularised module: the Hessian-vector product w.r.t. x equals
    the reference's (the same masks replayed); on the stepwise backend too (the operators'
    double backward recomputes the layer with the same masks)."""
    if backend not in fused_rnn.available_backends(DEVICE) and backend != "torch":
        pytest.skip("no fused backend (Triton) on this machine")
    m = _module("LSTM", layers=1, bi=False, zone=(0.3, 0.2), p=0.3, ln=True, backend=backend)
    m.train()
    x = torch.randn(3, 2, 5, **F64, requires_grad=True)
    v = torch.randn_like(x)

    def hvp(run):
        out = run()
        (g,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad((g * v).sum(), x)[0]

    torch.manual_seed(9)
    got = hvp(lambda: m(x)[0])
    torch.manual_seed(9)
    masks = _replay(m, "LSTM", 3, 2, True, (0.3, 0.2), 0.3)
    zero = torch.zeros(1, 2, 7, **F64)
    want = hvp(lambda: reference.stack("LSTM", x, zero, zero, m._cell_weights(), 1, False,
                                       **masks)[0])  # fmt: skip
    assert _rel(got, want) < TOL64


# ============================================================================ the module API


def test_parameters_and_state_dict():
    torch.manual_seed(0)
    ref = nn.LSTM(5, 7, 2, bidirectional=True, proj_size=3)
    torch.manual_seed(0)
    m = fused_rnn.LSTM(5, 7, 2, bidirectional=True, proj_size=3, layer_norm=True)
    names = [n for n, _ in m.named_parameters()]
    ln = ["weight_ln_ih", "bias_ln_ih", "weight_ln_hh", "bias_ln_hh", "weight_ln_c", "bias_ln_c"]
    want = []
    for k in ("l0", "l0_reverse", "l1", "l1_reverse"):
        own = [n for n, _ in ref.named_parameters() if n.endswith("_" + k)]
        layer, _, rev = k.partition("_")
        want += own + [f"{s}_{layer}" + (f"_{rev}" if rev else "") for s in ln]
    assert names == want  # after the existing parameters of each layer-direction
    for n, q in ref.named_parameters():  # the same init draws as torch.nn for the seed
        assert torch.equal(getattr(m, n), q)
    for n, q in m.named_parameters():
        if "_ln_" in n:
            assert torch.equal(q, torch.ones_like(q) if n.startswith("weight") else q * 0)
            assert q.shape == ((28,) if "_ln_c_" not in n else (7,))
    assert list(m.state_dict()) == want
    # the options off: parameters and state_dict exactly torch.nn's
    plain = fused_rnn.LSTM(5, 7, zoneout=0.1, recurrent_dropout=0.2)
    assert list(plain.state_dict()) == list(nn.LSTM(5, 7).state_dict())
    gru = fused_rnn.GRU(5, 4, layer_norm=True)
    assert [n for n, _ in gru.named_parameters()][-4:] == [
        "weight_ln_ih_l0", "bias_ln_ih_l0", "weight_ln_hh_l0", "bias_ln_hh_l0"
    ]  # fmt: skip
    assert gru.weight_ln_hh_l0.shape == (12,)
    m2 = fused_rnn.LSTM(5, 7, 2, bidirectional=True, proj_size=3, layer_norm=True)
    m2.load_state_dict(m.state_dict())


def test_extra_repr():
    m = fused_rnn.LSTM(5, 7, zoneout=(0.1, 0.2), recurrent_dropout=0.3, layer_norm=True)
    assert "zoneout=(0.1, 0.2), recurrent_dropout=0.3, layer_norm=True" in repr(m)
    assert "zoneout" not in repr(fused_rnn.GRU(5, 7))
    assert "zoneout=0.5, layer_norm=True" in repr(
        fused_rnn.GRUCell(5, 7, zoneout=0.5, layer_norm=True)
    )


@pytest.mark.parametrize(
    "cls, kw, exc",
    [
        (fused_rnn.LSTM, dict(zoneout=1.0), ValueError),
        (fused_rnn.LSTM, dict(zoneout=-0.1), ValueError),
        (fused_rnn.LSTM, dict(zoneout=(0.1, 0.2, 0.3)), ValueError),
        (fused_rnn.LSTM, dict(zoneout=(0.1, 1.5)), ValueError),
        (fused_rnn.LSTM, dict(zoneout="0.1"), ValueError),
        (fused_rnn.LSTM, dict(zoneout=True), ValueError),
        (fused_rnn.GRU, dict(zoneout=(0.1, 0.2)), ValueError),
        (fused_rnn.RNN, dict(zoneout=(0.1, 0.2)), ValueError),
        (fused_rnn.LSTM, dict(recurrent_dropout=1.0), ValueError),
        (fused_rnn.GRU, dict(recurrent_dropout=-1), ValueError),
        (fused_rnn.LSTM, dict(layer_norm=1), TypeError),
        (fused_rnn.RNN, dict(layer_norm=True), TypeError),
        (fused_rnn.LSTMCell, dict(zoneout=1.2), ValueError),
        (fused_rnn.GRUCell, dict(zoneout=(0.1, 0.1)), ValueError),
        (fused_rnn.RNNCell, dict(zoneout=-0.5), ValueError),
        (fused_rnn.GRUCell, dict(layer_norm="yes"), TypeError),
    ],
)
def test_bad_options(cls, kw, exc):
    with pytest.raises(exc):
        cls(5, 7, **kw)


def test_rnncell_has_no_layer_norm():
    with pytest.raises(TypeError):
        fused_rnn.RNNCell(5, 7, layer_norm=True)


# ============================================================================ cells


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_cells_match_reference(native_off, mode, train):
    ln = mode != "RNN_TANH"
    cls = {"LSTM": fused_rnn.LSTMCell, "GRU": fused_rnn.GRUCell, "RNN_TANH": fused_rnn.RNNCell}
    kw = {"layer_norm": True} if ln else {}
    zone = (0.3, 0.4) if mode == "LSTM" else 0.4
    m = cls[mode](5, 6, zoneout=zone, backend="torch", **F64, **kw).train(train)
    with torch.no_grad():
        for name, q in m.named_parameters():
            if "_ln_" in name:
                q.add_(torch.randn_like(q) * 0.3)
    names = [n for n, _ in m.named_parameters()]
    assert names[:4] == ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]
    if ln:
        assert names[4:8] == ["weight_ln_ih", "bias_ln_ih", "weight_ln_hh", "bias_ln_hh"]
    x = torch.randn(4, 5, **F64, requires_grad=True)
    h = torch.randn(4, 6, **F64, requires_grad=True)
    c = torch.randn(4, 6, **F64, requires_grad=True)
    torch.manual_seed(21)
    out = m(x, (h, c)) if mode == "LSTM" else (m(x, h), None)
    torch.manual_seed(21)
    zc, zh = zone if mode == "LSTM" else (0.0, zone)
    if train:
        rng = _rng.draw(DEVICE)
        zh = _rng.keep_masks(rng, [0], 4, 6, 0, _rng.WHICH_H, zh).double()
        zc = _rng.keep_masks(rng, [0], 4, 6, 0, _rng.WHICH_C, zc).double()
    w = reference.CellWeights(m.weight_ih, m.weight_hh, m.bias_ih, m.bias_hh)
    if ln:
        parts = ["ih", "hh"] + (["c"] if mode == "LSTM" else [])
        w = w._replace(**{f"{kind[0]}_ln_{part}": getattr(m, f"{kind}_ln_{part}")
                          for part in parts for kind in ("weight", "bias")})  # fmt: skip
    y, hT, cT = reference.recurrence(mode, x[None], h, c if mode == "LSTM" else None, w,
                                     zone_h=zh, zone_c=zc if mode == "LSTM" else None)  # fmt: skip
    assert _rel(out[0], hT) < TOL64
    if mode == "LSTM":
        assert _rel(out[1], cT) < TOL64
    g = torch.autograd.grad(out[0].sum(), [x, h] + list(m.parameters()))
    gr = torch.autograd.grad(hT.sum(), [x, h] + list(m.parameters()))
    for a, b in zip(g, gr):
        assert _rel(a, b) < TOL64


def test_cell_zoneout_draws_per_call():
    m = fused_rnn.GRUCell(5, 6, zoneout=0.5)
    x, h = torch.randn(16, 5), torch.randn(16, 6)
    torch.manual_seed(4)
    a = m(x, h)
    torch.manual_seed(4)
    assert torch.equal(a, m(x, h))
    assert not torch.equal(a, m(x, h))


# ============================================================================ stepwise kernels

FUSED = [b for b in ("stepwise", "persistent") if b in fused_rnn.available_backends(DEVICE)]
needs_fused = pytest.mark.skipif(not FUSED, reason="no fused backend (Triton) on this machine")

if FUSED:
    import triton
    import triton.language as tl

    from fused_rnn.kernels import _common

    @triton.jit
    def _masks_kernel(rng, out, t, z_stream, thr, B, W, WHICH: tl.constexpr, BLOCK: tl.constexpr):
        """(B, W) int8 zoneout masks of step t through the kernels' helper."""
        o_w = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        o_b = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = _common._zoneout_keep(rng, t, z_stream, o_w, o_b, W, WHICH, thr)
        m = (o_w[:, None] < W) & (o_b[None, :] < B)
        tl.store(out + o_b[None, :] * W + o_w[:, None], keep.to(tl.int8), mask=m)


@needs_fused
@pytest.mark.parametrize("W, B, T", [(33, 3, 4), (16, 1, 2), (5, 17, 3)])
def test_kernel_masks_bit_identical(W, B, T):
    """The kernels' `_zoneout_keep` (Triton's Philox: tl.philox, under the interpreter the
    numpy implementation in triton/runtime/interpreter.py) against fused_rnn._rng, bit for bit,
    for tiles that do not divide the shape."""
    rng = torch.tensor([2**62 + 12345, 2**31 - 7], device=DEVICE)
    for p, which, stream in ((0.3, 0, 0), (0.5, 1, 3), (0.97, 0, 5)):
        thr = _common.zoneout_threshold(p)
        assert thr == _rng.threshold(p)
        for t in range(T):
            out = torch.full((B, W), -1, dtype=torch.int8, device=DEVICE)
            grid = (triton.cdiv(W, 16), triton.cdiv(B, 16))
            _masks_kernel[grid](rng, out, t, stream, thr, B, W, which, 16)
            want = _rng.keep_mask(rng, t, B, W, stream, which, p)
            assert torch.equal(out.bool(), want) and (out >= 0).all()


KERNEL_CASES = {
    "LSTM-2l-packed": ("LSTM", dict(layers=2, bi=False, lens=True, ln=False)),
    "LSTM-ln-bi-packed": ("LSTM", dict(layers=1, lens=True)),
    "LSTM-ln-proj-peep-packed": ("LSTM", dict(proj=3, peep=True, lens=True, bi=False)),
    "LSTM-ln-coupled-eval": ("LSTM", dict(coupled=True, train=False, bi=False, layers=1)),
    "LSTM-ln-only": ("LSTM", dict(layers=1, bi=False, zone=(0.0, 0.0), p=0.0)),
    "GRU-bi-packed": ("GRU", dict(layers=1, lens=True, ln=False)),
    "GRU-ln-bi-packed": ("GRU", dict(layers=1, lens=True)),
    "GRU-ln-eval": ("GRU", dict(layers=1, bi=False, train=False)),
    "RNN-bi-packed": ("RNN_TANH", dict(layers=1, lens=True, ln=False)),
}


@needs_fused
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_stepwise_matches_reference(case):
    """The stepwise kernels with zoneout, recurrent dropout and layer norm (masks drawn in the
    kernels, the reference's from fused_rnn._rng: equal outputs prove equal masks), float64."""
    mode, kw = KERNEL_CASES[case]
    kw = {"zone": (0.3, 0.4), "p": 0.25, "ln": True, **kw}
    check_module(mode, backend="stepwise", **kw)


SMALL_TILE_CASES = {
    "LSTM-ln-zoneout-dropout": ("LSTM", dict(lens=True)),
    "LSTM-ln-proj": ("LSTM", dict(lens=True, proj=20)),
    "GRU-ln-zoneout-dropout": ("GRU", dict(lens=True)),
    "RNN-zoneout-dropout": ("RNN_TANH", dict(lens=True, ln=False)),
}


@needs_fused
@pytest.mark.parametrize("case", list(SMALL_TILE_CASES))
def test_stepwise_small_tiles(case, monkeypatch):
    """GPU-like tiling (16-wide tiles: 3 programs along H=33, 2 along B=17, phase 1 of layer
    norm in 9 or 7 blocks, multi-chunk products): the reductions across programs (the layer
    norms' statistics and backward row sums), masks and offsets of partial tiles."""
    from fused_rnn.kernels import gru, lstm

    for mod in (lstm, gru):
        monkeypatch.setattr(mod, "block_b", lambda B: 16)
        monkeypatch.setattr(mod, "block_h", lambda H, n_b=1: 16)
        monkeypatch.setattr(mod, "block_k", lambda K: 16)
    mode, kw = SMALL_TILE_CASES[case]
    kw = {"zone": (0.3, 0.3), "p": 0.25, "ln": True, **kw}
    check_module(mode, backend="stepwise", layers=1, bi=False, H=33, B=17, T=3, **kw)


@needs_fused
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_stepwise_inference_without_grad(mode):
    """No gradient wanted: layer norm's buffer is one reused slot, zoneout the expectation; the
    same outputs as with a gradient (which keep every step)."""
    m = _module(mode, layers=1, bi=False, zone=(0.3, 0.4), p=0.25, ln=True, backend="stepwise")
    m.eval()
    x = torch.randn(4, 3, 5, **F64)
    with torch.no_grad():
        y = m(x)[0]
    x.requires_grad_()
    y2 = m(x)[0]
    assert torch.equal(y, y2.detach())
    m.backend = "torch"
    assert _rel(y, m(x)[0].detach()) < TOL64


@needs_fused
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_stepwise_fp32_matches_torch_path(mode, native_off):
    """fp32 kernels against the fp32 torch loop with the same masks; 1e-5 relative: fp32
    rounding (~6e-8) over a few steps and products of width <= 28, with margin."""
    m = _module(mode, layers=1, bi=True, zone=(0.3, 0.4), p=0.25, ln=True).float().train()
    x = torch.randn(4, 3, 5, requires_grad=True)
    outs = {}
    for backend in ("stepwise", "torch"):
        m.backend = backend
        torch.manual_seed(2)
        y = m(x)[0]
        outs[backend] = (y, *torch.autograd.grad(y.square().sum(), [x, *m.parameters()]))
    for a, b in zip(outs["stepwise"], outs["torch"]):
        assert _rel(a.double(), b.double()) < 1e-5


_COMPILED_SCRIPT = """
import json
import torch
from fused_rnn.bench.host_cost import stub_cuda_driver
from fused_rnn.kernels import gru, lstm
from fused_rnn.kernels._launch import STATS

T, B, H, P = 5, 3, 20, 12
rng = torch.tensor([11, 7])
with stub_cuda_driver() as seen:
    for proj in (0, P):
        R = proj or H
        gx, h0, c0 = torch.randn(T, B, 4 * H), torch.randn(B, R), torch.randn(B, H)
        w_hh, drop = torch.randn(4 * H, R), torch.ones(B, R)
        w_hr = torch.randn(P, H) if proj else None
        for ln in (None, (torch.ones(4 * H), torch.ones(H), torch.zeros(H))):
            opts = (rng, 0.2, 0.3, 1, drop) + (ln or ())
            y, hs, cs, gates, ms, *aux = lstm.lstm_fwd(gx, h0, c0, w_hh, w_hr, None, None, False,
                                                       False, True, *opts)
            needs = (True,) * 4 + (proj > 0, False) + ((True,) * 3 if ln else ())
            lstm.lstm_bwd(y, h0, c0, hs, cs, gates, ms, w_hh, w_hr, None, None, False, False,
                          needs, aux[0] if aux else None, *opts)
    for cell, G, ln in ((gru.CELL_GRU, 3, None), (gru.CELL_RNN_TANH, 1, None),
                        (gru.CELL_GRU, 3, torch.ones(9 * H // 3))):
        gx, h0, drop = torch.randn(T, B, G * H), torch.randn(B, H), torch.ones(B, H)
        w_hh = torch.randn(G * H, H)
        y, hs, ws, *aux = gru.gru_fwd(cell, gx, h0, w_hh, None, None, True, True, rng, 0.25, 2,
                                      drop, ln)
        needs = (True, True, True, False) + ((True,) if ln is not None else ())
        gru.gru_bwd(cell, y, h0, hs, ws, w_hh, None, True, needs, aux[0] if aux else None, rng,
                    0.25, 2, drop, ln)
print(json.dumps({"stats": dict(STATS), "raw": seen.raw}))
"""


@pytest.mark.slow
@needs_fused
def test_option_kernels_compile_for_sm90_and_launch_lean():
    """The option kernels compiled for sm_90 (Triton's real compiler and launch path, under the
    stub CUDA driver of bench/host_cost.py: nothing runs): every argument binds (a kernel
    argument named like a launch option would not), tl.philox and the layer-norm kernels
    compile, and every stepwise loop takes the lean launch path."""
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0", FUSED_RNN_POISON="0")
    env.pop("FUSED_RNN_LEAN_LAUNCH", None)
    proc = subprocess.run([sys.executable, "-c", _COMPILED_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=1500)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import json

    res = json.loads(proc.stdout.strip().splitlines()[-1])
    # lean loops: LSTM fwd 1 + bwd 1, with proj 2 + 2; with layer norm fwd 3 + bwd 2, with
    # proj 4 + 3; GRU and RNN fwd 1 + bwd 1 each, the GRU with layer norm 2 + 1
    assert res["stats"].get("lean") == 25, res["stats"]
    assert not any(k.startswith("plain") for k in res["stats"]), res["stats"]
    assert res["raw"] > 0


# ============================================================================ compile, dtypes


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_torch_compile_fullgraph(train):
    """torch.compile (aot_eager, fullgraph: no graph break) of a layer with every option, on the
    torch backend: the same numbers as eager, the same random stream in training."""
    m = fused_rnn.LSTM(5, 7, 2, zoneout=(0.2, 0.3), recurrent_dropout=0.2, layer_norm=True,
                       backend="torch").train(train)  # fmt: skip
    x = torch.randn(4, 3, 5, requires_grad=True)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    torch.manual_seed(0)
    want = m(x)[0]
    (g_want,) = torch.autograd.grad(want.sum(), x)
    torch.manual_seed(0)
    got = compiled(x)[0]
    (g_got,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(g_got, g_want, rtol=1e-6, atol=1e-7)


@needs_fused
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_stepwise_half_precision(mode, dtype):
    """Every option in bf16 / fp16 on the stepwise kernels against the float64 module with the
    same (rounded) weights and the same masks: 3e-2 relative for bf16 (8-bit mantissa, products
    and h rounded every step), 5e-3 for fp16 (11 bits)."""
    tol = {torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    m = _module(mode, layers=1, bi=False, zone=(0.3, 0.4), p=0.25, ln=True, backend="stepwise")
    m = m.to(dtype).double().train()  # weights rounded through the half dtype
    half = _module(mode, layers=1, bi=False, zone=(0.3, 0.4), p=0.25, ln=True,
                   backend="stepwise").to(dtype).train()  # fmt: skip
    half.load_state_dict(m.state_dict())
    x = torch.randn(4, 3, 5, **F64).to(dtype)
    torch.manual_seed(6)
    y = half(x)[0]
    assert y.dtype == dtype
    m.backend = "torch"
    torch.manual_seed(6)
    ref = m(x.double())[0]
    assert _rel(y.double(), ref) < tol
