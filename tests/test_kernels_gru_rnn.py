"""GRU and RNN Triton kernels (kernels/gru.py) against the float64 reference.

Kernel vs `reference.recurrence`: outputs, final states and the gradients of x (through
gx = x W_ih^T + b), h0, w_hh, w_ih, b_ih, b_hh (GRU: b_hh's r, z parts fold into gx, its n part
is the kernel's b_hn) for the loss (y * dy).sum() + (hT * dhT).sum(). On CPU the kernels run under
TRITON_INTERPRET=1; every output buffer a kernel allocates starts as NaN (FUSED_RNN_POISON=1).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
os.environ.setdefault("FUSED_RNN_POISON", "1")

import pytest  # noqa: E402

import fused_rnn.kernels.gru as gru_mod  # noqa: E402
from fused_rnn import reference  # noqa: E402
from fused_rnn.recurrence import gru_recurrence, rnn_recurrence  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODES = ["GRU", "RNN_TANH", "RNN_RELU"]

# max |kernel - reference| / max(|reference|, 1e-3 floor), per dtype:
#   fp64: both sides compute in float64; only summation order differs (~1e-14 seen) -> 1e-10.
#   fp32: fp32 storage, exact ("ieee") fp32 dots, a few steps of rounding (~3e-7 seen) -> 1e-5.
#   fp16: 11-bit mantissa: inputs, h, y and dgx are rounded, gates and dh kept in fp32; torch's
#         own fp16 maths lands at ~1e-3, the kernel below it (~8e-4 seen) -> 3e-3.
#   bf16: 8-bit mantissa, the same path (~1.2e-2 seen). The CPU interpreter rounds fp32 -> bf16
#         toward zero where a GPU rounds to nearest, which about doubles the error here -> 3e-2.
# GPU fp32 runs follow torch's TF32 flag; the tests switch TF32 off (tf32 would need ~3e-4).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}
DNAME = {
    torch.float64: "fp64",
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
}


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


def _gates(mode):
    return 3 if mode == "GRU" else 1


def _make(mode, B, T, H, I, dtype, bias=True):
    """Random inputs and weights (leaf tensors, requires_grad) in `dtype`."""
    G = _gates(mode)
    s = H**-0.5  # torch's init scale keeps the gates away from saturation

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).requires_grad_()

    x = rnd(T, B, I)
    h0 = rnd(B, H, scale=0.5)
    w = reference.CellWeights(
        rnd(G * H, I, scale=s),
        rnd(G * H, H, scale=s),
        rnd(G * H, scale=s) if bias else None,
        rnd(G * H, scale=s) if bias else None,
    )
    return x, h0, w


def _run_kernel(mode, x, h0, w, lengths, reverse):
    """gx as the caller (fused_rnn.functional) forms it, then the kernel."""
    H = h0.shape[1]
    gx = x @ w.w_ih.t()
    if mode == "GRU":
        b_hn = None
        if w.b_ih is not None:
            gx = gx + w.b_ih + torch.cat([w.b_hh[: 2 * H], w.b_hh.new_zeros(H)])
            b_hn = w.b_hh[2 * H :]
        return gru_recurrence(gx, h0, w.w_hh, b_hn, lengths=lengths, reverse=reverse)
    if w.b_ih is not None:
        gx = gx + w.b_ih + w.b_hh
    act = "tanh" if mode == "RNN_TANH" else "relu"
    return rnn_recurrence(gx, h0, w.w_hh, nonlinearity=act, lengths=lengths, reverse=reverse)


def _leaves(x, h0, w):
    return [x, h0] + [p for p in w if p is not None]


def _rel_err(a, b):
    a, b = a.double(), b.double()
    assert not torch.isnan(a).any(), "NaN in the kernel's result (an unwritten element?)"
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-3)).item()


def _check(mode, B, T, H, I, dtype, bias, lengths, reverse):
    """Kernel in `dtype` vs the float64 reference on the same (rounded) inputs."""
    x, h0, w = _make(mode, B, T, H, I, dtype, bias)
    lens = None if lengths is None else torch.tensor(lengths, dtype=torch.int64, device=DEVICE)
    leaves = _leaves(x, h0, w)
    # the reference sees float64 copies of exactly the values the kernel sees
    leaves64 = [p.detach().double().requires_grad_() for p in leaves]
    x64, h064 = leaves64[:2]
    w64 = reference.CellWeights(*(leaves64[2:] + [None] * (6 - len(leaves64[2:]))))
    dev = [p.detach().to(DEVICE).requires_grad_() for p in leaves]
    xd, h0d = dev[:2]
    wd = reference.CellWeights(*(dev[2:] + [None] * (6 - len(dev[2:]))))

    y, hT = _run_kernel(mode, xd, h0d, wd, lens, reverse)
    y_ref, hT_ref, _ = reference.recurrence(mode, x64, h064, None, w64, lens, reverse)
    assert y.dtype == dtype and hT.dtype == dtype
    assert y.shape == (T, B, H) and hT.shape == (B, H)

    tol = TOL[dtype]
    assert _rel_err(y.cpu(), y_ref) < tol
    assert _rel_err(hT.cpu(), hT_ref) < tol
    if lens is not None:  # outputs past a sequence's end are exactly zero
        for b, n in enumerate(lengths):
            assert (y[n:, b] == 0).all()

    dy = torch.randn(T, B, H, dtype=torch.float64)
    dhT = torch.randn(B, H, dtype=torch.float64)
    loss = (y * dy.to(DEVICE, dtype)).sum() + (hT * dhT.to(DEVICE, dtype)).sum()
    grads = torch.autograd.grad(loss, dev)
    loss_ref = (y_ref * dy.to(dtype).double()).sum() + (hT_ref * dhT.to(dtype).double()).sum()
    grads_ref = torch.autograd.grad(loss_ref, leaves64)
    names = ["x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"]
    for name, g, g_ref in zip(names[: len(grads)], grads, grads_ref, strict=True):
        assert g.dtype == dtype, name
        err = _rel_err(g.cpu(), g_ref)
        assert err < tol, f"d{name}: relative error {err:.2e} >= {tol:.0e}"


# (B, T, H, I, bias, lengths, reverse): awkward sizes, unsorted lengths with 1 and full length
CASES = [
    (3, 5, 33, 5, True, None, False),
    (3, 5, 33, 5, True, None, True),
    (3, 5, 33, 5, True, [3, 5, 1], False),
    (3, 5, 33, 5, True, [3, 5, 1], True),
    (3, 5, 33, 5, False, None, False),
    (4, 1, 33, 5, True, None, False),
    (4, 1, 33, 5, True, [1, 1, 1, 1], True),
    (1, 7, 33, 5, True, None, True),
    (5, 6, 17, 3, False, [6, 2, 5, 1, 3], True),
]


def _case_id(mode, case, dtype):
    B, T, H, I, bias, lengths, reverse = case
    s = f"{mode}-B{B}-T{T}-H{H}-I{I}-{DNAME[dtype]}"
    s += "-rev" if reverse else ""
    s += "-len" if lengths is not None else ""
    s += "" if bias else "-nobias"
    return s


def _params(modes, cases, dtypes):
    return [
        pytest.param(m, c, d, id=_case_id(m, c, d)) for d in dtypes for m in modes for c in cases
    ]


@pytest.mark.parametrize("mode,case,dtype", _params(MODES, CASES, [torch.float64]))
def test_matches_reference_fp64(mode, case, dtype):
    B, T, H, I, bias, lengths, reverse = case
    _check(mode, B, T, H, I, dtype, bias, lengths, reverse)


# bf16 leaves RNN_RELU out: ReLU's derivative jumps where a pre-activation changes sign, and
# bf16 rounding flips the sign of the ones near 0, so that check would measure the flips (torch's
# own bf16 maths misses the float64 gradients by up to 3e-2 too), not the kernel. fp16 covers it.
@pytest.mark.parametrize(
    "mode,case,dtype",
    _params(MODES, [CASES[0], CASES[3]], [torch.float32])
    + _params(MODES, [CASES[3]], [torch.float16])
    + _params(["GRU", "RNN_TANH"], [CASES[3]], [torch.bfloat16]),
)
def test_matches_reference_low_precision(mode, case, dtype):
    B, T, H, I, bias, lengths, reverse = case
    _check(mode, B, T, H, I, dtype, bias, lengths, reverse)


@pytest.mark.parametrize("mode", MODES)
def test_small_tiles(mode, monkeypatch):
    """The GPU's tiling (16-wide blocks): several hidden and batch tiles, a K loop of 3 chunks."""
    monkeypatch.setattr(gru_mod, "block_b", lambda B: 16)
    monkeypatch.setattr(gru_mod, "block_h", lambda H, n_b_tiles=1: 16)
    monkeypatch.setattr(gru_mod, "block_k", lambda K: 16)
    lengths = [3, 1, 4, 3, 2, 4, 4, 1, 3, 4, 2, 3, 4, 4, 1, 4, 3, 2, 3, 4]
    _check(mode, 20, 4, 33, 5, torch.float64, True, lengths, True)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(mode):
    """Finite differences in float64 through the kernel's own inputs (gx, h0, w_hh, b_hn).

    fast_mode (a random projection of the Jacobian) keeps the number of interpreted launches
    small; the reference tests above check every gradient element.
    """
    T, B, H = 3, 2, 4
    G = _gates(mode)
    gx = torch.randn(T, B, G * H, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, H, dtype=torch.float64, requires_grad=True)
    w_hh = (torch.randn(G * H, H, dtype=torch.float64) * 0.5).requires_grad_()
    lengths = torch.tensor([3, 2])
    if mode == "GRU":
        b_hn = torch.randn(H, dtype=torch.float64, requires_grad=True)

        def fn(gx, h0, w_hh, b_hn):
            return gru_recurrence(gx, h0, w_hh, b_hn, lengths=lengths, reverse=True)

        inputs = (gx, h0, w_hh, b_hn)
    else:
        act = "tanh" if mode == "RNN_TANH" else "relu"

        def fn(gx, h0, w_hh):
            return rnn_recurrence(gx, h0, w_hh, nonlinearity=act, lengths=lengths)

        inputs = (gx, h0, w_hh)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=True)


