"""One-call device check: correctness of every fused path, then timing against cuDNN.

Run on a machine with a GPU, after ``python3 -m pip install -q --no-deps --no-build-isolation .``,
with ``-P`` (or from another folder): in the checkout's root ``./fused_rnn`` would hide the
installed package, which alone holds ``fused_rnn.kernels`` and ``fused_rnn.bench``:

    python3 -P -m fused_rnn.bench.gpu_check            # full: under 8 minutes on an H100
    python3 -P -m fused_rnn.bench.gpu_check --quick    # under ~3 minutes
    python -m fused_rnn.bench.gpu_check --device cpu --tiny --no-bench   # CPU, interpreter

Files go to ``--out DIR`` (default ``$OUT``, else ``gpu_check_out/<UTC stamp>``): ``env.json``,
``correctness.json`` (rewritten as rows arrive, so a run cut short keeps what finished),
``bench.json`` / ``bench.csv`` (fused_rnn.bench.report's formats) and ``gpu_check.log`` (all
output). A short summary table is printed last. Exit status 1 when any correctness check or
extra check failed, did not finish, or a bench row errored or disagreed with torch.nn; 0 otherwise;
2 for bad arguments.

Correctness. Each check builds one module (a cell kind at a size), draws fresh random weights,
inputs, initial states and output cotangents (seeded from a per-run seed, recorded), rounds them
to the check's dtype and runs three things on exactly those values:

- the float64 reference: the fused_rnn module on the CPU in float64 with backend="torch";
- the baseline: torch.nn's module (cuDNN on CUDA) in the check's dtype; for the LSTM variants
  (peephole, coupled gates), which torch.nn lacks, fused_rnn's own backend="torch" instead;
- each fused backend (stepwise, persistent) in the check's dtype, outputs NaN-poisoned
  (FUSED_RNN_POISON=1) so an element no kernel wrote fails the check.

Compared are the output, the final states and the gradients of the input, h0, c0 and every
parameter, each by ``||a - ref|| / ||ref||``; a check passes when its largest error is within
the dtype's tolerance (TOLERANCES, with the reasons); NaN never passes. The baseline's error
against the same reference is recorded beside it. Persistent checks run ``--repeats`` times on
the same inputs; any bitwise difference between repeats is a "race".

Every check runs in a worker process that the parent watches: a check that makes no progress for
``--hang-timeout`` seconds is reported as "hang", the worker is killed and a fresh one goes on with
the rest (a dead worker, e.g. after an illegal memory access, is a "crash"). After ``--max-hangs``
hangs of one backend, that backend's remaining checks are reported "skipped". Correctness runs in
``--jobs`` workers at once (Triton compiles dominate and they run on the CPU), while other workers
compile the kernels the benchmark will need; timing then runs alone, in one worker, with nothing
else on the device.

Statuses: pass, fail (error above tolerance, NaN, missing gradient), race, error (an exception),
hang, crash, unavailable (fused_rnn.dispatch says the backend cannot run here: not a failure),
skipped (not run: time budget or a backend that hung). Extra checks: torch.compile(fullgraph=True)
of a small fused model against eager, one single-process DistributedDataParallel step, and the
output dtype of every class under torch.autocast (bf16, fp16) against torch.nn.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import datetime as _dt
import hashlib
import importlib.util
import io
import json
import math
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from pathlib import Path

PROG = "gpu_check"
_MSG = "@@gpu_check@@ "  # prefix of a worker's protocol lines on its stdout
FUSED_BACKENDS = ("stepwise", "persistent")

# dtype -> (tolerance on max ||a-b||/||b|| vs float64, why)
TOLERANCES = {
    "fp32": (
        1e-4,
        "fp32 with TF32 off: unit roundoff 6e-8 per operation, grown over the steps and the "
        "backward to ~1e-6; a wrong gate, index or missed step gives >1e-2",
    ),
    "tf32": (
        3e-3,
        "TF32 products (10-bit mantissa, ~3e-4 per matmul, METHOD.md) in the input GEMM and the "
        "recurrence, amplified through the steps and the backward",
    ),
    "fp16": (
        1e-2,
        "fp16 operands and stored states (unit roundoff 4.9e-4), fp32 accumulation: every "
        "stored h rounds, and the weight gradients sum T*B rounded products",
    ),
    "bf16": (
        5e-2,
        "bf16 operands and stored states (unit roundoff 3.9e-3): 1e-3..1e-2 expected (METHOD.md); "
        "gradients through many rounded steps reach a few 1e-2",
    ),
}

# cell kind -> (class name, constructor extras); "proj_size": True means proj_size = H // 2
KINDS = {
    "lstm": ("LSTM", {}),
    "lstm-proj": ("LSTM", {"proj_size": True}),
    "lstm-peephole": ("LSTM", {"peephole": True}),
    "lstm-coupled": ("LSTM", {"coupled_gates": True}),
    "lstm-peephole-coupled": ("LSTM", {"peephole": True, "coupled_gates": True}),
    "gru": ("GRU", {}),
    "rnn-tanh": ("RNN", {"nonlinearity": "tanh"}),
    "rnn-relu": ("RNN", {"nonlinearity": "relu"}),
    "lstmcell": ("LSTMCell", {}),
    "grucell": ("GRUCell", {}),
    "rnncell-tanh": ("RNNCell", {"nonlinearity": "tanh"}),
    "rnncell-relu": ("RNNCell", {"nonlinearity": "relu"}),
}


def _dispatch_mode(kind: str) -> str:
    if kind.startswith("lstm"):
        return "LSTM"
    if kind.startswith("gru"):
        return "GRU"
    return "RNN_RELU" if kind.endswith("relu") else "RNN_TANH"


def _is_cell(kind: str) -> bool:
    return KINDS[kind][0].endswith("Cell")


def _is_variant(kind: str) -> bool:
    extra = KINDS[kind][1]
    return bool(extra.get("peephole") or extra.get("coupled_gates"))


@dataclasses.dataclass(frozen=True)
class Size:
    """A correctness configuration. Cells use B, I, H (and bias) only."""

    name: str
    T: int
    B: int
    I: int  # noqa: E741
    H: int
    layers: int = 1
    bidirectional: bool = False
    batch_first: bool = False
    bias: bool = True
    packed: bool = False  # a PackedSequence of unsorted lengths
    mode: str = "fwdbwd"  # or "fwd": forward only (the flashrnn size)
    weight: float = 1.0  # hang-timeout multiplier

    def label(self) -> str:
        s = f"T{self.T} B{self.B} I{self.I} H{self.H}"
        s += f" L{self.layers}" if self.layers > 1 else ""
        s += " bi" if self.bidirectional else ""
        s += " batch_first" if self.batch_first else ""
        s += " nobias" if not self.bias else ""
        s += " packed" if self.packed else ""
        return s + ("" if self.mode == "fwdbwd" else f" {self.mode}")


def _sizes(level: str) -> dict[str, Size]:
    if level == "tiny":
        base = Size("base", 4, 3, 8, 16)
        odd = Size("H17", 3, 3, 5, 17)
        extra = {}
    else:
        base = Size("base", 8, 4, 16, 32)
        odd = Size("H33", 6, 3, 20, 33)
        extra = {
            "medium": Size("medium", 64, 16, 256, 256),
            "flashrnn": Size("flashrnn", 1024, 16, 768, 768, mode="fwd", weight=3.0),
        }
    r = dataclasses.replace
    return {
        "base": base,
        "layers2": r(base, name="layers2", layers=2),
        "bidir": r(base, name="bidir", bidirectional=True),
        "batch_first": r(base, name="batch_first", batch_first=True),
        "nobias": r(base, name="nobias", bias=False),
        "packed": r(base, name="packed", packed=True, bidirectional=True),
        "B1": r(base, name="B1", B=1),
        "T1": r(base, name="T1", T=1),
        odd.name: odd,
        **extra,
    }


_CELL_SIZES = ("base", "B1", "nobias", "H33", "H17", "medium")


def correctness_plan(level: str) -> list[tuple[str, Size, str]]:
    """[(kind, size, dtype)] for ``level`` (tiny, quick, full)."""
    S = _sizes(level)
    odd = "H17" if level == "tiny" else "H33"
    configs = ["layers2", "bidir", "batch_first", "nobias", "packed", "B1", "T1", odd]
    plan: list[tuple[str, Size, str]] = []

    def add(kinds, size_names, dtypes):
        for dt in dtypes:
            for name in size_names:
                for k in kinds:
                    if _is_cell(k) and name not in _CELL_SIZES:
                        continue
                    entry = (k, S[name], dt)
                    if entry not in plan:
                        plan.append(entry)

    if level == "tiny":  # a smoke test of the script on the CPU interpreter: ~30 s on 2 cores
        add(list(KINDS), ["base"], ["fp32"])
        add(["lstm", "gru"], ["base"], ["bf16"])
        add(["lstm", "gru", "rnn-tanh"], ["packed", "layers2", odd], ["fp32"])
        add(["lstm"], ["B1", "T1"], ["fp32"])
        return plan
    if level == "quick":
        add(list(KINDS), ["base"], ["fp32", "tf32", "fp16", "bf16"])
        add(["lstm", "lstm-proj", "gru", "rnn-tanh"], ["layers2", "packed", "B1", "T1", odd],
            ["fp32", "bf16"])  # fmt: skip
        add(["lstm", "gru", "rnn-tanh"], ["medium"], ["fp32", "bf16"])
        add(["lstm", "gru", "rnn-tanh"], ["flashrnn"], ["bf16"])
        return plan
    add(list(KINDS), ["base"], ["fp32", "tf32", "fp16", "bf16"])
    add(["lstm", "lstm-proj", "lstm-peephole-coupled", "gru", "rnn-tanh", "rnn-relu"], configs,
        ["fp32", "bf16"])  # fmt: skip
    add(["lstmcell", "grucell", "rnncell-tanh"], ["B1", "nobias", odd], ["fp32", "bf16"])
    add(["lstm", "lstm-proj", "lstm-peephole", "lstm-coupled", "gru", "rnn-tanh", "rnn-relu"],
        ["medium"], ["fp32", "tf32", "fp16", "bf16"])  # fmt: skip
    add(["lstm", "gru", "rnn-tanh"], ["flashrnn"], ["fp32", "fp16", "bf16"])
    return plan


# bench suites: level -> [(suite, dtypes)]
BENCH_PLAN = {
    "full": [
        ("fastrnns", ("bf16", "fp16", "fp32", "tf32")),
        ("flashrnn", ("bf16", "fp16")),
        ("deepbench", ("bf16", "fp16")),
        ("small-batch", ("bf16", "fp16")),
        ("large", ("bf16", "fp16")),
        ("stack", ("bf16", "fp16")),
    ],
    "quick": [("fastrnns", ("bf16",)), ("flashrnn", ("bf16",))],
}
# level -> (warmup, max reps, seconds per side): the CLI's defaults are 10/100/2 s; here ~80
# configs must fit a few minutes, and >= 10 timed runs still give a median (timing.MIN_REPS)
BENCH_TIMING = {"full": (5, 30, 0.3), "quick": (5, 30, 0.3), "tiny": (1, 3, 0.1)}
# level -> minutes for the whole run (--max-minutes); correctness gets PHASE1_SHARE of it when
# the bench runs too (unfinished checks are reported "skipped")
BUDGET_MIN = {"full": 7.5, "quick": 2.8, "tiny": 5.0}
PHASE1_SHARE = 0.65
# level -> seconds without progress before a check is a hang (--hang-timeout). A small check
# compiles a handful of kernels (about a second each) and runs in milliseconds; the flashrnn
# size gets 3x, bench rows 2x, a worker's first task 60 s more (imports, CUDA init)
HANG_TIMEOUT_S = {"full": 45.0, "quick": 30.0, "tiny": 60.0}


# ============================================================================ small helpers


def _now() -> float:
    return time.monotonic()


def _seed_for(base: int, key: str) -> int:
    return (base + zlib.crc32(key.encode())) % (2**31 - 1)


def _jsonable(v):
    """JSON without NaN/inf (written as strings, as fused_rnn.bench.report does)."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _write_json(path: Path, doc: dict, one_line: tuple[str, ...] = ()) -> None:
    """Indented JSON, except that the lists named in ``one_line`` get one item per line."""
    parts = []
    for k, v in doc.items():
        if k in one_line:
            items = ",\n  ".join(json.dumps(_jsonable(x), allow_nan=False) for x in v)
            parts.append(f"{json.dumps(k)}: [\n  {items}\n ]" if v else f"{json.dumps(k)}: []")
        else:
            text = json.dumps(_jsonable(v), indent=1, allow_nan=False).replace("\n", "\n ")
            parts.append(f"{json.dumps(k)}: {text}")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("{\n " + ",\n ".join(parts) + "\n}\n")
    tmp.replace(path)


