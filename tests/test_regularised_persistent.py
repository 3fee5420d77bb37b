"""Zoneout, recurrent dropout and layer norm in the persistent kernels, on multi-program grids.

The modules with backend="persistent" against the float64 reference (test_regularised's
`check_module`: outputs, final states and every gradient, lengths and both directions, the
masks replayed from fused_rnn._rng, so agreement to float64 rounding means the kernels drew
the same masks bit for bit), with each program of a grid in its own thread
(tests/mp_interpreter.py) and GPU-like tiling forced (`_common.forced_persistent_tiles`):
several blocks of units (and projection rows), each program looping over several batch
chunks, so the cross-program reductions of layer norm (a row's statistics over every program's
units, forward and backward) and the extra grid barriers they need are really exercised. The
stepwise kernels (and layer norm's stepwise-only kernels) are tripwires, and the launches are
recorded: a test passes only if the persistent kernels ran, on the grid it names.

Also: the contract between the strategies (the backward of either accepts the forward of the
other: same buffers, aux included), a negative control (layer norm's barrier let through one
arrival early must fail the checks), and fp32 against the torch path with the same seed.

Sizes stay small (T <= 4, H <= 16, B <= 8): every program is interpreted in Python.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
os.environ.setdefault("FUSED_RNN_POISON", "1")

import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from test_persistent import STEPWISE_KERNELS, _Tripwire  # noqa: E402
from test_regularised import F64, _module, _rel, check_module  # noqa: E402

from fused_rnn import _rng  # noqa: E402
from fused_rnn.kernels import _common  # noqa: E402
from fused_rnn.kernels import gru as gru_mod  # noqa: E402
from fused_rnn.kernels import lstm as lstm_mod  # noqa: E402

INTERPRETED = _common.is_interpreter()
if INTERPRETED:
    from mp_interpreter import threaded_programs  # noqa: E402

pytestmark = pytest.mark.skipif(
    not INTERPRETED, reason="threads for the interpreter's programs (a GPU runs real grids)"
)

# the stepwise kernels of the options, besides those of the plain cells
OPTION_STEPWISE = STEPWISE_KERNELS + [
    (lstm_mod, "_ln_rec_kernel"),
    (gru_mod, "_ln_rec_kernel"),
    (lstm_mod, "_lstm_fwd_ln_out_kernel"),
    (lstm_mod, "_lstm_bwd_ln_out_kernel"),
]
KERNELS = {
    "LSTM": ("_lstm_fwd_persistent_kernel", "_lstm_bwd_persistent_kernel"),
    "GRU": ("_fwd_persistent_kernel", "_bwd_persistent_kernel"),
    "RNN_TANH": ("_fwd_persistent_kernel", "_bwd_persistent_kernel"),
}


@pytest.fixture(autouse=True)
def _setup(native_off):
    """Poisoned outputs; backend="torch" (the reference's own modules) through the generic
    stack, as in test_regularised."""
    with _common.poisoned(True):
        yield


@pytest.fixture
def persistent_only(monkeypatch):
    """Every stepwise kernel fails when launched: results must come from the persistent ones."""
    for mod, name in OPTION_STEPWISE:
        monkeypatch.setattr(mod, name, _Tripwire(name))


@pytest.fixture
def grid(request):
    with threaded_programs(getattr(request, "param", "greedy")) as g:
        yield g


def _programs(mode, H, P, tiles):
    units, rows, _ = tiles
    n = triton.cdiv(H, units)
    return max(n, triton.cdiv(P, rows)) if mode == "LSTM" and P else n


def _run(g, mode, tiles, *, H, B, bi=False, **kw):
    """check_module on the forced tiling; then exactly the persistent kernels ran, one forward
    and one backward per direction, each on a grid of >= 2 programs looping over >= 2 batch
    chunks."""
    P = kw.get("proj", 0)
    n = _programs(mode, H, P, tiles)
    assert n >= 2 and triton.cdiv(B, tiles[2]) >= 2, "not a multi-program, multi-chunk grid"
    with _common.forced_persistent_tiles(*tiles):
        check_module(mode, backend="persistent", layers=1, bi=bi, H=H, B=B, **kw)
    D = 2 if bi else 1
    fwd, bwd = KERNELS[mode]
    got = sorted((r.kernel, r.grid) for r in g.launches)
    assert got == sorted([(fwd, (n, 1, 1))] * D + [(bwd, (n, 1, 1))] * D), got
    assert all(r.hang is None for r in g.launches)


# (mode, options of check_module, (units, projection rows, batch per chunk)). Every grid has
# >= 2 programs, each looping over >= 2 batch chunks; lens: packed sequences of lengths T..1.
CASES = {
    # every option: LN_hh and LN_c (3 barriers a step), zoneout of c and h, recurrent dropout,
    # both directions
    "LSTM-all-bi": ("LSTM", dict(lens=True, bi=True), (8, 8, 4)),
    # with the projection (4 barriers a step); projection blocks 3 > unit blocks 2: program 2
    # owns rows of h but no units (its layer-norm partials are never merged)
    "LSTM-all-proj-peep": ("LSTM", dict(lens=True, proj=12, peep=True), (8, 4, 4)),
    "LSTM-all-coupled-peep-eval": ("LSTM", dict(coupled=True, peep=True, train=False), (8, 8, 4)),
    # without layer norm: zoneout in the cell phase, the dropout-masked h from its buffer
    "LSTM-zoneout-dropout": ("LSTM", dict(lens=True, ln=False), (8, 8, 4)),
    "LSTM-ln-only": ("LSTM", dict(zone=(0.0, 0.0), p=0.0), (8, 8, 4)),
    "GRU-all-bi": ("GRU", dict(lens=True, bi=True), (8, 8, 4)),
    "GRU-all-eval": ("GRU", dict(train=False), (8, 8, 4)),
    "GRU-ln-only": ("GRU", dict(zone=(0.0, 0.0), p=0.0, lens=True), (8, 8, 4)),
    "RNN-zoneout-dropout-bi": ("RNN_TANH", dict(lens=True, ln=False, bi=True), (8, 8, 4)),
    "RNN-zoneout-eval": ("RNN_TANH", dict(train=False, ln=False, p=0.0), (8, 8, 4)),
}
DEFAULTS = dict(H=16, B=8, T=3, zone=(0.3, 0.2), p=0.25, ln=True)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, grid, persistent_only):
    mode, kw, tiles = CASES[case]
    _run(grid, mode, tiles, **{**DEFAULTS, **kw})


@pytest.mark.parametrize("grid", ["free"], indirect=True)
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_matches_reference_free_schedule(mode, grid, persistent_only):
    """All programs at once, interleaved by the OS: a different interleaving every run."""
    _run(grid, mode, (8, 8, 4), **{**DEFAULTS, "lens": True})


def test_single_program_default_runs_persistent(persistent_only):
    """Without the test hooks the interpreter's launch is one program: the options no longer
    send backend="persistent" to the stepwise loop."""
    for mode in ("LSTM", "GRU", "RNN_TANH"):
        check_module(mode, backend="persistent", layers=1, bi=False, lens=True,
                     ln=mode != "RNN_TANH")  # fmt: skip


# ----------------------------------------------------------------------------- the contract


def _lstm_op_inputs(T=3, B=6, H=12, P=0):
    G, R = 4, P or H
    g = torch.Generator().manual_seed(3)

    def r(*shape, s=1.0):
        return torch.randn(*shape, generator=g, **F64) * s

    return dict(
        gx=r(T, B, G * H), h0=r(B, R, s=0.5), c0=r(B, H, s=0.5), w_hh=r(G * H, R, s=H**-0.5),
        w_hr=r(P, H, s=H**-0.5) if P else None, w_ch=r(3 * H, s=0.5),
        lengths=torch.tensor([T, 1, 2, T, 2, T][:B]), rng=torch.tensor([12345, 678]),
        drop=(torch.rand(B, R, generator=g, **F64) > 0.3).double() / 0.7,
        ln_hh=1 + r(G * H, s=0.3), ln_c_w=1 + r(H, s=0.3), ln_c_b=r(H, s=0.3),
    )  # fmt: skip


def _lstm_pass(inp, fwd, bwd, dys):
    """fused_rnn::lstm_fwd on backend `fwd`, fused_rnn::lstm_bwd on `bwd`: the forward's
    buffers and the gradients."""
    i = inp
    opts = (i["rng"], 0.3, 0.2, 1, i["drop"], i["ln_hh"], i["ln_c_w"], i["ln_c_b"])
    out = torch.ops.fused_rnn.lstm_fwd(
        i["gx"], i["h0"], i["c0"], i["w_hh"], i["w_hr"], i["w_ch"], i["lengths"], True, False,
        True, fwd, *opts,
    )  # fmt: skip
    y, h_T, c_T, hs, cs, gates, ms, aux = out
    needs = [True] * 4 + [i["w_hr"] is not None, True] + [True] * 3
    grads = torch.ops.fused_rnn.lstm_bwd(
        *dys, hs, cs, gates, ms, i["w_hh"], i["w_hr"], i["w_ch"], i["lengths"], True, False,
        needs, bwd, aux, *opts,
    )  # fmt: skip
    return list(out), [g for g in grads if g.numel()]


def test_each_backward_accepts_the_other_forward():
    """Forward and backward on every pairing of the strategies (persistent on a grid of 2
    programs and 2 batch chunks), the LSTM with every option and a projection: the forward's
    buffers (aux: û, its rstd, LN_c's statistics) and all gradients agree to float64
    rounding."""
    P = 5
    inp = _lstm_op_inputs(P=P)
    T, B = inp["gx"].shape[:2]
    R, H = P, 12
    g = torch.Generator().manual_seed(4)
    dys = [torch.randn(T, B, R, generator=g, **F64), torch.randn(B, R, generator=g, **F64),
           torch.randn(B, H, generator=g, **F64)]  # fmt: skip
    runs = {}
    with threaded_programs(), _common.forced_persistent_tiles(8, 8, 4):
        for fwd in ("stepwise", "persistent"):
            for bwd in ("stepwise", "persistent"):
                runs[fwd, bwd] = _lstm_pass(inp, fwd, bwd, dys)
    ref_out, ref_grads = runs["stepwise", "stepwise"]
    for key, (out, grads) in runs.items():
        for name, a, b in zip(["y", "h_T", "c_T", "hs", "cs", "gates", "ms", "aux"], out, ref_out):
            if b.numel():
                assert _rel(a, b) < 1e-12, (key, name)
        assert len(grads) == len(ref_grads)
        for n, (a, b) in enumerate(zip(grads, ref_grads)):
            assert _rel(a, b) < 1e-10, (key, n)


def test_gru_backward_accepts_the_other_forward():
    T, B, H = 3, 6, 12
    g = torch.Generator().manual_seed(5)
    gx, h0 = torch.randn(T, B, 3 * H, generator=g, **F64), torch.randn(B, H, generator=g, **F64)
    w_hh = torch.randn(3 * H, H, generator=g, **F64) * H**-0.5
    b_hn, ln_hh = torch.randn(H, generator=g, **F64), 1 + 0.3 * torch.randn(3 * H, generator=g,
                                                                             **F64)  # fmt: skip
    drop = (torch.rand(B, H, generator=g, **F64) > 0.3).double() / 0.7
    lengths, rng = torch.tensor([T, 1, 2, T, 2, T]), torch.tensor([99, 7])
    dy, dhT = torch.randn(T, B, H, generator=g, **F64), torch.randn(B, H, generator=g, **F64)
    opts = (rng, 0.3, 2, drop, ln_hh)
    runs = {}
    with threaded_programs(), _common.forced_persistent_tiles(8, 8, 4):
        for fwd in ("stepwise", "persistent"):
            out = torch.ops.fused_rnn.gru_fwd(gx, h0, w_hh, b_hn, lengths, False, 0, True, fwd,
                                              *opts)  # fmt: skip
            y, h_T, hs, ws, aux = out
            for bwd in ("stepwise", "persistent"):
                grads = torch.ops.fused_rnn.gru_bwd(dy, dhT, hs, ws, w_hh, lengths, False, 0,
                                                    [True] * 5, bwd, aux, *opts)  # fmt: skip
                runs[fwd, bwd] = (list(out), list(grads))
    ref_out, ref_grads = runs["stepwise", "stepwise"]
    for key, (out, grads) in runs.items():
        for a, b in zip(out, ref_out):
            assert _rel(a, b) < 1e-12, key
        for a, b in zip(grads, ref_grads):
            assert _rel(a, b) < 1e-10, key


# ----------------------------------------------------------------------------- negative control


@triton.jit
def _barrier_odd(cnt, target, EARLY: tl.constexpr):
    """The grid barrier, except (EARLY) that in a grid with 2 barriers a step (the GRU with layer
    norm) the second of each step, layer norm's, lets the grid through one arrival early."""
    n = tl.num_programs(0)
    early = (target // n) % 2 if EARLY else 0
    tl.debug_barrier()
    tl.atomic_add(cnt, 1, sem="release", scope="gpu")
    while tl.atomic_add(cnt, 0, sem="acquire", scope="gpu") < target - early:
        pass
    tl.debug_barrier()


@triton.jit
def _barrier_odd_early(cnt, target):
    _barrier_odd(cnt, target, True)


@triton.jit
def _barrier_odd_exact(cnt, target):
    _barrier_odd(cnt, target, False)


@pytest.mark.parametrize("early", [True, False], ids=["early", "exact"])
def test_layer_norm_barrier_is_needed(early, monkeypatch, persistent_only):
    """Layer norm's barrier (the row statistics of every program) made one arrival early: the
    programs that pass merge partials not yet written (NaN poison, or a stale step's), and
    the checks must fail (greedy schedule: deterministic). The control: the same substitute
    made exact passes."""
    monkeypatch.setattr(
        gru_mod, "_grid_barrier", _barrier_odd_early if early else _barrier_odd_exact
    )
    with threaded_programs() as g, _common.forced_persistent_tiles(8, 8, 16):
        run = lambda: check_module("GRU", backend="persistent", layers=1, bi=False, H=16, B=6,
                                   T=3, zone=(0.0, 0.0), p=0.0)  # noqa: E731  # fmt: skip
        if early:
            with pytest.raises(AssertionError, match="non-finite|relative errors"):
                run()
        else:
            run()
    assert g.launches[0].kernel == KERNELS["GRU"][0] and g.launches[0].grid == (2, 1, 1)


# ----------------------------------------------------------------------------- fp32, the seed


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_fp32_matches_torch_path_same_seed(mode, persistent_only):
    """fp32 persistent kernels (a 2-program grid) against the fp32 torch loop drawing the same
    masks from the same seed: 1e-5 relative (fp32 rounding, ~6e-8, over a few steps and
    products of width <= 64, with margin; a mask that differs changes a unit by O(1))."""
    ln = mode != "RNN_TANH"
    m = _module(mode, layers=1, bi=False, zone=(0.3, 0.4), p=0.25, ln=ln, H=16).float().train()
    x = torch.randn(3, 8, 5, requires_grad=True)
    outs = {}
    for backend in ("persistent", "torch"):
        m.backend = backend
        torch.manual_seed(2)
        with threaded_programs(), _common.forced_persistent_tiles(8, 8, 4):
            y = m(x)[0]
            outs[backend] = (y, *torch.autograd.grad(y.square().sum(), [x, *m.parameters()]))
    for a, b in zip(outs["persistent"], outs["torch"]):
        assert _rel(a.double(), b.double()) < 1e-5
    # the masks really were drawn: another seed gives other outputs
    m.backend = "torch"
    torch.manual_seed(3)
    assert not torch.equal(m(x)[0], outs["torch"][0])
    assert _rng.threshold(0.3) == _common.zoneout_threshold(0.3)
