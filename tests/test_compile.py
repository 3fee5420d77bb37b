"""torch.compile, torch.export and the fused_rnn:: custom operators (fused_rnn._ops).

* The operators themselves: `torch.library.opcheck` (schema, fake implementation, autograd
  registration, AOT dispatch with dynamic shapes) and parity with the kernels' own entry points
  (`lstm_recurrence` / `gru_recurrence` / `rnn_recurrence`), gradients of every input included
  (second-order gradients: tests/test_second_order.py).
* Modules under `torch.compile(fullgraph=True)` (inductor), forward and backward against eager,
  on the torch path (backend="torch": the operators' torch implementation under compile against
  torch's native op in eager) and on the fused path (backend="stepwise": the kernels run under
  TRITON_INTERPRET=1 on CPU); every graph must hold the fused_rnn operators as single nodes, one
  per layer and direction, and the same graph must serve every sequence length.
* `torch.export` of eval models, running the exported program (and a save/load round trip).

CPU compiles cost seconds each: shapes stay tiny (T <= 4, H <= 16), and every case resets
dynamo first so that no case reuses another's compiled code.
"""

import io

import pytest
import torch
from torch import nn

import fused_rnn
from fused_rnn import dispatch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FUSED = "stepwise" if "stepwise" in dispatch.available_backends(DEVICE) else None
FUSED_ALL = [b for b in ("stepwise", "persistent") if b in dispatch.available_backends(DEVICE)]
needs_fused = pytest.mark.skipif(FUSED is None, reason="no fused backend can run here")

# float64: eager and compiled run the same maths in another order (or in another program: the
# native op against the unrolled loop), so they agree to float64 rounding. The interpreter runs
# float64 kernels; on a GPU float32 with TF32 off.
DTYPE = torch.float64 if DEVICE == "cpu" else torch.float32
TOL = {"rtol": 1e-9, "atol": 1e-10} if DTYPE == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
    torch._dynamo.reset()


def _flat(out):
    y, h = out
    return [y, *h] if isinstance(h, tuple) else [y, h]


def _loss(outs, seed=1):
    """sum(out * fixed random weights): every output (and final state) gets a gradient."""
    g = torch.Generator().manual_seed(seed)
    return sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device)).sum()
               for t in outs)  # fmt: skip


def _fwd_bwd(model, x, hx=None):
    outs = _flat(model(x, hx))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(_loss(outs), [x, *params])
    return [o.detach() for o in outs], list(grads)


