"""The CUDA-graph cache (fused_rnn._graphs): keys, replay, eviction, switches and fallbacks.

On CPU the CUDA side of the cache (`_graphs._runtime`) is replaced by a double that "captures"
by running the function on the static inputs and "replays" by running it again and copying the
results into the static outputs, as a real replay overwrites them. Everything else (keys,
static copies, clones, LRU bounds, locks, fallbacks) is the module's own code on CPU tensors.
The GPU test at the end captures a real stepwise LSTM forward and backward.
"""

import threading

import pytest
import torch

import fused_rnn
from fused_rnn import _graphs as G


class FakeGraph:
    def __init__(self, run, outputs):
        self.run, self.outputs = run, outputs

    def replay(self):
        fresh = self.run()
        for dst, src in zip(G._tensors_of(self.outputs), G._tensors_of(fresh), strict=True):
            dst.copy_(src)


class FakeRuntime:
    """The CUDA operations of the cache, on CPU tensors; `log` records what happened."""

    def __init__(self):
        self.total = 1 << 40
        self.capturing_now = False
        self.fail: Exception | None = None
        self.pool = 0
        self.stream = "s0"
        self.log = []

    def supports(self, device):
        return device.type == "cpu"

    def capturing(self):
        return self.capturing_now

    def current_stream(self, device):
        return self.stream

    def order_after(self, stream, previous):
        self.log.append(("wait", stream, previous))

    def synchronize(self, device):
        self.log.append("sync")

    def total_memory(self, device):
        return self.total

    def warmup(self, run, device):
        self.log.append("warmup")
        return run()

    def capture(self, run, device):
        self.log.append("capture")
        if self.fail is not None:
            raise self.fail
        out = run()
        return FakeGraph(run, out), out, self.pool

    def replay(self, graph, device):
        self.log.append("replay")
        graph.replay()


