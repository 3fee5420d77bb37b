"""The persistent kernels with several programs per grid, run under the CPU interpreter.

Each program of a grid runs in its own thread (tests/mp_interpreter.py: `threaded_programs`),
so the grid barriers of `_lstm_fwd_persistent_kernel`, `_lstm_bwd_persistent_kernel`,
`_fwd_persistent_kernel` and `_bwd_persistent_kernel` (GRU and the Elman RNN) are really
crossed by several programs, and `_common.forced_persistent_tiles` asks for GPU-like tiling:
several blocks of hidden units (and of projection rows), each program looping over several
batch chunks. Checked
against the float64 oracle (`kernel_cases.check_case`): outputs, final states, every gradient;
NaN-poisoned outputs; the stepwise kernels are tripwires, and the launches are recorded, so a
test passes only if the persistent kernels ran on the grid it names.

Schedules (mp_interpreter): "greedy" (the default here) is deterministic, one program at a
time, each running as far ahead as the barriers let it; "free" lets the OS interleave them.

Negative controls: the kernels' barrier, a jit helper they resolve by name at run time, is
replaced (module global `_grid_barrier` of kernels/lstm.py and kernels/gru.py); a barrier
that lets the grid through one arrival early must make the checks fail, one that waits for an
arrival too many must be reported as a hang within seconds.

Sizes stay small (T <= 8, H <= 48, B <= 20): every program is interpreted in Python.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
os.environ.setdefault("FUSED_RNN_POISON", "1")

import threading  # noqa: E402
import time  # noqa: E402

import kernel_cases  # noqa: E402
import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from kernel_cases import Case, check_case  # noqa: E402
from test_persistent import STEPWISE_KERNELS, _Tripwire  # noqa: E402

from fused_rnn.kernels import _common  # noqa: E402
from fused_rnn.kernels import gru as gru_mod  # noqa: E402
from fused_rnn.kernels import lstm as lstm_mod  # noqa: E402

INTERPRETED = _common.is_interpreter()
if INTERPRETED:
    from mp_interpreter import GridHangError, threaded_programs  # noqa: E402
    from triton.runtime import interpreter as _interp  # noqa: E402
    from triton.runtime.errors import InterpreterError  # noqa: E402

pytestmark = pytest.mark.skipif(
    not INTERPRETED,
    reason="threads for the interpreter's programs; on a GPU test_persistent.py runs real grids",
)

# Relative error per tensor against float64 maths on the same rounded inputs (as in
# test_persistent.py): fp64 differs only in summation order (~1e-15 seen) -> 1e-10; fp32 with
# exact ("ieee") dots, T steps of fp32 rounding (~3e-7 seen) -> 1e-5.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}

KERNELS = {
    "LSTM": ("_lstm_fwd_persistent_kernel", "_lstm_bwd_persistent_kernel"),
    "GRU": ("_fwd_persistent_kernel", "_bwd_persistent_kernel"),
    "RNN_TANH": ("_fwd_persistent_kernel", "_bwd_persistent_kernel"),
    "RNN_RELU": ("_fwd_persistent_kernel", "_bwd_persistent_kernel"),
}


@pytest.fixture(autouse=True)
def _poison():
    with _common.poisoned(True):
        assert _common.poison_enabled()
        yield


@pytest.fixture
def persistent_only(monkeypatch):
    """The stepwise kernels fail when launched: results must come from the persistent ones."""
    for mod, name in STEPWISE_KERNELS:
        monkeypatch.setattr(mod, name, _Tripwire(name))


@pytest.fixture
def grid(request):
    """Every program in its own thread; `request.param` (indirect) names the schedule."""
    with threaded_programs(getattr(request, "param", "greedy")) as g:
        yield g


def _expected_grid(c: Case, tiles):
    """One program per block of units (with a projection, per block of rows of h if there are
    more of those); each program loops over the batch in chunks: the grid is one-dimensional."""
    units, rows, batch = tiles
    return (max(triton.cdiv(c.H, units), triton.cdiv(c.P, rows)), 1, 1)


def _check(c: Case, tiles, g, batch_tiles: int = 2):
    """check_case on the forced tiling; then: exactly the persistent forward and backward
    kernels ran, each on the expected grid of >= 2 programs, each looping over >= `batch_tiles`
    batch chunks."""
    want = _expected_grid(c, tiles)
    chunks = triton.cdiv(c.B, tiles[2])
    assert want[0] >= 2 and chunks >= batch_tiles, f"grid {want}, {chunks} chunks: not meant"
    with _common.forced_persistent_tiles(*tiles):
        check_case(c, TOL[c.dtype], persistent=True)
    assert [(r.kernel, r.grid) for r in g.launches] == [(k, want) for k in KERNELS[c.mode]]
    assert all(r.hang is None for r in g.launches)


# ----------------------------------------------------------------------------- kernels vs oracle

# (case, (units, projection rows, batch rows per chunk) per program); every grid has >= 2
# programs, each looping over >= 2 batch chunks. make_lengths: unsorted, one full-length and
# one length-1 sequence.
CASES = [
    (Case(mode="LSTM", B=12, T=5, H=32, lens=True), (16, 16, 8)),
    (Case(mode="LSTM", B=8, T=5, H=33, peep=True, lens=True, reverse=True), (16, 16, 4)),
    (Case(mode="LSTM", B=10, T=5, H=24, coupled=True, reverse=True), (16, 16, 8)),
    # projection, two phases per step. Unit blocks 2 > projection blocks 1: program 1 owns
    # units but no rows of h
    (Case(mode="LSTM", B=12, T=5, H=32, P=12, lens=True), (16, 16, 8)),
    # projection blocks 3 > unit blocks 2: program 2 owns rows of h but no units
    (Case(mode="LSTM", B=8, T=5, H=24, P=20, lens=True, reverse=True), (16, 8, 4)),
    (
        Case(mode="LSTM", B=6, T=4, H=33, P=17, peep=True, coupled=True, lens=True, reverse=True),
        (16, 8, 4),
    ),
    (
        Case(mode="LSTM", B=8, T=4, H=32, P=20, lens=True, reverse=True, dtype=torch.float32),
        (16, 16, 4),
    ),
    (Case(mode="GRU", B=12, T=6, H=33, lens=True), (16, 16, 8)),
    (Case(mode="GRU", B=8, T=5, H=32, reverse=True), (16, 16, 4)),
    (Case(mode="RNN_TANH", B=12, T=6, H=40, lens=True), (16, 16, 8)),
    (Case(mode="RNN_RELU", B=10, T=6, H=24, lens=True, reverse=True), (8, 8, 8)),
]


def _case_id(v):
    if isinstance(v, Case):
        return v.id
    return "tiles{}x{}x{}".format(*v)


@pytest.mark.parametrize("c,tiles", CASES, ids=_case_id)
def test_matches_reference(c, tiles, grid, persistent_only):
    _check(c, tiles, grid)


@pytest.mark.parametrize(
    "c,tiles",
    [
        (Case(mode="LSTM", B=8, T=4, H=32, P=20, lens=True, reverse=True), (16, 16, 4)),
        (Case(mode="GRU", B=8, T=4, H=32, lens=True), (16, 16, 4)),
    ],
    ids=_case_id,
)
@pytest.mark.parametrize("grid", ["free"], indirect=True)
def test_matches_reference_free_schedule(c, tiles, grid, persistent_only):
    """All programs at once, interleaved by the OS: a different interleaving every run."""
    _check(c, tiles, grid)


def _packed_dead_tile_lengths(B, T):
    """Packed-like (non-increasing, the first full length) and the last batch tile of 8 (rows
    8..B-1) only of length 1: its programs have nothing live after step 0, yet every other
    program waits for them at every barrier."""
    assert B > 8 and T >= 4
    lengths = torch.ones(B, dtype=torch.long)
    lengths[:8] = torch.tensor([T, T, T - 1, T - 1, 3, 2, 2, 1])
    return lengths


@pytest.mark.parametrize(
    "c",
    [
        Case(mode="LSTM", B=12, T=5, H=32, P=20, lens=True),
        Case(mode="GRU", B=12, T=5, H=33, lens=True, reverse=True),
    ],
    ids=lambda c: c.id,
)
def test_packed_lengths_with_a_dead_tile(c, monkeypatch, grid, persistent_only):
    monkeypatch.setattr(kernel_cases, "make_lengths", _packed_dead_tile_lengths)
    _check(c, (16, 16, 8), grid)


# ----------------------------------------------------------------------------- negative controls


@triton.jit
def _arrive_and_wait(cnt, target):
    tl.debug_barrier()
    tl.atomic_add(cnt, 1, sem="release", scope="gpu")
    while tl.atomic_add(cnt, 0, sem="acquire", scope="gpu") < target:
        pass
    tl.debug_barrier()


@triton.jit
def _barrier_exact(cnt, target):
    """The kernels' barrier, written again here: substituting it must change nothing."""
    _arrive_and_wait(cnt, target)


