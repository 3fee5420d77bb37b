"""The persistent kernels (one launch per sequence and direction) and their launch decisions.

Kernel vs reference: `lstm_recurrence`, `gru_recurrence` and `rnn_recurrence` of
fused_rnn.recurrence with backend="persistent" against the float64 oracle
`fused_rnn.reference.recurrence`: outputs, final states and the gradients of x (through
gx = x W_ih^T + b), h0, c0 and every weight (w_hh, w_hr, w_ch, b_hh whose n block is the GRU's
b_hn). The stepwise kernels are
replaced by a tripwire there, so a test passes only if the persistent kernels did the work.

Without CUDA the kernels run on CPU tensors under TRITON_INTERPRET=1 (set before triton is
imported), where programs run one after another: a grid barrier only works with one program, so
here the launchers use a single program covering all units and the whole batch in one chunk.
Multi-program tiling is checked where no barrier is crossed (T = 1, no projection); batch chunks
(a program looping over the batch) across many steps. Every kernel output buffer is NaN-filled
before the kernel runs (poison): an element a kernel forgets to write fails a test.

Launch decisions: the co-residency bound, `choose` and the tiling are pure functions, checked with
fake device properties on both sides of each limit; the launch itself (cooperative, refused by
the driver, or impossible without cooperative launch) with fake kernels; "auto" picks the
persistent kernels only where a measurement says so. The sm_90 compile of every persistent
kernel at the flashrnn size is checked from fused_rnn.bench.kernel_report (slow). Grids of
several programs crossing barriers run in tests/test_persistent_grid.py (a thread per program).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
os.environ.setdefault("FUSED_RNN_POISON", "1")

import contextlib  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
from kernel_cases import DEVICE, Case, check_case, loss_of, make_problem, rel_err  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils.rnn import pack_sequence  # noqa: E402

import fused_rnn  # noqa: E402
from fused_rnn import dispatch, reference  # noqa: E402
from fused_rnn.kernels import _common  # noqa: E402
from fused_rnn.kernels import gru as gru_mod  # noqa: E402
from fused_rnn.kernels import lstm as lstm_mod  # noqa: E402
from fused_rnn.recurrence import gru_recurrence, lstm_recurrence, rnn_recurrence  # noqa: E402

INTERPRETED = _common.is_interpreter()

# Relative error ‖kernel - reference‖ / ‖reference‖ per tensor, against float64 maths on the
# same (rounded) inputs:
#   fp64: only the summation order differs (split-K sums, ~1e-15 seen) -> 1e-10.
#   fp32: exact ("ieee") fp32 dots, T steps of fp32 rounding (~3e-7 seen in the stepwise
#         tests) -> 1e-5; TF32 is switched off by the fixture below.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}

STEPWISE_KERNELS = [
    (lstm_mod, "_lstm_fwd_cell_kernel"),
    (lstm_mod, "_lstm_fwd_proj_kernel"),
    (lstm_mod, "_lstm_bwd_cell_kernel"),
    (lstm_mod, "_lstm_bwd_dh_kernel"),
    (gru_mod, "_fwd_step_kernel"),
    (gru_mod, "_bwd_step_kernel"),
]


class _Tripwire:
    """Stands in for a stepwise kernel: launching it fails the test."""

    def __init__(self, name):
        self.name = name

    def __getitem__(self, grid):
        raise AssertionError(f"the stepwise kernel {self.name} ran instead of a persistent one")


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setenv("FUSED_RNN_POISON", "1")
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture
def persistent_only(monkeypatch):
    """The stepwise kernels fail when launched: results must come from the persistent ones."""
    for mod, name in STEPWISE_KERNELS:
        monkeypatch.setattr(mod, name, _Tripwire(name))


# ----------------------------------------------------------------------------- problems


# ----------------------------------------------------------------------------- kernel vs reference

LSTM_VARIANTS = [
    dict(),
    dict(P=5),
    dict(peep=True),
    dict(coupled=True),
    dict(P=17, peep=True, coupled=True),
]
CELL_CASES = [
    Case(mode=m, lens=lens, reverse=rev, **v)
    for m, variants in [
        ("LSTM", LSTM_VARIANTS),
        ("GRU", [{}]),
        ("RNN_TANH", [{}]),
        ("RNN_RELU", [{}]),
    ]
    for v in variants
    for lens, rev in [(False, False), (True, True), (True, False), (False, True)]
]
SHAPES = [
    Case(mode="LSTM", T=1, B=1, P=4, peep=True, lens=True, reverse=True),
    Case(mode="LSTM", T=1, B=4, coupled=True),
    Case(mode="GRU", T=1, B=1, lens=True),
    Case(mode="RNN_RELU", T=1, B=2, reverse=True),
    Case(mode="LSTM", B=1, T=5, H=16, I=1, P=3, reverse=True),
    Case(mode="GRU", B=1, T=7, H=33, reverse=True),
    Case(mode="LSTM", B=5, T=9, H=20, I=3, P=7, peep=True, lens=True, reverse=True, coupled=True),
    Case(mode="RNN_TANH", B=17, T=4, H=40, lens=True),
]
FP32 = [
    Case(mode="LSTM", dtype=torch.float32, P=17, peep=True, lens=True, reverse=True),
    Case(mode="LSTM", dtype=torch.float32, coupled=True, lens=True),
    Case(mode="GRU", dtype=torch.float32, lens=True, reverse=True),
    Case(mode="RNN_TANH", dtype=torch.float32, lens=True),
]


@pytest.mark.parametrize("c", CELL_CASES + SHAPES + FP32, ids=lambda c: c.id)
def test_matches_reference(c, persistent_only):
    check_case(c, TOL[c.dtype], persistent=True)


def _force_tiles(monkeypatch, units=None, batch=None, batch_bwd=None):
    """The launchers' tiling with `units` per program and `batch` sequences per product
    (`batch_bwd` in the backward), as on a GPU, instead of the interpreter's single tile."""

    def tiles(H, B, **kw):
        b = batch_bwd if kw.get("backward") and batch_bwd is not None else batch
        return _common.persistent_tile_choices(H, B, units=units, batch=b, **kw)

    monkeypatch.setattr(lstm_mod, "persistent_tile_choices", tiles)
    monkeypatch.setattr(gru_mod, "persistent_tile_choices", tiles)