def _fmt_err(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if math.isnan(v):
        return "nan"
    return f"{v:.1e}"


def _short(msg: str, n: int = 300) -> str:
    msg = " ".join(str(msg).split())
    return msg if len(msg) <= n else msg[: n - 3] + "..."


class _Tee(io.TextIOBase):
    """Writes to a stream and to the log file."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, s):
        self.stream.write(s)
        self.log.write(s)
        if "\n" in s:  # a run killed at its time limit keeps what it printed
            self.stream.flush()
        return len(s)

    def flush(self):
        self.stream.flush()
        self.log.flush()

    def isatty(self):
        return False


# ============================================================================ environment


def _source_digest() -> str | None:
    """sha256 over the installed package's .py files: identifies the code where git is absent."""
    h = hashlib.sha256()
    found = False
    for pkg in ("fused_rnn", "fused_rnn.kernels", "fused_rnn.bench"):
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(list(spec.submodule_search_locations)[0])
        for f in sorted(root.glob("*.py")):
            h.update(f"{pkg}/{f.name}\n".encode())
            h.update(f.read_bytes())
            found = True
    return h.hexdigest()[:16] if found else None


def _git_cwd() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5)  # fmt: skip
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _nvidia_smi() -> str | None:
    q = "name,driver_version,pstate,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu"
    try:
        r = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv"],
                           capture_output=True, text=True, timeout=20)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def collect_env(device, args, argv) -> dict:
    import torch

    from fused_rnn import dispatch

    from . import report

    meta = report.metadata(device, ["python", "-m", "fused_rnn.bench.gpu_check", *argv], {})
    meta.pop("options", None)
    meta.pop("ratio", None)
    meta["tool"] = "fused_rnn.bench.gpu_check"
    meta["git_commit_cwd"] = _git_cwd()
    meta["source_sha256_16"] = _source_digest()
    meta["nvidia_smi"] = _nvidia_smi() if device.type == "cuda" else None
    meta["cpu_count"] = os.cpu_count()
    meta["poison"] = not args.no_poison  # FUSED_RNN_POISON=1 in the correctness workers
    meta["env"] = {
        k: os.environ.get(k)
        for k in (
            "TRITON_INTERPRET",
            "FUSED_RNN_POISON",
            "CUDA_VISIBLE_DEVICES",
            "TRITON_CACHE_DIR",
        )
    }
    meta["tf32_defaults"] = {
        "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
    }
    meta["backends"] = {
        m: {b: dispatch.unavailable_reason(b, m, device) or "available" for b in FUSED_BACKENDS}
        for m in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
    }
    meta["options"] = {k: v for k, v in vars(args).items() if k != "worker"}
    return meta


def _print_env(meta: dict) -> None:
    dev = meta.get("device_name")
    line = f"device: {dev} ({meta.get('device')})"
    if "sm_count" in meta:
        line += (
            f", sm {meta['compute_capability']}, {meta['sm_count']} SMs, "
            f"{meta['gpu_memory_gib']} GiB"
        )
    print(f"{PROG} {meta['date_utc']} on {meta.get('host')}")
    print(line)
    print(
        f"torch {meta['torch_version']} (CUDA {meta['cuda_version']}, cuDNN "
        f"{meta['cudnn_version']}), triton {meta['triton_version']}, "
        f"python {meta['python_version']}"
    )
    git = meta.get("git_commit") or meta.get("git_commit_cwd") or "unknown"
    print(
        f"fused_rnn {meta.get('fused_rnn_version')}, git {git}, "
        f"source sha256 {meta.get('source_sha256_16')}"
    )
    if meta.get("nvidia_smi"):
        print("nvidia-smi: " + " | ".join(meta["nvidia_smi"].splitlines()[1:]))
    for m, bs in meta["backends"].items():
        print(f"  {m:<8} " + "; ".join(f"{b}: {why}" for b, why in bs.items()))


# ============================================================================ the worker side
#
# The parent writes a plan file ({"device", "threads", "repeats", ...}) and sends the tasks on the
# worker's stdin, one JSON line each, the next when the last is done (so what runs next is always
# the parent's choice); EOF ends the worker. It reports on stdout, one JSON object per line after
# _MSG:
#   {"ev": "start", "check": id}        a check (or a task's preparation) begins
#   {"ev": "row", "kind": k, "row": r}  a result
#   {"ev": "task_done", "task": id}


_INJECT: list[tuple[str, str]] = []


def _emit(obj) -> None:
    sys.stdout.write(_MSG + json.dumps(obj) + "\n")
    sys.stdout.flush()
    if obj.get("ev") == "start":
        for what, pattern in _INJECT:
            if re.search(pattern, obj["check"]):
                print(f"{PROG} worker: injected {what} in {obj['check']}", flush=True)
                if what == "hang":
                    time.sleep(1e6)
                os._exit(7)


def _fatal_cuda(exc: BaseException) -> bool:
    """An error after which the CUDA context cannot be trusted: the worker must be replaced."""
    msg = str(exc).lower()
    return any(
        s in msg
        for s in ("illegal memory access", "illegal address", "unspecified launch failure",
                  "misaligned address", "device-side assert", "an illegal instruction",
                  "cuda error: launch timeout", "hardware exception")
    )  # fmt: skip


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rel_err(a, ref) -> float:
    """||a - ref|| / ||ref|| in float64 on the CPU (||a - ref|| where ref is all zeros)."""
    import torch

    a = a.detach().to("cpu", torch.float64)
    if a.shape != ref.shape:
        return float("nan")
    if ref.numel() == 0:
        return 0.0
    d = torch.linalg.vector_norm(a - ref).item()
    n = torch.linalg.vector_norm(ref).item()
    return d / n if n > 0 else d