@triton.jit
def _barrier_early(cnt, target):
    """Faulty: lets the grid through when one program has not arrived yet."""
    _arrive_and_wait(cnt, target - 1)


@triton.jit
def _barrier_late(cnt, target):
    """Faulty: waits for one arrival more than the grid will ever make."""
    _arrive_and_wait(cnt, target + 1)


@triton.jit
def _barrier_marker(cnt, target):
    """Fails where it runs (the interpreter checks static_assert when a program reaches it)."""
    tl.static_assert(False, "the substituted barrier ran")


def _substitute_barrier(monkeypatch, barrier):
    for mod in (lstm_mod, gru_mod):
        assert mod._grid_barrier is _common._grid_barrier
        monkeypatch.setattr(mod, "_grid_barrier", barrier)


# Grids of one batch tile: every program reads every other's units each step. Under the greedy
# schedule the last program in grid order is the one still outside when a too-early barrier
# lets the others through, so they read what it has not written yet (NaN poison): the failure
# is deterministic. (Under the free schedule it would depend on the OS's interleaving.)
CONTROLS = [
    (Case(mode="LSTM", B=4, T=3, H=32, P=16, lens=True), (16, 16, 16)),
    (Case(mode="GRU", B=4, T=3, H=32, reverse=True), (16, 16, 16)),
]