@pytest.fixture
def rt(monkeypatch):
    """The CPU double installed, an empty cache, default switches, capture on the first call."""
    fake = FakeRuntime()
    monkeypatch.setattr(G, "_runtime", fake)
    for name in (G.ENV_SWITCH, G.ENV_MAX_ENTRIES, G.ENV_MAX_BYTES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(G.ENV_CAPTURE_AFTER, "1")
    G.set_enabled(None)
    G.clear_graph_cache()
    yield fake
    G.set_enabled(None)
    G.clear_graph_cache()


class Launcher:
    """A launcher-like function: tensors, ints, bools, a keyword; a tuple output holding a None
    and a nested tuple. Records the tensor objects it was called with."""

    def __init__(self):
        self.seen = []

    def __call__(self, x, w, n, flag, *, scale=1.0):
        self.seen.append(x)
        y = (x @ w) * scale + n
        return y, None, (x.sum(0) if flag else x.amax(0),)


def expected(x, w, n, flag, scale=1.0):
    return (x @ w) * scale + n, None, (x.sum(0) if flag else x.amax(0),)


def assert_same(out, ref):
    """Bit-equal: the same ops on the same data."""
    assert out[1] is None and ref[1] is None
    assert type(out[2]) is tuple
    for o, r in ((out[0], ref[0]), (out[2][0], ref[2][0])):
        assert o.dtype == r.dtype and torch.equal(o, r)


def problem(T=5, B=3, dtype=torch.float32):
    return torch.randn(T, B, dtype=dtype), torch.randn(B, 4, dtype=dtype)


def call(fn, x, w, n=1, flag=True, key_extra=(), **kw):
    return G.graphed(fn, (x, w, n, flag), kw, key_extra=key_extra)


# ----------------------------------------------------------------------------- capture and replay


def test_first_call_captures_and_later_calls_replay(rt):
    fn = Launcher()
    x1, w = problem()
    out1 = call(fn, x1, w)
    assert_same(out1, expected(x1, w, 1, True))
    assert rt.log == ["warmup", "capture"]
    assert fn.seen[-1] is not x1  # the warm-up ran on the static copy, not the caller's tensor

    x2 = torch.randn_like(x1)
    out2 = call(fn, x2, w)
    assert_same(out2, expected(x2, w, 1, True))
    assert rt.log[-1] == "replay"
    info = G.cache_info()
    assert (info.entries, info.captures, info.hits) == (1, 1, 1)


def test_replay_copies_inputs_and_returns_clones(rt):
    fn = Launcher()
    x1, w = problem()
    x2, x3 = torch.randn_like(x1), torch.randn_like(x1)
    call(fn, x1, w)
    out2 = call(fn, x2, w)  # replay
    out3 = call(fn, x3, w)  # replay: overwrites the static outputs
    assert_same(out2, expected(x2, w, 1, True))  # out2 did not change with the next replay
    assert_same(out3, expected(x3, w, 1, True))

    (entry,) = G._cache.values()
    static = {t.untyped_storage().data_ptr() for t in G._tensors_of(entry.outputs)}
    static |= {t.untyped_storage().data_ptr() for t in entry.static_inputs}
    assert not {t.untyped_storage().data_ptr() for t in G._tensors_of(out3)} & static

    out3[0].add_(100.0)  # mutating a result does not reach the next one
    assert_same(call(fn, x3, w), expected(x3, w, 1, True))


def test_output_aliasing_an_input_is_cloned(rt):
    """A function that returns its argument: the warm-up's result must not be the static copy,
    which the next replay overwrites."""

    def ident(x):
        return x, x * 2

    x1, x2 = torch.randn(4), torch.randn(4)
    out1 = G.graphed(ident, (x1,))
    out2 = G.graphed(ident, (x2,))
    assert rt.log == ["warmup", "capture", "replay"]
    assert torch.equal(out1[0], x1) and torch.equal(out2[0], x2) and torch.equal(out2[1], x2 * 2)


def test_replay_from_another_stream_waits_for_the_previous_one(rt):
    fn = Launcher()
    x, w = problem()
    call(fn, x, w)
    call(fn, x, w)  # first replay, stream s0
    call(fn, x, w)  # same stream: nothing to wait for
    assert not [e for e in rt.log if isinstance(e, tuple)]
    rt.stream = "s1"
    call(fn, x, w)
    assert ("wait", "s1", "s0") in rt.log


def test_results_carry_no_autograd_history(rt):
    fn = Launcher()
    x, w = problem()
    w.requires_grad_()
    for _ in range(2):  # capture, replay
        out = call(fn, x, w)
        assert not out[0].requires_grad


# ----------------------------------------------------------------------------- keys


def test_same_shapes_hit_and_any_key_change_misses(rt):
    fn, other = Launcher(), Launcher()
    x, w = problem()
    call(fn, x, w)
    variants = {
        "dtype": lambda: call(fn, x.double(), w.double()),
        "shape": lambda: call(fn, torch.randn(6, 3), w),
        "stride": lambda: call(fn, torch.randn(3, 5).t(), w),  # same shape, column-major
        "int arg": lambda: call(fn, x, w, n=2),
        "bool arg": lambda: call(fn, x, w, flag=False),
        "kwarg": lambda: call(fn, x, w, scale=2.0),
        "key_extra": lambda: call(fn, x, w, key_extra=("tf32",)),
        "function": lambda: call(other, x, w),
    }
    for name, run in variants.items():
        before = G.cache_info().captures
        run()
        assert G.cache_info().captures == before + 1, f"a {name} change must not hit"
    for name, run in variants.items():
        before = G.cache_info()
        run()
        after = G.cache_info()
        assert (after.captures, after.hits) == (before.captures, before.hits + 1), name
    before = G.cache_info().hits
    x_new = torch.randn_like(x)
    assert_same(call(fn, x_new, w), expected(x_new, w, 1, True))
    assert G.cache_info().hits == before + 1


def test_true_and_one_are_different_keys(rt):
    def f(x, k):
        return x + (10 if k is True else 1)

    x = torch.zeros(2)
    assert G.graphed(f, (x, True))[0] == 10
    assert G.graphed(f, (x, 1))[0] == 1  # a hit on the True entry would give 10
    assert G.cache_info().captures == 2


def test_float_keys_by_bits(rt):
    def f(x, s):
        return x * s

    x = torch.ones(2)
    G.graphed(f, (x, float("nan")))
    G.graphed(f, (x, float("nan")))  # another nan object, nan != nan: its bits are the key
    assert G.cache_info()[3:1:-1] == (1, 1)  # (captures, hits)
    G.graphed(f, (x, -0.0))
    out = G.graphed(f, (x, 0.0))  # equal to -0.0 in Python, but 1 / x tells them apart
    assert G.cache_info()[3:1:-1] == (3, 1)
    assert not out.signbit().any()


def test_torch_flags_are_in_the_key(rt):
    fn = Launcher()
    x, w = problem()
    mm = torch.backends.cuda.matmul
    old = mm.allow_fp16_reduced_precision_reduction
    try:
        call(fn, x, w)
        mm.allow_fp16_reduced_precision_reduction = not old
        call(fn, x, w)
        assert G.cache_info().captures == 2
    finally:
        mm.allow_fp16_reduced_precision_reduction = old
    call(fn, x, w)
    assert G.cache_info().hits == 1


# ----------------------------------------------------------------------------- bounds


def keyed(fn, i):
    """A call whose key is told apart by the int argument i."""
    x, w = torch.ones(4, 2), torch.ones(2, 4)
    return call(fn, x, w, n=i)


def cached_ns():
    return sorted(key[2][2][1] for key in G._cache)  # the int argument n of each entry


def test_eviction_by_count_is_least_recently_used(rt, monkeypatch):
    monkeypatch.setenv(G.ENV_MAX_ENTRIES, "2")
    fn = Launcher()
    keyed(fn, 1)
    keyed(fn, 2)
    keyed(fn, 1)  # hit: 2 is now the least recently used
    keyed(fn, 3)
    assert cached_ns() == [1, 3]
    assert G.cache_info().evictions == 1
    assert "sync" in rt.log  # before dropping a graph a replay might still be using


def test_eviction_by_bytes_is_least_recently_used(rt, monkeypatch):
    fn = Launcher()
    keyed(fn, 1)
    one = G.cache_info().nbytes
    # static inputs x (4, 2), w (2, 4) and outputs y (4, 4), x.sum(0) (2,): fp32
    assert one == 4 * (8 + 8 + 16 + 2)
    monkeypatch.setenv(G.ENV_MAX_BYTES, str(int(2.5 * one)))
    keyed(fn, 2)
    keyed(fn, 1)
    keyed(fn, 3)
    assert cached_ns() == [1, 3]
    assert G.cache_info().nbytes == 2 * one


def test_pool_bytes_count_when_larger_than_the_outputs(rt):
    rt.pool = 10_000
    keyed(Launcher(), 1)
    assert G.cache_info().nbytes == 4 * (8 + 8) + 10_000


def test_default_byte_bound_is_a_quarter_of_the_device(rt):
    rt.total = 4000
    assert G._max_bytes(torch.device("cpu")) == 1000


def test_entry_over_the_byte_bound_runs_eagerly(rt, monkeypatch):
    monkeypatch.setenv(G.ENV_MAX_BYTES, "64")
    fn = Launcher()
    x, w = problem()
    assert_same(call(fn, x, w), expected(x, w, 1, True))
    assert rt.log == ["warmup"]  # measured, found too big, not captured
    assert_same(call(fn, x, w), expected(x, w, 1, True))
    assert fn.seen[-1] is x  # remembered: later calls run eagerly on the caller's tensors
    assert rt.log == ["warmup"] and G.cache_info().entries == 0


def test_zero_entries_means_no_graphs(rt, monkeypatch):
    monkeypatch.setenv(G.ENV_MAX_ENTRIES, "0")
    fn = Launcher()
    x, w = problem()
    call(fn, x, w)
    call(fn, x, w)
    assert rt.log == [] and fn.seen[-1] is x


def test_bad_bound_is_a_clear_error(rt, monkeypatch):
    monkeypatch.setenv(G.ENV_MAX_ENTRIES, "many")
    with pytest.raises(ValueError, match=G.ENV_MAX_ENTRIES):
        keyed(Launcher(), 1)


def test_capture_after_the_second_call_by_default(rt, monkeypatch):
    monkeypatch.delenv(G.ENV_CAPTURE_AFTER)
    fn = Launcher()
    x, w = problem()
    call(fn, x, w)
    assert rt.log == [] and fn.seen[-1] is x  # first sighting: eager
    call(fn, x, w)
    assert rt.log == ["warmup", "capture"]
    assert_same(call(fn, x, w), expected(x, w, 1, True))
    assert rt.log[-1] == "replay"


def test_clear_graph_cache(rt):
    fn = Launcher()
    x, w = problem()
    call(fn, x, w)
    call(fn, x, w)
    assert G.cache_info().entries == 1
    fused_rnn.clear_graph_cache()
    assert G.cache_info() == G.CacheInfo(0, 0, 0, 0, 0, 0)
    assert "sync" in rt.log
    call(fn, x, w)
    assert G.cache_info().captures == 1


def test_package_exports_clear_graph_cache():
    assert fused_rnn.clear_graph_cache is G.clear_graph_cache


# ----------------------------------------------------------------------------- switches, fallbacks


def test_env_switch_and_programmatic_switch(rt, monkeypatch):
    fn = Launcher()
    x, w = problem()
    monkeypatch.setenv(G.ENV_SWITCH, "0")
    assert_same(call(fn, x, w), expected(x, w, 1, True))
    assert rt.log == [] and fn.seen[-1] is x and not G.enabled()
    G.set_enabled(True)  # overrides the environment
    call(fn, x, w)
    assert rt.log == ["warmup", "capture"]
    G.set_enabled(None)  # back to the environment: off
    call(fn, x, w)
    assert rt.log[-1] == "capture" and fn.seen[-1] is x
    monkeypatch.setenv(G.ENV_SWITCH, "1")
    call(fn, x, w)
    assert rt.log[-1] == "replay"
    G.set_enabled(False)
    call(fn, x, w)
    assert rt.log[-1] == "replay" and fn.seen[-1] is x


def test_capture_in_capture_runs_eagerly(rt):
    """Inside someone else's capture (torch.compile's cudagraphs, a user's graph) the kernels
    must be launched directly so that the outer capture records them."""
    fn = Launcher()
    x, w = problem()
    rt.capturing_now = True
    assert_same(call(fn, x, w), expected(x, w, 1, True))
    assert fn.seen == [x] and rt.log == [] and G.cache_info().entries == 0


def test_failed_capture_leaves_the_cache_clean(rt):
    fn = Launcher()
    x, w = problem()
    rt.fail = RuntimeError("operation not permitted when stream is capturing")
    with pytest.raises(RuntimeError, match="FUSED_RNN_CUDA_GRAPHS=0") as e:
        call(fn, x, w)
    assert "not permitted" in str(e.value)
    info = G.cache_info()
    assert (info.entries, info.nbytes, info.captures) == (0, 0, 0)
    rt.fail = None
    assert_same(call(fn, x, w), expected(x, w, 1, True))
    assert G.cache_info().captures == 1
    assert_same(call(fn, x, w), expected(x, w, 1, True))
    assert G.cache_info().hits == 1


def test_error_of_the_function_itself_propagates_unchanged(rt):
    def bad(x):
        raise ValueError("input.size(-1) must be equal to input_size")

    with pytest.raises(ValueError, match="input_size"):
        G.graphed(bad, (torch.ones(2),))
    assert rt.log == ["warmup"] and G.cache_info().entries == 0


def test_unsupported_output_is_a_type_error(rt):
    with pytest.raises(TypeError, match="returned a int"):
        G.graphed(lambda x: 3, (torch.ones(2),))
    assert G.cache_info().entries == 0


class Sub(torch.Tensor):
    pass


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(lambda: (torch.ones(2), (torch.ones(2),)), id="tensor-in-tuple"),
        pytest.param(lambda: (torch.ones(2), object()), id="object"),
        pytest.param(lambda: (torch.ones(2), torch.ones(2, device="meta")), id="two-devices"),
        pytest.param(lambda: (torch.ones(2).as_subclass(Sub),), id="subclass"),
        pytest.param(lambda: (torch.ones(1).expand(3),), id="overlapping"),
        pytest.param(lambda: (3, 4.0), id="no-tensor"),
    ],
)
def test_unsupported_arguments_run_eagerly(rt, args):
    args = args()
    seen = []

    def f(*a):
        seen.append(a)
        return None

    assert G.graphed(f, args) is None
    assert all(s is a for s, a in zip(seen[0], args, strict=True))  # the caller's own objects
    assert rt.log == [] and G.cache_info().entries == 0