def _bits_equal(a, b) -> bool:
    import torch

    if a is None or b is None:
        return a is None and b is None
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


class _Check:
    """One correctness task: a cell kind, a size and a dtype; the reference and baseline once,
    then every fused backend the task lists."""

    def __init__(self, task: dict, plan: dict, device):
        import torch

        self.task, self.plan, self.device = task, plan, device
        self.kind, self.dtype_name = task["kind"], task["dtype"]
        self.size = Size(**task["size"])
        self.dtype = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16,
                      "bf16": torch.bfloat16}[self.dtype_name]  # fmt: skip
        self.seed = task["seed"]
        self.cell = _is_cell(self.kind)
        self.lstm = self.kind.startswith("lstm")
        self.grad = self.size.mode == "fwdbwd"

    # --- building ------------------------------------------------------------------------

    def _kwargs(self, lib: str) -> tuple[str, dict]:
        cls_name, extra = KINDS[self.kind]
        s = self.size
        kw = {}
        for k, v in extra.items():
            if k == "proj_size":
                kw["proj_size"] = s.H // 2
            elif lib == "fused" or k == "nonlinearity":
                kw[k] = v
        kw["bias"] = s.bias
        if not self.cell:
            kw.update(num_layers=s.layers, bidirectional=s.bidirectional, batch_first=s.batch_first)
        return cls_name, kw

    def build(self, lib: str, backend: str | None, dtype, device):
        import torch

        import fused_rnn

        cls_name, kw = self._kwargs(lib)
        if lib == "torch.nn":
            cls = getattr(torch.nn, cls_name)
        else:
            cls = getattr(fused_rnn, cls_name)
            kw["backend"] = backend
        return cls(self.size.I, self.size.H, **kw, device=device, dtype=dtype)

    def make_data(self):
        """fp32 CPU weights (a state_dict), inputs and lengths, from the task's seed."""
        import torch

        torch.manual_seed(self.seed)
        sd = self.build("fused", "torch", torch.float32, "cpu").state_dict()
        g = torch.Generator().manual_seed(self.seed + 1)
        s = self.size
        D = 2 if s.bidirectional else 1
        R = s.H // 2 if KINDS[self.kind][1].get("proj_size") else s.H
        data = {}
        if self.cell:
            data["x"] = torch.randn(s.B, s.I, generator=g)
            data["h0"] = 0.5 * torch.randn(s.B, s.H, generator=g)
            if self.lstm:
                data["c0"] = 0.5 * torch.randn(s.B, s.H, generator=g)
        else:
            shape = (s.B, s.T, s.I) if s.batch_first else (s.T, s.B, s.I)
            data["x"] = torch.randn(*shape, generator=g)
            data["h0"] = 0.5 * torch.randn(s.layers * D, s.B, R, generator=g)
            if self.lstm:
                data["c0"] = 0.5 * torch.randn(s.layers * D, s.B, s.H, generator=g)
        lengths = None
        if s.packed:
            lengths = torch.randint(1, s.T + 1, (s.B,), generator=g)
            lengths[torch.randint(0, s.B, (1,), generator=g)] = s.T
            if s.B > 1 and bool((lengths[:-1] >= lengths[1:]).all()):  # sorted: unsort it
                lengths = lengths.flip(0)
                if bool((lengths == lengths[0]).all()) and s.T > 1:
                    lengths[0] = s.T - 1
        return sd, data, lengths

    def cotangent(self, name: str, like):
        """The same random output gradient for every model (rounded to the check's dtype)."""
        import torch

        g = torch.Generator().manual_seed(_seed_for(self.seed, "cot:" + name))
        t = torch.randn(like.shape, generator=g).to(self.dtype)
        return t.to(device=like.device, dtype=like.dtype)

    # --- running -------------------------------------------------------------------------

    def run(self, model, data: dict, lengths, device, dtype) -> dict:
        """{name: tensor or None}: outputs, final states and (fwdbwd) gradients, detached."""
        import torch
        from torch.nn.utils.rnn import pack_padded_sequence

        leaves = {k: v.to(dtype).to(device).requires_grad_(self.grad) for k, v in data.items()}
        x, h0, c0 = leaves["x"], leaves["h0"], leaves.get("c0")
        model.train(self.grad)
        with torch.set_grad_enabled(self.grad):
            if self.cell:
                if self.lstm:
                    h, c = model(x, (h0, c0))
                    outs = {"h": h, "c": c}
                else:
                    outs = {"h": model(x, h0)}
            else:
                inp = x
                if lengths is not None:
                    inp = pack_padded_sequence(x, lengths, batch_first=self.size.batch_first,
                                               enforce_sorted=False)  # fmt: skip
                out, hn = model(inp, (h0, c0) if self.lstm else h0)
                if lengths is not None:
                    out = out.data
                outs = {"output": out}
                if self.lstm:
                    outs["h_n"], outs["c_n"] = hn
                else:
                    outs["h_n"] = hn
        res = {k: v.detach() for k, v in outs.items()}
        if self.grad:
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            inputs = [leaves[k] for k in leaves] + [p for _, p in named]
            names = [f"grad_{k}" for k in leaves] + [f"grad_{n}" for n, _ in named]
            cots = [self.cotangent(k, v) for k, v in outs.items()]
            grads = torch.autograd.grad(list(outs.values()), inputs, cots, allow_unused=True)
            res.update({n: (None if g is None else g.detach()) for n, g in zip(names, grads)})
        return res

    def compare(self, got: dict, ref: dict) -> tuple[dict, str]:
        """({tensor: rel err}, message about missing or extra tensors)."""
        errs, notes = {}, []
        for name, r in ref.items():
            if r is None:
                continue
            a = got.get(name)
            if a is None:
                errs[name] = float("nan")
                notes.append(f"{name} missing")
            elif tuple(a.shape) != tuple(r.shape):
                errs[name] = float("nan")
                notes.append(f"{name} shape {tuple(a.shape)} != {tuple(r.shape)}")
            else:
                errs[name] = _rel_err(a, r)
        return errs, "; ".join(notes)


def _worst(errs: dict) -> tuple[float | None, str | None]:
    if not errs:
        return None, None
    nan = [k for k, v in errs.items() if v != v]
    if nan:
        return float("nan"), nan[0]
    k = max(errs, key=errs.get)
    return errs[k], k


def _base_row(task: dict, check: dict) -> dict:
    size = task["size"]
    tol, why = TOLERANCES[task["dtype"]]
    return {
        "id": check["id"],
        "cell": task["kind"],
        "config": size["name"],
        "dtype": task["dtype"],
        "backend": check["backend"],
        "mode": size["mode"],
        "size": Size(**size).label(),
        "sizes": {k: v for k, v in size.items() if k not in ("name", "weight")},
        "seed": task["seed"],
        "status": None,
        "message": "",
        "tol": tol * task.get("tol_scale", 1.0),
        "tol_reason": why,
        "max_rel_err": None,
        "worst_tensor": None,
        "baseline": None,
        "baseline_max_rel_err": None,
        "baseline_worst_tensor": None,
        "vs_baseline": None,  # max_rel_err / baseline_max_rel_err
        "errors": {},  # tensor -> [fused rel err, baseline rel err]
        "repeats": 0,
        "repeat_max_abs_diff": None,
        "dot_precision": None,
        "seconds": None,
    }