@pytest.mark.parametrize("c,tiles", CONTROLS, ids=_case_id)
def test_substituted_barrier_is_the_one_that_runs(c, tiles, monkeypatch, grid, persistent_only):
    _substitute_barrier(monkeypatch, _barrier_marker)
    with pytest.raises(InterpreterError, match="the substituted barrier ran"):
        _check(c, tiles, grid, batch_tiles=1)
    assert grid.launches[0].kernel == KERNELS[c.mode][0]


@pytest.mark.parametrize("c,tiles", CONTROLS, ids=_case_id)
def test_exact_substitute_passes(c, tiles, monkeypatch, grid, persistent_only):
    """The control of the controls: the same substitution with a correct barrier passes."""
    _substitute_barrier(monkeypatch, _barrier_exact)
    _check(c, tiles, grid, batch_tiles=1)


@pytest.mark.parametrize("c,tiles", CONTROLS, ids=_case_id)
def test_early_barrier_fails_the_checks(c, tiles, monkeypatch, grid, persistent_only):
    _substitute_barrier(monkeypatch, _barrier_early)
    with pytest.raises(AssertionError, match="non-finite|relative errors"):
        _check(c, tiles, grid, batch_tiles=1)
    assert grid.launches[0].kernel == KERNELS[c.mode][0]
    assert grid.launches[0].grid == _expected_grid(c, tiles)