@pytest.mark.skipif(not INTERPRETED, reason="tiles are the interpreter's single program")
@pytest.mark.parametrize(
    "c",
    [
        Case(mode="LSTM", B=20, T=1, H=33, peep=True, lens=True),
        Case(mode="LSTM", B=20, T=1, H=40, coupled=True, reverse=True),
        Case(mode="GRU", B=20, T=1, H=33, lens=True),
        Case(mode="RNN_TANH", B=20, T=1, H=33),
    ],
    ids=lambda c: c.id,
)
def test_multi_program_tiles(c, monkeypatch, persistent_only):
    """GPU-like tiling (16 units per program: 3 programs, each over the whole batch in chunks of
    16 sequences, 2 chunks) where no barrier is crossed (one step, no projection): programs'
    slices of W_hh, unit blocks and batch chunks."""
    _force_tiles(monkeypatch, units=16, batch=16)
    check_case(c, TOL[c.dtype], persistent=True)


@pytest.mark.parametrize(
    "c",
    [
        Case(mode="LSTM", B=20, T=6, H=20, P=7, peep=True, lens=True, reverse=True),
        Case(mode="LSTM", B=20, T=6, H=20, coupled=True, lens=True),
        Case(mode="LSTM", B=20, T=6, H=20),
        Case(mode="GRU", B=20, T=6, H=20, lens=True, reverse=True),
        Case(mode="RNN_RELU", B=20, T=6, H=20, lens=True),
    ],
    ids=lambda c: c.id,
)
def test_batch_chunks(c, monkeypatch, persistent_only):
    """One program looping over the batch in chunks across many steps (forward 16 sequences
    per product, backward 4, as shared memory makes it at large sizes): the states that cross
    steps go through their buffers per chunk, and a chunk's padding never leaks."""
    _force_tiles(monkeypatch, batch=16, batch_bwd=4 if c.G > 1 else 16)
    check_case(c, TOL[c.dtype], persistent=True)


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter's guard")
def test_interpreter_refuses_a_barrier_over_several_programs(monkeypatch):
    """Under the interpreter a multi-program grid barrier would spin forever: it raises."""
    _force_tiles(monkeypatch, units=16)
    gx, h0 = torch.randn(2, 2, 3 * 33), torch.randn(2, 33)
    with pytest.raises(RuntimeError, match="one after another"):
        gru_recurrence(gx, h0, torch.randn(99, 33), backend="persistent")


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_falls_back_to_stepwise(mode, monkeypatch):
    """When the persistent launch is refused the stepwise kernels give the same results."""
    launched = []

    def refuse(kernel, tiles, **kw):
        launched.append(kernel)
        return False

    monkeypatch.setattr(lstm_mod, "launch_persistent", refuse)
    monkeypatch.setattr(gru_mod, "launch_persistent", refuse)
    c = Case(mode=mode, P=5 if mode == "LSTM" else 0, lens=True, reverse=True)
    check_case(c, TOL[c.dtype], persistent=True)
    assert len(launched) == 2  # forward and backward each asked, then ran stepwise


