"""fused_rnn.RNN / LSTM / GRU against torch.nn on CPU: the drop-in contract.

Every comparison runs on two paths (the `path` fixture):
  native   the default backend="torch", which calls the ATen RNN op torch.nn itself calls;
  generic  the same module with torch's native op switched off (`native_off`): the generic
           stack (one GEMM for x W_ih^T over all steps, per-step torch loop, padding + lengths
           for packed input), i.e. the code the fused GPU backends share.
Weights are copied from the torch.nn module with a strict load_state_dict.

Loss: (y*dy).sum() + (h_n*dh).sum() (+ (c_n*dc).sum()) with random dy, dh, dc, so that the
gradients through the final states count as well as those through the output.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fused_rnn
import fused_rnn.functional as FF

# Tolerances by dtype and path.
# native: the same ATen op on the same weights and inputs, so the results are bit-identical.
# generic, float64: only the order of floating-point operations differs (x W_ih^T for all steps in
#   one GEMM with b_ih + b_hh folded in, addcmul/lerp in the cell); float64 rounding (~1e-16)
#   accumulated over a few layers and steps stays far below 1e-10.
# generic, float32: the same reordering in float32 (eps 1.2e-7); values are O(1) and sums are
#   short (<= 15 terms), so errors are a few ulp: 1e-5 leaves room for gradients summed over
#   steps and layers without hiding a real bug (a wrong gate or a missing term is O(0.1)).
TOL = {
    ("native", torch.float64): dict(rtol=0, atol=0),
    ("native", torch.float32): dict(rtol=0, atol=0),
    ("generic", torch.float64): dict(rtol=1e-10, atol=1e-12),
    ("generic", torch.float32): dict(rtol=1e-5, atol=1e-5),
}

I, H, P = 3, 5, 3  # odd sizes; P = proj_size < H


# ------------------------------------------------------------------------------------------------
# helpers


def make_pair(mode, *, dtype=torch.float64, **kw):
    """(ours, torch.nn) with identical weights (torch's copied into ours by a strict load)."""
    kw = dict(kw)
    if mode in ("RNN_TANH", "RNN_RELU"):
        kw["nonlinearity"] = "tanh" if mode == "RNN_TANH" else "relu"
        name = "RNN"
    else:
        name = mode
    ref = getattr(nn, name)(I, H, dtype=dtype, **kw)
    ours = getattr(fused_rnn, name)(I, H, dtype=dtype, **kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def split_out(mode, res):
    """(output, h_n, c_n or None) of a module call; checks the nesting torch uses."""
    out, hid = res
    if mode == "LSTM":
        assert type(hid) is tuple and len(hid) == 2
        return out, hid[0], hid[1]
    assert isinstance(hid, torch.Tensor)
    return out, hid, None


def assert_same(a, b, tol):
    torch.testing.assert_close(a, b, **tol)


@dataclass(frozen=True)
class Cfg:
    mode: str
    layers: int = 1
    bidir: bool = False
    bf: bool = False
    bias: bool = True
    proj: int = 0
    dropout: float = 0.0  # only ever run in eval mode in the grid
    form: str = "batched"  # batched | unbatched | packed (unsorted) | packed_sorted
    T: int = 4
    B: int = 3
    hx: bool = True
    fp32: bool = False  # also run in float32 (a representative subset, to keep the file fast)

    @property
    def id(self):
        s = [{"RNN_TANH": "RNN-tanh", "RNN_RELU": "RNN-relu"}.get(self.mode, self.mode)]
        s.append(f"L{self.layers}")
        s += ["bidir"] * self.bidir + ["bf"] * self.bf + ["nobias"] * (not self.bias)
        s += ["proj"] * bool(self.proj) + ["dropeval"] * bool(self.dropout)
        if self.form != "batched":
            s.append(self.form.replace("_", "-"))
        s += [f"T{self.T}"] * (self.T != 4) + [f"B{self.B}"] * (self.B != 3)
        s += ["nohx"] * (not self.hx)
        return "-".join(s)


def _grid():
    out = []
    for mode in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU"):

        def c(mode=mode, **kw):
            return Cfg(mode, **kw)

        out += [
            c(),
            c(hx=False),
            c(layers=2, bidir=True, fp32=True),
            c(layers=3, bf=True, bias=False),
            c(layers=2, bidir=True, bf=True, dropout=0.5),
            c(layers=2, bidir=True, form="unbatched", fp32=True),
            c(bf=True, form="unbatched", hx=False),
            c(layers=2, bidir=True, form="packed", fp32=True),
            c(layers=2, form="packed_sorted"),
            c(bidir=True, bf=True, form="packed", hx=False),
            c(layers=3, bidir=True, bias=False, form="packed", B=5, T=6),
            c(layers=2, bidir=True, T=1, B=1),
            c(bidir=True, form="packed", T=1),
            c(layers=2, form="packed", B=1),
        ]
        if mode == "LSTM":
            out += [
                c(proj=P),
                c(layers=2, bidir=True, bf=True, proj=P, fp32=True),
                c(layers=2, bidir=True, proj=P, form="packed", fp32=True),
                c(layers=2, proj=P, form="packed_sorted", hx=False),
                c(bidir=True, proj=P, form="unbatched"),
                c(layers=3, bias=False, proj=P, T=1, hx=False),
            ]
    return out


GRID = _grid()
assert len({c.id for c in GRID}) == len(GRID), "grid ids must be unique"
GRID_DTYPES = [pytest.param(c, torch.float64, id=f"{c.id}-fp64") for c in GRID] + [
    pytest.param(c, torch.float32, id=f"{c.id}-fp32") for c in GRID if c.fp32
]


def lengths_for(T, B, sort):
    """Per-sequence lengths in [1, T] with max == T, repeated and unsorted unless `sort`."""
    base = [2, T, 1, T, T - 1, 3]
    lens = [min(max(v, 1), T) for v in base[:B]] if B > 1 else [T]
    lens += [T] * (B - len(lens))
    return sorted(lens, reverse=True) if sort else lens


def make_inputs(cfg, dtype):
    """Leaf tensors (x, h0, c0 or None) and a function building the module input from x."""
    D = 2 if cfg.bidir else 1
    R = cfg.proj or H
    rows = cfg.layers * D
    if cfg.form == "unbatched":
        x = torch.randn(cfg.T, I, dtype=dtype)
        hshape, cshape = (rows, R), (rows, H)
    else:
        x = torch.randn(*((cfg.B, cfg.T) if cfg.bf else (cfg.T, cfg.B)), I, dtype=dtype)
        hshape, cshape = (rows, cfg.B, R), (rows, cfg.B, H)
    x.requires_grad_()
    h0 = c0 = None
    if cfg.hx:
        h0 = torch.randn(hshape, dtype=dtype, requires_grad=True)
        if cfg.mode == "LSTM":
            c0 = torch.randn(cshape, dtype=dtype, requires_grad=True)

    if cfg.form.startswith("packed"):
        sort = cfg.form == "packed_sorted"
        lens = torch.tensor(lengths_for(cfg.T, cfg.B, sort))

        def build(x):
            return pack_padded_sequence(x, lens, batch_first=cfg.bf, enforce_sorted=sort)
    else:

        def build(x):
            return x

    return x, h0, c0, build


def run_and_grad(mode, m, inp, h0, c0, leaves, seed=1):
    """Forward with the given hx, a loss over output and final states, and the gradients."""
    hx = None if h0 is None else ((h0, c0) if mode == "LSTM" else h0)
    out, hn, cn = split_out(mode, m(inp, hx))
    y = out.data if isinstance(out, PackedSequence) else out
    g = torch.Generator().manual_seed(seed)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
    loss = loss + (hn * torch.randn(hn.shape, generator=g, dtype=hn.dtype)).sum()
    if cn is not None:
        loss = loss + (cn * torch.randn(cn.shape, generator=g, dtype=cn.dtype)).sum()
    grads = torch.autograd.grad(loss, leaves + list(m.parameters()), allow_unused=False)
    return out, hn, cn, grads


# ------------------------------------------------------------------------------------------------
# the grid: outputs, final states and every gradient


@pytest.mark.parametrize("cfg,dtype", GRID_DTYPES)
def test_matches_torch(cfg, dtype, path):
    ours, ref = make_pair(
        cfg.mode, dtype=dtype, num_layers=cfg.layers, bidirectional=cfg.bidir,
        batch_first=cfg.bf, bias=cfg.bias, dropout=cfg.dropout,
        **({"proj_size": cfg.proj} if cfg.mode == "LSTM" else {}),
    )  # fmt: skip
    if cfg.dropout:
        ours.eval()
        ref.eval()
    tol = TOL[(path, dtype)]
    x, h0, c0, build = make_inputs(cfg, dtype)
    leaves = [t for t in (x, h0, c0) if t is not None]

    o_ref, h_ref, c_ref, g_ref = run_and_grad(cfg.mode, ref, build(x), h0, c0, leaves)
    o_our, h_our, c_our, g_our = run_and_grad(cfg.mode, ours, build(x), h0, c0, leaves)

    if cfg.form.startswith("packed"):
        assert isinstance(o_our, PackedSequence)
        assert_same(o_our.data, o_ref.data, tol)
        assert torch.equal(o_our.batch_sizes, o_ref.batch_sizes)
        for attr in ("sorted_indices", "unsorted_indices"):
            a, b = getattr(o_our, attr), getattr(o_ref, attr)
            assert (a is None) == (b is None), attr
            assert a is None or torch.equal(a, b), attr
    else:
        assert_same(o_our, o_ref, tol)
    assert_same(h_our, h_ref, tol)
    if cfg.mode == "LSTM":
        assert_same(c_our, c_ref, tol)
    else:
        assert c_our is None and c_ref is None
    names = ["x", "h0", "c0"][: len(leaves)] + [n for n, _ in ref.named_parameters()]
    assert len(g_our) == len(g_ref) == len(names)
    for name, a, b in zip(names, g_our, g_ref, strict=True):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"grad {name}: {m}")


def test_grid_exercises_both_paths(monkeypatch):
    """The native path calls ATen's op and never the generic stack; native_off the opposite."""
    ours, ref = make_pair("GRU", num_layers=2, bidirectional=True)
    x = torch.randn(4, 3, I, dtype=torch.float64)

    def boom(*a, **k):
        raise AssertionError("wrong path taken")

    with monkeypatch.context() as mp:
        mp.setattr(FF, "_recurrence_for", boom)
        torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=0, atol=0)
    with monkeypatch.context() as mp:
        mp.setattr(FF, "USE_NATIVE", False)
        mp.setattr(FF, "_native", boom)
        torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=1e-10, atol=1e-12)