@pytest.mark.parametrize("mode", MODES)
def test_gradient_subsets(mode):
    """Each input alone requiring a gradient (the backward skips what is not needed)."""
    T, B, H = 4, 3, 9
    G = _gates(mode)
    full = {
        "gx": torch.randn(T, B, G * H, dtype=torch.float64),
        "h0": torch.randn(B, H, dtype=torch.float64),
        "w_hh": torch.randn(G * H, H, dtype=torch.float64) * 0.3,
    }
    if mode == "GRU":
        full["b_hn"] = torch.randn(H, dtype=torch.float64)
    lengths = torch.tensor([4, 1, 2])

    def run(args):
        if mode == "GRU":
            return gru_recurrence(**args, lengths=lengths)
        act = "tanh" if mode == "RNN_TANH" else "relu"
        return rnn_recurrence(**args, nonlinearity=act, lengths=lengths)

    all_args = {k: v.clone().requires_grad_() for k, v in full.items()}
    y, hT = run(all_args)
    dy, dhT = torch.randn_like(y), torch.randn_like(hT)
    expected = torch.autograd.grad((y * dy).sum() + (hT * dhT).sum(), list(all_args.values()))
    for i, name in enumerate(full):
        args = {k: v.clone().requires_grad_(k == name) for k, v in full.items()}
        y, hT = run(args)
        ((y * dy).sum() + (hT * dhT).sum()).backward()
        torch.testing.assert_close(args[name].grad, expected[i], rtol=1e-12, atol=1e-12)
        assert all(v.grad is None for k, v in args.items() if k != name)