def test_grad_subset_and_no_grad(persistent_only):
    """Only w_hh needs a gradient; under no_grad nothing is kept and outputs are the same."""
    c = Case(mode="LSTM", B=3, T=5, H=16, I=4, P=6, peep=True, lens=True, reverse=True)
    x, h0, c0, w, lengths = make_problem(c)
    ref = reference.recurrence("LSTM", x, h0, c0, w, lengths, True)
    cot = [torch.randn_like(r) for r in ref]
    (ref_whh,) = torch.autograd.grad(loss_of(ref, cot), [w.w_hh])
    gx = (x @ w.w_ih.t() + w.b_ih + w.b_hh).detach()
    w_hh = w.w_hh.detach().requires_grad_()
    kw = dict(
        w_hr=w.w_hr.detach(),
        w_ch=w.w_ch.detach(),
        lengths=lengths,
        reverse=True,
        backend="persistent",
    )
    out = lstm_recurrence(gx, h0.detach(), c0.detach(), w_hh, **kw)
    loss_of(out, cot).backward()
    assert rel_err(w_hh.grad, ref_whh) < TOL[torch.float64]
    with torch.no_grad():
        plain = lstm_recurrence(gx, h0.detach(), c0.detach(), w_hh, **kw)
    for a, b in zip(out, plain, strict=True):
        assert torch.equal(a.detach(), b) and not b.requires_grad


def test_bad_inputs_raise():
    gx, h0, w_hh = torch.randn(3, 2, 9), torch.randn(2, 3), torch.randn(9, 3)
    with pytest.raises(TypeError):  # a dtype mix is refused, not cast silently
        gru_recurrence(gx, h0.double(), w_hh, backend="persistent")
    with pytest.raises(ValueError, match="h0"):
        lstm_recurrence(
            torch.randn(3, 2, 12), h0[:, :2], h0, torch.randn(12, 3), backend="persistent"
        )
    with pytest.raises(ValueError, match="nonlinearity"):
        rnn_recurrence(gx[..., :3], h0, w_hh[:3], nonlinearity="gelu", backend="persistent")


# ----------------------------------------------------------------------------- modules

MODULE_DTYPE = torch.float64 if DEVICE.type == "cpu" else torch.float32
MODULE_TOL = (
    {"rtol": 1e-9, "atol": 1e-10} if MODULE_DTYPE == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
)


def _flatten(cls, out):
    y, h = out
    if isinstance(y, nn.utils.rnn.PackedSequence):
        y = y.data
    return [y, *h] if cls == "LSTM" else [y, h]


