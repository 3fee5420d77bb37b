"""fused_rnn in the PyTorch ecosystem, against torch.nn doing the same thing.

* DistributedDataParallel (gloo, two CPU processes) gives the gradients of single-process
  training on the concatenated batch; parameters are plain leaf nn.Parameters, no buffers.
* Serialization and copies: state_dict through torch.save/torch.load, deepcopy, pickle,
  torch.save(module); dtype conversions; freezing; no_grad / inference_mode; functional_call;
  weight_norm; in-place weight edits seen by the next forward (nothing is cached).
* Bad input: other devices, wrong dtypes, NaN/inf, an empty batch, a very long sequence.
* Autocast (bf16 on CPU).

Each behaviour runs on the torch path and, where the kernels are involved, on the fused path
(backend="stepwise"; without CUDA the kernels run under TRITON_INTERPRET=1 on CPU, so shapes stay
tiny). Comparisons are in float64 unless a test is about dtypes.
"""

import contextlib
import copy
import io
import os
import pickle
import socket
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_rnn
from fused_rnn import dispatch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FUSED = "stepwise" if "stepwise" in dispatch.available_backends(DEVICE) else None
BACKENDS = ["torch"] + [
    b for b in ("stepwise", "persistent") if b in dispatch.available_backends(DEVICE)
]
DTYPE = torch.float64 if DEVICE == "cpu" else torch.float32
TOL = {"rtol": 1e-9, "atol": 1e-10} if DTYPE == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
SEQ = ["LSTM", "GRU", "RNN"]


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _pair(cls, backend, *args, dtype=DTYPE, device=DEVICE, **kw):
    """torch.nn's module and ours with the same weights."""
    torch.manual_seed(0)
    ref = getattr(nn, cls)(*args, **kw).to(device, dtype)
    ours = getattr(fused_rnn, cls)(*args, **kw, backend=backend).to(device, dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    a, b = out  # (y, h), (y, (h, c)) or LSTMCell's (h, c)
    return [a, *b] if isinstance(b, tuple) else [a, b]


def _x(*shape, dtype=DTYPE, grad=False):
    return torch.randn(*shape, dtype=dtype, device=DEVICE, requires_grad=grad)


def _loss(outs, seed=1):
    g = torch.Generator().manual_seed(seed)
    return sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device)).sum()
               for t in outs)  # fmt: skip


def _close(a, b, **tol):
    tol = tol or TOL
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and u.shape == v.shape
        torch.testing.assert_close(u, v, **tol)


def _same_outputs(m1, m2, x, **tol):
    with torch.no_grad():
        _close(_flat(m1(x)), _flat(m2(x)), **tol)


# ============================================================================ distributed


def test_parameters_are_plain_leaves_without_buffers():
    """What FSDP / DDP / optimizers rely on: leaf nn.Parameters, no buffers, one name each."""
    modules = [
        fused_rnn.LSTM(3, 6, num_layers=2, bidirectional=True, proj_size=4),
        fused_rnn.LSTM(3, 6, peephole=True, coupled_gates=True),
        fused_rnn.GRU(3, 6, bias=False),
        fused_rnn.RNN(3, 6, nonlinearity="relu"),
        fused_rnn.LSTMCell(3, 6),
        fused_rnn.GRUCell(3, 6),
    ]
    for m in modules:
        named = dict(m.named_parameters())
        assert named and list(m.buffers()) == []
        for p in named.values():
            assert type(p) is nn.Parameter and p.is_leaf and p.requires_grad
        assert list(m.state_dict()) == list(named)
        assert len({id(p) for p in named.values()}) == len(named)  # no shared storage objects
    ref = nn.LSTM(3, 6, num_layers=2, bidirectional=True, proj_size=4)
    assert [n for n, _ in modules[0].named_parameters()] == [n for n, _ in ref.named_parameters()]


class _Net(nn.Module):
    def __init__(self, backend):
        super().__init__()
        kw = {"batch_first": True, "backend": backend}
        self.lstm = fused_rnn.LSTM(3, 5, num_layers=2, bidirectional=True, **kw)
        self.gru = fused_rnn.GRU(10, 4, **kw)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y, _ = self.lstm(x)
        _, h = self.gru(y)
        return self.head(h[-1])


