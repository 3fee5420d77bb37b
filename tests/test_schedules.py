"""Schedules of stacked networks (fused_rnn._schedule): directions at once, layers as a wavefront.

* The decision: which schedule a call gets on CUDA (a pure function, so checked here on CPU),
  the chunk length K of the wavefront (the model in bench/NOTES.md), the override.
* Same function: the concurrent and the chunked schedules, forced on CPU (the stream operations
  are no-ops there, the chunking logic runs in full), against the serial one: outputs, final
  states and the gradients of the input, the initial states and every weight, and the random
  numbers drawn (the generator's state after the forward), for every cell (LSTM with proj_size,
  peephole, coupled gates; GRU; RNN tanh and relu) with packed sequences, bidirectional stacks
  and every option on (zoneout, recurrent dropout, layer norm, dropout between layers), on the
  torch backend (the operators' torch loop) and on the stepwise kernels under the interpreter.
* The stream rules, with a stream double that records every wait, event and record_stream and
  a torch function mode that sees which (fake) stream made and read each tensor: a stream waits
  before it reads what another made, a tensor read on another stream than its maker's is
  record_stream'ed for the reader, the caller's stream ends up waiting for every side stream.
  The checker itself is checked: leaving out any one of those calls is caught.
* The zoneout step offset in the high word of the rng's offset (fused_rnn._rng), in the torch
  generator and in the kernels' helper, bit for bit.
"""

import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

import fused_rnn  # noqa: E402
from fused_rnn import _ops, _rng, _schedule, dispatch  # noqa: E402
from fused_rnn._schedule import decide  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64 = dict(dtype=torch.float64, device=DEVICE)
# float64 on every side: the schedules run the same operations, but the wavefront computes an
# upper layer's input GEMM chunk by chunk, which may sum in another order: float64 rounding
# (~1e-16 relative) accumulated over a few layers and steps, far below 1e-12
TOL64 = 1e-12
CLASSES = {"LSTM": fused_rnn.LSTM, "GRU": fused_rnn.GRU, "RNN": fused_rnn.RNN}


# ============================================================================ the decision


def test_decide_on_cuda():
    d = decide("cuda", "stepwise", False, 2, 2, 200)  # the `stack` bench suite
    assert d.name == "directions" and d.chunk == 0
    d = decide("cuda", "persistent", False, 4, 1, 1024)
    assert d.name == "wavefront" and d.chunk == _schedule.chunk_steps(1024, 4, "persistent")
    assert decide("cuda", "stepwise", False, 1, 2, 50).name == "directions"
    for args, why in [
        (("cuda", "stepwise", True, 2, 2, 200), "torch.compile"),
        (("cuda", "torch", False, 2, 2, 200), "backend 'torch'"),
        (("cpu", "stepwise", False, 2, 2, 200), "cpu tensors"),
        (("cuda", "stepwise", False, 1, 1, 200), "one layer-direction"),
        (("cuda", "stepwise", False, 2, 1, 20), "too short"),
    ]:
        d = decide(*args)
        assert d.name == "serial" and why in d.reason, (args, d)
    d = decide("cuda", "stepwise", False, 2, 2, 200, capturing=True)
    assert d.name == "serial" and "capturing" in d.reason


@pytest.mark.parametrize(
    "T, L, backend, K",
    [(200, 2, "stepwise", 50), (200, 4, "stepwise", 67), (1024, 4, "stepwise", 94),
     (1024, 2, "stepwise", 57), (200, 4, "persistent", 100)],
)  # fmt: skip
def test_chunk_rule_at_the_modelled_sizes(T, L, backend, K):
    """The K that bench/NOTES.md's schedule model tabulates (the rule's root, rounded to equal
    chunks): a change of the rule must change the notes too."""
    assert _schedule.chunk_steps(T, L, backend) == K