@pytest.mark.parametrize(
    "cls,kw,packed",
    [
        ("LSTM", dict(num_layers=2, bidirectional=True), True),
        ("LSTM", dict(proj_size=4, batch_first=True), False),
        ("GRU", dict(num_layers=2, bidirectional=True, batch_first=True), False),
        ("GRU", dict(bidirectional=True), True),
        ("RNN", dict(nonlinearity="relu", num_layers=2), False),
    ],
    ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(f"{k}={x}" for k, x in v.items()),
)
def test_module_matches_torch(cls, kw, packed, persistent_only):
    I, H, B, T = 3, 10, 4, 5
    ref = getattr(nn, cls)(I, H, **kw).to(DEVICE, MODULE_DTYPE)
    ours = getattr(fused_rnn, cls)(I, H, **kw, backend="persistent").to(DEVICE, MODULE_DTYPE)
    ours.load_state_dict(ref.state_dict())
    D = 2 if kw.get("bidirectional") else 1
    L = kw.get("num_layers", 1)
    R = kw.get("proj_size", 0) or H
    h0 = torch.randn(L * D, B, R, device=DEVICE, dtype=MODULE_DTYPE, requires_grad=True)
    c0 = torch.randn(L * D, B, H, device=DEVICE, dtype=MODULE_DTYPE, requires_grad=True)
    hx = (h0, c0) if cls == "LSTM" else h0
    if packed:
        seqs = [torch.randn(n, I, device=DEVICE, dtype=MODULE_DTYPE) for n in (2, 5, 1, 4)]
        x = pack_sequence(seqs, enforce_sorted=False)
        xs = []
    else:
        shape = (B, T, I) if kw.get("batch_first") else (T, B, I)
        x = torch.randn(shape, device=DEVICE, dtype=MODULE_DTYPE, requires_grad=True)
        xs = [x]
    out_ref, out_our = _flatten(cls, ref(x, hx)), _flatten(cls, ours(x, hx))
    for a, b in zip(out_our, out_ref, strict=True):
        torch.testing.assert_close(a, b, **MODULE_TOL)
    cot = [torch.randn_like(o) for o in out_ref]
    states = [h0] + ([c0] if cls == "LSTM" else [])
    g_ref = torch.autograd.grad(loss_of(out_ref, cot), xs + states + list(ref.parameters()))
    g_our = torch.autograd.grad(loss_of(out_our, cot), xs + states + list(ours.parameters()))
    for a, b in zip(g_our, g_ref, strict=True):
        torch.testing.assert_close(a, b, **MODULE_TOL)


# ----------------------------------------------------------------------------- launch decisions

H100 = _common.DeviceProps(sm_count=132)  # defaults: sm_90's per-SM limits
# what the H=768 fp16 LSTM backward kernel compiled to on sm_90 (bench/NOTES.md)
LSTM768 = _common.KernelResources(n_regs=254, shared=192 * 1024, num_warps=4)


def test_max_coresident_bounds():
    # 254 regs x 128 threads and 192 KB: one program per SM
    assert _common.max_coresident(H100, LSTM768) == 132
    # small kernel: registers bound it (64 regs -> 32 warps per SM -> 8 programs of 4 warps)
    small = _common.KernelResources(n_regs=64, shared=0, num_warps=4)
    assert _common.max_coresident(H100, small) == 8 * 132
    # shared memory bounds it: 100 KB (+1 KB reserved) twice in 228 KB
    smem = _common.KernelResources(n_regs=32, shared=100 * 1024, num_warps=4)
    assert _common.max_coresident(H100, smem) == 2 * 132
    # registers rounded per warp (255 -> 8192 per warp): 16 warps of them do not fit an SM
    fat = _common.KernelResources(n_regs=255, shared=0, num_warps=16)
    assert _common.max_coresident(H100, fat) == 0
    # more shared memory than a block may have
    huge = _common.KernelResources(n_regs=32, shared=230 * 1024, num_warps=4)
    assert _common.max_coresident(H100, huge) == 0
    # more threads than an SM has
    wide = _common.KernelResources(n_regs=16, shared=0, num_warps=128)
    assert _common.max_coresident(H100, wide) == 0


def test_choose_fits_is_persistent():
    cfg = _common.PersistentConfig(programs=48, onchip_bytes=128 * 1024)
    assert _common.choose(H100, LSTM768, cfg) == "persistent"
    assert _common.choose(H100, None, cfg) == "persistent"  # before compiling: estimate only
    assert _common.choose(H100, LSTM768, _common.PersistentConfig(132, 128 * 1024)) == "persistent"