def _train(model, x, y, steps=2):
    """SGD steps; returns the gradients of every step and the final parameters."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    grads = []
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        grads.append([p.grad.detach().clone() for p in model.parameters()])
        opt.step()
    return grads, [p.detach().clone() for p in model.parameters()]


def _data():
    """The whole batch: x (B=4, T=3, I=3) batch-first, targets (4, 2)."""
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 3, 3, generator=g), torch.randn(4, 2, generator=g)


def _ddp_worker(rank, world, backends, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
    try:
        x, y = _data()
        n = x.shape[0] // world
        results = {}
        for backend in backends:
            torch.manual_seed(0)  # the same initial weights as the single-process model
            model = DDP(_Net(backend))
            results[backend] = _train(
                model, x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
            )
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_matches_single_process(monkeypatch):
    """2 gloo processes on CPU, each on half the batch: DDP's averaged gradients (and the
    parameters after two SGD steps) equal single-process training on the whole batch."""
    import torch.multiprocessing as mp

    # The fused path joins when its kernels can run on CPU tensors (the interpreter).
    backends = ["torch"] + (
        ["stepwise"] if "stepwise" in dispatch.available_backends("cpu") else []
    )
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_ddp_worker, args=(2, backends, out_dir), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]
    x, y = _data()
    for backend in backends:
        torch.manual_seed(0)
        grads, params = _train(_Net(backend), x, y)
        for rank in ranks:
            r_grads, r_params = rank[backend]
            for step in range(len(grads)):
                # fp32: DDP sums two half-batch gradients where one process sums all four
                _close(r_grads[step], grads[step], rtol=1e-5, atol=1e-6)
            _close(r_params, params, rtol=1e-5, atol=1e-6)


# ============================================================================ serialization


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_through_torch_save(backend):
    ref, ours = _pair("LSTM", backend, 3, 5, num_layers=2, bidirectional=True)
    x = _x(4, 2, 3)
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)
    torch.manual_seed(123)  # other initial weights, then the loaded ones
    fresh = fused_rnn.LSTM(3, 5, num_layers=2, bidirectional=True, backend=backend)
    fresh = fresh.to(DEVICE, DTYPE)
    fresh.load_state_dict(sd)
    back = nn.LSTM(3, 5, num_layers=2, bidirectional=True).to(DEVICE, DTYPE)
    back.load_state_dict(sd)
    _same_outputs(fresh, ours, x)
    _same_outputs(back, ref, x)
    _same_outputs(fresh, ref, x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_deepcopy_pickle_and_torch_save_module(cls, backend):
    _, ours = _pair(cls, backend, 3, 5, bidirectional=True)
    x = _x(3, 2, 3)
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    copies = [
        copy.deepcopy(ours),
        pickle.loads(pickle.dumps(ours)),
        torch.load(buf, weights_only=False),
    ]
    for c in copies:
        assert type(c) is type(ours) and c.backend == backend
        _same_outputs(c, ours, x)
        with torch.no_grad():  # a copy owns its weights
            c.weight_hh_l0.add_(1.0)
        assert not torch.equal(c.weight_hh_l0, ours.weight_hh_l0)


def _same_behaviour(run_ref, run_ours, tol):
    """Both return close results, or both raise the same exception type."""
    try:
        expected = run_ref()
    except Exception as e:  # what torch.nn does is the specification here
        with pytest.raises(type(e)):
            run_ours()
        return
    _close(_flat(run_ours()), _flat(expected), **tol)


# torch path: the same native op as torch.nn, so exact. Fused path: fp16/bf16 operands and
# states are rounded to 11/8 mantissa bits (accumulation in fp32), torch rounds elsewhere.
CONVERSIONS = {
    "half": {"torch": {"rtol": 0, "atol": 0}, "fused": {"rtol": 1e-2, "atol": 2e-3}},
    "bfloat16": {"torch": {"rtol": 0, "atol": 0}, "fused": {"rtol": 5e-2, "atol": 1.6e-2}},
    "double": {"torch": {"rtol": 0, "atol": 0}, "fused": TOL},
    "float": {"torch": {"rtol": 0, "atol": 0}, "fused": {"rtol": 1e-5, "atol": 1e-6}},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("conv", list(CONVERSIONS))
@pytest.mark.parametrize("cls", SEQ)
def test_dtype_conversion_then_forward(cls, conv, backend):
    ref, ours = _pair(cls, backend, 3, 5, num_layers=2, dtype=torch.float32)
    ref, ours = getattr(ref, conv)(), getattr(ours, conv)()
    dtype = ref.weight_ih_l0.dtype
    assert all(p.dtype == dtype for p in ours.parameters())
    x = _x(3, 2, 3, dtype=dtype)
    tol = CONVERSIONS[conv]["torch" if backend == "torch" else "fused"]
    with torch.no_grad():
        _same_behaviour(lambda: ref(x), lambda: ours(x), tol)


# ============================================================================ autograd plumbing


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", SEQ)
def test_frozen_parameters_still_pass_input_grads(cls, backend):
    ref, ours = _pair(cls, backend, 3, 5, num_layers=2, bidirectional=True)
    ref.requires_grad_(False)
    ours.requires_grad_(False)
    x_ref, x_our = _x(3, 2, 3, grad=True), None
    x_our = x_ref.detach().clone().requires_grad_()
    _loss(_flat(ref(x_ref))).backward()
    _loss(_flat(ours(x_our))).backward()
    assert all(p.grad is None for p in ours.parameters())
    torch.testing.assert_close(x_our.grad, x_ref.grad, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", SEQ)
def test_no_grad_and_inference_mode(cls, backend):
    ref, ours = _pair(cls, backend, 3, 5, bidirectional=True)
    x = _x(3, 2, 3)
    expected = _flat(ref(x))
    with torch.no_grad():
        outs = _flat(ours(x))
    assert not any(t.requires_grad for t in outs)
    _close(outs, [t.detach() for t in expected])
    with torch.inference_mode():
        outs = _flat(ours(x))
    assert all(t.is_inference() and not t.requires_grad for t in outs)
    _close(outs, [t.detach() for t in expected])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", SEQ)
def test_functional_call(cls, backend):
    ref, ours = _pair(cls, backend, 3, 5, num_layers=2)
    x = _x(3, 2, 3)
    params = {n: (p.detach() * 0.5).requires_grad_() for n, p in ours.named_parameters()}
    params_ref = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    outs = _flat(torch.func.functional_call(ours, params, (x,)))
    outs_ref = _flat(torch.func.functional_call(ref, params_ref, (x,)))
    _close([t.detach() for t in outs], [t.detach() for t in outs_ref])
    g = torch.autograd.grad(_loss(outs), list(params.values()))
    g_ref = torch.autograd.grad(_loss(outs_ref), list(params_ref.values()))
    _close(list(g), list(g_ref))
    # the module's own weights were not used
    with torch.no_grad():
        assert not torch.allclose(_flat(ours(x))[0], outs[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_weight_norm_parametrization(cls, backend):
    from torch.nn.utils.parametrizations import weight_norm

    ref, ours = _pair(cls, backend, 3, 5)
    ref = weight_norm(ref, "weight_hh_l0")
    ours = weight_norm(ours, "weight_hh_l0")
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    x = _x(3, 2, 3)
    outs, outs_ref = _flat(ours(x)), _flat(ref(x))
    _close([t.detach() for t in outs], [t.detach() for t in outs_ref])
    orig = ours.parametrizations.weight_hh_l0
    orig_ref = ref.parametrizations.weight_hh_l0
    g = torch.autograd.grad(_loss(outs), [orig.original0, orig.original1])
    g_ref = torch.autograd.grad(_loss(outs_ref), [orig_ref.original0, orig_ref.original1])
    _close(list(g), list(g_ref))
    with torch.no_grad():  # a new magnitude is seen on the next forward
        orig.original0.mul_(2.0)
        orig_ref.original0.mul_(2.0)
    _same_outputs(ours, ref, x)
    assert not torch.allclose(_flat(ours(x))[0], outs[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", SEQ)
def test_weight_edits_are_seen_on_the_next_forward(cls, backend):
    """In-place edits, load_state_dict and a re-assigned Parameter: no stale cached weights."""
    ref, ours = _pair(cls, backend, 3, 5, bidirectional=True)
    x = _x(3, 2, 3)
    before = _flat(ours(x))[0].detach()
    with torch.no_grad():
        for m in (ref, ours):
            m.weight_hh_l0.mul_(-0.7)
            m.bias_hh_l0_reverse.add_(0.3)
    _same_outputs(ours, ref, x)
    assert not torch.allclose(_flat(ours(x))[0], before)

    torch.manual_seed(5)
    other = getattr(nn, cls)(3, 5, bidirectional=True).to(DEVICE, DTYPE)
    ref.load_state_dict(other.state_dict())
    ours.load_state_dict(other.state_dict())
    _same_outputs(ours, ref, x)

    new = nn.Parameter(torch.randn_like(ours.weight_hh_l0))
    ours.weight_hh_l0 = new
    ref.weight_hh_l0 = nn.Parameter(new.detach().clone())
    _same_outputs(ours, ref, x)
    _loss(_flat(ours(x))).backward()
    assert new.grad is not None and new.grad.abs().sum() > 0


# ============================================================================ bad input


def test_other_device_raises():
    """An input or a state on another device than the module's: RuntimeError, as torch.nn.

    CI has only a CPU, so the other device is "meta" (tensors without data): a CPU module with a
    meta input, and a CPU input with a meta state. CPU-vs-CUDA itself needs a GPU.
    """
    for backend in BACKENDS:
        for cls in SEQ:
            ref, ours = _pair(cls, backend, 3, 5)
            x_meta = torch.randn(3, 2, 3, dtype=DTYPE, device="meta")
            h_meta = torch.zeros(1, 2, 5, dtype=DTYPE, device="meta")
            hx_meta = (h_meta, h_meta) if cls == "LSTM" else h_meta
            x = _x(3, 2, 3)
            for m in (ref, ours):
                with pytest.raises(RuntimeError):
                    m(x_meta)
                with pytest.raises(RuntimeError):
                    m(x, hx_meta)
    for cls in ["LSTMCell", "GRUCell"]:
        ref, ours = _pair(cls, "torch", 3, 5)
        for m in (ref, ours):
            with pytest.raises(RuntimeError):
                m(torch.randn(2, 3, dtype=DTYPE, device="meta"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", SEQ)
def test_wrong_dtypes_raise_as_torch(cls, backend):
    ref, ours = _pair(cls, backend, 3, 5, dtype=torch.float32)
    bad_inputs = [_x(3, 2, 3, dtype=torch.float64), _x(3, 2, 3).to(torch.int64)]
    h64 = _x(1, 2, 5, dtype=torch.float64)
    h32 = _x(1, 2, 5, dtype=torch.float32)
    bad_hx = (h64, h32) if cls == "LSTM" else h64
    for m in (ref, ours):
        for x in bad_inputs:
            with pytest.raises(ValueError, match="does not match weight dtype"):
                m(x)
        with pytest.raises(RuntimeError):
            m(_x(3, 2, 3, dtype=torch.float32), bad_hx)


def test_cell_wrong_dtypes_raise_as_torch():
    for cls in ["LSTMCell", "GRUCell", "RNNCell"]:
        for backend in BACKENDS:
            ref, ours = _pair(cls, backend, 3, 5, dtype=torch.float32)
            for m in (ref, ours):
                with pytest.raises(RuntimeError):
                    m(_x(2, 3, dtype=torch.float64))


NONFINITE = {
    # where: (t, b, features) set to value
    "nan-one": (float("nan"), slice(1, 2), slice(0, 1), slice(1, 2)),
    "inf-one": (float("inf"), slice(2, 3), slice(1, 2), slice(0, 1)),
    # every feature +inf: x W^T sums +inf and -inf terms, giving NaN pre-activations
    "inf-all": (float("inf"), slice(0, 1), slice(0, 1), slice(None)),
    "-inf-one": (-float("inf"), slice(0, 1), slice(2, 3), slice(2, 3)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(NONFINITE))
@pytest.mark.parametrize("cls", SEQ)
def test_nan_and_inf_propagate_as_torch(cls, case, backend):
    ref, ours = _pair(cls, backend, 3, 5, num_layers=2, bidirectional=True)
    value, t, b, f = NONFINITE[case]
    x = _x(4, 3, 3)
    x[t, b, f] = value
    with torch.no_grad():
        expected, got = _flat(ref(x)), _flat(ours(x))
    for e, g in zip(expected, got):
        assert torch.equal(g.isnan(), e.isnan())
        torch.testing.assert_close(g, e, equal_nan=True, **TOL)
    if case == "nan-one":
        assert expected[0].isnan().any() and not expected[0][:, 1:].isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", SEQ)
def test_empty_batch(cls, backend):
    ref, ours = _pair(cls, backend, 3, 5, num_layers=2, bidirectional=True, batch_first=True)
    x = _x(0, 4, 3, grad=True)
    x2 = x.detach().clone().requires_grad_()
    expected, got = _flat(ref(x)), _flat(ours(x2))
    assert [tuple(t.shape) for t in got] == [tuple(t.shape) for t in expected]
    assert tuple(got[0].shape) == (0, 4, 10) and tuple(got[1].shape) == (4, 0, 5)
    _loss(got).backward()
    assert x2.grad.shape == x2.shape
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in ours.parameters())


def test_very_long_sequence_default_path():
    """T = 100,000, H = 4, B = 2 through the default path (torch's native op on CPU)."""
    ref, ours = _pair("LSTM", "auto", 3, 4, dtype=torch.float32, device="cpu")
    x = torch.randn(100_000, 2, 3)
    with torch.no_grad():
        y_ref, (h_ref, c_ref) = ref(x)
        y, (h, c) = ours(x)
    _close([y[-10:], h, c], [y_ref[-10:], h_ref, c_ref], rtol=1e-5, atol=1e-6)


def test_long_sequence_loop_path():
    """The plain-op loop (the LSTM variants' CPU path): T = 20,000, H = 4, B = 2.

    100,000 steps of the Python loop take ~10 s here, so 20,000. A peephole LSTM with zero
    peephole weights is the standard LSTM, so torch.nn is the oracle.
    """
    torch.manual_seed(0)
    ref = nn.LSTM(3, 4)
    ours = fused_rnn.LSTM(3, 4, peephole=True, backend="torch")
    ours.load_state_dict({**ref.state_dict(), "weight_ch_l0": torch.zeros(12)})
    x = torch.randn(20_000, 2, 3)
    with torch.no_grad():
        y_ref, (h_ref, c_ref) = ref(x)
        y, (h, c) = ours(x)
    _close([y[-10:], h, c], [y_ref[-10:], h_ref, c_ref], rtol=1e-5, atol=1e-6)


# ============================================================================ autocast


def _cpu_bf16_lstm_runs() -> bool:
    """torch's CPU LSTM (oneDNN) runs bf16 only on CPUs with AVX-512; elsewhere it raises."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        try:
            torch.nn.LSTM(2, 2)(torch.randn(1, 1, 2))
        except RuntimeError as e:
            assert "primitive descriptor" in str(e), e
            return False
    return True


CPU_BF16_LSTM = _cpu_bf16_lstm_runs()


@pytest.mark.parametrize("cls", [*SEQ, "LSTMCell", "GRUCell", "RNNCell"])
def test_autocast_bf16_torch_path(cls):
    """torch.autocast("cpu", bfloat16): the same output dtype (and values) as torch.nn, or the
    same error where torch.nn's CPU LSTM cannot run bf16 on this CPU (the same native op)."""
    ref, ours = _pair(cls, "torch", 3, 5, dtype=torch.float32, device="cpu")
    seq = cls in SEQ
    x = torch.randn(3, 2, 3) if seq else torch.randn(2, 3)
    if cls == "LSTM" and not CPU_BF16_LSTM:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with pytest.raises(RuntimeError, match="primitive descriptor"):
                ours(x)
        return
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = _flat(ref(x)), _flat(ours(x))
    assert [t.dtype for t in got] == [t.dtype for t in expected]
    _close(got, expected, rtol=0, atol=0)


@pytest.mark.skipif(DEVICE != "cpu" or FUSED is None, reason="CPU autocast on the interpreter")
def test_autocast_bf16_fused_lstm():
    """The fused path under CPU autocast: LSTM in bf16 like torch.nn's (close values). Where
    torch.nn cannot run bf16 on this CPU, against torch.nn in fp32 on bf16-rounded operands."""
    from fused_rnn.bench.gpu_check import torch_nn_under_autocast

    ref, ours = _pair("LSTM", FUSED, 3, 5, dtype=torch.float32)
    x = torch.randn(3, 2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _flat(ours(x))
    expected = _flat(torch_nn_under_autocast(ref, x, torch.bfloat16)[0])
    assert [t.dtype for t in got] == [t.dtype for t in expected] == [torch.bfloat16] * 3
    _close(got, expected, rtol=5e-2, atol=1.6e-2)


@pytest.mark.parametrize("cls", ["LSTM", "GRU", "RNN"])
def test_autocast_accepts_low_precision_state(cls):
    """Under autocast torch.nn runs an hx whose dtype differs from the input's; so do we."""
    ref = getattr(torch.nn, cls)(4, 8)
    ours = getattr(fused_rnn, cls)(4, 8)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 2, 4)
    h = torch.randn(1, 2, 8).bfloat16()
    hx = (h, h) if cls == "LSTM" else h
    # where oneDNN cannot run a bf16 LSTM on this CPU, both sides take torch's other CPU kernel
    onednn = contextlib.nullcontext() if CPU_BF16_LSTM else torch.backends.mkldnn.flags(False)
    with onednn, torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, y = ref(x, hx)[0], ours(x, hx)[0]
    assert y.dtype == y_ref.dtype
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)  # the same native op on this path
    with pytest.raises(RuntimeError, match="dtype"):  # outside autocast it is an error
        ours(x, hx)


def test_flat_weights_assignment_and_jit_script():
    m = fused_rnn.LSTM(3, 4, 2)
    names = m._flat_weights_names
    m._flat_weights = []  # third-party code refreshes torch's cache this way: nothing to refresh
    assert [w is getattr(m, n) for w, n in zip(m._flat_weights, names)] == [True] * len(names)
    for module in (m, fused_rnn.GRUCell(3, 4)):
        with pytest.raises(RuntimeError, match="torch.jit.script does not support"):
            torch.jit.script(module)