def test_chunks_are_long_enough_and_even():
    """For every T and L: a wavefront has at least two chunks, each of at least GRAPH_MIN_STEPS
    (so each chunk's stepwise loop replays from a CUDA graph), all of one length but a shorter
    last one; and once a length T gets a wavefront, every longer one does."""
    g = _ops.GRAPH_MIN_STEPS
    for L in (2, 3, 4, 8):
        for backend in ("stepwise", "persistent"):
            since = None
            for T in range(1, 1500, 7):
                K = _schedule.chunk_steps(T, L, backend)
                if K == 0:
                    assert since is None, (T, L, backend)
                    continue
                since = since or T
                n = -(-T // K)
                assert n >= 2 and K >= g, (T, L, K)
                assert 1 <= T - (n - 1) * K <= K
            assert since is not None and since < 500  # T=500 and longer: always a wavefront


def test_forced_overrides_and_falls_back():
    with _schedule.forced("wavefront", 3):
        assert decide("cpu", "torch", False, 3, 1, 7) == ("wavefront", 3, "forced")
        assert decide("cpu", "torch", False, 3, 2, 7).name == "directions"
        assert decide("cpu", "torch", False, 1, 1, 7).name == "serial"
        assert decide("cpu", "torch", True, 3, 1, 7).name == "serial"  # compiling: always
        with _schedule.forced("directions"):
            assert decide("cpu", "torch", False, 3, 2, 7).name == "directions"
            assert decide("cpu", "torch", False, 3, 1, 7).name == "serial"
        assert decide("cuda", "stepwise", False, 3, 1, 7).chunk == 3  # the outer one again
    assert decide("cpu", "torch", False, 3, 1, 7).name == "serial"
    with _schedule.forced("wavefront"):  # no chunk: the rule, or halves for short sequences
        assert decide("cpu", "torch", False, 2, 1, 7).chunk == 4
        assert decide("cpu", "torch", False, 4, 1, 200).chunk == 67
    with pytest.raises(ValueError, match="unknown schedule"):
        with _schedule.forced("pipelined"):
            pass


# ============================================================================ same function


CELLS = {
    "LSTM": ("LSTM", {}),
    "LSTM-proj": ("LSTM", dict(proj_size=3)),
    "LSTM-peephole": ("LSTM", dict(peephole=True)),
    "LSTM-coupled-peephole": ("LSTM", dict(coupled_gates=True, peephole=True)),
    "GRU": ("GRU", {}),
    "RNN-tanh": ("RNN", {}),
    "RNN-relu": ("RNN", dict(nonlinearity="relu")),
}


def _net(cell, *, layers, bi, backend, zoneout=0.2, rec=0.25, ln=True, dropout=0.3, H=6,
         dtype=torch.float64):  # fmt: skip
    cls, kw = CELLS[cell]
    kw = dict(kw, zoneout=zoneout, recurrent_dropout=rec)
    if ln and cls != "RNN":
        kw["layer_norm"] = True
    dropout = dropout if layers > 1 else 0.0
    torch.manual_seed(0)
    m = CLASSES[cls](5, H, layers, bidirectional=bi, dropout=dropout, backend=backend,
                     dtype=dtype, device=DEVICE, **kw)  # fmt: skip
    with torch.no_grad():  # layer-norm gains and biases away from their init, so they matter
        for name, q in m.named_parameters():
            if "_ln_" in name:
                q.add_(torch.randn_like(q) * 0.3)
    return m


def _run(m, schedule, chunk=None, *, T=7, B=4, lengths=(7, 2, 5, 1), train=True):
    """Output, final states, the gradients of x, h0 (c0) and every parameter, and the generator
    state after the forward, under `schedule` (None: what decide picks)."""
    cls = type(m).__name__
    D = 2 if m.bidirectional else 1
    R = getattr(m, "proj_size", 0) or m.hidden_size
    g = torch.Generator().manual_seed(1)
    like = dict(dtype=next(m.parameters()).dtype, device=DEVICE)
    x = torch.randn(T, B, 5, generator=g, dtype=torch.float64).to(**like).requires_grad_()
    h0 = torch.randn(m.num_layers * D, B, R, generator=g, dtype=torch.float64).to(**like)
    c0 = torch.randn(m.num_layers * D, B, m.hidden_size, generator=g, dtype=torch.float64)
    h0, c0 = h0.requires_grad_(), c0.to(**like).requires_grad_()
    hx = (h0, c0) if cls == "LSTM" else h0
    m.train(train)
    scope = _schedule.forced(schedule, chunk) if schedule else contextlib.nullcontext()
    torch.manual_seed(77)
    with scope:
        inp = x if lengths is None else pack_padded_sequence(x, torch.tensor(lengths),
                                                             enforce_sorted=False)  # fmt: skip
        out, hn = m(inp, hx)
        state = torch.cuda.get_rng_state() if DEVICE == "cuda" else torch.get_rng_state()
    out = out if lengths is None else out.data
    outs = [out, *(hn if cls == "LSTM" else (hn,))]
    cot = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(**like) for o in outs]
    leaves = [x, h0] + ([c0] if cls == "LSTM" else []) + list(m.parameters())
    grads = torch.autograd.grad(sum((o * c).sum() for o, c in zip(outs, cot)), leaves)
    return [t.detach() for t in (*outs, *grads)], state