def _run_correctness(task: dict, plan: dict, device) -> None:
    import torch

    from .runner import precision

    ck = _Check(task, plan, device)
    _emit({"ev": "start", "check": task["id"] + "/prep"})
    t0 = time.perf_counter()
    try:
        sd, data, lengths = ck.make_data()
        sd_dt = {k: v.to(ck.dtype) for k, v in sd.items()}
        # float64 reference on the CPU, from the values rounded to the check's dtype
        ref_model = ck.build("fused", "torch", torch.float64, "cpu")
        ref_model.load_state_dict({k: v.double() for k, v in sd_dt.items()})
        q_data = {k: v.to(ck.dtype).double() for k, v in data.items()}
        ref = ck.run(ref_model, q_data, lengths, "cpu", torch.float64)
        prep_error = None
    except Exception as exc:  # the reference itself failed: every check of the task errs
        prep_error = f"reference: {type(exc).__name__}: {_short(exc)}"
        traceback.print_exc()
    if prep_error:
        for check in task["checks"]:
            row = _base_row(task, check)
            row.update(status="error", message=prep_error)
            _emit({"ev": "row", "kind": "correctness", "row": row})
        return

    # the baseline: torch.nn (or fused_rnn's torch backend for the variants) in the same dtype
    base_name = "fused_rnn backend=torch" if _is_variant(ck.kind) else "torch.nn"
    if device.type == "cuda" and base_name == "torch.nn":
        base_name = "torch.nn (cuDNN)"
    base_errs, base_msg = {}, ""
    try:
        with precision(ck.dtype_name):
            if _is_variant(ck.kind):
                bm = ck.build("fused", "torch", ck.dtype, device)
            else:
                bm = ck.build("torch.nn", None, ck.dtype, device)
            bm.load_state_dict(sd_dt)
            base = ck.run(bm, data, lengths, device, ck.dtype)
            _sync(device)
        base_errs, base_msg = ck.compare(base, ref)
        del bm, base
    except Exception as exc:
        base_msg = f"baseline failed: {type(exc).__name__}: {_short(exc, 200)}"
        if _fatal_cuda(exc):
            raise
    prep_s = time.perf_counter() - t0

    for check in task["checks"]:
        backend = check["backend"]
        _emit({"ev": "start", "check": check["id"]})
        row = _base_row(task, check)
        row["baseline"] = base_name
        row["baseline_max_rel_err"], row["baseline_worst_tensor"] = _worst(base_errs)
        if base_msg:
            row["message"] = f"({base_msg}) "
        t1 = time.perf_counter()
        fatal = None
        try:
            with precision(ck.dtype_name):
                if ck.dtype == torch.float32:
                    from fused_rnn.kernels._common import dot_precision

                    row["dot_precision"] = dot_precision(torch.float32)
                model = ck.build("fused", backend, ck.dtype, device)
                model.load_state_dict(sd_dt)
                n = plan["repeats"] if backend == "persistent" else 1
                runs = []
                for _ in range(n):
                    runs.append(ck.run(model, data, lengths, device, ck.dtype))
                    _sync(device)
            row["repeats"] = n
            errs, msg = ck.compare(runs[0], ref)
            row["errors"] = {k: [v, base_errs.get(k)] for k, v in errs.items()}
            row["max_rel_err"], row["worst_tensor"] = _worst(errs)
            diff = 0.0
            moved = []
            for r in runs[1:]:
                for k, v in runs[0].items():
                    if not _bits_equal(v, r.get(k)):
                        moved.append(k)
                        if v is not None and r.get(k) is not None:
                            d = (v.double() - r[k].double()).abs().max().item()
                            diff = max(diff, d) if d == d else float("nan")
            row["repeat_max_abs_diff"] = diff if n > 1 else None
            err, base_err = row["max_rel_err"], row["baseline_max_rel_err"]
            if err is not None and base_err:
                row["vs_baseline"] = err / base_err
            row["status"] = "pass"
            if err is None or not err <= row["tol"]:  # NaN fails
                row["status"] = "fail"
                row["message"] += (
                    f"rel err {_fmt_err(err)} > tol {row['tol']:.0e} on {row['worst_tensor']}; "
                )
            if msg:
                row["status"] = "fail"
                row["message"] += msg + "; "
            if moved:  # a result that moves between runs on the same inputs: a race
                row["status"] = "race"
                row["message"] += (
                    f"repeats on the same inputs differ in {sorted(set(moved))[:4]} "
                    f"(max |Δ| {diff:.3g}); "
                )
        except Exception as exc:
            row["status"] = "error"
            row["message"] += f"{type(exc).__name__}: {_short(exc)}"
            traceback.print_exc()
            if _fatal_cuda(exc):
                fatal = exc
        row["seconds"] = round(time.perf_counter() - t1 + prep_s, 3)
        prep_s = 0.0
        row["message"] = row["message"].strip().rstrip(";")
        _emit({"ev": "row", "kind": "correctness", "row": row})
        if fatal is not None:
            raise fatal


def _run_extra(task: dict, plan: dict, device) -> None:
    """torch.compile(fullgraph=True) or one single-process DDP step, against eager."""
    import torch

    import fused_rnn

    from .runner import precision

    check = task["checks"][0]
    _emit({"ev": "start", "check": check["id"]})
    what, backend = task["what"], check["backend"]
    row = {"id": check["id"], "check": what, "backend": backend, "status": None, "message": "",
           "max_rel_err": None, "tol": TOLERANCES["fp32"][0], "seconds": None}  # fmt: skip
    t0 = time.perf_counter()
    torch.manual_seed(task["seed"])

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = fused_rnn.LSTM(16, 32, num_layers=2, batch_first=True, backend=backend)
            self.head = torch.nn.Linear(32, 8)

        def forward(self, x):
            y, (h, c) = self.rnn(x)
            return self.head(y).sum() + (h * h).sum() + c.mean()

    def grads(model, x):
        loss = model(x)
        gs = torch.autograd.grad(loss, [x, *model.parameters()])
        return [loss.detach(), *gs]

    def max_err(a, b):
        return max(_rel_err(u, v.detach().to("cpu", torch.float64)) for u, v in zip(a, b))

    with precision("fp32"):
        net = Net().to(device)
        x = torch.randn(4, 8, 16, device=device, requires_grad=True)
        try:
            eager = grads(net, x)
            if what == "autocast":
                err = _autocast_check(backend, device, row)
            elif what == "compile":
                import torch._dynamo

                torch._dynamo.reset()
                compiled = torch.compile(net, fullgraph=True)
                got = grads(compiled, x)
                got2 = grads(compiled, x)  # a second call: no recompile surprises
                err = max(max_err(got, eager), max_err(got2, eager))
                row["message"] = "compiled fwd+bwd vs eager (loss, d input, d params)"
            else:
                err = _ddp_step(net, x, device, row)
            if err is not None:
                row["max_rel_err"] = err
                row["status"] = "pass" if err <= row["tol"] else "fail"
        except Exception as exc:
            row["status"] = "error"
            row["message"] = f"{type(exc).__name__}: {_short(exc, 600)}"
            traceback.print_exc()
    row["seconds"] = round(time.perf_counter() - t0, 3)
    _emit({"ev": "row", "kind": "extra", "row": row})


def torch_nn_under_autocast(module, x, dtype):
    """`module(x)` (a torch.nn recurrent module) under torch.autocast(x's device, dtype), and
    whether torch.nn could run it.

    On CPUs without AVX-512, torch's CPU LSTM (oneDNN) cannot run in bf16 and raises ("could not
    create a primitive descriptor"). There it returns what autocast would compute, emulated: the
    module in float32 on operands rounded to `dtype`, the outputs cast to `dtype`; with
    `ran=False` so a caller can say so. Any other error propagates.
    """
    import torch

    try:
        with torch.autocast(x.device.type, dtype=dtype):
            return module(x), True
    except RuntimeError as e:
        if x.device.type != "cpu" or "primitive descriptor" not in str(e):
            raise
    rounded = copy.deepcopy(module)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(dtype))
    out = rounded(x.to(dtype).float())
    return _cast_outputs(out, dtype), False


def _cast_outputs(out, dtype):
    if isinstance(out, tuple):
        return tuple(_cast_outputs(o, dtype) for o in out)
    return out.to(dtype)


def _autocast_check(backend, device, row) -> float | None:
    """Under torch.autocast (bf16, fp16) each fused module returns the dtype torch.nn's does;
    the worst relative difference from torch.nn, or None (with status fail) on a dtype mismatch."""
    import torch
    from torch import nn

    import fused_rnn

    worst, seen = 0.0, []
    for cls in ("LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"):
        ref = getattr(nn, cls)(16, 32).to(device)
        ours = getattr(fused_rnn, cls)(16, 32, backend=backend).to(device)
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(8, 4, 16, device=device)
        if cls.endswith("Cell"):
            x = x[0]
        # CPU autocast in fp16 is not supported by torch's own CPU LSTM (oneDNN): bf16 only there
        for dtype in (
            (torch.bfloat16, torch.float16) if device.type == "cuda" else (torch.bfloat16,)
        ):
            with torch.autocast(device.type, dtype=dtype):
                a = ours(x)
            b, ran = torch_nn_under_autocast(ref, x, dtype)
            a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
            # torch.nn's CPU LSTM cannot run bf16 on every CPU: then an emulated baseline
            seen.append(f"{cls}/{str(dtype)[6:]}->{str(b.dtype)[6:]}" + ("" if ran else "*"))
            if a.dtype != b.dtype:
                row["status"] = "fail"
                row["message"] = (
                    f"{cls} under {dtype} autocast: fused {a.dtype}, torch.nn {b.dtype}"
                )
                return None
            worst = max(worst, _rel_err(a.float(), b.detach().double().cpu()))
    row["tol"] = TOLERANCES["bf16"][0]
    row["message"] = "output dtype and values vs torch.nn under autocast: " + ", ".join(seen)
    if any(s.endswith("*") for s in seen):
        row["message"] += " (*: torch.nn cannot run it on this CPU; vs float32 on rounded operands)"
    return worst


