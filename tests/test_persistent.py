"""The persistent kernels (one launch per sequence and direction) and their launch decisions.

Kernel vs reference: `lstm_recurrence`, `gru_recurrence` and `rnn_recurrence` of
fused_rnn.recurrence with backend="persistent" against the float64 oracle
`fused_rnn.reference.recurrence`: outputs, final states and the gradients of x (through
gx = x W_ih^T + b), h0, c0 and every weight (w_hh, w_hr, w_ch, b_hh whose n block is the GRU's
b_hn). The stepwise kernels are
replaced by a tripwire there, so a test passes only if the persistent kernels did the work.

Without CUDA the kernels run on CPU tensors under TRITON_INTERPRET=1 (set before triton is
imported), where programs run one after another: a grid barrier only works with one program, so
the launchers use a single program covering all units and the whole batch. Multi-program tiling
is checked where no barrier is crossed (T = 1, no projection). Every kernel output buffer is
NaN-filled before the kernel runs (poison): an element a kernel forgets to write fails a test.

Launch decisions: the co-residency bound, `choose` and the tiling are pure functions, checked with
fake device properties on both sides of each limit; "auto" picks the persistent kernels only
where a measurement says so.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
os.environ.setdefault("FUSED_RNN_POISON", "1")

import json  # noqa: E402
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
    """GPU-like tiling (16 units x 16 sequences per program: 3 x 2 programs) where no barrier is
    crossed (one step, no projection): programs' slices of W_hh, units and batch tiles."""

    def tiles(H, B, P=0, sm_count=1):
        return 16, 16, 16, (-(-max(H, P) // 16), -(-B // 16))

    monkeypatch.setattr(lstm_mod, "persistent_tiles", tiles)
    monkeypatch.setattr(gru_mod, "persistent_tiles", tiles)
    check_case(c, TOL[c.dtype], persistent=True)


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter's guard")
def test_interpreter_refuses_a_barrier_over_several_programs(monkeypatch):
    """Under the interpreter a multi-program grid barrier would spin forever: it raises."""
    monkeypatch.setattr(
        gru_mod, "persistent_tiles", lambda H, B, P=0, sm_count=1: (16, 0, 16, (3, 1))
    )
    gx, h0 = torch.randn(2, 2, 3 * 33), torch.randn(2, 33)
    with pytest.raises(RuntimeError, match="one after another"):
        gru_recurrence(gx, h0, torch.randn(99, 33), backend="persistent")


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_falls_back_to_stepwise(mode, monkeypatch):
    """When the persistent launch is refused the stepwise kernels give the same results."""
    launched = []

    def refuse(kernel, grid, **kw):
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
# what the H=768 fp16 LSTM kernels compiled to on sm_90 (bench/NOTES.md)
LSTM768 = _common.KernelResources(n_regs=190, shared=160 * 1024, num_warps=8)


def test_max_coresident_bounds():
    # 190 regs x 256 threads and 160 KB: one program per SM
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


def test_persistent_tiles_on_a_gpu(monkeypatch):
    monkeypatch.setattr(_common, "is_interpreter", lambda: False)
    # FlashRNN setting: 48 programs of 16 units, one batch tile
    assert _common.persistent_tiles(768, 16, 0, 132) == (16, 16, 16, (48, 1))
    # 16 x 16-unit blocks would need 256 programs: units per program doubled
    assert _common.persistent_tiles(4096, 16, 0, 132) == (32, 16, 16, (128, 1))
    # batch tiles stop at 32 (wider ones spilled): B=64 in 2 tiles
    assert _common.persistent_tiles(512, 64, 0, 132) == (16, 16, 32, (32, 2))
    # B=256 in 8 tiles: 48 x 8 and 24 x 8 programs too many -> 64 units per program
    assert _common.persistent_tiles(768, 256, 0, 132) == (64, 16, 32, (12, 8))
    # projection: the grid covers whichever of H, P needs more blocks
    assert _common.persistent_tiles(1024, 8, 256, 132) == (16, 16, 16, (64, 1))
    assert _common.split_k(1024, 8) == 8 and _common.split_k(32, 8) == 2
    assert _common.split_k(16, 8) == 1


def test_launch_refused_before_compiling(monkeypatch):
    """On a (fake) GPU whose grid cannot hold the programs, nothing is compiled or launched."""
    monkeypatch.setattr(_common, "is_interpreter", lambda: False)
    monkeypatch.setattr(_common, "device_props", lambda device: _common.DeviceProps(sm_count=4))

    class Kernel:
        def warmup(self, *a, **k):
            raise AssertionError("compiled")

        def __getitem__(self, grid):
            raise AssertionError("launched")

    ok = _common.launch_persistent(Kernel(), (8, 1), barriers=3, onchip_bytes=1024, device="cpu")
    assert ok is False
    ok = _common.launch_persistent(
        Kernel(), (2, 1), barriers=3, onchip_bytes=300 * 1024, device="cpu"
    )
    assert ok is False


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

_COMPILE = r"""
import os, re, subprocess, tempfile
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
import fused_rnn.kernels.lstm as L
import fused_rnn.kernels.gru as G

def build(kernel, sig, consts, ints):
    fn = kernel.fn
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig.get(n, "constexpr").startswith("*") or ints.get(n, 1) % 16 == 0}
    sig.update({k: "constexpr" for k in consts})
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                        options=dict(num_warps=8, maxnreg=255))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(ck.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True)
    os.unlink(f.name)
    reg, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", out.stdout).groups())
    print(kernel.fn.__name__, reg, stack, ck.metadata.shared)

H, B = 512, 16
p, acc = "*fp16", "*fp32"
common = dict(ACC=tl.float32, DOT_PREC="ieee", BLOCK_B=16, REVERSE=False)
ints = dict(T=1024, B=B, H=H, R=H)
lstm = dict(G=4, COUPLED=False, BLOCK_H=16, BLOCK_P=16, BLOCK_R=H, BLOCK_HK=H, SPLIT_R=8,
            SPLIT_HK=8, HAS_PEEP=False, HAS_LEN=True, HAS_PROJ=False, w_hr=None, w_ch=None)
build(L._lstm_fwd_persistent_kernel,
      dict(gx=p, hs=p, cs=acc, y=p, gates=acc, w_hh=p, lengths="*i64", cnt="*i32",
           T="i32", B="i32", H="i32", R="i32"),
      dict(common, **lstm, STORE_GATES=True, ms=None), ints)
build(L._lstm_bwd_persistent_kernel,
      dict(dgx=p, gates=acc, cs=acc, dh=acc, dc=acc, dy=p, w_hh=p, lengths="*i64", cnt="*i32",
           T="i32", B="i32", H="i32", R="i32"),
      dict(common, **lstm, dhs=None), ints)
gru = dict(CELL=0, BLOCK_H=16, BLOCK_K=H, SPLIT_K=8, HAS_LEN=True)
build(G._fwd_persistent_kernel,
      dict(gx=p, hs=p, w_hh=p, b_hn=p, lengths="*i64", y=p, ws=acc, cnt="*i32",
           T="i32", B="i32", H="i32"),
      dict(common, **gru, HAS_B_HN=True, STORE_WS=True), ints)
build(G._bwd_persistent_kernel,
      dict(dy=p, hs=p, ws=acc, w_hh=p, lengths="*i64", carry=acc, dgx=p, dhn=p, cnt="*i32",
           T="i32", B="i32", H="i32"),
      dict(common, **gru), ints)
"""


@pytest.mark.slow
def test_compiles_for_sm90_without_spills():
    """The persistent kernels compile for the H100 (Triton's bundled ptxas) with no register
    spills and shared memory one block may have, at H=512 fp16 B=16 with lengths."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    res = subprocess.run(
        [sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split() for line in res.stdout.strip().splitlines()]
    assert len(rows) == 4, res.stdout
    for name, reg, stack, shared in rows:
        assert int(stack) == 0, f"{name} spills: {rows}"
        assert int(reg) <= 255 and int(shared) <= 227 * 1024, f"{name}: {rows}"