def test_cuda_runtime_refuses_cpu_and_the_interpreter(monkeypatch):
    runtime = G._CudaRuntime()
    assert not runtime.supports(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not runtime.supports(torch.device("cuda", 0))


def test_threads_get_their_own_results(rt):
    fn = Launcher()
    w = torch.randn(3, 4)
    call(fn, torch.randn(5, 3), w)
    errors = []

    def worker(seed):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(25):
            x = torch.randn(5, 3, generator=gen)
            out = call(fn, x, w)
            if not torch.equal(out[0], expected(x, w, 1, True)[0]):
                errors.append(seed)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert G.cache_info().hits == 100


# ----------------------------------------------------------------------------- real launchers


def lstm_case(dev, T, B, H, dt):
    s = H**-0.5
    gx = torch.randn(T, B, 4 * H, device=dev, dtype=dt)
    h0, c0 = torch.randn(B, H, device=dev, dtype=dt), torch.randn(B, H, device=dev, dtype=dt)
    w = torch.randn(4 * H, H, device=dev, dtype=dt) * s
    lengths = torch.tensor([T, 1] + [T] * (B - 2), device=dev)[:B]
    # the stepwise launchers' full argument lists: tensors, None, bools, a tuple of bools
    fwd = (gx, h0, c0, w, None, None, lengths, False, False, True)
    return fwd, lambda y, hs, cs, gates, ms: (
        torch.randn_like(y), torch.randn_like(h0), torch.randn_like(c0), hs, cs, gates, ms, w,
        None, None, lengths, False, False, (True, True, True, True, False, False),
    )  # fmt: skip


def check_launcher_through_cache(dev, T, B, H, dt, calls, bwd_tol):
    """Each call: the graphed forward and backward equal the eager launchers on new inputs."""
    from fused_rnn.kernels import _common, lstm

    kw = {"persistent": False}
    extra = (_common.dot_precision(dt), _common.poison_enabled())
    for _ in range(calls):
        fwd, make_bwd = lstm_case(dev, T, B, H, dt)
        out, ref = G.graphed(lstm.lstm_fwd, fwd, kw, key_extra=extra), lstm.lstm_fwd(*fwd, **kw)
        for o, r in zip(out, ref, strict=True):  # same kernels on the same inputs: bit-equal
            assert (o is None) == (r is None)
            if o is not None:
                torch.testing.assert_close(o, r, rtol=0, atol=0, equal_nan=False)
        bwd = make_bwd(*ref)
        bout = G.graphed(lstm.lstm_bwd, bwd, kw, key_extra=extra)
        bref = lstm.lstm_bwd(*bwd, **kw)
        for o, r in zip(bout, bref, strict=True):
            assert (o is None) == (r is None)
            if o is not None:
                torch.testing.assert_close(o, r, **bwd_tol)
    info = G.cache_info()
    assert (info.captures, info.hits) == (2, 2 * (calls - 1))


def test_stepwise_lstm_launchers_through_the_cache(rt):
    """The real launchers' signatures and outputs (None entries, a tuple of bools, lengths)
    go through keys, static copies and clones; the CPU double stands in for the graph."""
    # the CPU double runs the very same kernels (interpreter) on the static copies: bit-equal
    check_launcher_through_cache(torch.device("cpu"), 3, 2, 16, torch.float32, 2,
                                 dict(rtol=0, atol=0))  # fmt: skip


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_stepwise_lstm_replay_equals_eager(monkeypatch):
    """A real capture of the stepwise LSTM forward and backward loops: a replay on new inputs
    gives what an eager run on them gives."""
    from fused_rnn.kernels import _common, lstm

    monkeypatch.setenv(G.ENV_CAPTURE_AFTER, "1")
    G.set_enabled(True)
    G.clear_graph_cache()
    dev, dt = torch.device("cuda"), torch.float32
    try:
        # dgx comes from the Triton kernels (bit-equal); dh0 and dW_hh from cuBLAS GEMMs, whose
        # algorithm (reduction order) may differ between the capture stream and the caller's:
        # fp32 rounding of sums over T*B = 240 terms
        check_launcher_through_cache(dev, 48, 5, 40, dt, 3, dict(rtol=1e-5, atol=1e-5))

        # inside a user's own capture the launches are recorded directly (no nested capture)
        kw = {"persistent": False}
        extra = (_common.dot_precision(dt), _common.poison_enabled())
        args, _ = lstm_case(dev, 48, 5, 40, dt)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            lstm.lstm_fwd(*args, **kw)  # warm-up outside the user's capture
        torch.cuda.current_stream().wait_stream(side)
        user_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(user_graph):
            user_out = G.graphed(lstm.lstm_fwd, args, kw, key_extra=extra)
        args[0].copy_(torch.randn_like(args[0]))
        user_graph.replay()
        torch.testing.assert_close(user_out[0], lstm.lstm_fwd(*args, **kw)[0], rtol=0, atol=0)
        assert G.cache_info().captures == 2
    finally:
        G.set_enabled(None)
        G.clear_graph_cache()


def test_operators_send_long_stepwise_loops_to_the_cache():
    """fused_rnn._ops: only stepwise loops of at least GRAPH_MIN_STEPS steps are graphed."""
    from fused_rnn import _ops

    n = _ops.GRAPH_MIN_STEPS
    assert _ops._graph_worthy("stepwise", n) and _ops._graph_worthy("stepwise", 10 * n)
    assert not _ops._graph_worthy("stepwise", n - 1)
    assert not _ops._graph_worthy("persistent", 10 * n)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_module_on_cuda_replays_graphs(monkeypatch):
    """A stepwise LSTM module on CUDA: its loops are captured and replayed, and the results of
    replays equal an eager run's (graphs off)."""
    import fused_rnn
    from fused_rnn import _ops

    monkeypatch.setenv(G.ENV_CAPTURE_AFTER, "1")
    G.set_enabled(True)
    G.clear_graph_cache()
    m = fused_rnn.LSTM(8, 16, backend="stepwise").cuda()
    x = torch.randn(_ops.GRAPH_MIN_STEPS + 3, 4, 8, device="cuda", requires_grad=True)
    try:
        results = []
        for graphs_on in (False, True, True):
            G.set_enabled(graphs_on)
            y, (h, c) = m(x)
            grads = torch.autograd.grad((y.sum() + h.sum() + c.sum()), [x, *m.parameters()])
            results.append([y, h, c, *grads])
        assert G.cache_info().captures >= 2  # forward and backward
        for replayed in results[1:]:
            for a, b in zip(replayed, results[0], strict=True):
                # GEMMs may pick another algorithm on the capture stream: fp32 rounding
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    finally:
        G.set_enabled(None)
        G.clear_graph_cache()
