"""Kernel vs reference: the fused LSTM recurrence (fused_rnn.kernels.lstm) against the float64
oracle `fused_rnn.reference.recurrence`, outputs, final states and the gradients of every input.

Without CUDA the Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (set before triton
is imported). Every kernel output buffer is NaN-filled before the kernel runs (poison), so an
element a kernel forgets to write shows up as NaN.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402
from kernel_cases import (  # noqa: E402
    DEVICE,
    Case,
    check_case,
    loss_of,
    make_lengths,
    make_problem,
    rel_err,
    run_kernel,
)

from fused_rnn import reference  # noqa: E402
from fused_rnn.kernels import _common  # noqa: E402
from fused_rnn.kernels import lstm as lstm_mod  # noqa: E402
from fused_rnn.recurrence import lstm_recurrence  # noqa: E402

# Relative error bound ‖kernel - reference‖ / ‖reference‖ per tensor, against float64 maths on
# the same (rounded) inputs.
TOL = {
    # fp64 kernels: only summation order differs from the reference (observed ~1e-15).
    torch.float64: 1e-10,
    # fp32 "ieee" dots: rounding of fp32 products/sums over ~T steps (observed ~3e-7); a GPU with
    # TF32 on (cuDNN's default for RNNs) rounds the dot operands to 10 mantissa bits.
    torch.float32: 1e-5 if _common.dot_precision(torch.float32) == "ieee" else 3e-3,
    # fp16/bf16: dot operands, h, y and da are stored in 11/8 mantissa bits; the gradients
    # compound that rounding over the steps (observed ~5e-4 fp16, ~6e-3 bf16).
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}


@pytest.fixture(autouse=True)
def _seed_and_poison(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setenv("FUSED_RNN_POISON", "1")


# ----------------------------------------------------------------------------- the grid

VARIANTS = [
    dict(),
    dict(P=5),
    dict(peep=True),
    dict(coupled=True),
    dict(P=17, peep=True),
    dict(P=17, peep=True, coupled=True),
]
GRID = [
    Case(lens=lens, reverse=rev, **v)
    for v in VARIANTS
    for lens in (False, True)
    for rev in (False, True)
]
SHAPES = [
    Case(T=1, lens=True, reverse=True, peep=True, P=4),
    Case(T=1, B=1),
    Case(B=1, T=5, H=16, I=1, P=3, reverse=True),
    Case(B=1, T=6, lens=True, coupled=True, peep=True),
    Case(B=5, T=12, H=64, I=9, lens=True, peep=True),
    Case(B=5, T=20, H=20, I=3, P=7, lens=True, reverse=True, coupled=True),
    Case(B=2, T=3, H=1, I=2, peep=True),
]
LOW = [
    Case(dtype=dt, **kw)
    for dt in (torch.float32, torch.float16, torch.bfloat16)
    for kw in (
        dict(),
        dict(P=17, peep=True, lens=True, reverse=True),
        dict(coupled=True, peep=True, lens=True),
    )
]


@pytest.mark.parametrize("c", GRID + SHAPES + LOW, ids=lambda c: c.id)
def test_matches_reference(c):
    check_case(c, TOL[c.dtype])


@pytest.mark.parametrize(
    "c",
    [
        Case(B=20, T=4, H=33, I=3, P=20, peep=True, lens=True, reverse=True),
        Case(B=20, T=4, H=33, I=3, coupled=True, peep=True, lens=True),
        Case(B=17, T=3, H=40, I=3),
    ],
    ids=lambda c: c.id,
)
def test_small_tiles(c, monkeypatch):
    """GPU-like tiling: several programs along H and B, multi-chunk K loops with masked tails."""
    monkeypatch.setattr(lstm_mod, "block_b", lambda B: 16)
    monkeypatch.setattr(lstm_mod, "block_h", lambda H, n_b=1: 16)
    monkeypatch.setattr(lstm_mod, "block_k", lambda K: 16)
    check_case(c, TOL[c.dtype])


# ----------------------------------------------------------------------------- autograd


def _fn(coupled, lengths, reverse):
    def f(gx, h0, c0, w_hh, w_hr, w_ch):
        return lstm_recurrence(
            gx,
            h0,
            c0,
            w_hh,
            w_hr=w_hr,
            w_ch=w_ch,
            coupled=coupled,
            lengths=lengths,
            reverse=reverse,
        )

    return f


@pytest.mark.parametrize(
    "coupled,proj,lens,reverse,T,B,H,fast",
    [
        (False, True, True, True, 2, 2, 1, False),  # every Jacobian entry, on a tiny problem
        (True, False, True, False, 4, 3, 5, True),  # random projections of it (cheaper)
        (False, False, False, True, 4, 3, 5, True),
    ],
)
def test_gradcheck(coupled, proj, lens, reverse, T, B, H, fast):
    G = 3 if coupled else 4
    R = 1 if proj else H
    f64 = dict(dtype=torch.float64, device=DEVICE, requires_grad=True)
    args = (
        torch.randn(T, B, G * H, **f64),
        torch.randn(B, R, **f64),
        torch.randn(B, H, **f64),
        torch.randn(G * H, R, **f64),
        torch.randn(R, H, **f64) if proj else None,
        torch.randn((G - 1) * H, **f64),
    )
    lengths = make_lengths(B, T).to(DEVICE) if lens else None
    f = _fn(coupled, lengths, reverse)
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-8, fast_mode=fast)


def test_grad_subset():
    """Only w_hh and c0 require grad: those gradients still match; the rest stay None."""
    c = Case(B=3, T=5, H=16, I=4, P=6, peep=True, lens=True, reverse=True)
    x, h0, c0, w, lengths = make_problem(c)
    ref = reference.recurrence("LSTM", x, h0, c0, w, lengths, c.reverse, c.coupled)
    cot = [torch.randn_like(r) for r in ref]
    ref_whh, ref_c0 = torch.autograd.grad(loss_of(ref, cot), [w.w_hh, c0])

    gx = (x @ w.w_ih.t() + w.b_ih + w.b_hh).detach()
    w_hh, c0k = w.w_hh.detach().requires_grad_(), c0.detach().requires_grad_()
    h0k, w_hr, w_ch = h0.detach(), w.w_hr.detach(), w.w_ch.detach()
    out = lstm_recurrence(gx, h0k, c0k, w_hh, w_hr=w_hr, w_ch=w_ch, lengths=lengths, reverse=True)
    loss_of(out, cot).backward()
    assert rel_err(w_hh.grad, ref_whh) < TOL[torch.float64]
    assert rel_err(c0k.grad, ref_c0) < TOL[torch.float64]
    assert gx.grad is None and h0k.grad is None and w_hr.grad is None


def test_backward_leaves_grad_outputs_alone():
    """The kernels update dh/dc buffers in place: they must be copies of dh_T/dc_T."""
    c = Case(B=2, T=3, H=8, I=2, lens=True)
    x, h0, c0, w, lengths = make_problem(c)
    out, _ = run_kernel(c, x, h0, c0, w, lengths)
    cot = [torch.randn_like(o) for o in out]
    kept = [g.clone() for g in cot]
    torch.autograd.backward(out, cot)
    assert all(torch.equal(a, b) for a, b in zip(cot, kept, strict=True))


def test_no_grad_and_noncontiguous_inputs_give_identical_outputs():
    c = Case(B=3, T=6, H=24, I=4, P=5, peep=True, lens=True)
    x, h0, c0, w, lengths = make_problem(c)
    gx = (x @ w.w_ih.t() + w.b_ih + w.b_hh).detach()
    kw = dict(w_hr=w.w_hr, w_ch=w.w_ch, lengths=lengths)
    with_grad = lstm_recurrence(gx, h0, c0, w.w_hh, **kw)  # stores gates for backward
    with torch.no_grad():
        plain = lstm_recurrence(gx, h0, c0, w.w_hh, **kw)  # does not
    gx_nc = gx.transpose(0, 1).contiguous().transpose(0, 1)  # (T, B, 4H) view of (B, T, 4H)
    assert not gx_nc.is_contiguous()
    with torch.no_grad():
        nc = lstm_recurrence(gx_nc, h0, c0, w.w_hh, **kw)
    for a, b, d in zip(with_grad, plain, nc, strict=True):
        assert torch.equal(a.detach(), b) and torch.equal(b, d)
    assert not any(t.requires_grad for t in plain)


# ----------------------------------------------------------------------------- checks


def test_poison_is_on():
    """The autouse fixture's poison reaches the allocator, so the grid proves full writes."""
    buf = _common.new_output((3, 2), torch.float32, DEVICE)
    assert buf.isnan().all()


def test_bad_inputs_raise():
    T, B, H = 2, 3, 8
    gx, h0, c0 = torch.randn(T, B, 4 * H), torch.randn(B, H), torch.randn(B, H)
    w_hh = torch.randn(4 * H, H)
    with pytest.raises(ValueError, match="h0"):
        lstm_recurrence(gx, h0[:, :-1], c0, w_hh)
    with pytest.raises(ValueError, match="w_ch"):
        lstm_recurrence(gx, h0, c0, w_hh, w_ch=torch.randn(2 * H))
    with pytest.raises(ValueError, match="multiple"):
        lstm_recurrence(torch.randn(T, B, 4 * H + 1), h0, c0, w_hh)
    with pytest.raises(TypeError):
        lstm_recurrence(gx, h0.double(), c0, w_hh)
    with pytest.raises(ValueError, match="lengths"):
        lstm_recurrence(gx, h0, c0, w_hh, lengths=torch.ones(B + 1, dtype=torch.int64))