def _rel(a, b):
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _same(got, want, tol=TOL64):
    (tensors, state), (ref, ref_state) = got, want
    assert torch.equal(state, ref_state), "the schedule drew other random numbers"
    errs = [_rel(a, b) for a, b in zip(tensors, ref, strict=True)]
    assert max(errs) <= tol, errs
    return errs


@pytest.mark.parametrize("bi", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_torch_backend_schedules_match_serial(native_off, cell, bi):
    """Three layers, packed (unsorted lengths ending inside, at and before chunk boundaries),
    training with every option on; the wavefront with K=3 over T=7 (chunks 3, 3, 1)."""
    m = _net(cell, layers=3, bi=bi, backend="torch")
    serial = _run(m, "serial")
    concurrent = _run(m, "wavefront", 3)  # bidirectional: falls back to directions
    if bi:  # the same operations, each on its own inputs: bitwise equal
        assert all(torch.equal(a, b) for a, b in zip(concurrent[0], serial[0]))
    _same(concurrent, serial)
    _same(_run(m, "directions"), serial)


@pytest.mark.parametrize("K", [1, 2, 4, 7, 9])
def test_wavefront_chunk_lengths(native_off, K):
    """Any chunk length, down to one step a chunk and up to the whole sequence (or beyond),
    padded input, evaluation (zoneout's expectation, no dropout)."""
    m = _net("LSTM-proj", layers=2, bi=False, backend="torch")
    for train in (True, False):
        serial = _run(m, "serial", lengths=None, train=train)
        _same(_run(m, "wavefront", K, lengths=None, train=train), serial)


def test_default_schedule_on_cpu_is_serial_and_explained(native_off):
    m = _net("GRU", layers=2, bi=False, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(_run(m, None)[0], _run(m, "serial")[0]))
    x = torch.randn(5, 2, 5, **F64)
    rows = dispatch.explain(m, x, file=None)
    assert {(r.schedule, r.schedule_reason) for r in rows} == {
        ("serial", "cpu tensors: no CUDA streams")
    }
    with _schedule.forced("wavefront", 2):
        rows = dispatch.explain(m, x, file=None)
        text = str(rows)
    assert {(r.schedule, r.schedule_reason) for r in rows} == {("wavefront (K=2)", "forced")}
    assert "  schedule: wavefront (K=2) (forced)" in text.splitlines()


def test_native_ops_have_no_schedule():
    from fused_rnn.bench import runner

    m, x = fused_rnn.LSTM(5, 6, 2), torch.randn(3, 2, 5)
    assert {r.schedule for r in dispatch.explain(m, x, file=None)} == {None}
    assert runner.resolved(m, x, "fwd") == ("torch", None)


def test_bench_row_says_which_schedule_ran(native_off):
    from fused_rnn.bench import runner

    m = _net("LSTM", layers=2, bi=True, backend="torch")
    x = torch.randn(5, 2, 5, **F64)
    assert runner.resolved(m, x, "fwdbwd") == ("torch", "serial")
    with _schedule.forced("directions"):
        assert runner.resolved(m, x, "fwd") == ("torch", "directions")


# the kernels: every cell, each on one schedule, every option on, layer norm once (its launches
# cost most under the interpreter, where each is interpreted program by program): (cell,
# layers, bidirectional, layer norm, schedule, K)
KERNEL_CASES = {
    "LSTM-proj-wavefront": ("LSTM-proj", 2, False, False, "wavefront", 3),
    "LSTM-coupled-peephole-directions": ("LSTM-coupled-peephole", 1, True, False, "directions", 0),
    "GRU-ln-wavefront": ("GRU", 2, False, True, "wavefront", 2),
    "RNN-relu-directions": ("RNN-relu", 1, True, False, "directions", 0),
}


@pytest.mark.skipif(
    "stepwise" not in fused_rnn.available_backends(DEVICE), reason="no Triton on this machine"
)
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_stepwise_kernels_schedules_match_serial(case, monkeypatch):
    """The stepwise kernels (interpreter on CPU) on the schedule vs serially: packed, training,
    zoneout (through the step offset), recurrent dropout, dropout between layers."""
    cell, layers, bi, ln, schedule, K = KERNEL_CASES[case]
    # float64 under the interpreter; on a GPU (no float64 kernels) fp32 with TF32 off, where the
    # wavefront's chunked input GEMM sums in another order than the whole one: ~1e-7 relative
    # per element, grown over a few steps and layers, well under 1e-5
    dtype, tol = (torch.float64, TOL64) if DEVICE == "cpu" else (torch.float32, 1e-5)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    m = _net(cell, layers=layers, bi=bi, ln=ln, backend="stepwise", H=4, dtype=dtype)
    kw = dict(T=5, B=3, lengths=(5, 2, 4))
    _same(_run(m, schedule, K or None, **kw), _run(m, "serial", **kw), tol)


# ============================================================================ stream rules


class FakeStreams(_schedule.NoStreams):
    """The stream operations of _schedule.CudaStreams, recorded: streams are names, events are
    (stream, position in the log) and `use` switches the stream that a torch function mode
    (`Tracker`) charges each tensor operation to. `skip` names operations to leave out (the
    checker's own tests)."""

    def __init__(self, skip=()):
        self.skip = set(skip)
        self.stack = ["main"]
        self.log = []

    def current(self, device):
        return "main"

    def side(self, device, lane):
        return f"lane{lane}"

    def wait(self, consumer, producer):
        if "wait" not in self.skip:
            self.log.append(("wait", consumer, producer))

    def event(self, stream):
        self.log.append(("event", stream))
        return (stream, len(self.log) - 1)

    def wait_event(self, stream, event):
        if "wait_event" not in self.skip:
            self.log.append(("wait_event", stream, event))

    def record(self, tensors, stream):
        if "record" not in self.skip:
            for t in tensors:
                if t is not None:
                    self.log.append(("record", _storage(t), stream))

    def use(self, stream):
        streams = self

        class Use:
            def __enter__(self):
                streams.stack.append(stream)

            def __exit__(self, *exc):
                streams.stack.pop()

        return Use()


def _storage(t):
    return t.untyped_storage().data_ptr()


class Tracker(TorchFunctionMode):
    """Charges every tensor operation to the fake stream in use: the storages it reads, and the
    ones it makes (outputs whose storage no input had)."""

    def __init__(self, streams: FakeStreams):
        super().__init__()
        self.streams = streams

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ins = {_storage(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outs:
            return out  # metadata (shape, dtype, ...): no data read
        here = self.streams.stack[-1]
        self.streams.log += [("read", s, here) for s in ins if s]
        self.streams.log += [("make", s, here) for s in {_storage(t) for t in outs} - ins if s]
        return out


def violations(log, end="main"):
    """The stream rules broken in `log` (module docstring); [] when all hold."""
    owner = {}  # storage -> (stream, position) of the operation that made it
    synced = {}  # (consumer, producer) -> position up to which consumer waited for producer
    recorded, cross, last = set(), set(), {}
    bad = []
    for i, entry in enumerate(log):
        kind = entry[0]
        if kind == "make":
            owner[entry[1]] = (entry[2], i)
        elif kind == "read":
            s, reader = entry[1], entry[2]
            maker, made = owner.get(s, ("main", -1))  # the caller's tensors: its stream
            last[reader] = i
            if maker != reader:
                if synced.get((reader, maker), -2) < made:
                    bad.append(f"{reader} reads a tensor of {maker} without waiting (entry {i})")
                cross.add((s, reader))
        elif kind == "wait":
            synced[(entry[1], entry[2])] = i
        elif kind == "wait_event":
            stream, (producer, at) = entry[1], entry[2]
            synced[(stream, producer)] = max(synced.get((stream, producer), -2), at)
        elif kind == "record":
            recorded.add((entry[1], entry[2]))
    bad += [f"a tensor read on {r} is not record_stream'ed for it" for s, r in cross
            if (s, r) not in recorded]  # fmt: skip
    bad += [f"{end} does not wait for {s}'s last work" for s, at in last.items()
            if s != end and synced.get((end, s), -2) < at]  # fmt: skip
    return sorted(set(bad))


def _traced(monkeypatch, m, schedule, skip=(), **kw):
    fake = FakeStreams(skip)
    monkeypatch.setattr(_schedule, "streams_for", lambda device: fake)
    x = torch.randn(7, 3, 5, **F64)
    lengths = torch.tensor([7, 4, 2])
    m.train()
    with _schedule.forced(schedule, 3), Tracker(fake):
        out, hn = m(pack_padded_sequence(x, lengths), **kw)
        # what the caller does next on its stream: reads the outputs
        for t in (out.data, *(hn if isinstance(hn, tuple) else (hn,))):
            (t + 1).sum()
    return fake.log


@pytest.mark.parametrize(
    "cell, bi, schedule, lanes",
    [("LSTM-proj", True, "directions", 1), ("LSTM", False, "wavefront", 2),
     ("GRU", False, "wavefront", 2)],
)  # fmt: skip
def test_stream_rules_hold(monkeypatch, native_off, cell, bi, schedule, lanes):
    m = _net(cell, layers=3, bi=bi, backend="torch")
    log = _traced(monkeypatch, m, schedule)
    assert violations(log) == []
    used = {e[2] for e in log if e[0] == "read"}
    assert used == {"main"} | {f"lane{i}" for i in range(1, lanes + 1)}  # the side streams ran
    reads_per_stream = {s: sum(1 for e in log if e[0] == "read" and e[2] == s) for s in used}
    assert min(reads_per_stream.values()) > 10


@pytest.mark.parametrize(
    "schedule, skip, broken",
    [("directions", "record", "record_stream"), ("directions", "wait", "without waiting"),
     ("wavefront", "wait_event", "without waiting"), ("wavefront", "record", "record_stream"),
     ("wavefront", "wait", "without waiting")],
)  # fmt: skip
def test_stream_checker_catches_a_missing_call(monkeypatch, native_off, schedule, skip, broken):
    m = _net("LSTM", layers=3, bi=schedule == "directions", backend="torch")
    bad = violations(_traced(monkeypatch, m, schedule, skip={skip}))
    assert any(broken in b for b in bad), bad


def test_stream_checker_catches_a_missing_join():
    log = [("make", 1, "lane1"), ("wait", "main", "lane1"), ("record", 1, "main"),
           ("read", 1, "main")]  # fmt: skip
    assert violations(log) == []
    log.append(("read", 2, "lane1"))  # lane1 reads a caller's tensor, after the join
    assert violations(log) == [
        "a tensor read on lane1 is not record_stream'ed for it",
        "lane1 reads a tensor of main without waiting (entry 4)",
        "main does not wait for lane1's last work",
    ]


def test_cuda_streams_are_cached_per_device_and_lane():
    s = _schedule.CudaStreams()
    assert isinstance(_schedule.streams_for(torch.device("cpu")), _schedule.NoStreams)
    assert _schedule.streams_for(torch.device("cpu")).use(1) is not None
    if torch.cuda.is_available():
        dev = torch.device("cuda", 0)
        assert s.side(dev, 1) is s.side(dev, 1) and s.side(dev, 1) is not s.side(dev, 2)


# ============================================================================ zoneout offset


def test_step_offset_in_the_rng_offset():
    """rng (seed, offset + (t0 << 32)) draws at step t the masks of step t0 + t under
    (seed, offset): a chunk of the wavefront draws the whole sequence's masks."""
    rng = torch.tensor([2**62 + 12345, 2**31 - 7])
    for t0 in (0, 1, 3, 1000):
        shifted = rng.clone()
        shifted[1] += t0 << 32
        for stream, which in ((0, 0), (5, 1)):
            a = _rng.keep_masks(shifted, range(6), 3, 9, stream, which, 0.4)
            b = _rng.keep_masks(rng, range(t0, t0 + 6), 3, 9, stream, which, 0.4)
            assert torch.equal(a, b)
            assert torch.equal(_rng.keep_mask(shifted, 2, 3, 9, stream, which, 0.4), b[2])


if "stepwise" in fused_rnn.available_backends(DEVICE):
    import triton
    import triton.language as tl

    from fused_rnn.kernels import _common

    @triton.jit
    def _masks_kernel(rng, out, t, z_stream, thr, B, W, WHICH: tl.constexpr, BLOCK: tl.constexpr):
        """(B, W) int8 zoneout masks of step t through the kernels' helper."""
        o_w = tl.arange(0, BLOCK)
        o_b = tl.arange(0, BLOCK)
        keep = _common._zoneout_keep(rng, t, z_stream, o_w, o_b, W, WHICH, thr)
        m = (o_w[:, None] < W) & (o_b[None, :] < B)
        tl.store(out + o_b[None, :] * W + o_w[:, None], keep.to(tl.int8), mask=m)

    def test_kernel_helper_step_offset():
        """The kernels' `_zoneout_keep` reads the step offset as fused_rnn._rng does."""
        rng = torch.tensor([2**62 + 12345, 2**31 - 7], device=DEVICE)
        B, W, p = 3, 9, 0.4
        for t0 in (0, 7, 2**20):
            shifted = rng.clone()
            shifted[1] += t0 << 32
            for t in (0, 2):
                out = torch.full((B, W), -1, dtype=torch.int8, device=DEVICE)
                _masks_kernel[(1,)](shifted, out, t, 1, _common.zoneout_threshold(p), B, W, 0, 16)
                want = _rng.keep_mask(rng, t0 + t, B, W, 1, 0, p)
                assert torch.equal(out.bool(), want)