def _assert_all_close(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert not v.isnan().any()
        torch.testing.assert_close(u, v, **TOL)


def _recording(graphs, name):
    """Compiler backend `name`, recording each dynamo graph it gets."""
    from torch._dynamo.backends.registry import lookup_backend

    compiler = lookup_backend(name)

    def backend(gm, example_inputs):
        graphs.append(gm)
        return compiler(gm, example_inputs)

    return backend


def _targets(graphs):
    return {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}


def _make(cls, backend, I, H, **kw):
    torch.manual_seed(0)
    return getattr(fused_rnn, cls)(I, H, **kw, backend=backend).to(DEVICE, DTYPE)


def _compile_matches_eager(model, x, hx=None, backend="inductor"):
    graphs = []
    compiled = torch.compile(model, fullgraph=True, backend=_recording(graphs, backend))
    eager_out, eager_grads = _fwd_bwd(model, x, hx)
    comp_out, comp_grads = _fwd_bwd(compiled, x, hx)
    _assert_all_close(comp_out, eager_out)
    _assert_all_close(comp_grads, eager_grads)
    assert len(graphs) == 1  # one dynamo graph: no graph break
    return graphs


# ============================================================================ the operators


def _t(*shape, grad=True):
    return torch.randn(*shape, dtype=DTYPE, device=DEVICE, requires_grad=grad)


LSTM_OP_CASES = {
    # name: (G, proj, peephole, lengths, reverse)
    "plain": (4, 0, False, False, False),
    "proj-reverse": (4, 3, False, False, True),
    "coupled-peephole-lengths": (3, 0, True, True, True),
}


@needs_fused
@pytest.mark.parametrize("case", list(LSTM_OP_CASES))
def test_lstm_ops_opcheck(case):
    G, P, peep, lens, rev = LSTM_OP_CASES[case]
    T, B, H = 3, 2, 5
    R = P or H
    lengths = torch.tensor([3, 1], device=DEVICE) if lens else None
    w_hr = _t(P, H) if P else None
    w_ch = _t((G - 1) * H) if peep else None
    args = (_t(T, B, G * H), _t(B, R), _t(B, H), _t(G * H, R), w_hr, w_ch, lengths, rev, G == 3,
            True, "stepwise")  # fmt: skip
    torch.library.opcheck(torch.ops.fused_rnn.lstm_fwd.default, args)
    # the backward operator on the forward's saved buffers, with some gradients not needed
    with torch.no_grad():
        y, h_T, c_T, hs, cs, gates, ms, aux = torch.ops.fused_rnn.lstm_fwd(*args)
    assert aux.numel() == 0  # layer norm's buffer: empty without it
    needs = [True, False, True, True, P > 0, False]
    detached = [None if t is None else t.detach() for t in (args[3], w_hr, w_ch)]
    dys = [torch.randn_like(t) for t in (y, h_T, c_T)]
    bargs = (*dys, hs, cs, gates, ms, *detached, lengths, rev, G == 3, needs, "stepwise")
    torch.library.opcheck(torch.ops.fused_rnn.lstm_bwd.default, bargs)
    grads = torch.ops.fused_rnn.lstm_bwd(*bargs)
    # not needed (and the layer-norm gradients of a call without it): an empty tensor
    assert [g.numel() > 0 for g in grads] == needs + [False] * 3


GRU_OP_CASES = {"GRU": (3, True), "GRU-nobias": (3, False), "RNN_TANH": (1, False),
                "RNN_RELU": (1, False)}  # fmt: skip


@needs_fused
@pytest.mark.parametrize("mode", list(GRU_OP_CASES))
def test_gru_ops_opcheck(mode):
    from fused_rnn import _ops

    G, has_bhn = GRU_OP_CASES[mode]
    cell = _ops.cell_of(mode.split("-")[0])
    T, B, H = 3, 2, 5
    lengths = torch.tensor([2, 3], device=DEVICE)
    args = (_t(T, B, G * H), _t(B, H), _t(G * H, H), _t(H) if has_bhn else None, lengths, True,
            cell, True, "stepwise")  # fmt: skip
    torch.library.opcheck(torch.ops.fused_rnn.gru_fwd.default, args)
    with torch.no_grad():
        y, h_T, hs, ws, aux = torch.ops.fused_rnn.gru_fwd(*args)
    assert aux.numel() == 0
    assert (ws.numel() > 0) == (G == 3)  # the RNN keeps no gates: an empty tensor
    needs = [True, True, True, has_bhn]
    bargs = (torch.randn_like(y), torch.randn_like(h_T), hs, ws, args[2].detach(), lengths, True,
             cell, needs, "stepwise")  # fmt: skip
    torch.library.opcheck(torch.ops.fused_rnn.gru_bwd.default, bargs)


def _grads_of(fn, inputs):
    outs = fn(*inputs)
    return list(outs), list(
        torch.autograd.grad(_loss(outs), [t for t in inputs if t is not None and t.requires_grad])
    )


@needs_fused
@pytest.mark.parametrize("proj", [0, 3])
def test_lstm_op_path_matches_kernel_function(proj):
    """The operators, and the shape-checked entry point (fused_rnn.recurrence) over them: same
    outputs and gradients."""
    from fused_rnn import _ops
    from fused_rnn.recurrence import lstm_recurrence

    T, B, H = 4, 3, 6
    R = proj or H
    ins = [_t(T, B, 4 * H), _t(B, R), _t(B, H), _t(4 * H, R), _t(proj, H) if proj else None,
           _t(3 * H)]  # fmt: skip
    lengths = torch.tensor([4, 2, 3], device=DEVICE)

    def ours(*a):
        return _ops.lstm_recurrence(*a, lengths=lengths, reverse=True)

    def kernel(gx, h0, c0, w_hh, w_hr, w_ch):
        return lstm_recurrence(gx, h0, c0, w_hh, w_hr=w_hr, w_ch=w_ch, lengths=lengths,
                               reverse=True)  # fmt: skip

    out_a, g_a = _grads_of(ours, ins)
    out_b, g_b = _grads_of(kernel, ins)
    _assert_all_close(out_a, out_b)
    _assert_all_close(g_a, g_b)


@needs_fused
@pytest.mark.parametrize("mode", ["GRU", "RNN_RELU"])
def test_gru_op_path_matches_kernel_function(mode):
    from fused_rnn import _ops
    from fused_rnn.recurrence import gru_recurrence, rnn_recurrence

    T, B, H = 4, 3, 6
    G = 3 if mode == "GRU" else 1
    ins = [_t(T, B, G * H), _t(B, H), _t(G * H, H)] + ([_t(H)] if G == 3 else [])
    cell = _ops.cell_of(mode)

    def ours(*a):
        return _ops.gru_recurrence(cell, *a)

    def kernel(*a):
        return gru_recurrence(*a) if G == 3 else rnn_recurrence(*a, nonlinearity="relu")

    out_a, g_a = _grads_of(ours, ins)
    out_b, g_b = _grads_of(kernel, ins)
    _assert_all_close(out_a, out_b)
    _assert_all_close(g_a, g_b)


@needs_fused
def test_op_grads_respect_requires_grad_and_unused_outputs():
    """Only what needs a gradient gets one; an output outside the loss counts as zero."""
    from fused_rnn import _ops

    T, B, H = 3, 2, 4
    gx, h0, c0, w_hh = _t(T, B, 4 * H), _t(B, H, grad=False), _t(B, H), _t(4 * H, H, grad=False)
    y, h_T, c_T = _ops.lstm_recurrence(gx, h0, c0, w_hh)
    assert y.requires_grad and h_T.requires_grad
    y.sum().backward()  # h_T and c_T unused
    assert h0.grad is None and w_hh.grad is None
    assert gx.grad is not None and c0.grad is not None
    # the same with torch's maths: gx's gradient from y alone
    gx_ref = gx.detach().clone().requires_grad_()
    from fused_rnn._loop import recurrence_autograd

    y_ref, _, _ = recurrence_autograd("LSTM", gx_ref, h0, c0.detach(), w_hh)
    y_ref.sum().backward()
    torch.testing.assert_close(gx.grad, gx_ref.grad, **TOL)
    with torch.no_grad():  # no graph: the forward keeps no gates
        out = torch.ops.fused_rnn.lstm_fwd(gx, h0, c0, w_hh, None, None, None, False, False,
                                           False, "stepwise")  # fmt: skip
    assert out[5].numel() == 0 and not out[0].requires_grad


@needs_fused
def test_persistent_flag_reaches_the_launcher(monkeypatch):
    """backend="persistent" reaches the launcher as persistent=True; an unknown backend raises.

    A launcher stands in for kernels.lstm's here: this checks the operator's plumbing, not the
    persistent kernels (their own tests do).
    """
    from fused_rnn import _ops
    from fused_rnn.kernels import lstm as lstm_mod

    real, seen = lstm_mod.lstm_fwd, []

    def spy(*args, persistent=False):
        seen.append(persistent)
        return real(*args)

    gx, h0, c0, w_hh = _t(2, 1, 8), _t(1, 2), _t(1, 2), _t(8, 2)
    y_ref, _, _ = _ops.lstm_recurrence(gx, h0, c0, w_hh)
    monkeypatch.setattr(lstm_mod, "lstm_fwd", spy)
    y, _, _ = _ops.lstm_recurrence(gx, h0, c0, w_hh, backend="persistent")
    _ops.lstm_recurrence(gx, h0, c0, w_hh)
    assert seen == [True, False]
    torch.testing.assert_close(y, y_ref, **TOL)
    with pytest.raises(ValueError, match="unknown backend"):
        _ops.lstm_recurrence(gx, h0, c0, w_hh, backend="warp")


def test_compile_constant_marks_like_torch():
    """dispatch.compile_constant sets the attribute torch.compiler.assume_constant_result sets."""
    from fused_rnn.dispatch import compile_constant

    def f():
        return None

    marked = torch.compiler.assume_constant_result(lambda: None)
    flags = {k: v for k, v in vars(marked).items() if k.startswith("_dynamo")}
    assert flags == {k: v for k, v in vars(compile_constant(f)).items() if k.startswith("_dynamo")}
    assert flags  # the attribute exists


# ============================================================================ torch.compile

# Inductor (the default backend) generates and compiles C++ for every graph, which costs seconds
# on two busy cores; the cases marked "aot_eager" check dynamo (one graph, fullgraph) and
# AOTAutograd's forward and backward graphs without that code generation. One case per path
# runs through inductor.
TORCH_CASES = {
    # id: (cls, kwargs, compiler backend)
    "LSTM-inductor": ("LSTM", {}, "inductor"),
    "LSTM-2l-bidir": ("LSTM", {"num_layers": 2, "bidirectional": True}, "aot_eager"),
    "GRU-2l-bidir": (
        "GRU",
        {"num_layers": 2, "bidirectional": True, "batch_first": True},
        "aot_eager",
    ),
    "RNN-relu-2l-bidir": (
        "RNN",
        {"num_layers": 2, "bidirectional": True, "nonlinearity": "relu"},
        "aot_eager",
    ),
    "LSTM-peephole-proj": ("LSTM", {"peephole": True, "proj_size": 3}, "aot_eager"),
    "LSTM-coupled-peephole": ("LSTM", {"coupled_gates": True, "peephole": True}, "aot_eager"),
}


@pytest.mark.parametrize("case", list(TORCH_CASES))
def test_compile_torch_path(case):
    cls, kw, backend = TORCH_CASES[case]
    model = _make(cls, "torch", 3, 5, **kw)
    x = _t(3, 2, 3)
    graphs = _compile_matches_eager(model, x, backend=backend)
    # one operator node per layer and direction (the torch implementation inside), no native
    # RNN op and no per-step ops: the graph does not grow with T
    L, D = kw.get("num_layers", 1), 2 if kw.get("bidirectional") else 1
    op = "fused_rnn.lstm_fwd" if cls == "LSTM" else "fused_rnn.gru_fwd"
    calls = [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert calls.count(op) == L * D, calls
    assert not any("_VF" in t or "aten.lstm" in t for t in calls), calls


@pytest.mark.parametrize("cls,backend", [("LSTM", "torch"), ("GRU", "torch"), ("LSTM", FUSED)])
def test_compiled_graph_is_independent_of_T(cls, backend):
    """A compiled model serves every sequence length with one graph whose size does not depend
    on T: at most one recompile (dynamo's switch to a dynamic T after the first new length),
    none after it, and the same number of nodes."""
    if backend is None:
        pytest.skip("no fused backend can run here")
    model = _make(cls, backend, 3, 5, num_layers=2)
    graphs = []
    compiled = torch.compile(model, fullgraph=True, backend=_recording(graphs, "aot_eager"))
    for T in (4, 6, 9, 17, 33):  # never equal to B or I: dynamo would tie such sizes together
        x = _t(T, 2, 3)
        _assert_all_close(_flat(compiled(x)), _flat(model(x)))

    def real(graphs):  # dynamo may also hand over an empty graph (a frame without tensor ops)
        return [g for g in graphs if any(n.op == "call_function" for n in g.graph.nodes)]

    graphs = real(graphs)
    assert len(graphs) <= 2, [len(g.graph.nodes) for g in graphs]
    op = "fused_rnn.lstm_fwd" if cls == "LSTM" else "fused_rnn.gru_fwd"
    for gm in graphs:  # the same graph whatever T: one operator per layer, no per-step ops
        calls = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        assert calls.count(op) == 2, calls
        assert not any(k in c for c in calls for k in ("sigmoid", "tanh", "lstm_cell")), calls
    graphs.clear()
    torch._dynamo.reset()
    compiled = torch.compile(
        model, fullgraph=True, dynamic=True, backend=_recording(graphs, "aot_eager")
    )
    for T in (4, 7, 30):
        compiled(_t(T, 2, 3))
    assert len(real(graphs)) == 1


def test_compile_torch_path_with_hx_and_cell():
    model = _make("LSTM", "torch", 3, 5)
    x = _t(3, 2, 3)
    hx = (_t(1, 2, 5, grad=False), _t(1, 2, 5, grad=False))
    _compile_matches_eager(model, x, hx, backend="aot_eager")

    torch._dynamo.reset()
    cell = _make("GRUCell", "torch", 3, 5)
    xc, h = _t(2, 3), _t(2, 5, grad=False)
    compiled = torch.compile(cell, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(xc, h), cell(xc, h), **TOL)


FUSED_CASES = {
    # id: (cls, kwargs, operator in the graph, compiler backend)
    "LSTM-bidir": ("LSTM", {"bidirectional": True}, "fused_rnn.lstm_fwd", "inductor"),
    "LSTM-2l-proj-peephole": (
        "LSTM",
        {"num_layers": 2, "proj_size": 3, "peephole": True},
        "fused_rnn.lstm_fwd",
        "aot_eager",
    ),
    "GRU-bidir": (
        "GRU",
        {"bidirectional": True, "batch_first": True},
        "fused_rnn.gru_fwd",
        "aot_eager",
    ),
    "RNN-tanh-2l": ("RNN", {"num_layers": 2}, "fused_rnn.gru_fwd", "aot_eager"),
}


@needs_fused
@pytest.mark.parametrize("fused", FUSED_ALL)
@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_compile_fused_path(case, fused):
    cls, kw, op, backend = FUSED_CASES[case]
    model = _make(cls, fused, 3, 5, **kw)
    x = _t(3, 2, 3)
    graphs = _compile_matches_eager(model, x, backend=backend)
    targets = _targets(graphs)
    assert op in targets, targets  # the recurrence is one opaque node per layer and direction


@needs_fused
@pytest.mark.parametrize("fused", FUSED_ALL)
def test_compile_fused_path_against_torch_nn(fused):
    """Compiled fused LSTM vs torch.nn.LSTM with the same weights (not only vs its own eager)."""
    ref = nn.LSTM(3, 5, num_layers=2).to(DEVICE, DTYPE)
    model = _make("LSTM", fused, 3, 5, num_layers=2)
    model.load_state_dict(ref.state_dict())
    x = _t(3, 2, 3)
    out_c, g_c = _fwd_bwd(torch.compile(model, fullgraph=True, backend="aot_eager"), x)
    out_r, g_r = _fwd_bwd(ref, x)
    _assert_all_close(out_c, out_r)
    _assert_all_close(g_c, g_r)


@pytest.mark.skipif(
    "persistent" not in dispatch.available_backends(DEVICE), reason="no persistent kernels here"
)
def test_compile_persistent_backend():
    """backend="persistent" reaches the operators, eager and compiled."""
    ref = nn.LSTM(3, 5, bidirectional=True).to(DEVICE, DTYPE)
    model = _make("LSTM", "persistent", 3, 5, bidirectional=True)
    model.load_state_dict(ref.state_dict())
    x = _t(3, 2, 3)
    graphs = _compile_matches_eager(model, x, backend="aot_eager")
    nodes = [n for gm in graphs for n in gm.graph.nodes if "fused_rnn.lstm_fwd" in str(n.target)]
    assert len(nodes) == 2 and all(n.args[-1] == "persistent" for n in nodes)
    out_r, g_r = _fwd_bwd(ref, x)
    out_p, g_p = _fwd_bwd(model, x)
    _assert_all_close(out_p, out_r)
    _assert_all_close(g_p, g_r)


# ============================================================================ torch.export


def _export_and_run(model, x):
    model.eval()
    with torch.no_grad():
        expected = _flat(model(x))
        ep = torch.export.export(model, (x,))
        got = _flat(ep.module()(x))
        buf = io.BytesIO()
        torch.export.save(ep, buf)
        buf.seek(0)
        loaded = torch.export.load(buf)
        again = _flat(loaded.module()(x))
    _assert_all_close(got, expected)
    _assert_all_close(again, expected)
    return ep


EXPORT_CASES = {
    "torch-LSTM-2l-bidir": ("LSTM", "torch", {"num_layers": 2, "bidirectional": True}),
    "torch-GRU": ("GRU", "torch", {"batch_first": True}),
    "torch-LSTM-peephole": ("LSTM", "torch", {"peephole": True}),
    "fused-LSTM-proj": ("LSTM", FUSED, {"proj_size": 2}),
    "fused-GRU-bidir": ("GRU", FUSED, {"bidirectional": True}),
    "fused-RNN-relu": ("RNN", FUSED, {"nonlinearity": "relu"}),
    "persistent-LSTM-proj-bidir": (
        "LSTM",
        "persistent" if "persistent" in FUSED_ALL else None,
        {"proj_size": 2, "bidirectional": True},
    ),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export(case):
    cls, backend, kw = EXPORT_CASES[case]
    if backend is None:
        pytest.skip("no fused backend can run here")
    model = _make(cls, backend, 3, 5, **kw)
    x = _t(4, 2, 3, grad=False)
    ep = _export_and_run(model, x)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    if backend != "torch":
        assert any(t.startswith("fused_rnn.") for t in targets), targets
    # the exported program takes another batch of the traced shape
    x2 = _t(4, 2, 3, grad=False)
    with torch.no_grad():
        _assert_all_close(_flat(ep.module()(x2)), _flat(model(x2)))
