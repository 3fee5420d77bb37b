"""The modules on a fused backend against torch.nn (weights copied), end to end.

On a machine without CUDA the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py),
so these are small shapes. They check what the kernel tests do not: the module plumbing around
the kernels (layers x directions, batch_first, packing, hx order, unbatched input, cells).
"""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence

import fused_rnn
from fused_rnn import dispatch
from fused_rnn.bench.gpu_check import torch_nn_under_autocast

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FUSED = [b for b in ("stepwise", "persistent") if b in dispatch.available_backends(DEVICE)]
if not FUSED:
    pytest.skip("no fused backend can run here", allow_module_level=True)

# float64 (interpreter) or float32 (GPU, TF32 off): the kernels accumulate in the input
# precision and sum in another order than torch, so they agree to rounding of that precision.
DTYPE = torch.float64 if DEVICE == "cpu" else torch.float32
TOL = {"rtol": 1e-9, "atol": 1e-10} if DTYPE == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _pair(cls, backend, *args, **kw):
    """torch.nn's module and ours with the same weights."""
    ref = getattr(nn, cls)(*args, **kw).to(DEVICE, DTYPE)
    ours = getattr(fused_rnn, cls)(*args, **kw, backend=backend).to(DEVICE, DTYPE)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _grads(out, inputs):
    flat = [t for t in out if t is not None]
    loss = sum((t * torch.randn_like(t)).sum() for t in flat)
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def _compare(ref_out, our_out, ref_inputs, our_inputs):
    for a, b in zip(our_out, ref_out):
        torch.testing.assert_close(a, b, **TOL)
    state = torch.get_rng_state()
    g_ref = _grads(ref_out, ref_inputs)
    torch.set_rng_state(state)
    g_our = _grads(our_out, our_inputs)
    for a, b in zip(g_our, g_ref):
        if b is None:
            assert a is None or a.abs().max() == 0
        else:
            torch.testing.assert_close(a, b, **TOL)


def _flatten(cls, out):
    y, h = out
    if isinstance(y, nn.utils.rnn.PackedSequence):
        y = y.data
    return [y, *h] if cls == "LSTM" else [y, h]


CONFIGS = [
    # cls, kwargs, T, B, I, H
    ("LSTM", {}, 5, 3, 4, 33),
    ("LSTM", {"num_layers": 2, "bidirectional": True, "batch_first": True}, 4, 2, 3, 17),
    ("LSTM", {"proj_size": 5, "num_layers": 2}, 4, 3, 4, 9),
    ("LSTM", {"bias": False, "bidirectional": True, "proj_size": 3}, 3, 1, 5, 7),
    ("GRU", {}, 5, 3, 4, 33),
    ("GRU", {"num_layers": 2, "bidirectional": True, "batch_first": True}, 4, 2, 3, 17),
    ("GRU", {"bias": False}, 1, 1, 3, 8),
    ("RNN", {"nonlinearity": "tanh", "num_layers": 3}, 4, 3, 4, 16),
    ("RNN", {"nonlinearity": "relu", "bidirectional": True, "bias": False}, 5, 2, 3, 9),
]


def _id(c):
    cls, kw, T, B, I, H = c
    flags = "-".join(f"{k}={v}" for k, v in kw.items())
    return f"{cls}-T{T}-B{B}-I{I}-H{H}" + (f"-{flags}" if flags else "")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("config", CONFIGS, ids=[_id(c) for c in CONFIGS])
def test_module_matches_torch(config, backend):
    cls, kw, T, B, I, H = config
    ref, ours = _pair(cls, backend, I, H, **kw)
    D = 2 if kw.get("bidirectional") else 1
    L = kw.get("num_layers", 1)
    R = kw.get("proj_size", 0) or H
    shape = (B, T, I) if kw.get("batch_first") else (T, B, I)
    x = torch.randn(shape, device=DEVICE, dtype=DTYPE, requires_grad=True)
    h0 = torch.randn(L * D, B, R, device=DEVICE, dtype=DTYPE, requires_grad=True)
    c0 = torch.randn(L * D, B, H, device=DEVICE, dtype=DTYPE, requires_grad=True)
    hx = (h0, c0) if cls == "LSTM" else h0
    inputs_ref = [x, h0] + ([c0] if cls == "LSTM" else []) + list(ref.parameters())
    inputs_our = [x, h0] + ([c0] if cls == "LSTM" else []) + list(ours.parameters())
    _compare(_flatten(cls, ref(x, hx)), _flatten(cls, ours(x, hx)), inputs_ref, inputs_our)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("cls", ["LSTM", "GRU", "RNN"])
def test_packed_unsorted_bidirectional(cls, backend):
    kw = {"proj_size": 3} if cls == "LSTM" else {}
    ref, ours = _pair(cls, backend, 3, 6, num_layers=2, bidirectional=True, **kw)
    lengths = [2, 5, 1, 4]
    seqs = [torch.randn(n, 3, device=DEVICE, dtype=DTYPE) for n in lengths]
    packed = pack_sequence(seqs, enforce_sorted=False)
    R = 3 if cls == "LSTM" else 6
    h0 = torch.randn(4, 4, R, device=DEVICE, dtype=DTYPE, requires_grad=True)
    c0 = torch.randn(4, 4, 6, device=DEVICE, dtype=DTYPE, requires_grad=True)
    hx = (h0, c0) if cls == "LSTM" else h0
    out_ref, out_our = ref(packed, hx), ours(packed, hx)
    assert torch.equal(out_our[0].batch_sizes, out_ref[0].batch_sizes)
    assert torch.equal(out_our[0].unsorted_indices, out_ref[0].unsorted_indices)
    inputs_ref = [h0] + ([c0] if cls == "LSTM" else []) + list(ref.parameters())
    inputs_our = [h0] + ([c0] if cls == "LSTM" else []) + list(ours.parameters())
    _compare(_flatten(cls, out_ref), _flatten(cls, out_our), inputs_ref, inputs_our)
    padded, _ = pad_packed_sequence(out_our[0])
    assert padded[lengths[2] :, 2].abs().max() == 0  # padding of the short sequence is zero


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("cls", ["LSTM", "GRU", "RNN"])
def test_unbatched_and_default_state(cls, backend):
    ref, ours = _pair(cls, backend, 4, 8, batch_first=True)
    x = torch.randn(6, 4, device=DEVICE, dtype=DTYPE)
    for a, b in zip(_flatten(cls, ours(x)), _flatten(cls, ref(x))):
        torch.testing.assert_close(a, b, **TOL)
    assert ours(x)[0].shape == (6, 8)