def test_lstm_hx_as_list_and_nested_tuple_output(path):
    ours, ref = make_pair("LSTM", num_layers=2)
    x = torch.randn(4, 3, I, dtype=torch.float64)
    h0, c0 = torch.randn(2, 3, H, dtype=torch.float64), torch.randn(2, 3, H, dtype=torch.float64)
    out, hid = ours(x, [h0, c0])
    out_r, hid_r = ref(x, [h0, c0])
    assert type(hid) is tuple and len(hid) == 2
    tol = TOL[(path, torch.float64)]
    assert_same(out, out_r, tol)
    assert_same(hid[0], hid_r[0], tol)
    assert_same(hid[1], hid_r[1], tol)


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_batch_zero_returns_empty(mode, path):
    ours, ref = make_pair(mode, num_layers=2, bidirectional=True)
    x = torch.randn(4, 0, I, dtype=torch.float64)
    o, h, c = split_out(mode, ours(x))
    o_r, h_r, c_r = split_out(mode, ref(x))
    assert o.shape == o_r.shape == (4, 0, 2 * H)
    assert h.shape == h_r.shape == (4, 0, H)
    if mode == "LSTM":
        assert c.shape == c_r.shape


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_RELU"])
def test_default_hx_is_zeros_of_input_dtype(mode, path):
    """hx=None is the same as explicit zeros (with proj, h0 has width proj_size)."""
    kw = {"proj_size": P} if mode == "LSTM" else {}
    ours, _ = make_pair(mode, num_layers=2, bidirectional=True, **kw)
    x = torch.randn(4, 3, I, dtype=torch.float64)
    R = P if mode == "LSTM" else H
    h0 = torch.zeros(4, 3, R, dtype=torch.float64)
    hx = (h0, torch.zeros(4, 3, H, dtype=torch.float64)) if mode == "LSTM" else h0
    o1, h1, c1 = split_out(mode, ours(x))
    o2, h2, c2 = split_out(mode, ours(x, hx))
    assert o1.dtype == h1.dtype == torch.float64
    assert torch.equal(o1, o2) and torch.equal(h1, h2)
    if mode == "LSTM":
        assert torch.equal(c1, c2) and c1.shape == (4, 3, H) and h1.shape == (4, 3, P)