def _ddp_step(net, x, device, row) -> float | None:
    """One DDP (world size 1) SGD step vs the same step without DDP; None if DDP cannot start."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    pg = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
    tmp = tempfile.mkdtemp(prefix="gpu_check_ddp_")
    try:
        dist.init_process_group(pg, init_method=f"file://{tmp}/store", rank=0, world_size=1)
    except Exception as exc:  # the environment, not fused_rnn
        shutil.rmtree(tmp, ignore_errors=True)
        row["status"] = "unavailable"
        row["message"] = f"init_process_group({pg!r}) failed: {_short(exc, 300)}"
        return None
    try:
        plain = copy.deepcopy(net)
        ddp = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
        params = []
        for model, inner in ((ddp, net), (plain, plain)):
            opt = torch.optim.SGD(inner.parameters(), lr=0.1)
            opt.zero_grad()
            model(x.detach()).backward()
            opt.step()
            params.append([p.detach().clone() for p in inner.parameters()])
        _sync(device)
        row["message"] = f"{pg}, world size 1: parameters after one SGD step vs without DDP"
        return max(_rel_err(a, b.to("cpu", torch.float64)) for a, b in zip(*params))
    finally:
        dist.destroy_process_group()
        shutil.rmtree(tmp, ignore_errors=True)


def _run_warm(task: dict, plan: dict, device) -> None:
    """Compile (into Triton's disk cache) what a bench config will run: one untimed pass."""
    import torch

    from .runner import DTYPES, build_fused, precision, step_fn
    from .suites import Shape

    check = task["checks"][0]
    _emit({"ev": "start", "check": check["id"]})
    shape = Shape(**task["shape"])
    row = {"id": check["id"], "backend": check["backend"], "status": "ok", "message": ""}
    t0 = time.perf_counter()
    try:
        with precision(task["dtype"]):
            dtype = DTYPES[task["dtype"]]
            model = build_fused(shape, device, dtype, check["backend"], "none")
            model.train(task["mode"] == "fwdbwd")
            x = torch.randn(shape.seq_len, shape.batch, shape.input_size, device=device)
            x = x.to(dtype).requires_grad_(task["mode"] == "fwdbwd")
            step_fn(model, x, task["mode"])()
            _sync(device)
    except Exception as exc:
        row["status"] = "error"
        row["message"] = f"{type(exc).__name__}: {_short(exc)}"
        if _fatal_cuda(exc):
            _emit({"ev": "row", "kind": "warm", "row": row})
            raise
    row["seconds"] = round(time.perf_counter() - t0, 3)
    _emit({"ev": "row", "kind": "warm", "row": row})


def _run_bench(task: dict, plan: dict, device) -> None:
    from .runner import Config, TimingOptions, run_config
    from .suites import Shape

    shape = Shape(**task["shape"])
    cfg = Config(task["suite"], shape, task["dtype"], task["mode"])
    ids = {c["backend"]: c["id"] for c in task["checks"]}
    opts = TimingOptions(*plan["bench_timing"])
    _emit({"ev": "start", "check": task["id"] + "/torch.nn"})
    fatal = []

    def done(row):
        _emit({"ev": "row", "kind": "bench", "row": {"id": ids[row.backend], **row.as_dict()}})
        if row.error and _fatal_cuda(Exception(row.error)):
            fatal.append(row.error)

    run_config(cfg, ["none"], list(ids), device, opts,
               on_row_start=lambda row: _emit({"ev": "start", "check": ids[row.backend]}),
               on_row_done=done)  # fmt: skip
    if fatal:
        raise RuntimeError(fatal[0])


_RUNNERS = {
    "correctness": _run_correctness,
    "extra": _run_extra,
    "warm": _run_warm,
    "bench": _run_bench,
}


def worker_main(plan_path: str) -> int:
    import torch

    plan = json.loads(Path(plan_path).read_text())
    device = torch.device(plan["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, plan["threads"]))
    _INJECT[:] = [tuple(s.split(":", 1)) for s in plan.get("inject", [])]
    for line in sys.stdin:  # one task per line, sent when the previous one is done
        task = json.loads(line)
        try:
            _RUNNERS[task["type"]](task, plan, device)
        except Exception as exc:
            traceback.print_exc()
            if _fatal_cuda(exc):
                print(f"{PROG} worker: CUDA context unusable, exiting", flush=True)
                os._exit(3)
            raise
        _emit({"ev": "task_done", "task": task["id"]})
    return 0


# ============================================================================ the parent side


class Lane:
    """A queue of tasks run in order by one worker process at a time."""

    def __init__(self, name: str, tasks: list[dict], env: dict):
        self.name, self.env = name, env
        self.pending: collections.deque = collections.deque(tasks)
        self.proc = None
        self.gen = 0
        self.current = None  # check id running now
        self.deadline = None
        self.tail: collections.deque = collections.deque(maxlen=40)
        self.done = not tasks
        self.heard = False  # the current worker has reported something
        self.dead_starts = 0  # workers in a row that died before reporting anything


class Supervisor:
    """Runs lanes concurrently; turns a silent worker into "hang" and a dead one into "crash"."""

    def __init__(self, args, device, plan_common: dict, workdir: Path, sink):
        self.args, self.device, self.plan_common, self.workdir = args, device, plan_common, workdir
        self.sink = sink  # sink(kind, row, task)
        self.events: queue.Queue = queue.Queue()
        self.hangs: collections.Counter = collections.Counter()
        self.crashes: collections.Counter = collections.Counter()
        self.tripped: dict[str, str] = {}  # backend -> why its remaining checks are skipped
        self.interrupted = False

    # --- workers -------------------------------------------------------------------------

    def _start(self, lane: Lane) -> None:
        """A fresh worker for the lane, given the lane's next task (if any is left to run)."""
        self._drop_tripped(lane)
        if not lane.pending:
            lane.done = True
            return
        lane.gen += 1
        path = self.workdir / "plan.json"
        path.write_text(json.dumps(self.plan_common))
        cmd = [sys.executable, "-u", "-m", "fused_rnn.bench.gpu_check", "--worker", str(path)]
        # the worker's cwd is not the checkout: there ./fused_rnn would hide the installed package
        lane.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.PIPE, text=True, errors="replace",
                                     env=lane.env, cwd=self.workdir)  # fmt: skip
        lane.heard = False
        threading.Thread(target=self._read, args=(lane, lane.proc, lane.gen), daemon=True).start()
        self._send(lane, extra_s=60)  # + imports and CUDA init

    def _send(self, lane: Lane, extra_s: float = 0.0) -> None:
        """Give the worker the lane's head task, or close its stdin (it exits) if none is left."""
        self._drop_tripped(lane)
        try:
            if lane.pending:
                task = lane.pending[0]
                lane.proc.stdin.write(json.dumps(task) + "\n")
                lane.proc.stdin.flush()
                lane.current = f"{task['id']} (starting)"
                lane.deadline = _now() + self._timeout(task) + extra_s
            else:
                lane.proc.stdin.close()
                lane.current, lane.deadline = None, _now() + 60  # time to exit
        except (BrokenPipeError, OSError):
            pass  # the worker is gone: its "eof" event follows

    def _drop_tripped(self, lane: Lane) -> None:
        """Report the checks of tripped backends in not-yet-started tasks as skipped."""
        while lane.pending:
            task = lane.pending[0]
            drop = [c for c in task["checks"] if c["backend"] in self.tripped]
            for c in drop:
                why = self.tripped[c["backend"]]
                self.sink(task["type"], _failed_row(task, c, "skipped", why), task)
            rest = [c for c in task["checks"] if c["backend"] not in self.tripped]
            if rest:
                lane.pending[0] = dict(task, checks=rest)
                return
            lane.pending.popleft()

    def _read(self, lane: Lane, proc, gen: int) -> None:
        for line in proc.stdout:
            line = line.rstrip("\n")
            at = line.find(_MSG)  # not always at the start: a library may leave half a line
            if at >= 0:
                try:
                    msg = json.loads(line[at + len(_MSG) :])
                except json.JSONDecodeError:
                    msg = None
                if msg is not None:
                    if line[:at].strip():
                        self.events.put((lane, gen, "line", line[:at]))
                    self.events.put((lane, gen, "msg", msg))
                    continue
            self.events.put((lane, gen, "line", line))
        proc.wait()
        self.events.put((lane, gen, "eof", proc.returncode))

    def _kill(self, lane: Lane) -> None:
        if lane.proc is not None and lane.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                lane.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                lane.proc.wait(timeout=30)
        lane.proc = None

    def _timeout(self, task: dict) -> float:
        return self.args.hang_timeout * task.get("weight", 1.0)

    # --- bookkeeping ---------------------------------------------------------------------

    def _fail_check(self, lane: Lane, check_id: str, status: str, message: str) -> None:
        """Report the check that was running (or, during preparation, the whole head task)."""
        task = lane.pending[0]
        ids = [c["id"] for c in task["checks"]]
        victims = [c for c in task["checks"] if c["id"] == check_id] or list(task["checks"])
        for c in victims:
            self.sink(task["type"], _failed_row(task, c, status, message), task)
        rest = [c for c in task["checks"] if c not in victims]
        if rest and check_id in ids:
            lane.pending[0] = dict(task, checks=rest)
        else:
            lane.pending.popleft()

    def _trip(self, backend: str, why: str) -> None:
        """Stop running ``backend``: its checks in tasks not yet started become "skipped"."""
        if backend not in self.tripped:
            self.tripped[backend] = why
            print(f"{PROG}: {why}: its remaining checks are skipped")

    def _backend_of(self, lane: Lane, check_id: str | None) -> str | None:
        """The kernel backend a hang or crash of ``check_id`` counts against (None for the extra
        checks: torch.compile or NCCL trouble says nothing about the kernels)."""
        if not lane.pending or lane.pending[0]["type"] == "extra":
            return None
        for c in lane.pending[0]["checks"]:
            if c["id"] == check_id:
                return c["backend"]
        return None

    # --- the loop ------------------------------------------------------------------------

    def run(self, lanes: list[Lane], deadline: float, label: str) -> None:
        for lane in lanes:
            lane.done = not lane.pending
            if not lane.done:
                self._start(lane)
        try:
            self._loop(lanes, deadline, label)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: report what finished, skip the rest
            self.interrupted = True
            self._abort(lanes, "interrupted")
        except BaseException:
            for lane in lanes:
                self._kill(lane)
            raise

    def _loop(self, lanes: list[Lane], deadline: float, label: str) -> None:
        while not all(lane.done for lane in lanes):
            now = _now()
            if now >= deadline:
                self._abort(lanes, f"the {label} phase ran out of time (--max-minutes)")
                return
            wake = min([deadline] + [ln.deadline for ln in lanes if not ln.done and ln.deadline])
            try:
                lane, gen, what, payload = self.events.get(timeout=max(0.05, wake - now))
            except queue.Empty:
                lane = None
            if lane is not None and gen == lane.gen and not lane.done:
                self._handle(lane, what, payload, lanes)
            for ln in lanes:
                if not ln.done and ln.deadline is not None and _now() > ln.deadline:
                    self._hang(ln, lanes)

    def _handle(self, lane: Lane, what: str, payload, lanes: list[Lane]) -> None:
        if what == "line":
            lane.tail.append(payload)
            print(f"[{lane.name}] {payload}")
            return
        if what == "eof":
            self._eof(lane, payload, lanes)
            return
        ev = payload.get("ev")
        lane.heard, lane.dead_starts = True, 0
        task = lane.pending[0] if lane.pending else None
        if ev == "start":
            lane.current = payload["check"]
            lane.deadline = _now() + (self._timeout(task) if task else self.args.hang_timeout)
        elif ev == "row" and task is not None:
            row = payload["row"]
            if not any(c["id"] == row.get("id") for c in task["checks"]):
                print(f"{PROG}: [{lane.name}] ignored a row for {row.get('id')}: not expected")
                return
            self.sink(payload["kind"], row, task)
            rest = [c for c in task["checks"] if c["id"] != row.get("id")]
            lane.pending[0] = dict(task, checks=rest)
            lane.current = None
            lane.deadline = _now() + self._timeout(task)
        elif ev == "task_done" and task is not None:
            lane.pending.popleft()
            self._send(lane)

    def _eof(self, lane: Lane, code, lanes: list[Lane]) -> None:
        lane.proc = None
        if not lane.heard:
            lane.dead_starts += 1
            if lane.dead_starts >= 2:  # the worker cannot start at all: give up on the lane
                tail = " | ".join(list(lane.tail)[-8:])
                self._abort([lane], f"worker exits at start (code {code}): {_short(tail)}",
                            status="crash")  # fmt: skip
                return
        if lane.pending and lane.pending[0]["checks"] and lane.current is None:
            pass  # it exited between checks (after reporting a fatal CUDA error): go on afresh
        elif lane.pending and lane.pending[0]["checks"]:
            tail = " | ".join(list(lane.tail)[-6:])
            backend = self._backend_of(lane, lane.current)
            msg = (
                f"worker exited with code {code} while running {lane.current}: {_short(tail, 500)}"
            )
            self._fail_check(lane, lane.current, "crash", msg)
            if backend:
                self.crashes[backend] += 1
                if self.crashes[backend] >= self.args.max_crashes:
                    self._trip(backend, f"backend {backend} crashed its worker "
                               f"{self.crashes[backend]} time(s)")  # fmt: skip
        elif lane.pending:  # the head task's checks were all reported: it died between tasks
            lane.pending.popleft()
        lane.tail.clear()
        if lane.pending:
            self._start(lane)
        else:
            lane.done = True

    def _hang(self, lane: Lane, lanes: list[Lane]) -> None:
        waited = self._timeout(lane.pending[0]) if lane.pending else self.args.hang_timeout
        check = lane.current
        print(
            f"{PROG}: [{lane.name}] no progress for {waited:.0f} s in {check}: killing the worker"
        )
        self._kill(lane)
        lane.gen += 1  # ignore whatever the dead worker still had in the pipe
        backend = self._backend_of(lane, check)
        if lane.pending:
            self._fail_check(lane, check, "hang", f"no progress for {waited:.0f} s (worker killed)")
        if backend:
            self.hangs[backend] += 1
            if self.hangs[backend] >= self.args.max_hangs:
                self._trip(backend, f"backend {backend} hung {self.hangs[backend]} time(s)")
        if lane.pending:
            self._start(lane)
        else:
            lane.done = True

    def _abort(self, lanes: list[Lane], why: str, status: str = "skipped") -> None:
        for lane in lanes:
            if lane.done:
                continue
            self._kill(lane)
            lane.gen += 1
            for task in lane.pending:
                for c in task["checks"]:
                    self.sink(task["type"], _failed_row(task, c, status, why), task)
            lane.pending.clear()
            lane.done = True


def _failed_row(task: dict, check: dict, status: str, message: str) -> dict:
    """A row for a check the worker could not report itself."""
    t = task["type"]
    if t == "correctness":
        row = _base_row(task, check)
        row.update(status=status, message=message)
        return row
    if t == "bench":
        return {"id": check["id"], "backend": check["backend"], "status": "error",
                "error": f"{status}: {message}"}  # fmt: skip
    return {"id": check["id"], "backend": check["backend"], "check": task.get("what"),
            "status": status, "message": message}  # fmt: skip


# ============================================================================ planning


def _only(args, check_id: str) -> bool:
    return args.only is None or re.search(args.only, check_id) is not None


def plan_tasks(args, device, level: str, base_seed: int):
    """(correctness tasks, extra tasks, warm tasks, bench tasks, rows reported without a run)."""
    from fused_rnn import dispatch

    from .suites import SUITES

    def why_not(backend, mode):
        return dispatch.unavailable_reason(backend, mode, device)

    corr, pre = [], []
    for kind, size, dtype in correctness_plan(level):
        tid = f"{kind}/{size.name}/{dtype}"
        task = {
            "type": "correctness", "id": tid, "kind": kind, "dtype": dtype,
            "size": dataclasses.asdict(size), "seed": _seed_for(base_seed, tid),
            "weight": size.weight, "tol_scale": args.tolerance_scale, "checks": [],
        }  # fmt: skip
        for b in FUSED_BACKENDS:
            check = {"id": f"{tid}/{b}", "backend": b}
            if not _only(args, check["id"]):
                continue
            reason = why_not(b, _dispatch_mode(kind))
            if reason:
                row = _failed_row(task, check, "unavailable", reason)
                pre.append(("correctness", row, task))
            else:
                task["checks"].append(check)
        if task["checks"]:
            corr.append(task)

    extras = []
    if not args.no_extras:
        # --tiny: torch.compile alone takes ~40 s on a 2-core CPU; it runs with --quick and full
        for what in ("ddp", "autocast") if level == "tiny" else ("compile", "ddp", "autocast"):
            for b in FUSED_BACKENDS:
                cid = f"{what}/lstm/{b}"
                if not _only(args, cid):
                    continue
                task = {"type": "extra", "id": cid, "what": what, "seed": _seed_for(base_seed, cid),
                        "weight": 3.0, "checks": [{"id": cid, "backend": b}]}  # fmt: skip
                reason = why_not(b, "LSTM")
                if reason:
                    pre.append(("extra", _failed_row(task, task["checks"][0], "unavailable",
                                                     reason), task))  # fmt: skip
                else:
                    extras.append(task)

    bench, warm = [], []
    if not args.no_bench:
        if level == "tiny":
            from .suites import custom_suite

            suites = [(custom_suite(5, 3, 8, 8), ("fp32",))]
        else:
            names = BENCH_PLAN[level]
            if args.bench_suite:
                names = [(s, d) for s, d in BENCH_PLAN["full"] if s in args.bench_suite]
            suites = [(SUITES[s], dts) for s, dts in names]
        for suite, dtypes in suites:
            for shape in suite.shapes:
                for dtype in dtypes:
                    for mode in suite.modes:
                        tid = f"{suite.name}/{shape.cell}/{dtype}/{mode}"
                        checks = [{"id": f"{tid}/{b}", "backend": b} for b in FUSED_BACKENDS]
                        checks = [c for c in checks if _only(args, c["id"])]
                        if not checks:
                            continue
                        bench.append({"type": "bench", "id": tid, "suite": suite.name,
                                      "shape": shape.as_dict(), "dtype": dtype, "mode": mode,
                                      "weight": 2.0, "checks": checks})  # fmt: skip
                        for c in checks:
                            # compile ahead, in parallel (the interpreter compiles nothing)
                            cuda = device.type == "cuda"
                            if cuda and not why_not(c["backend"], _dispatch_mode(shape.cell)):
                                warm.append({"type": "warm", "id": "warm/" + c["id"],
                                             "shape": shape.as_dict(), "dtype": dtype,
                                             "mode": mode, "weight": 2.0,
                                             "checks": [{"id": "warm/" + c["id"],
                                                         "backend": c["backend"]}]})  # fmt: skip
    return corr, extras, warm, bench, pre


# ============================================================================ reporting


_STATUS_ORDER = ["pass", "fail", "race", "hang", "crash", "error", "skipped", "unavailable"]
_CORR_BAD = {"fail", "race", "hang", "crash", "error", "skipped"}


def _corr_summary(rows: list[dict], device_type: str) -> list[str]:
    base = "cuDNN" if device_type == "cuda" else "torch.nn"
    out = [
        "correctness: fused vs float64 reference, max ||a-b||/||b|| over outputs, final states "
        f"and all gradients; '{base}' = the baseline's error on the same check",
    ]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["backend"], r["dtype"]), []).append(r)
    order = {k: i for i, k in enumerate([*FUSED_BACKENDS, *TOLERANCES])}
    groups = dict(sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 99),
                                                         order.get(kv[0][1], 99))))  # fmt: skip
    head = (
        f"{'backend':<11}{'dtype':<6}{'tol':>7}"
        + "".join(f"{s[:7]:>8}" for s in _STATUS_ORDER)
        + f"{'worst':>10}{base:>10}"
    )
    out += [head, "-" * len(head)]
    for (backend, dtype), rs in groups.items():
        c = collections.Counter(r["status"] for r in rs)
        ran = [r for r in rs if r.get("max_rel_err") is not None]
        worst = max(ran, key=lambda r: (r["max_rel_err"] != r["max_rel_err"], r["max_rel_err"]),
                    default=None)  # fmt: skip
        tol = rs[0]["tol"]
        out.append(
            f"{backend:<11}{dtype:<6}{tol:>7.0e}"
            + "".join(f"{c.get(s, 0) or '.':>8}" for s in _STATUS_ORDER)
            + f"{_fmt_err(worst['max_rel_err'] if worst else None):>10}"
            + f"{_fmt_err(worst['baseline_max_rel_err'] if worst else None):>10}"
        )
    bad = [r for r in rows if r["status"] in _CORR_BAD]
    if bad:
        out.append(f"not passed ({len(bad)}; first 15, all in correctness.json):")
        for r in bad[:15]:
            out.append(f"  {r['status']:<7} {r['id']:<38} {_short(r['message'], 90)}")
    return out