@pytest.mark.parametrize("c,tiles", CONTROLS, ids=_case_id)
def test_late_barrier_is_a_hang(c, tiles, monkeypatch, persistent_only):
    _substitute_barrier(monkeypatch, _barrier_late)
    with threaded_programs(stall_s=2.0) as g:
        with pytest.raises(GridHangError, match="a hang"):
            _check(c, tiles, g, batch_tiles=1)
    (launch,) = g.launches  # the forward hung; nothing ran after it
    assert launch.kernel == KERNELS[c.mode][0] and launch.hang is not None
    assert launch.seconds < 2.0 + 5.0
    assert not [t for t in threading.enumerate() if t.name.startswith("program")]


# ----------------------------------------------------------------------------- the executor


@triton.jit
def _ids_kernel(out, cnt):
    """Each program stores its program ids and grid size, crosses a barrier (where the others
    run), and stores them again: out[p] = (x, y, z, nx, ny, nz) before, out[n + p] after."""
    x, y, z = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    nx, ny, nz = tl.num_programs(0), tl.num_programs(1), tl.num_programs(2)
    p = (x * ny + y) * nz + z
    n = nx * ny * nz
    o = tl.arange(0, 8)
    row = tl.where(o == 0, x, tl.where(o == 1, y, tl.where(o == 2, z, 0)))
    row = tl.where(o == 3, nx, tl.where(o == 4, ny, tl.where(o == 5, nz, row)))
    tl.store(out + p * 8 + o, row)
    _common._grid_barrier(cnt, n)
    x, y, z = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row = tl.where(o == 0, x, tl.where(o == 1, y, tl.where(o == 2, z, 0)))
    row = tl.where(o == 3, nx, tl.where(o == 4, ny, tl.where(o == 5, nz, row)))
    tl.store(out + (n + p) * 8 + o, row)


@pytest.mark.parametrize("grid", ["greedy", "free"], indirect=True)
def test_each_program_has_its_own_id(grid):
    shape = (2, 3, 2)
    n = 12
    out = torch.full((2 * n, 8), -1, dtype=torch.int32)
    cnt = torch.zeros(1, dtype=torch.int32)
    _ids_kernel[shape](out, cnt)
    want = torch.tensor(
        [[x, y, z, *shape, 0, 0] for x in range(2) for y in range(3) for z in range(2)],
        dtype=torch.int32,
    )
    assert torch.equal(out[:n], want) and torch.equal(out[n:], want)
    assert cnt.item() == n
    (launch,) = grid.launches
    assert launch.grid == shape
    if grid.schedule == "greedy":
        assert launch.switches >= n - 1  # every program but the last waited at the barrier


@triton.jit
def _ring_kernel(out, cnt, ROUNDS: tl.constexpr):
    """Round r: program i writes 100 r + i, crosses the barrier, reads program i+1's value."""
    n = tl.num_programs(0)
    i = tl.program_id(0)
    for r in range(ROUNDS):
        tl.store(out + r * n + i, 100 * r + i)
        _common._grid_barrier(cnt, (r + 1) * n)
        v = tl.load(out + r * n + (i + 1) % n)
        tl.store(out + (ROUNDS + r) * n + i, v)


@pytest.mark.parametrize("grid", ["greedy", "free"], indirect=True)
def test_grid_barrier_orders_the_programs(grid):
    n, rounds = 5, 4
    out = torch.full((2 * rounds, n), -1, dtype=torch.int32)
    cnt = torch.zeros(1, dtype=torch.int32)
    _ring_kernel[(n,)](out, cnt, ROUNDS=rounds)
    mine = 100 * torch.arange(rounds)[:, None] + torch.arange(n)[None, :]
    assert torch.equal(out[:rounds], mine.int())
    assert torch.equal(out[rounds:], mine.roll(-1, dims=1).int())
    assert cnt.item() == rounds * n


@triton.jit
def _count_kernel(cnt, K: tl.constexpr):
    for _ in range(K):
        tl.atomic_add(cnt, 1)


def test_atomics_lose_no_update():
    """Concurrent atomic adds of 8 programs (free schedule: really interleaved) all count."""
    cnt = torch.zeros(1, dtype=torch.int32)
    with threaded_programs("free") as g:
        _count_kernel[(8,)](cnt, K=50)
    assert cnt.item() == 8 * 50
    assert g.launches[0].atomics == 8 * 50


