"""Problems and checks shared by the kernel tests (tests/test_kernels_lstm.py,
tests/test_persistent.py): a `Case`, float64 leaves rounded through the case's dtype, the kernel
run on copies of them, and the comparison of outputs, final states and every gradient against
the float64 oracle `fused_rnn.reference.recurrence`.

Imported by the test modules after they set TRITON_INTERPRET (tests/conftest.py does too).
"""

from dataclasses import dataclass

import torch

from fused_rnn import reference
from fused_rnn.recurrence import gru_recurrence, lstm_recurrence, rnn_recurrence

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DT_NAME = {
    torch.float64: "fp64",
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
}


@dataclass(frozen=True)
class Case:
    mode: str = "LSTM"  # LSTM, GRU, RNN_TANH, RNN_RELU
    B: int = 3
    T: int = 7
    H: int = 33
    I: int = 5
    P: int = 0  # proj_size (LSTM)
    peep: bool = False
    coupled: bool = False
    lens: bool = False
    reverse: bool = False
    dtype: torch.dtype = torch.float64

    @property
    def id(self) -> str:
        parts = [f"{self.mode}-B{self.B}-T{self.T}-H{self.H}-I{self.I}-{DT_NAME[self.dtype]}"]
        parts += [f"proj{self.P}"] if self.P else []
        parts += [n for n in ("peep", "coupled", "lens") if getattr(self, n)]
        parts += ["rev"] if self.reverse else []
        return "-".join(parts)

    @property
    def G(self) -> int:
        return {"LSTM": 3 if self.coupled else 4, "GRU": 3}.get(self.mode, 1)


def make_lengths(B: int, T: int) -> torch.Tensor:
    """Unsorted lengths holding a full-length and a length-1 sequence (when B allows)."""
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T
    if B > 1:
        lengths[1] = 1
    return lengths[torch.randperm(B)]


def make_problem(c: Case):
    """Float64 leaves (x, h0, c0 or None, weights, lengths), rounded through c.dtype."""
    R = c.P or c.H

    def leaf(*shape, scale=1.0):
        x = torch.randn(*shape, dtype=torch.float64, device=DEVICE) * scale
        return x.to(c.dtype).double().requires_grad_()

    s = c.H**-0.5
    w = reference.CellWeights(
        w_ih=leaf(c.G * c.H, c.I, scale=s),
        w_hh=leaf(c.G * c.H, R, scale=s),
        b_ih=leaf(c.G * c.H, scale=0.1),
        b_hh=leaf(c.G * c.H, scale=0.1),
        w_hr=leaf(c.P, c.H, scale=s) if c.P else None,
        w_ch=leaf((c.G - 1) * c.H, scale=0.5) if c.peep else None,
    )
    x = leaf(c.T, c.B, c.I)
    h0 = leaf(c.B, R, scale=0.5)
    c0 = leaf(c.B, c.H, scale=0.5) if c.mode == "LSTM" else None
    lengths = make_lengths(c.B, c.T).to(DEVICE) if c.lens else None
    return x, h0, c0, w, lengths


def leaves(x, h0, c0, w):
    return [v for v in [x, h0, c0, *w] if v is not None]


def run_kernel(c: Case, x, h0, c0, w, lengths, persistent=False, backend=None):
    """The recurrence of `backend` (default: "persistent" if `persistent` else "stepwise") in
    c.dtype on copies of the leaves: (outputs, leaves)."""
    lv = [v.detach().to(c.dtype).requires_grad_() for v in leaves(x, h0, c0, w)]
    it = iter(lv)
    xk, h0k = next(it), next(it)
    c0k = next(it) if c0 is not None else None
    wk = reference.CellWeights(*[next(it) if v is not None else None for v in w])
    H = c.H
    backend = backend or ("persistent" if persistent else "stepwise")
    if c.mode == "GRU":  # b_hh's r, z blocks fold into gx, its n block is b_hn
        bias = wk.b_ih + torch.cat([wk.b_hh[: 2 * H], wk.b_hh.new_zeros(H)])
        gx = xk @ wk.w_ih.t() + bias
        out = gru_recurrence(
            gx, h0k, wk.w_hh, wk.b_hh[2 * H :], lengths=lengths, reverse=c.reverse, backend=backend
        )
    elif c.mode == "LSTM":
        gx = xk @ wk.w_ih.t() + wk.b_ih + wk.b_hh
        out = lstm_recurrence(
            gx, h0k, c0k, wk.w_hh, w_hr=wk.w_hr, w_ch=wk.w_ch, coupled=c.coupled,
            lengths=lengths, reverse=c.reverse, backend=backend,
        )  # fmt: skip
    else:
        gx = xk @ wk.w_ih.t() + wk.b_ih + wk.b_hh
        act = "tanh" if c.mode == "RNN_TANH" else "relu"
        out = rnn_recurrence(
            gx,
            h0k,
            wk.w_hh,
            nonlinearity=act,
            lengths=lengths,
            reverse=c.reverse,
            backend=backend,
        )
    return out, lv


def loss_of(out, cot):
    return sum((o * d.to(o.dtype)).sum() for o, d in zip(out, cot, strict=True))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    assert torch.isfinite(a).all(), "non-finite values (unwritten poison?)"
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-300)).item()


def check_case(c: Case, tol: float, persistent: bool = False, backend: str | None = None):
    """Outputs, final states and every gradient of the kernel path (or of `backend`) vs the
    float64 reference, each within relative error `tol`."""
    x, h0, c0, w, lengths = make_problem(c)
    ref = reference.recurrence(c.mode, x, h0, c0, w, lengths, c.reverse, c.coupled)
    ref = [r for r in ref if r is not None]
    cot = [torch.randn_like(r) for r in ref]
    ref_grads = torch.autograd.grad(loss_of(ref, cot), leaves(x, h0, c0, w))

    out, lv = run_kernel(c, x, h0, c0, w, lengths, persistent, backend)
    assert len(out) == len(ref)
    for o, r in zip(out, ref, strict=True):
        assert o.dtype == c.dtype and o.shape == r.shape
    grads = torch.autograd.grad(loss_of(out, cot), lv)

    names = ["y", "h_T"] + (["c_T"] if c.mode == "LSTM" else []) + ["dx", "dh0"]
    names += ["dc0"] if c0 is not None else []
    names += [
        "d" + n for n, v in zip(reference.CellWeights._fields, w, strict=True) if v is not None
    ]
    errs = {
        n: rel_err(a, b)
        for n, a, b in zip(names, list(out) + list(grads), list(ref) + list(ref_grads), strict=True)
    }
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"relative errors over {tol:.0e}: {bad}"

    if lengths is not None:  # dead steps: y exactly zero, no gradient reaches their input
        dead = torch.arange(c.T, device=DEVICE)[:, None] >= lengths[None, :]
        assert (out[0][dead] == 0).all()
        assert (grads[0][dead] == 0).all()