# ------------------------------------------------------------------------------------------------
# dropout in training mode


def _train_pair(mode, p, layers=2, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # num_layers=1 with dropout warns
        ours, ref = make_pair(mode, num_layers=layers, dropout=p, **kw)
    return ours.train(), ref.train()


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
def test_dropout_p1_feeds_zeros_to_next_layer(mode, path):
    """p=1 is deterministic: exact zeros between layers, so it matches torch.nn exactly, and the
    last layer's output is that of a 1-layer network run on zeros."""
    ours, ref = _train_pair(mode, 1.0, layers=3, bidirectional=True)
    x = torch.randn(5, 2, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(6, 2, H, dtype=torch.float64)
    hx = (h0, torch.randn(6, 2, H, dtype=torch.float64)) if mode == "LSTM" else h0
    o, h, c = split_out(mode, ours(x, hx))
    o_r, h_r, c_r = split_out(mode, ref(x, hx))
    tol = TOL[(path, torch.float64)]
    assert_same(o, o_r, tol)
    assert_same(h, h_r, tol)
    if mode == "LSTM":
        assert_same(c, c_r, tol)

    # the last layer alone, on a zero input of width D*H, from the last layer's h0 (c0) rows
    last = _build(nn, mode, input_size=2 * H, bidirectional=True, dtype=torch.float64)
    last.load_state_dict(
        {k.replace("_l2", "_l0"): v for k, v in ours.state_dict().items() if "_l2" in k}
    )
    hx_last = (h0[4:], hx[1][4:]) if mode == "LSTM" else h0[4:]
    zeros = torch.zeros(5, 2, 2 * H, dtype=torch.float64)
    torch.testing.assert_close(
        o, split_out(mode, last(zeros, hx_last))[0], **TOL[(path, torch.float64)]
    )
    # layer 0's final state never sees dropout
    ref.eval()
    h_eval = split_out(mode, ref(x, hx))[1]
    assert_same(h[:2], h_eval[:2], tol)
    # nothing flows from the output back into the input through the dropped activations
    assert torch.count_nonzero(torch.autograd.grad(o.sum(), x)[0]) == 0


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_dropout_train_shapes_determinism_and_effect(mode, path):
    ours, _ = _train_pair(mode, 0.5, layers=3)
    x = torch.randn(6, 4, I, dtype=torch.float64)
    torch.manual_seed(123)
    o1, h1, c1 = split_out(mode, ours(x))
    torch.manual_seed(123)
    o2, h2, c2 = split_out(mode, ours(x))
    torch.manual_seed(124)
    o3, _, _ = split_out(mode, ours(x))
    ours.eval()
    o_eval, h_eval, _ = split_out(mode, ours(x))
    assert o1.shape == o_eval.shape == (6, 4, H) and h1.shape == h_eval.shape == (3, 4, H)
    assert torch.equal(o1, o2) and torch.equal(h1, h2), "same seed, same masks"
    if mode == "LSTM":
        assert torch.equal(c1, c2)
    assert not torch.equal(o1, o3), "another seed, other masks"
    assert (o1 - o_eval).abs().max() > 1e-3, "dropout changed nothing"
    # dropout sits after layers 0 and 1: layer 0's h_n is untouched, the later ones are not
    assert torch.equal(h1[0], h_eval[0])
    assert (h1[2] - h_eval[2]).abs().max() > 1e-3


def test_dropout_train_matches_torch_rng_stream_on_native_path():
    """backend="torch" runs the same ATen op as torch.nn, dropout included: same seed, same
    masks, so 0<p<1 matches exactly (the generic path only matches in distribution)."""
    ours, ref = _train_pair("LSTM", 0.3, layers=3, bidirectional=True)
    x = torch.randn(5, 3, I, dtype=torch.float64)
    torch.manual_seed(7)
    o, (h, c) = ours(x)
    torch.manual_seed(7)
    o_r, (h_r, c_r) = ref(x)
    assert torch.equal(o, o_r) and torch.equal(h, h_r) and torch.equal(c, c_r)


@pytest.mark.parametrize("p", [0.25, 0.6])
def test_dropout_statistics(p, path):
    """A 2-layer ReLU RNN whose second layer is the identity on its input (W_ih = I, W_hh = 0,
    no bias) and whose first layer outputs are positive: the output is exactly the dropped
    first-layer output, so the mask and its 1/(1-p) scaling can be read off."""
    n = 64
    ours = fused_rnn.RNN(n, n, 2, "relu", bias=False, dropout=p, dtype=torch.float64)
    with torch.no_grad():
        ours.weight_ih_l0.copy_(torch.eye(n))
        ours.weight_hh_l0.zero_()
        ours.weight_ih_l1.copy_(torch.eye(n))
        ours.weight_hh_l1.zero_()
    x = torch.rand(40, 8, n, dtype=torch.float64) + 0.5  # layer 0 output == x, all > 0
    y = ours.train()(x)[0]
    kept = y != 0
    frac_dropped = 1 - kept.double().mean().item()
    # 20480 Bernoulli(p) draws: the standard deviation of the mean is < 0.0035
    assert abs(frac_dropped - p) < 0.02
    torch.testing.assert_close(y[kept], x[kept] / (1 - p), rtol=1e-12, atol=0)
    assert torch.equal(ours.eval()(x)[0], x)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_no_dropout_with_one_layer(mode, path):
    with pytest.warns(UserWarning, match="dropout option adds dropout"):
        m = getattr(fused_rnn, mode)(I, H, dropout=0.9, dtype=torch.float64)
    x = torch.randn(5, 3, I, dtype=torch.float64)
    o_train, h_train, _ = split_out(mode, m.train()(x))
    o_eval, h_eval, _ = split_out(mode, m.eval()(x))
    assert torch.equal(o_train, o_eval) and torch.equal(h_train, h_eval)


def test_dropout_attribute_reread_on_forward(path):
    ours, ref = make_pair("GRU", num_layers=2)
    ours.train()
    ref.train()
    x = torch.randn(5, 3, I, dtype=torch.float64)
    o0 = ours(x)[0]
    assert torch.equal(o0, ours.eval()(x)[0]), "dropout=0 in training is a no-op"
    ours.train()
    ours.dropout = 0.7
    assert (ours(x)[0] - o0).abs().max() > 1e-3, "m.dropout = 0.7 was ignored"
    ours.dropout = 1.0
    ref.dropout = 1.0
    assert_same(ours(x)[0], ref(x)[0], TOL[(path, torch.float64)])


# ------------------------------------------------------------------------------------------------
# construction, parameters, plumbing

CONSTRUCT = [
    ("LSTM", {}),
    ("LSTM", dict(num_layers=2, bidirectional=True, proj_size=P)),
    ("LSTM", dict(num_layers=3, bias=False, proj_size=2)),
    ("GRU", dict(num_layers=2, bidirectional=True)),
    ("GRU", dict(bias=False, batch_first=True)),
    ("RNN_TANH", dict(num_layers=3)),
    ("RNN_RELU", dict(num_layers=2, bidirectional=True, bias=False)),
]
CONSTRUCT_IDS = [
    f"{m}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for m, kw in CONSTRUCT
]


def _build(lib, mode, input_size=I, **kw):
    if "RNN" in mode:
        nonlinearity = "relu" if mode == "RNN_RELU" else "tanh"
        return lib.RNN(input_size, H, nonlinearity=nonlinearity, **kw)
    return getattr(lib, mode)(input_size, H, **kw)


@pytest.mark.parametrize("mode,kw", CONSTRUCT, ids=CONSTRUCT_IDS)
def test_same_seed_same_weights_and_names(mode, kw):
    torch.manual_seed(42)
    ref = _build(nn, mode, **kw)
    torch.manual_seed(42)
    ours = _build(fused_rnn, mode, **kw)
    names_ref = [n for n, _ in ref.named_parameters()]
    names_our = [n for n, _ in ours.named_parameters()]
    assert names_our == names_ref
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert list(ours.buffers()) == []
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, n
        assert torch.equal(a, b), f"{n} differs for the same seed"
    bound = 1 / H**0.5
    assert all(p.abs().max() <= bound for p in ours.parameters())


@pytest.mark.parametrize("mode,kw", CONSTRUCT, ids=CONSTRUCT_IDS)
def test_strict_state_dict_both_ways(mode, kw):
    ref = _build(nn, mode, **kw)
    ours = _build(fused_rnn, mode, **kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(1.0)
    ref.load_state_dict(ours.state_dict(), strict=True)
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("mode,kw", CONSTRUCT, ids=CONSTRUCT_IDS)
def test_all_weights_and_bias_absence(mode, kw):
    ref = _build(nn, mode, **kw)
    ours = _build(fused_rnn, mode, **kw)
    aw, aw_ref = ours.all_weights, ref.all_weights
    assert len(aw) == len(aw_ref) == kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1)
    params = dict(ours.named_parameters())
    for group, group_ref, names in zip(aw, aw_ref, ref._all_weights, strict=True):
        assert [p.shape for p in group] == [p.shape for p in group_ref]
        assert all(p is params[n] for p, n in zip(group, names, strict=True)), (
            "all_weights must be live"
        )
        assert all(isinstance(p, nn.Parameter) for p in group)
    for k in range(kw.get("num_layers", 1)):
        for sfx in ["", "_reverse"] if kw.get("bidirectional") else [""]:
            for b in ("bias_ih", "bias_hh"):
                name = f"{b}_l{k}{sfx}"
                assert hasattr(ours, name) == hasattr(ref, name) == kw.get("bias", True)
    assert ours.flatten_parameters() is None
    # internals some third-party code reads (AWD-LSTM WeightDrop, quantization, ONNX export)
    assert ours._flat_weights_names == ref._flat_weights_names
    assert ours._all_weights == ref._all_weights
    assert all(
        a is params[n] for a, n in zip(ours._flat_weights, ours._flat_weights_names, strict=True)
    )


@pytest.mark.parametrize("mode,kw", CONSTRUCT[:3], ids=CONSTRUCT_IDS[:3])
def test_device_and_dtype_reach_every_parameter(mode, kw):
    ours = _build(fused_rnn, mode, device="meta", dtype=torch.float16, **kw)
    ref = _build(nn, mode, device="meta", dtype=torch.float16, **kw)
    assert all(p.device.type == "meta" and p.dtype == torch.float16 for p in ours.parameters())
    assert [p.shape for p in ours.parameters()] == [p.shape for p in ref.parameters()]


def test_stored_attributes():
    for lib in (nn, fused_rnn):
        # dropout=1 (an int) is stored as 1.0, bidirectional=1 as given
        m = lib.LSTM(I, H, 2, True, True, 1, 1, P)
        assert (m.mode, m.dropout, type(m.dropout), m.bidirectional, m.proj_size) == (
            "LSTM", 1.0, float, 1, P,
        )  # fmt: skip
        r = lib.RNN(I, H, 2, "relu", False, True)
        assert (r.mode, r.nonlinearity, r.bias, r.batch_first) == ("RNN_RELU", "relu", False, True)
        assert lib.GRU(I, H).mode == "GRU"
        assert lib.RNN(I, H).nonlinearity == "tanh" and lib.RNN(I, H).mode == "RNN_TANH"


@pytest.mark.parametrize(
    "mode,kw",
    [
        ("LSTM", {}),
        (
            "LSTM",
            dict(
                num_layers=2,
                bias=False,
                batch_first=True,
                dropout=0.5,
                bidirectional=True,
                proj_size=2,
            ),
        ),
        ("GRU", dict(num_layers=2, bidirectional=1, dropout=1)),
        ("RNN_RELU", dict(num_layers=2)),
        ("RNN_TANH", dict(batch_first=True)),
    ],
    ids=["LSTM-default", "LSTM-everything", "GRU-L2-bidir1-drop1", "RNN-relu-L2", "RNN-bf"],
)
def test_repr_matches_torch(mode, kw):
    assert repr(_build(fused_rnn, mode, **kw)) == repr(_build(nn, mode, **kw))


def test_deepcopy_pickle_and_torch_save(path):
    ours, ref = make_pair("LSTM", num_layers=2, bidirectional=True, proj_size=P)
    x = torch.randn(4, 3, I, dtype=torch.float64)
    expect = ref(x)[0]
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    copies = [copy.deepcopy(ours), pickle.loads(pickle.dumps(ours)),
              torch.load(buf, weights_only=False)]  # fmt: skip
    for m in copies:
        assert type(m) is fused_rnn.LSTM
        assert_same(m(x)[0], expect, TOL[(path, torch.float64)])


# ------------------------------------------------------------------------------------------------
# weights are read on every forward


def _out(mode, m, x, hx=None):
    return split_out(mode, m(x, hx))[0]


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_inplace_edit_and_load_state_dict_after_forward(mode, path):
    ours, ref = make_pair(mode, num_layers=2, bidirectional=True)
    tol = TOL[(path, torch.float64)]
    x = torch.randn(4, 3, I, dtype=torch.float64)
    before = _out(mode, ours, x)
    assert_same(before, _out(mode, ref, x), tol)
    with torch.no_grad():
        for m in (ours, ref):
            m.weight_hh_l0.mul_(-1.5)
            m.bias_ih_l1_reverse.add_(0.3)
    after = _out(mode, ours, x)
    assert (after - before).abs().max() > 1e-3, "in-place edit not seen"
    assert_same(after, _out(mode, ref, x), tol)

    other = _build(nn, mode, num_layers=2, bidirectional=True, dtype=torch.float64)
    ours.load_state_dict(other.state_dict())
    assert_same(_out(mode, ours, x), _out(mode, other, x), tol)


@pytest.mark.parametrize("mode", ["LSTM", "RNN_TANH"])
def test_reassigned_parameter_is_used_and_gets_grads(mode, path):
    ours, ref = make_pair(mode, num_layers=2)
    x = torch.randn(4, 3, I, dtype=torch.float64)
    _out(mode, ours, x)  # a forward before the swap
    new = torch.randn_like(ref.weight_hh_l1)
    ours.weight_hh_l1 = nn.Parameter(new.clone())
    ref.weight_hh_l1 = nn.Parameter(new.clone())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    tol = TOL[(path, torch.float64)]
    y, y_r = _out(mode, ours, x), _out(mode, ref, x)
    assert_same(y, y_r, tol)
    y.sum().backward()
    y_r.sum().backward()
    assert ours.weight_hh_l1.grad is not None
    assert_same(ours.weight_hh_l1.grad, ref.weight_hh_l1.grad, tol)
    assert ours.all_weights[1][1] is ours.weight_hh_l1


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_functional_call(mode, path):
    ours, ref = make_pair(mode, num_layers=2, bidirectional=True)
    x = torch.randn(4, 3, I, dtype=torch.float64)
    params = {n: torch.randn_like(p, requires_grad=True) for n, p in ref.named_parameters()}
    y = split_out(mode, torch.func.functional_call(ours, params, (x,)))[0]
    y_r = split_out(mode, torch.func.functional_call(ref, params, (x,)))[0]
    tol = TOL[(path, torch.float64)]
    assert_same(y, y_r, tol)
    assert (y - _out(mode, ours, x)).abs().max() > 1e-3, "functional_call params ignored"
    g = torch.autograd.grad(y.square().sum(), list(params.values()))
    g_r = torch.autograd.grad(y_r.square().sum(), list(params.values()))
    for a, b in zip(g, g_r, strict=True):
        assert_same(a, b, tol)
    # the module's own parameters are back afterwards
    assert_same(_out(mode, ours, x), _out(mode, ref, x), tol)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_parametrized_weight_norm(mode, path):
    from torch.nn.utils.parametrizations import weight_norm

    ours, ref = make_pair(mode, num_layers=2)
    weight_norm(ours, "weight_hh_l0")
    weight_norm(ref, "weight_hh_l0")
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert "parametrizations.weight_hh_l0.original0" in ours.state_dict()
    assert "parametrizations.weight_hh_l0.original1" in ours.state_dict()
    x = torch.randn(4, 3, I, dtype=torch.float64)
    tol = TOL[(path, torch.float64)]
    with torch.no_grad():
        for m in (ours, ref):
            m.parametrizations.weight_hh_l0.original0.mul_(2.0)  # g: the norm is read per call
    y, y_r = _out(mode, ours, x), _out(mode, ref, x)
    assert_same(y, y_r, tol)
    y.sum().backward()
    y_r.sum().backward()
    for p in ("original0", "original1"):
        a = getattr(ours.parametrizations.weight_hh_l0, p).grad
        b = getattr(ref.parametrizations.weight_hh_l0, p).grad
        assert a is not None
        assert_same(a, b, tol)


def test_legacy_weight_norm(path):
    ours, ref = make_pair("LSTM", num_layers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated
        for m in (ours, ref):
            torch.nn.utils.weight_norm(m, "weight_hh_l0")
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(4, 3, I, dtype=torch.float64)
    tol = TOL[(path, torch.float64)]
    with torch.no_grad():
        ours.weight_hh_l0_g.mul_(0.5)
        ref.weight_hh_l0_g.mul_(0.5)
    y, y_r = _out("LSTM", ours, x), _out("LSTM", ref, x)
    assert_same(y, y_r, tol)
    y.sum().backward()
    y_r.sum().backward()
    assert_same(ours.weight_hh_l0_g.grad, ref.weight_hh_l0_g.grad, tol)
    assert_same(ours.weight_hh_l0_v.grad, ref.weight_hh_l0_v.grad, tol)


@pytest.mark.parametrize("mode", ["LSTM", "RNN_RELU"])
def test_double_after_construction(mode, path):
    torch.manual_seed(3)
    ref = _build(nn, mode, num_layers=2, bidirectional=True)
    torch.manual_seed(3)
    ours = _build(fused_rnn, mode, num_layers=2, bidirectional=True)
    x32 = torch.randn(4, 3, I)
    assert_same(_out(mode, ours, x32), _out(mode, ref, x32), TOL[(path, torch.float32)])
    ours.double()
    ref.double()
    assert all(p.dtype == torch.float64 for p in ours.parameters())
    x = x32.double()
    assert_same(_out(mode, ours, x), _out(mode, ref, x), TOL[(path, torch.float64)])
    ours.float()
    assert _out(mode, ours, x32).dtype == torch.float32


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_backward_twice_with_retain_graph(mode, path):
    ours, _ = make_pair(mode, num_layers=2, bidirectional=True)
    x = torch.randn(4, 3, I, dtype=torch.float64, requires_grad=True)
    o, h, _ = split_out(mode, ours(x))
    loss = o.square().sum() + h.sum()
    loss.backward(retain_graph=True)
    first = [x.grad.clone()] + [p.grad.clone() for p in ours.parameters()]
    loss.backward()
    second = [x.grad] + [p.grad for p in ours.parameters()]
    for a, b in zip(first, second, strict=True):
        assert a.abs().max() > 0
        torch.testing.assert_close(b, 2 * a, rtol=1e-12, atol=0)