def _extras_summary(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    out = ["extras:"]
    for r in rows:
        err = (
            f"rel err {_fmt_err(r.get('max_rel_err'))}" if r.get("max_rel_err") is not None else ""
        )
        out.append(
            f"  {r['id']:<22} {r['status']:<11} {err:<18} {_short(r.get('message', ''), 70)}"
        )
    return out


def _bench_summary(rows, device_type: str) -> list[str]:
    """One line per suite, cell and dtype; per mode the baseline's ms, then each backend's ms
    and x = baseline ms / fused ms."""
    if not rows:
        return []
    base = "cuDNN" if device_type == "cuda" else "torch.nn"
    short = {"stepwise": "stepw", "persistent": "persist"}
    out = [f"bench: median ms per call; x = {base} ms / fused ms (> 1: fused_rnn is faster); "
           f"'!' = outputs disagree with torch.nn"]  # fmt: skip
    table: dict = {}
    for r in rows:
        table.setdefault((r.suite, r.cell, r.dtype), {})[(r.mode, r.backend)] = r
    modes = [m for m in ("fwd", "fwdbwd") if any(r.mode == m for r in rows)]
    head = f"{'suite':<12}{'cell':<5}{'dtype':<6}"
    for m in modes:
        head += f" |{m + ' ' + base:>15}" + "".join(
            f"{short[b]:>9}{'x':>6}" for b in FUSED_BACKENDS
        )
    out += [head, "-" * len(head)]
    for (suite, cell, dtype), by in table.items():
        line = f"{suite:<12}{cell:<5}{dtype:<6}"
        for m in modes:
            mine = [r for (mode, _), r in by.items() if mode == m]
            t = next((r.torch_ms for r in mine if r.torch_ms is not None), None)
            line += f" |{_num(t):>15}"
            for b in FUSED_BACKENDS:
                r = by.get((m, b))
                if r is None:
                    line += f"{'-':>9}{'':>6}"
                elif r.fused_ms is None:
                    line += f"{r.status[:8]:>9}{'':>6}"
                else:
                    flag = "" if r.status == "ok" else "!"
                    line += f"{_num(r.fused_ms) + flag:>9}{_num(r.ratio, 2):>6}"
        out.append(line)
    bad = [r for r in rows if r.status in ("error", "mismatch")]
    if bad:
        out.append(f"bench rows that failed ({len(bad)}; all in bench.json):")
        for r in bad[:8]:
            out.append(f"  {r.suite}/{r.cell}/{r.dtype}/{r.mode}/{r.backend} {r.status}: "
                       f"{_short(r.error, 90)}")  # fmt: skip
    return out


def _num(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if v < 1000 else f"{v:.0f}"


def _bench_row(d: dict, task: dict):
    from .runner import Row
    from .suites import Shape

    shape = Shape(**task["shape"])
    fields = Row.fields()
    if "suite" not in d:  # a row the parent made for a hung or crashed worker
        d = dict(
            suite=task["suite"], cell=shape.cell, variant="none", seq_len=shape.seq_len,
            batch=shape.batch, input_size=shape.input_size, hidden_size=shape.hidden_size,
            num_layers=shape.num_layers, bidirectional=shape.bidirectional,
            proj_size=shape.proj_size, dtype=task["dtype"], mode=task["mode"],
            device="", backend=d["backend"], status=d["status"], error=d["error"],
        )  # fmt: skip
    return Row(**{k: d[k] for k in fields if k in d}, shape=shape)


# ============================================================================ main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fused_rnn.bench.gpu_check",
        description="Correctness of every fused path against float64 and torch.nn, then timing "
        "against cuDNN, in one call. Prints a short summary table last.",
    )
    p.add_argument("--device", help="cuda[:N] or cpu (cpu: correctness under TRITON_INTERPRET)")
    lvl = p.add_mutually_exclusive_group()
    lvl.add_argument("--quick", action="store_true", help="fewer checks, fastrnns+flashrnn bf16")
    lvl.add_argument("--tiny", action="store_true", help="tiny sizes (CPU interpreter tests)")
    p.add_argument("--out", help="output folder (default $OUT, else gpu_check_out/<stamp>)")
    p.add_argument("--no-bench", action="store_true", help="skip timing")
    p.add_argument("--no-correctness", action="store_true", help="skip the correctness checks")
    p.add_argument("--no-extras", action="store_true", help="skip torch.compile and DDP checks")
    p.add_argument("--only", metavar="REGEX", help="run only checks whose id matches (re.search)")
    p.add_argument("--seed", type=int, help="base seed (default: random, recorded)")
    p.add_argument("--jobs", type=int, help="correctness workers at once (default: by CPUs)")
    p.add_argument("--hang-timeout", type=float, metavar="S",
                   help="seconds without progress before a check is a hang (default 45, --quick "
                   "30, --tiny 60; the flashrnn size and bench rows get a multiple)")  # fmt: skip
    p.add_argument(
        "--max-hangs",
        type=int,
        default=2,
        help="hangs of a backend before its remaining checks are skipped",
    )
    p.add_argument(
        "--max-crashes",
        type=int,
        default=4,
        help="worker crashes of a backend before its remaining checks are skipped",
    )
    p.add_argument("--max-minutes", type=float, metavar="M",
                   help="whole-run budget; unfinished checks are 'skipped' "
                   "(default 7.5, --quick 2.8, --tiny 5)")  # fmt: skip
    p.add_argument(
        "--repeats",
        type=int,
        help="runs per persistent check on the same inputs (default 3, --tiny 2)",
    )
    p.add_argument("--tolerance-scale", type=float, default=1.0, metavar="F",
                   help="multiply every tolerance (0 makes any non-zero error fail: a self-test "
                   "of the failure path)")  # fmt: skip
    p.add_argument("--no-poison", action="store_true", help="do not set FUSED_RNN_POISON=1")
    p.add_argument(
        "--bench-suite",
        action="append",
        metavar="NAME",
        help="bench only these suites (of the full plan)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan's size and exit")
    p.add_argument("--label", help="free text recorded in env.json (e.g. the commit under test)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    # fault injection for this script's own tests: "hang:REGEX" or "crash:REGEX" makes a worker
    # sleep forever or exit when a check whose id matches starts
    p.add_argument("--inject", action="append", default=[], help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    if args.worker:
        return worker_main(args.worker)
    try:
        return _main(parser, args, argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2


def _sigterm(signum, frame):
    raise KeyboardInterrupt  # the supervisor kills its workers and the summary still prints


def _main(parser, args, argv) -> int:
    t_start = _now()
    level = "tiny" if args.tiny else "quick" if args.quick else "full"
    if args.device and args.device.startswith("cpu") and not os.environ.get("TRITON_INTERPRET"):
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
        print(f"{PROG}: --device cpu: set TRITON_INTERPRET=1 (Triton's CPU interpreter)")
    import torch

    from .cli import _resolve_device

    device = _resolve_device(parser, args.device)
    if args.jobs is not None and args.jobs < 1:
        parser.error("--jobs must be >= 1")
    budget_min = args.max_minutes or BUDGET_MIN[level]
    args.hang_timeout = args.hang_timeout or HANG_TIMEOUT_S[level]
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out or os.environ.get("OUT") or Path("gpu_check_out") / stamp)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "gpu_check.log", "w", buffering=1)  # noqa: SIM115
    signal.signal(signal.SIGTERM, _sigterm)
    old_out, old_err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(old_out, log), _Tee(old_err, log)
    try:
        return _run(args, argv, level, device, out, t_start, budget_min, torch)
    finally:
        sys.stdout.flush()
        sys.stdout, sys.stderr = old_out, old_err
        log.close()


def _run(args, argv, level, device, out: Path, t_start, budget_min, torch) -> int:
    base_seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    meta = collect_env(device, args, argv)
    meta["level"], meta["base_seed"], meta["label"] = level, base_seed, args.label
    _print_env(meta)
    corr, extras, warm, bench, pre = plan_tasks(args, device, level, base_seed)
    if args.no_correctness:
        corr, extras = [], []
        pre = [p for p in pre if p[0] not in ("correctness", "extra")]
    n_checks = sum(len(t["checks"]) for t in corr)
    print(
        f"plan: {level}; {n_checks} correctness checks in {len(corr)} tasks "
        f"(+{sum(1 for p in pre if p[0] == 'correctness')} unavailable), {len(extras)} extras, "
        f"{len(bench)} bench configs ({len(warm)} compile warm-ups); seed {base_seed}; "
        f"budget {budget_min:g} min; out {out}"
    )
    if args.dry_run:
        for t in corr:
            print("  " + t["id"] + ": " + ", ".join(c["backend"] for c in t["checks"]))
        return 0

    cpus = os.cpu_count() or 2
    jobs = args.jobs or (max(1, min(4, cpus // 4)) if device.type == "cuda" else 1)
    n_warm = 0 if not warm else max(1, min(2, cpus // 8))
    n_proc = jobs + (1 if extras else 0) + n_warm
    base_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    corr_env = dict(base_env)
    if not args.no_poison:
        corr_env["FUSED_RNN_POISON"] = "1"
    time_env = {k: v for k, v in base_env.items() if k != "FUSED_RNN_POISON"}
    common = {
        "device": str(device), "threads": max(1, cpus // max(1, n_proc)),
        "repeats": args.repeats or (2 if level == "tiny" else 3),
        "bench_timing": BENCH_TIMING[level], "inject": args.inject,
    }  # fmt: skip
    env_path = out / "env.json"
    _write_json(env_path, meta)

    # results, written as they arrive
    corr_rows: list[dict] = []
    extra_rows: list[dict] = []
    warm_rows: list[dict] = []
    bench_rows: list = []
    bench_ids: list[str] = []
    state = {"last_write": 0.0, "last_bench": 0.0, "count": 0}
    total = n_checks + len(extras)
    rank = {c["id"]: i for i, c in enumerate(c for t in corr + extras for c in t["checks"])}
    bench_rank = {c["id"]: i for i, c in enumerate(c for t in bench for c in t["checks"])}
    from . import report

    bmeta = report.metadata(device, ["python", "-m", "fused_rnn.bench.gpu_check", *argv],
                            {"level": level, "bench_timing": BENCH_TIMING[level]})  # fmt: skip
    bmeta["tool"] = "fused_rnn.bench.gpu_check"

    def write_bench(force=False):
        """bench.json and bench.csv through fused_rnn.bench.report, rows in plan order."""
        if force or _now() - state["last_bench"] > 2.0:
            state["last_bench"] = _now()
            order = sorted(range(len(bench_rows)), key=lambda i: bench_rank.get(bench_ids[i], 1e9))
            rows = [bench_rows[i] for i in order]
            bmeta["warmup_problems"] = [r for r in warm_rows if r["status"] != "ok"]
            report.write_json(out / "bench.json", bmeta, rows)
            report.write_csv(out / "bench.csv", rows)
            return rows

    def write_corr(force=False):
        if force or _now() - state["last_write"] > 2.0:
            state["last_write"] = _now()
            if force:  # the final file in plan order (rows arrive interleaved from the workers)
                corr_rows.sort(key=lambda r: rank.get(r["id"], 1e9))
                extra_rows.sort(key=lambda r: rank.get(r["id"], 1e9))
            doc = {"meta": {k: meta[k] for k in ("date_utc", "device_name", "level", "base_seed")},
                   "tolerances": {k: {"tol": v[0], "reason": v[1]} for k, v in TOLERANCES.items()},
                   "rows": corr_rows, "extras": extra_rows, "bench_warmup": warm_rows}  # fmt: skip
            _write_json(out / "correctness.json", doc, ("rows", "extras", "bench_warmup"))

    def sink(kind, row, task):
        if kind == "correctness":
            corr_rows.append(row)
        elif kind == "extra":
            extra_rows.append(row)
        elif kind == "warm":
            warm_rows.append(row)
            if row["status"] != "ok":
                print(f"  warm-up {row['status']}: {row['id']} {_short(row.get('message'), 150)}")
            return
        else:
            r = _bench_row(row, task)
            bench_rows.append(r)
            bench_ids.append(row["id"])
            print(f"  bench {row['id']:<44} {r.status:<11} torch.nn {_num(r.torch_ms)} ms, "
                  f"fused {_num(r.fused_ms)} ms, x {_num(r.ratio, 2)}")  # fmt: skip
            write_bench()
            return
        if row["status"] != "unavailable":
            state["count"] += 1
        err = row.get("max_rel_err")
        base = row.get("baseline_max_rel_err")
        extra = f"err {_fmt_err(err)}" + (f" (base {_fmt_err(base)})" if base is not None else "")
        count = f"{state['count']:>4}" if row["status"] != "unavailable" else "   -"
        print(f"[{count}/{total}] {row['status'].upper():<11} {row['id']:<40} "
              f"{extra:<28} {_short(row.get('message', ''), 90)}")  # fmt: skip
        write_corr()

    for kind, row, task in pre:
        sink(kind, row, task)

    workdir = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    sup = Supervisor(args, device, common, workdir, sink)
    budget_s = budget_min * 60
    phase1_end = t_start + budget_s * (PHASE1_SHARE if bench else 0.97)
    lanes: list[Lane] = []
    if corr or extras or warm:
        print(
            f"--- correctness: {jobs} worker(s), {n_warm} compile warm-up worker(s)"
            f"{', 1 extras worker' if extras else ''}; {common['threads']} CPU threads each"
        )
        for j in range(jobs):
            lanes.append(Lane(f"c{j}", corr[j::jobs], corr_env))
        if extras:
            lanes.append(Lane("x", extras, corr_env))
        for j in range(n_warm):
            lanes.append(Lane(f"w{j}", warm[j::n_warm], time_env))
        sup.run(lanes, phase1_end, "correctness")
    write_corr(force=True)
    t_corr = _now() - t_start

    if bench and sup.interrupted:
        print(f"{PROG}: interrupted: no bench")
        bench = []
    if bench:
        print(f"--- bench: {len(bench)} configs, one worker, nothing else running "
              f"(warmup, max reps, s per side = {BENCH_TIMING[level]})")  # fmt: skip
        lane = Lane("b", bench, time_env)
        sup.run([lane], t_start + budget_s * 0.97, "bench")
        bench_rows[:] = write_bench(force=True)
        if bench_rows:
            print(
                report.format_table(bench_rows, header="full bench table (fused_rnn.bench.report)")
            )
    shutil.rmtree(workdir, ignore_errors=True)

    meta["runtime_s"] = {"correctness": round(t_corr, 1), "total": round(_now() - t_start, 1)}
    meta["hangs"], meta["crashes"] = dict(sup.hangs), dict(sup.crashes)
    meta["skipped_backends"] = sup.tripped
    _write_json(env_path, meta)

    # the summary, printed last
    corr_bad = [r for r in corr_rows if r["status"] in _CORR_BAD]
    extra_bad = [r for r in extra_rows if r["status"] in _CORR_BAD]
    bench_bad = [r for r in bench_rows if r.status in ("error", "mismatch")]
    lines = ["", "=" * 30 + f" {PROG} summary " + "=" * 30]
    lines.append(
        f"{meta.get('device_name')} | torch {meta['torch_version']} | triton "
        f"{meta['triton_version']} | {meta['date_utc']} | git "
        f"{meta.get('git_commit') or meta.get('git_commit_cwd') or 'unknown'} | src "
        f"{meta.get('source_sha256_16')} | seed {base_seed}"
        + (f" | {args.label}" if args.label else "")
    )
    if corr_rows:
        lines += _corr_summary(corr_rows, device.type)
    lines += _extras_summary(extra_rows)
    if bench_rows:
        lines += _bench_summary(bench_rows, device.type)
    if sup.tripped:
        lines.append("skipped backends: " + "; ".join(sup.tripped.values()))
    if sup.interrupted:
        lines.append("INTERRUPTED: unfinished checks are 'skipped'")
    # stepwise is the baseline fused backend: on CUDA it must be there, or nothing was checked
    no_stepwise = [m for m, bs in meta["backends"].items() if bs["stepwise"] != "available"]
    if device.type == "cuda" and no_stepwise:
        lines.append(f"NO STEPWISE BACKEND on CUDA for {', '.join(no_stepwise)}: "
                     f"{meta['backends'][no_stepwise[0]]['stepwise']}")  # fmt: skip
    ok = not (corr_bad or extra_bad or bench_bad or sup.interrupted)
    ok = ok and not (device.type == "cuda" and no_stepwise)
    passed = sum(r["status"] == "pass" for r in corr_rows)
    lines.append(
        f"RESULT: {'PASS' if ok else 'FAIL'}: correctness {passed}/{len(corr_rows)} pass "
        f"({len(corr_bad)} not passed, "
        f"{sum(r['status'] == 'unavailable' for r in corr_rows)} unavailable), extras "
        f"{len(extra_bad)} not passed, bench {len(bench_rows)} rows ({len(bench_bad)} failed); "
        f"{_now() - t_start:.0f} s; files in {out}"
    )
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