@pytest.mark.parametrize(
    "props,res,cfg",
    [
        # more programs than SMs
        (H100, LSTM768, _common.PersistentConfig(programs=133, onchip_bytes=1024)),
        (H100, None, _common.PersistentConfig(programs=192, onchip_bytes=1024)),
        # the weight slice does not fit a block's shared memory (fp32 H=1024: 256 KB)
        (H100, None, _common.PersistentConfig(programs=64, onchip_bytes=256 * 1024)),
        # too many registers to be resident at all
        (H100, _common.KernelResources(255, 0, 16), _common.PersistentConfig(48, 1024)),
        # compiled shared memory over the limit
        (H100, _common.KernelResources(128, 240 * 1024, 8), _common.PersistentConfig(48, 1024)),
        # fits one per SM, but the device is smaller than the grid
        (_common.DeviceProps(sm_count=40), LSTM768, _common.PersistentConfig(48, 128 * 1024)),
        # a device with less shared memory per SM (100 KB): 160 KB does not fit
        (
            _common.DeviceProps(sm_count=132, smem_per_sm=100 * 1024, smem_per_block=99 * 1024),
            LSTM768,
            _common.PersistentConfig(48, 96 * 1024),
        ),
        # spills: the on-chip slice would be re-read from memory every step
        (
            H100,
            _common.KernelResources(128, 1024, 8, n_spills=64),
            _common.PersistentConfig(48, 1024),
        ),
        # an empty grid
        (H100, LSTM768, _common.PersistentConfig(0, 1024)),
    ],
    ids=[
        "programs",
        "programs-precompile",
        "onchip",
        "regs",
        "smem",
        "small-device",
        "small-smem",
        "spills",
        "empty",
    ],  # fmt: skip
)
def test_choose_refuses_to_stepwise(props, res, cfg):
    assert _common.choose(props, res, cfg) == "stepwise"


def test_persistent_tiles_on_a_gpu():
    """The tiling on an sm_90 (132 SMs): every program owns a block of units for every
    sequence (the grid holds W_hh once), 64 rows on the MMA's M side where that fits."""
    tiles = functools.partial(_common.persistent_tiles, props=H100)
    # flashrnn, fp16 LSTM: 16 units x 4 gates = 64 rows, 48 programs, the batch of 16 in one chunk
    t = tiles(768, 16, G=4)
    assert (t.units, t.batch, t.programs, t.mma_m) == (16, 16, 48, 64)
    assert t.onchip_bytes <= H100.smem_per_block
    b = tiles(768, 16, G=4, backward=True)
    assert (b.units, b.batch, b.programs, b.mma_m) == (16, 16, 48, 64)
    # the GRU's 3 gates padded to 4 blocks; the RNN's one gate needs 64 units for M = 64
    assert (tiles(768, 16, G=3).units, tiles(768, 16, G=1).units) == (16, 64)
    # fp32: 64 rows of W (192 KB) and h (48 KB) do not fit: 8 units (mma.sync), 96 programs
    t = tiles(768, 16, G=4, elt=4)
    assert (t.units, t.programs, t.mma_m) == (8, 96, 32)
    # RNN at H=1760: 64 rows of W (220 KB) do not fit: 16 units, 110 programs
    t = tiles(1760, 16, G=1)
    assert (t.units, t.programs) == (16, 110) and t.onchip_bytes <= H100.smem_per_block
    # deepbench LSTM / large: W_hh once (128 KB over 64 programs) whatever the batch; the
    # backward's operand (4 gates x batch chunk) shrinks its chunk to 8 sequences
    for B in (128, 256):
        t, b = tiles(1024, B, G=4), tiles(1024, B, G=4, backward=True)
        assert (t.units, t.programs, b.programs, b.batch) == (16, 64, 64, 8)
        assert max(t.onchip_bytes, b.onchip_bytes) <= H100.smem_per_block
    # a batch never adds programs; chunks are at most 64 wide
    assert tiles(512, 64, G=4).grid == tiles(512, 1, G=4).grid == (32,)
    assert tiles(512, 64, G=4).batch == 64
    # projection: P rows of h in blocks of 16 spread over the units' programs
    t = tiles(1024, 8, G=4, P=256)
    assert (t.units, t.rows, t.programs) == (16, 16, 64)
    # chunks of a reduction: no padding to a power of two
    assert _common.k_chunks(768) == [512, 256]
    assert _common.k_chunks(1760) == [512, 512, 512, 128, 64, 32]
    assert _common.k_chunks(33) == [32, 16] and _common.k_chunks(768, 256) == [256] * 3


def _time_limit(seconds: float):
    """Fails (rather than hangs) a call that does not return within `seconds`."""

    def expired(signum, frame):
        raise TimeoutError(f"did not return within {seconds} s")

    @contextlib.contextmanager
    def limit():
        old = signal.signal(signal.SIGALRM, expired)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)

    return limit()