@triton.jit
def _wait_forever_kernel(cnt):
    _common._grid_barrier(cnt, tl.num_programs(0) + 1)


@pytest.mark.parametrize("schedule", ["greedy", "free"])
def test_hang_is_reported_within_seconds(schedule):
    cnt = torch.zeros(1, dtype=torch.int32)
    with threaded_programs(schedule, stall_s=1.0) as g:
        t = time.monotonic()
        with pytest.raises(GridHangError, match="no program wrote memory for 1 s"):
            _wait_forever_kernel[(3,)](cnt)
        assert time.monotonic() - t < 1.0 + 5.0
        assert not [t for t in threading.enumerate() if t.name.startswith("program")]
        _ring_kernel[(3,)](torch.zeros(4, 3, dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                           ROUNDS=2)  # fmt: skip
    assert cnt.item() == 3
    assert [r.hang is not None for r in g.launches] == [True, False]


@triton.jit
def _fail_one_kernel(cnt):
    # the interpreter checks static_assert when a program reaches it (device_assert is off)
    tl.static_assert(tl.program_id(0) != 1, "program 1 fails")
    _common._grid_barrier(cnt, tl.num_programs(0))


@pytest.mark.parametrize("schedule", ["greedy", "free"])
def test_a_failing_program_stops_the_others(schedule):
    """The others wait at a barrier program 1 never reaches: the launch raises program 1's
    error at once, long before the watchdog would call it a hang."""
    with threaded_programs(schedule, stall_s=60.0):
        t = time.monotonic()
        with pytest.raises(InterpreterError, match=r"program \(1, 0, 0\).*program 1 fails"):
            _fail_one_kernel[(3,)](torch.zeros(1, dtype=torch.int32))
        assert time.monotonic() - t < 10.0
    assert not [t for t in threading.enumerate() if t.name.startswith("program")]


def test_interpreter_is_restored():
    call, cls = _interp.GridExecutor.__call__, type(_interp.interpreter_builder)
    with threaded_programs():
        assert _common._CONCURRENT_PROGRAMS
        assert _interp.GridExecutor.__call__ is not call
        with pytest.raises(RuntimeError, match="already active"):
            with threaded_programs():
                pass
    assert _interp.GridExecutor.__call__ is call and type(_interp.interpreter_builder) is cls
    assert not _common._CONCURRENT_PROGRAMS
    out = torch.zeros(2, 8, dtype=torch.int32)
    _ids_kernel[(1,)](out, torch.zeros(1, dtype=torch.int32))  # the serial interpreter again
    assert out[0, :6].tolist() == [0, 0, 0, 1, 1, 1]


# ----------------------------------------------------------------------------- the tiling hook


def test_forced_tiles():
    with _common.forced_persistent_tiles(16, 8, 4):
        t = _common.persistent_tiles(40, 10, G=4)
        assert (t.units, t.batch, t.programs, t.grid) == (16, 4, 3, (3,))
        t = _common.persistent_tiles(40, 10, G=4, P=24, backward=True)
        assert (t.units, t.rows, t.batch, t.programs) == (16, 8, 4, 3)
        assert _common.persistent_tiles(20, 10, G=3, P=17).programs == 3  # 3 blocks of rows
        assert (
            len(_common.persistent_tile_choices(40, 10, G=4, props=_common.DeviceProps(132))) == 1
        )
    with _common.forced_persistent_tiles(16, 16, None):  # the whole batch in one chunk
        t = _common.persistent_tiles(40, 20, G=4)
        assert (t.units, t.batch, t.programs) == (16, 32, 3)
    assert _common.persistent_tiles(40, 20, G=4).programs == 1  # hook gone: the interpreter's
    with pytest.raises(ValueError, match="powers of two"):
        with _common.forced_persistent_tiles(12, 16, 16):
            pass