@pytest.mark.parametrize("backend", FUSED)
def test_dropout_p1_between_layers(backend):
    ref, ours = _pair("LSTM", backend, 4, 8, num_layers=2, dropout=1.0)
    ref.train()
    ours.train()
    x = torch.randn(5, 2, 4, device=DEVICE, dtype=DTYPE)
    # p=1 zeroes the first layer's output exactly: the result is deterministic and equal
    for a, b in zip(_flatten("LSTM", ours(x)), _flatten("LSTM", ref(x))):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("cls", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_cells_match_torch(cls, backend, batched):
    ref = getattr(nn, cls)(5, 9).to(DEVICE, DTYPE)
    ours = getattr(fused_rnn, cls)(5, 9, backend=backend).to(DEVICE, DTYPE)
    ours.load_state_dict(ref.state_dict())
    shape = (3, 5) if batched else (5,)
    x = torch.randn(shape, device=DEVICE, dtype=DTYPE, requires_grad=True)
    h = torch.randn(shape[:-1] + (9,), device=DEVICE, dtype=DTYPE, requires_grad=True)
    c = torch.randn(shape[:-1] + (9,), device=DEVICE, dtype=DTYPE, requires_grad=True)
    hx = (h, c) if cls == "LSTMCell" else h
    out_ref, out_our = ref(x, hx), ours(x, hx)
    out_ref = list(out_ref) if cls == "LSTMCell" else [out_ref]
    out_our = list(out_our) if cls == "LSTMCell" else [out_our]
    extra = [c] if cls == "LSTMCell" else []
    _compare(out_ref, out_our, [x, h, *extra, *ref.parameters()],
             [x, h, *extra, *ours.parameters()])  # fmt: skip


@pytest.mark.parametrize("backend", FUSED)
def test_variants_on_fused_path(backend):
    torch.manual_seed(5)
    ours = fused_rnn.LSTM(3, 6, 2, bidirectional=True, peephole=True, coupled_gates=True,
                          backend=backend).to(DEVICE, DTYPE)  # fmt: skip
    cpu = fused_rnn.LSTM(3, 6, 2, bidirectional=True, peephole=True, coupled_gates=True,
                         backend="torch").to(DEVICE, DTYPE)  # fmt: skip
    cpu.load_state_dict(ours.state_dict())
    x = torch.randn(4, 2, 3, device=DEVICE, dtype=DTYPE, requires_grad=True)
    _compare(_flatten("LSTM", cpu(x)), _flatten("LSTM", ours(x)), [x, *cpu.parameters()],
             [x, *ours.parameters()])  # fmt: skip


def test_auto_resolves_to_torch_on_cpu():
    assert dispatch.resolve("auto", "LSTM", torch.device("cpu")) == "torch"


@pytest.mark.parametrize("backend", FUSED)
def test_autocast_casts_like_nn_lstm(backend):
    """Under autocast the fused path runs in the autocast dtype, as torch.nn.LSTM does."""
    ref = nn.LSTM(4, 16, 2).to(DEVICE)
    ours = fused_rnn.LSTM(4, 16, 2, backend=backend).to(DEVICE)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 4, device=DEVICE)
    dtype = torch.bfloat16
    with torch.autocast(torch.device(DEVICE).type, dtype=dtype):
        y, (h, c) = ours(x)
    # torch.nn's CPU LSTM cannot run bf16 on every CPU: then fp32 on bf16-rounded operands
    y_ref, (h_ref, c_ref) = torch_nn_under_autocast(ref, x, dtype)[0]
    assert y.dtype == y_ref.dtype == dtype
    assert h.dtype == h_ref.dtype and c.dtype == c_ref.dtype
    # both round operands to bf16 (8 mantissa bits) at different points: a few 1e-2 apart at most
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=0, atol=3e-2)
    torch.testing.assert_close(c.float(), c_ref.float(), rtol=0, atol=3e-2)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("cls", ["GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
def test_autocast_dtype_follows_torch(cls, backend):
    """Under autocast the fused path picks the dtype torch.nn's op would run in on this device."""
    ref = getattr(nn, cls)(4, 16).to(DEVICE)
    ours = getattr(fused_rnn, cls)(4, 16, backend=backend).to(DEVICE)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 4, device=DEVICE)
    if cls.endswith("Cell"):
        x = x[0]
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        out_ref, out = ref(x), ours(x)
    out_ref = out_ref[0] if isinstance(out_ref, tuple) else out_ref
    out = out[0] if isinstance(out, tuple) else out
    assert out.dtype == out_ref.dtype
    # bf16 rounding on one side or both: torch's CPU GRU/RNN/cells return fp32 under autocast but
    # run their inner GEMMs in bf16 (those ops are on the list), ours computes them in fp32
    torch.testing.assert_close(out.float(), out_ref.float(), rtol=0, atol=3e-2)