@pytest.mark.parametrize("B", [4225, 10**6, 2**31 - 1])
def test_persistent_tiles_huge_batch_returns(B):
    """Regression: with batch tiles of 32 per program, a batch over 32 x SMs (B >= 4225 on an
    H100) made the tiling loop forever. The grid now never depends on B: it returns at once,
    with the same grid as any batch, and the launch decision follows from it."""
    for G in (4, 3, 1):
        for backward in (False, True):
            with _time_limit(5.0):
                t = _common.persistent_tiles(768, B, G=G, backward=backward, props=H100)
            assert t.grid == _common.persistent_tiles(768, 16, G=G, props=H100).grid
            assert t.batch <= _common.PERSISTENT_MAX_BLOCK_B
            cfg = _common.PersistentConfig(t.programs, t.onchip_bytes)
            assert _common.choose(H100, None, cfg) == "persistent"


class _FakeCompiled:
    """What `kernel.warmup` returns: resources of a kernel that fits (one program per SM),
    with `n_spills` bytes of spills."""

    n_regs = 200
    metadata = type("Meta", (), {"shared": 120 * 1024, "num_warps": 4})

    def __init__(self, n_spills=0):
        self.n_spills = n_spills

    def _init_handles(self):
        pass


class _FakeKernel:
    """A persistent kernel whose launch is recorded, or refused with `error`; compiled with
    the batch chunks in `spill` it spills."""

    def __init__(self, error=None, spill=()):
        self.error, self.spill, self.launched, self.compiled = error, spill, [], []

    def warmup(self, *, grid, **kwargs):
        self.compiled.append(kwargs)
        return _FakeCompiled(n_spills=64 if kwargs["BLOCK_B"] in self.spill else 0)

    def __getitem__(self, grid):
        def launch(**kwargs):
            if self.error is not None:
                raise self.error
            self.launched.append((grid, kwargs))

        return launch


@pytest.fixture
def fake_gpu(monkeypatch):
    """launch_persistent as on a GPU (H100 limits), with the installed Triton's options."""
    monkeypatch.setattr(_common, "is_interpreter", lambda: False)
    monkeypatch.setattr(_common, "device_props", lambda device: H100)
    monkeypatch.setattr(_common, "_warned", set())


def test_launch_is_cooperative(fake_gpu):
    """A launch that fits goes out cooperatively (the driver refuses a grid that cannot be
    co-resident instead of hanging it), with maxnreg and a fresh zeroed counter."""
    k = _FakeKernel()
    assert _common.launch_persistent(k, _tiles(48), barriers=9, device="cpu", x=1)
    ((grid, kwargs),) = k.launched
    assert grid == (48,) and kwargs["launch_cooperative_grid"] is True
    assert kwargs["num_warps"] == _common.PERSISTENT_WARPS and kwargs["maxnreg"] == 255
    assert kwargs["cnt"].tolist() == [0] and kwargs["x"] == 1
    assert (kwargs["BLOCK_U"], kwargs["BLOCK_B"], kwargs["MAX_K"]) == (16, 16, 512)


def test_launch_tries_narrower_tiles_where_one_spills(fake_gpu):
    """A compiled choice that spills is passed over for the next (narrower) one; if every
    choice spills, nothing runs."""
    choices = _common.persistent_tile_choices(512, 64, G=4, backward=True, props=H100)
    assert choices[0] == _common.persistent_tiles(512, 64, G=4, backward=True, props=H100)
    assert [c.units for c in choices] == [choices[0].units] * len(choices)
    assert [(c.batch, c.max_k) for c in choices[:3]] == [(32, 256), (32, 128), (16, 256)]
    k = _FakeKernel(spill=(32,))
    assert _common.launch_persistent(k, choices, barriers=9, device="cpu")
    assert [kw["BLOCK_B"] for kw in k.compiled] == [32, 32, 16]
    ((grid, kwargs),) = k.launched
    assert kwargs["BLOCK_B"] == 16 and kwargs["MAX_K"] == 256
    k = _FakeKernel(spill={c.batch for c in choices})
    assert not _common.launch_persistent(k, choices, barriers=9, device="cpu")
    assert len(k.compiled) == len(choices) and not k.launched


