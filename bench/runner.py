"""Build both sides of a row, check they agree, time them.

A *config* is one shape at one dtype and mode. Its torch.nn side is built and timed once; each
requested (variant, fused backend) pair then gives one row against that same measurement, on the
same input tensor. With variant ``none`` the fused module loads the torch.nn module's state_dict,
so both compute with the same weights and the outputs (and, for fwdbwd, the gradients) are
compared. A variant (peephole, coupled gates; zoneout, recurrent dropout, layer norm) has no
torch.nn counterpart: it is built on its own and timed against the plain torch.nn module of the
same size, with no comparison. fwd runs in eval mode, so there zoneout is its expectation and
recurrent dropout is off (what inference costs); fwdbwd trains with the masks.

fwd is inference: modules in eval mode (cuDNN then skips its training reserve space), under
``torch.no_grad()``. fwdbwd is training: train mode, forward, then
``torch.autograd.grad(out.sum(), [x, *params])``: gradients w.r.t. the input and every
parameter, returned rather than accumulated into ``.grad``, so nothing needs zeroing between runs.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .suites import Shape
from .timing import Timing, measure, ratio_range, within_noise

__all__ = [
    "BACKENDS",
    "DTYPES",
    "VARIANTS",
    "VARIANT_CELLS",
    "Config",
    "Row",
    "TimingOptions",
    "precision",
    "available_backends",
    "resolved_backend",
    "unavailable_reason",
    "run_config",
]

DTYPES = {
    "fp32": torch.float32,
    "tf32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
VARIANTS = {
    "none": {},
    "peephole": {"peephole": True},
    "cifg": {"coupled_gates": True},
    "peephole-cifg": {"peephole": True, "coupled_gates": True},
    "zoneout": {"zoneout": 0.1},
    "recurrent-dropout": {"recurrent_dropout": 0.25},
    "layernorm": {"layer_norm": True},
}
# the cells each variant exists for
VARIANT_CELLS = {
    "none": ("lstm", "gru", "rnn"),
    "peephole": ("lstm",),
    "cifg": ("lstm",),
    "peephole-cifg": ("lstm",),
    "zoneout": ("lstm", "gru", "rnn"),
    "recurrent-dropout": ("lstm", "gru", "rnn"),
    "layernorm": ("lstm", "gru"),
}
BACKENDS = ("auto", "torch", "stepwise", "persistent")
# Largest max |fused - torch.nn| of the outputs a row accepts before it is marked "mismatch".
# A sanity bound that catches wrong kernels (garbage, NaN, a wrong gate), not a precision
# test: h is bounded by 1 (no projection) and cuDNN and fused_rnn round differently, over up to
# a thousand steps, in the low-precision dtypes.
SANITY_TOL = {"fp32": 1e-3, "tf32": 1e-2, "fp16": 5e-2, "bf16": 1e-1}
_TORCH_CLASSES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


@dataclass(frozen=True)
class Config:
    suite: str
    shape: Shape
    dtype: str
    mode: str


@dataclass(frozen=True)
class TimingOptions:
    warmup: int
    reps: int
    budget_s: float | None


@dataclass
class Row:
    """One result line: fused_rnn (one backend, one variant) vs torch.nn at one config."""

    suite: str
    cell: str
    variant: str
    seq_len: int
    batch: int
    input_size: int
    hidden_size: int
    num_layers: int
    bidirectional: bool
    proj_size: int
    dtype: str
    mode: str
    device: str
    backend: str
    resolved_backend: str | None = None  # what "auto" ran as, when fused_rnn.dispatch says
    # the schedule of the stack's layer-directions (serial, directions, wavefront (K=..)), where
    # fused_rnn.dispatch.explain says; None where torch's own op ran
    schedule: str | None = None
    status: str = "ok"  # ok | unavailable | error | mismatch (outputs disagree; still timed)
    torch_ms: float | None = None
    fused_ms: float | None = None
    ratio: float | None = None  # torch_ms / fused_ms: > 1 means fused_rnn is faster
    torch_us_per_step: float | None = None
    fused_us_per_step: float | None = None
    torch_min_ms: float | None = None
    fused_min_ms: float | None = None
    torch_iqr_ms: float | None = None  # p75 - p25 of the timed runs
    fused_iqr_ms: float | None = None
    torch_reps: int | None = None
    fused_reps: int | None = None
    torch_p25_ms: float | None = None
    torch_p75_ms: float | None = None
    fused_p25_ms: float | None = None
    fused_p75_ms: float | None = None
    # the ratio over the two interquartile ranges: torch_p25 / fused_p75 .. torch_p75 / fused_p25
    ratio_lo: float | None = None
    ratio_hi: float | None = None
    # the two interquartile ranges overlap (the ratio's range contains 1): the difference is
    # within the run-to-run noise (bench.timing.within_noise); None: too few runs to say
    within_noise: bool | None = None
    max_abs_diff: float | None = None  # outputs, fused vs torch.nn (variant none only)
    grad_max_abs_diff: float | None = None  # d(input) and d(params), fwdbwd only
    error: str = ""
    shape: Shape = field(repr=False, default=None)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("shape")
        return d

    @classmethod
    def fields(cls) -> list[str]:
        return [f for f in cls.__dataclass_fields__ if f != "shape"]

    def set_torch(self, t: Timing) -> None:
        self.torch_ms, self.torch_min_ms, self.torch_iqr_ms = t.median_ms, t.min_ms, t.iqr_ms
        self.torch_p25_ms, self.torch_p75_ms, self.torch_reps = t.q1_ms, t.q3_ms, t.reps
        self.torch_us_per_step = t.median_ms * 1e3 / self.seq_len

    def set_fused(self, t: Timing) -> None:
        self.fused_ms, self.fused_min_ms, self.fused_iqr_ms = t.median_ms, t.min_ms, t.iqr_ms
        self.fused_p25_ms, self.fused_p75_ms, self.fused_reps = t.q1_ms, t.q3_ms, t.reps
        self.fused_us_per_step = t.median_ms * 1e3 / self.seq_len
        if self.torch_ms is not None and t.median_ms > 0:
            self.ratio = self.torch_ms / t.median_ms
            ref = Timing(self.torch_ms, self.torch_min_ms, self.torch_p25_ms, self.torch_p75_ms,
                         self.torch_reps)  # fmt: skip
            self.ratio_lo, self.ratio_hi = ratio_range(ref, t) or (None, None)
            self.within_noise = within_noise(ref, t)


@contextlib.contextmanager
def precision(dtype: str) -> Iterator[None]:
    """fp32: TF32 off in cuBLAS and cuDNN; tf32: on; restored afterwards. Others: untouched."""
    if dtype not in ("fp32", "tf32"):
        yield
        return
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    on = dtype == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


_DISPATCH_MODES = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN_TANH"}


def _dispatch():
    try:
        return importlib.import_module("fused_rnn.dispatch")
    except ImportError:
        return None


def available_backends(device: torch.device, cell: str = "lstm") -> set[str] | None:
    """The backends usable for ``cell`` on ``device`` per ``fused_rnn.dispatch`` ("auto"
    always); None when fused_rnn does not say, and a backend is then tried instead."""
    dispatch = _dispatch()
    fn = getattr(dispatch, "available_backends", None)
    if fn is None:
        return None
    try:
        names = fn(device, _DISPATCH_MODES[cell])
    except TypeError:  # an older signature without the mode
        names = fn(device)
    return {"auto", *names}


def resolved_backend(model: nn.Module, x: torch.Tensor, mode: str) -> str | None:
    """What ``model`` (notably with backend "auto") runs as on ``x`` in ``mode``, as
    ``fused_rnn.dispatch.explain`` reports it from one call ("a+b" if its layers differ)."""
    return resolved(model, x, mode)[0]


def resolved(model: nn.Module, x: torch.Tensor, mode: str) -> tuple[str | None, str | None]:
    """(backend, schedule) of ``model`` on ``x`` in ``mode`` as ``fused_rnn.dispatch.explain``
    reports them from one call: `resolved_backend`, and the schedule its stack ran on (None
    where torch's own op ran or explain does not say)."""
    explain = getattr(_dispatch(), "explain", None)
    if explain is None:
        return None, None
    try:
        with torch.no_grad() if mode == "fwd" else contextlib.nullcontext():
            rows = explain(model, x, file=None)
    except Exception:
        return None, None
    schedules = {s for s in (getattr(r, "schedule", None) for r in rows) if s is not None}
    return "+".join(sorted({r.backend for r in rows})) or None, "+".join(sorted(schedules)) or None


def unavailable_reason(backend: str, cell: str, device: torch.device) -> str:
    """Why ``backend`` cannot run ``cell`` on ``device`` (fused_rnn.dispatch's reason), and how
    to make it run where the bench can tell."""
    why = None
    fn = getattr(_dispatch(), "unavailable_reason", None)
    if fn is not None:
        try:
            why = fn(backend, _DISPATCH_MODES[cell], device)
        except Exception as exc:
            why = _error(exc)
    out = f"{backend}: {why or f'not available on {device}'}"
    if backend not in ("stepwise", "persistent"):
        return out
    if importlib.util.find_spec("triton") is None:
        return out + ". Install Triton (pip install triton; Linux) to run the fused kernels"
    interpret = getattr(_dispatch(), "interpreter_enabled", lambda: False)
    if device.type == "cpu" and not interpret():
        out += (
            ". To run them on CPU, set TRITON_INTERPRET=1 in the environment "
            "(slow: the interpreter runs the kernels in Python; use tiny sizes)"
        )
    return out


def _size_kwargs(shape: Shape, device, dtype) -> dict:
    kw = dict(
        num_layers=shape.num_layers,
        bidirectional=shape.bidirectional,
        device=device,
        dtype=dtype,
    )
    if shape.proj_size:
        kw["proj_size"] = shape.proj_size
    return kw


def build_torch(shape: Shape, device, dtype) -> nn.Module:
    cls = _TORCH_CLASSES[shape.cell]
    return cls(shape.input_size, shape.hidden_size, **_size_kwargs(shape, device, dtype))


def build_fused(shape: Shape, device, dtype, backend: str, variant: str) -> nn.Module:
    fused_rnn = importlib.import_module("fused_rnn")
    cls = getattr(fused_rnn, shape.cell.upper())
    kw = _size_kwargs(shape, device, dtype)
    return cls(shape.input_size, shape.hidden_size, **kw, backend=backend, **VARIANTS[variant])


def step_fn(model: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], object]:
    """What one timed run does."""
    if mode == "fwd":

        def fwd():
            with torch.no_grad():
                return model(x)[0]

        return fwd
    inputs = [x, *(p for p in model.parameters() if p.requires_grad)]

    def fwdbwd():
        out = model(x)[0]
        return torch.autograd.grad(out.sum(), inputs)

    return fwdbwd


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise RuntimeError(f"shape mismatch: fused {tuple(a.shape)} vs torch.nn {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0
    return (a.float() - b.float()).abs().max().item()


def _grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    x = x.detach().requires_grad_(True)
    out = model(x)[0]
    gs = torch.autograd.grad(out.sum(), [x, *(p for _, p in named)])
    return {"input": gs[0], **{n: g for (n, _), g in zip(named, gs[1:], strict=True)}}


def compare(fused: nn.Module, ref: nn.Module, x: torch.Tensor, mode: str):
    """(max |Δ| of outputs, max |Δ| over input and parameter gradients or None for fwd)."""
    with torch.no_grad():
        out_diff = _max_abs(fused(x)[0], ref(x)[0])
    if mode != "fwdbwd":
        return out_diff, None
    gf, gr = _grads(fused, x), _grads(ref, x)
    common = [k for k in gr if k in gf]
    grad_diff = max(_max_abs(gf[k], gr[k]) for k in common)
    return out_diff, grad_diff


def _error(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    if len(msg) > 300:
        msg = msg[:297] + "..."
    return f"{type(exc).__name__}: {msg}"


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_config(
    cfg: Config,
    variants: list[str],
    backends: list[str],
    device: torch.device,
    opts: TimingOptions,
    on_row_start: Callable[[Row], None] = lambda row: None,
    on_row_done: Callable[[Row], None] = lambda row: None,
) -> list[Row]:
    """All rows of one config; the torch.nn side is timed once and shared by them."""
    shape = cfg.shape
    dtype = DTYPES[cfg.dtype]
    avail = available_backends(device, shape.cell)
    rows = [
        Row(
            suite=cfg.suite,
            cell=shape.cell,
            variant=v,
            seq_len=shape.seq_len,
            batch=shape.batch,
            input_size=shape.input_size,
            hidden_size=shape.hidden_size,
            num_layers=shape.num_layers,
            bidirectional=shape.bidirectional,
            proj_size=shape.proj_size,
            dtype=cfg.dtype,
            mode=cfg.mode,
            device=str(device),
            backend=b,
            shape=shape,
        )
        for v in variants
        for b in backends
    ]
    for row in rows:
        if avail is not None and row.backend not in avail:
            row.status = "unavailable"
            row.error = unavailable_reason(row.backend, shape.cell, device)

    with precision(cfg.dtype):
        ref = x = None
        try:
            torch.manual_seed(0)
            ref = build_torch(shape, device, dtype).train(cfg.mode == "fwdbwd")
            x = torch.randn(shape.seq_len, shape.batch, shape.input_size, device=device)
            x = x.to(dtype).requires_grad_(cfg.mode == "fwdbwd")
            if any(r.status == "ok" for r in rows):
                t_ref = measure(
                    step_fn(ref, x, cfg.mode),
                    device,
                    warmup=opts.warmup,
                    reps=opts.reps,
                    budget_s=opts.budget_s,
                )
                for row in rows:
                    row.set_torch(t_ref)
        except Exception as exc:  # the torch.nn side failed: every row of the config did
            for row in rows:
                if row.status == "ok":
                    row.status, row.error = "error", "torch.nn: " + _error(exc)

        for row in rows:
            on_row_start(row)
            if row.status == "ok":  # not unavailable, torch.nn side ran
                _run_fused(row, ref, x, device, dtype, avail is None, opts)
                _free(device)
            on_row_done(row)
        del ref, x
    _free(device)
    return rows


def _run_fused(row: Row, ref, x, device, dtype, probe: bool, opts: TimingOptions) -> None:
    try:
        torch.manual_seed(0)
        fused = build_fused(row.shape, device, dtype, row.backend, row.variant)
        fused.train(row.mode == "fwdbwd")
        row.resolved_backend, row.schedule = resolved(fused, x, row.mode)
        if row.variant == "none":
            fused.load_state_dict(ref.state_dict())
            row.max_abs_diff, row.grad_max_abs_diff = compare(fused, ref, x, row.mode)
            tol = SANITY_TOL[row.dtype]
            if not row.max_abs_diff <= tol:  # NaN fails too
                row.status = "mismatch"
                row.error = f"outputs differ from torch.nn: max|Δ| {row.max_abs_diff:.3g} > {tol:g}"
        elif probe:
            with torch.no_grad():
                fused(x)
    except Exception as exc:
        # Without fused_rnn.dispatch, a backend that cannot be built or run here counts as
        # unavailable rather than broken.
        row.status = "unavailable" if probe else "error"
        row.error = _error(exc)
        return
    try:
        t = measure(
            step_fn(fused, x, row.mode),
            device,
            warmup=opts.warmup,
            reps=opts.reps,
            budget_s=opts.budget_s,
        )
        row.set_fused(t)
    except Exception as exc:  # keeps a mismatch's message: it came first
        row.error = "; ".join(filter(None, (row.error, _error(exc))))
        row.status = "error"