@pytest.mark.parametrize("mode", ["GRU", "RNN_RELU"])
def test_only_final_state_used(mode):
    """y unused: autograd hands backward a zero dy; the gradient must still be right."""
    x, h0, w = _make(mode, 3, 5, 12, 4, torch.float64)
    _, hT = _run_kernel(mode, x, h0, w, None, True)
    g = torch.autograd.grad(hT.sum(), _leaves(x, h0, w))
    _, hT_ref, _ = reference.recurrence(mode, x, h0, None, w, None, True)
    g_ref = torch.autograd.grad(hT_ref.sum(), _leaves(x, h0, w))
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_no_grad_and_noncontiguous(mode):
    """Strided inputs are normalised; under no_grad the same numbers come out."""
    T, B, H = 5, 3, 10
    G = _gates(mode)
    gx = torch.randn(B, T, G * H, dtype=torch.float64).transpose(0, 1)  # (T, B, G*H), strided
    h0 = torch.randn(B, 2 * H, dtype=torch.float64)[:, ::2]
    w_hh = (torch.randn(H, G * H, dtype=torch.float64) * 0.3).t()
    b_hn = torch.randn(2 * H, dtype=torch.float64)[1::2]
    w = reference.CellWeights(
        torch.eye(G * H, dtype=torch.float64),
        w_hh,
        torch.zeros(G * H, dtype=torch.float64),
        torch.cat([torch.zeros(2 * H, dtype=torch.float64), b_hn]) if mode == "GRU" else None,
    )
    if mode != "GRU":
        w = w._replace(b_ih=None)
    with torch.no_grad():
        if mode == "GRU":
            y, hT = gru_recurrence(gx, h0, w_hh, b_hn, reverse=True)
        else:
            act = "tanh" if mode == "RNN_TANH" else "relu"
            y, hT = rnn_recurrence(gx, h0, w_hh, nonlinearity=act, reverse=True)
    y_ref, hT_ref, _ = reference.recurrence(mode, gx, h0, None, w, None, True)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(hT, hT_ref, rtol=1e-10, atol=1e-10)
    assert y.is_contiguous() and hT.is_contiguous()


def test_bad_inputs_raise():
    gx = torch.randn(4, 2, 3 * 8)
    h0 = torch.randn(2, 8)
    w_hh = torch.randn(3 * 8, 8)
    with pytest.raises(ValueError, match="h0"):
        gru_recurrence(gx, torch.randn(3, 8), w_hh)
    with pytest.raises(ValueError, match="b_hn"):
        gru_recurrence(gx, h0, w_hh, torch.randn(7))
    with pytest.raises(ValueError, match="lengths"):
        gru_recurrence(gx, h0, w_hh, lengths=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError):
        gru_recurrence(gx, h0.double(), w_hh)
    with pytest.raises(ValueError, match="nonlinearity"):
        rnn_recurrence(gx[..., :8], h0, w_hh[:8], nonlinearity="gelu")
    with pytest.raises(ValueError, match="gx"):
        rnn_recurrence(gx, h0, w_hh[:8])