@pytest.mark.parametrize(
    "msg",
    [
        "Triton Error [CUDA]: too many blocks in cooperative launch",  # MPS / green contexts
        "Triton Error [CUDA]: operation not supported",
    ],
)
def test_launch_refused_by_the_driver_falls_back(fake_gpu, msg, caplog):
    """Regression: a cooperative launch the driver refuses (MPS or green contexts limiting the
    SMs) raised instead of falling back; now the launcher returns False (the caller runs the
    stepwise kernels) and logs it once."""
    k = _FakeKernel(RuntimeError(msg))
    with caplog.at_level(logging.WARNING, logger="fused_rnn.kernels"):
        for _ in range(2):
            ok = _common.launch_persistent(k, _tiles(48), barriers=9, device="cpu")
            assert ok is False
    assert len(k.compiled) == 2 and not k.launched
    (rec,) = [r for r in caplog.records if "refused the cooperative launch" in r.getMessage()]
    assert msg in rec.getMessage() and rec.levelno == logging.WARNING


def test_launch_other_errors_still_raise(fake_gpu):
    """Only a refusal falls back: any other launch error reaches the caller."""
    k = _FakeKernel(RuntimeError("Triton Error [CUDA]: an illegal memory access"))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        _common.launch_persistent(k, _tiles(48), barriers=9, device="cpu")


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_driver_refusal_runs_stepwise(mode, monkeypatch, fake_gpu):
    """End to end through the launchers: a refused cooperative launch leaves the stepwise
    kernels to compute the same results (here the interpreter runs them)."""
    monkeypatch.setattr(_common, "is_interpreter", lambda: True)  # kernels: the interpreter
    refused = []
    real = _common.launch_persistent

    def refuse_on_gpu(kernel, tiles, **kw):
        # the GPU branch of launch_persistent with the driver refusing, then back to the
        # interpreter for whatever runs next
        monkeypatch.setattr(_common, "is_interpreter", lambda: False)
        try:
            fake = _FakeKernel(RuntimeError("Triton Error [CUDA]: too many blocks in "
                                            "cooperative launch"))  # fmt: skip
            ok = real(fake, tiles, **kw)
        finally:
            monkeypatch.setattr(_common, "is_interpreter", lambda: True)
        refused.append(ok)
        return ok

    monkeypatch.setattr(lstm_mod, "launch_persistent", refuse_on_gpu)
    monkeypatch.setattr(gru_mod, "launch_persistent", refuse_on_gpu)
    c = Case(mode=mode, lens=True, reverse=True)
    check_case(c, TOL[c.dtype], persistent=True)
    assert refused == [False, False]  # forward and backward both refused, both ran stepwise


def test_no_cooperative_launch_runs_stepwise(fake_gpu, monkeypatch, caplog):
    """Regression: a Triton without cooperative launch (before 3.2) launched a grid barrier
    with nothing guaranteeing co-residency. Now nothing with a barrier is compiled or
    launched there; without a barrier (one step) the kernel may still run."""
    monkeypatch.setattr(_common, "_cuda_launch_options", lambda: frozenset({"num_warps"}))
    k = _FakeKernel()
    with caplog.at_level(logging.DEBUG, logger="fused_rnn.kernels"):
        ok = _common.launch_persistent(k, _tiles(48), barriers=9, device="cpu")
    assert ok is False and not k.compiled and not k.launched
    assert "no cooperative launch" in caplog.text
    assert _common.launch_persistent(k, _tiles(48), barriers=0, device="cpu")
    ((grid, kwargs),) = k.launched
    assert "launch_cooperative_grid" not in kwargs and "maxnreg" not in kwargs


def _tiles(programs, onchip_bytes=1024, batch=16):
    return _common.PersistentTiles(16, 16, batch, programs, onchip_bytes, 64, 512)


def test_launch_refused_before_compiling(monkeypatch):
    """On a (fake) GPU whose grid cannot hold the programs, nothing is compiled or launched."""
    monkeypatch.setattr(_common, "is_interpreter", lambda: False)
    monkeypatch.setattr(_common, "device_props", lambda device: _common.DeviceProps(sm_count=4))
    monkeypatch.setattr(_common, "cooperative_launch_available", lambda: True)

    class Kernel:
        def warmup(self, *a, **k):
            raise AssertionError("compiled")

        def __getitem__(self, grid):
            raise AssertionError("launched")

    assert _common.launch_persistent(Kernel(), _tiles(8), barriers=3, device="cpu") is False
    big = _tiles(2, onchip_bytes=300 * 1024)
    assert _common.launch_persistent(Kernel(), [big, big], barriers=3, device="cpu") is False


def test_auto_picks_persistent_only_where_measured(monkeypatch, tmp_path):
    """ "auto" runs the persistent kernels only where a measurement says so (here a policy),
    never by default; "persistent" asked for explicitly runs wherever it can."""
    fake = dispatch.DeviceInfo("Fake GPU", (9, 0))
    monkeypatch.setattr(dispatch, "device_info", lambda device: fake)
    monkeypatch.delenv(dispatch.POLICY_ENV, raising=False)
    dispatch.set_autotune(False)
    dispatch.forget()
    cpu = torch.device("cpu")  # a GPU to dispatch (fake); the kernels run under the interpreter
    sizes = dict(dtype=torch.float16, steps=64, batch=8, input_size=16, hidden=32)
    try:
        for mode in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU"):
            assert dispatch.resolve("auto", mode, cpu, **sizes) == "torch"
            assert dispatch.resolve("persistent", mode, cpu, **sizes) == "persistent"
        assert dispatch.resolve("auto", "LSTM", cpu, **sizes, peephole=True) == "stepwise"
        key = dispatch.Problem("GRU", "fp16", 64, 8, 16, 32).key(fake.arch)
        policy = {"format": 1, "source": "test", "entries": {key: {"backend": "persistent",
                  "shapes": [{"shape": "T64 B8 I16 H32", "ms": {"torch": 2.0, "persistent": 1.0,
                                                                  "stepwise": 3.0}}]}}}  # fmt: skip
        (tmp_path / "policy.json").write_text(json.dumps(policy))
        monkeypatch.setenv(dispatch.POLICY_ENV, str(tmp_path / "policy.json"))
        dispatch.forget()
        assert dispatch.resolve("auto", "GRU", cpu, **sizes) == "persistent"
        assert dispatch.resolve("auto", "LSTM", cpu, **sizes) == "torch"
    finally:
        dispatch.set_autotune(None)
        monkeypatch.undo()
        dispatch.forget()
    assert dispatch.resolve("auto", "GRU", cpu, **sizes) == "torch"


def test_cooperative_launch_option_exists():
    """The installed Triton (>= 3.2) has the cooperative launch option the launcher passes."""
    assert _common.cooperative_launch_available()


# ----------------------------------------------------------------------------- sm_90 compile


@pytest.mark.slow
def test_compiles_for_sm90_wgmma_without_spills():
    """At the flashrnn size (B=16, H=768) in fp16 and bf16 every persistent kernel compiles for
    the H100 (Triton's bundled ptxas) as the launchers would launch it, with wgmma, no spills,
    shared memory a block may have, and `choose` accepting it on a 132-SM sm_90
    (fused_rnn.bench.kernel_report --quick, bench/NOTES.md)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fused_rnn.bench.kernel_report", "--quick", "--json",
           "--strategy", "persistent", "--jobs", "1"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    kernels = {(r["kernel"], r["dtype"]) for r in rows}
    cells = [f"{c} {d}" for c in ("lstm", "gru", "rnn") for d in ("fwd", "bwd")]
    assert kernels == {(k, dt) for k in cells for dt in ("fp16", "bf16")}, kernels
    for r in rows:
        what = f"{r['kernel']} {r['dtype']}: {r}"
        assert r["mma"] == "wgmma", what
        assert r["stack"] == 0, what
        assert r["smem"] <= H100.smem_per_block and r["regs"] <= 255, what
        assert r["verdict"] == "yes" and r["choice"] == 1, what  # the preferred tiling
        assert r["bar_sync"] <= 20, what  # v1: 40-61 per step (bench/NOTES.md)


def test_kernel_report_catches_stepwise_launches():
    """The compile report catches the stepwise kernels' launches (compiling nothing) as it does
    the persistent ones', whatever the launch path: the lean launcher would otherwise ask the
    driver of a GPU this machine lacks. Outside the interpreter, as the report runs."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch\n"
        "from fused_rnn.bench import kernel_report as kr\n"
        "for cell in ('lstm', 'gru', 'rnn'):\n"
        "    for c in kr.capture(cell, 4, 2, 16, 0, torch.float16, 'stepwise'):\n"
        "        print(c.label, c.persistent)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    labels = res.stdout.split("\n")
    for want in ("lstm fwd cell False", "lstm bwd cell False", "gru fwd step False",
                 "gru bwd step False", "rnn fwd step False", "rnn bwd step False"):  # fmt: skip
        assert want in labels, res.stdout
