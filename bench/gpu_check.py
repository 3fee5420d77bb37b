"""One-call device check: correctness of every GPU path, the step floors, timing against cuDNN.

Run on a machine with a GPU, after ``python3 -m pip install -q --no-deps --no-build-isolation .``,
with ``-P`` (or from another folder): in the checkout's root ``./fused_rnn`` would hide the
installed package, which alone holds ``fused_rnn.kernels`` and ``fused_rnn.bench``:

    python3 -P -m fused_rnn.bench.gpu_check              # full: a 450 s budget (bench/NOTES.md)
    python3 -P -m fused_rnn.bench.gpu_check --quick      # 200 s
    python3 -P -m fused_rnn.bench.gpu_check --plan       # the plan and its estimate; runs nothing
    python -m fused_rnn.bench.gpu_check --device cpu --tiny   # the CPU rehearsal (interpreter)

Stages, in the order they run (what matters most first):

1. environment: GPU, driver, CUDA, cuDNN, torch, triton, commit, date -> env.json.
2. correctness of every path, cheapest first, in parallel workers (Triton compiles dominate and
   run on the CPUs), while other workers compile the bench's kernels ahead:
   - kernels: every cell kind, dtype (fp32 with TF32 off and on, fp16, bf16) and configuration
     against a float64 reference, next to torch.nn's own error (below). Stepwise checks of
     sequences long enough for the CUDA-graph cache (fused_rnn._ops.GRAPH_MIN_STEPS) run once
     with graphs off and three times with graphs on (eager, capture, replay: the cache captures
     a key on its second call), and `_graphs.cache_info()` must show a capture and a replay on
     CUDA; every stepwise loop must take the lean launch path on CUDA (kernels._launch.STATS).
     Persistent checks run ``--repeats`` times on the same inputs (bitwise: else a "race") and
     are compared with the stepwise result; whether the launcher ran the persistent kernels or
     fell back to the stepwise ones is recorded.
   - paths: backend="auto" against the shipped policy, a written policy and torch's flags
     (explain); autotuning end to end (cache file written, then hit); Hessian-vector products
     through each fused backend against float64; torch.compile (one graph, one operator node per
     layer, compiled = eager) and torch.compile(mode="reduce-overhead") (inductor's CUDA graphs
     around ours); convert() of an nn.LSTM model and revert() back to cuDNN.
3. micro-benchmarks, alone on the device (fused_rnn.bench.barrier_bench): the grid barrier per
   crossing at 1, 8, 32, 66 and 132 programs; the launch floor eager, lean and from a graph.
4. bench, alone in one worker: every suite x fp16, bf16, tf32, fp32 x fwd, fwdbwd, stepwise
   (CUDA graphs on) and persistent against torch.nn (cuDNN), the flashrnn size in fp16 / bf16
   first (BENCH_PLAN); medians with quartiles (fused_rnn.bench.runner). policy.json is then
   built from it (fused_rnn.bench.build_policy).
5. extras: one DistributedDataParallel step, output dtypes under torch.autocast.

Budget (``--budget-s``; default 450 s, --quick 200, --tiny 600): each phase starts no new task
past its share of it (PHASE_END) and kills what still runs PHASE_GRACE_S later (the last phase:
at the budget's end); what did not run is reported "skipped", and the files and the table are
written all the same. ``--plan`` prints the stages' item counts and estimated seconds (EST: a
model of the GPU machine, not a measurement) against the budget.

Files go to ``--out DIR`` (default ``$OUT``, else ``gpu_check_out/<UTC stamp>``), at most 8
(FILES), flat: env.json, correctness.json (the kernel rows, "paths", "extras"), micro.json,
bench.json / bench.csv (fused_rnn.bench.report's formats, what build_policy reads),
policy.json (CUDA runs), summary.txt (the table printed last) and gpu_check.log (all output).
Rows are written as they arrive (at most every 2 s, and at every phase's end), so a run cut
short keeps what finished. Exit status 0 when everything ran and passed; 1 when anything failed
("RESULT: FAIL") or did not run ("RESULT: INCOMPLETE"); 2 for bad arguments.

Correctness of the kernels. Each check builds one module (a cell kind at a size), draws fresh
random weights, inputs, initial states and output cotangents (seeded from a per-run seed,
recorded), rounds them to the check's dtype and runs three things on exactly those values:

- the float64 reference: the fused_rnn module on the CPU in float64 with backend="torch" (the
  kinds that train with zoneout or recurrent dropout: the same in fp32 on the check's device,
  every run drawing the masks from one seed, as they come from the device's generator);
- the baseline: torch.nn's module (cuDNN on CUDA) in the check's dtype; for the LSTM variants
  (peephole, coupled gates), which torch.nn lacks, fused_rnn's own backend="torch" instead;
- each fused backend (stepwise, persistent) in the check's dtype, outputs NaN-poisoned
  (FUSED_RNN_POISON=1) so an element no kernel wrote fails the check.

Compared are the output, the final states and the gradients of the input, h0, c0 and every
parameter, each by ``||a - ref|| / ||ref||`` (every call of the check: its worst); a check passes
when its largest error is within the dtype's tolerance (TOLERANCES, with the reasons); NaN never
passes. The baseline's error against the same reference is recorded beside it.

Every check runs in a worker process that the parent watches: a check that makes no progress for
``--hang-timeout`` seconds is reported as "hang", the worker is killed and a fresh one goes on with
the rest (a dead worker, e.g. after an illegal memory access, is a "crash"). After ``--max-hangs``
hangs of one backend, that backend's remaining checks are reported "skipped".

Statuses: pass, fail (error above tolerance, NaN, missing gradient, a graph or launch path not
taken), race, error (an exception), hang, crash, unavailable (cannot run here, e.g. a CUDA-only
check on the CPU: not a failure), skipped (not run: the budget, or a backend that hung).

Hooks for new work: a cell option is a KINDS entry (class name, constructor extras, as the
"-options" kinds are) plus its sizes in `correctness_plan`; a new fused backend is a
FUSED_BACKENDS entry, checked wherever the others are once fused_rnn.dispatch knows it; a new
path check is a `_CHECKS` function and a PATH_CHECKS entry, with its estimate in EST.
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
import logging
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
import warnings
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

# zoneout, recurrent dropout and layer norm together (the RNN has no layer norm)
_OPTIONS = {"zoneout": 0.25, "recurrent_dropout": 0.25, "layer_norm": True}
_LSTM_OPTIONS = {**_OPTIONS, "zoneout": (0.25, 0.2)}

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
    # the options (fused_rnn's alone: the baseline is its backend="torch"). "-eval": evaluation
    # mode (zoneout's expectation, no dropout), against the float64 reference; the others train,
    # drawing the masks from the same seed on every side (`_Check.seeded`)
    "lstm-options-eval": ("LSTM", {**_LSTM_OPTIONS, "eval": True}),
    "gru-options-eval": ("GRU", {**_OPTIONS, "eval": True}),
    "lstm-options": ("LSTM", _LSTM_OPTIONS),
    "gru-options": ("GRU", _OPTIONS),
    "rnn-options": ("RNN", {"nonlinearity": "tanh", "zoneout": 0.25, "recurrent_dropout": 0.25}),
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
    """A kind torch.nn cannot build (an option beyond proj_size and nonlinearity: peephole,
    coupled gates, and any option added later): its baseline is fused_rnn's backend="torch"."""
    return any(k not in ("proj_size", "nonlinearity") and v for k, v in KINDS[kind][1].items())


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


def _graph_min_steps() -> int:
    """The shortest stepwise loop that the operators send through the CUDA-graph cache."""
    from fused_rnn import _ops

    return _ops.GRAPH_MIN_STEPS


def _sizes(level: str) -> dict[str, Size]:
    if level == "tiny":
        base = Size("base", 4, 3, 8, 16)
        odd = Size("H17", 3, 3, 5, 17)
        extra = {}
        # forward only: off CUDA the cache runs eagerly, the check's logic is the same
        graphs = Size("graphs", _graph_min_steps(), 2, 8, 16, mode="fwd")
    else:
        base = Size("base", 8, 4, 16, 32)
        odd = Size("H33", 6, 3, 20, 33)
        extra = {
            "medium": Size("medium", 64, 16, 256, 256),
            "flashrnn": Size("flashrnn", 1024, 16, 768, 768, mode="fwd", weight=3.0),
        }
        graphs = Size("graphs", _graph_min_steps(), 4, 16, 32)
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
        # the shortest loop that runs as a CUDA graph: capture and replay at the boundary
        "graphs": graphs,
        odd.name: odd,
        **extra,
    }


_CELL_SIZES = ("base", "B1", "nobias", "H33", "H17", "medium")


def _cost(entry: tuple[str, Size, str]) -> float:
    """A relative cost of a correctness task, to run the fast ones first: the steps times the
    per-step work (H^2, at least a 16 x 16 tile), the layers and directions, x2 with a backward."""
    _, s, _ = entry
    steps = s.T * s.layers * (2 if s.bidirectional else 1)
    return steps * max(s.H, 16) ** 2 * (2 if s.mode == "fwdbwd" else 1)


def correctness_plan(level: str) -> list[tuple[str, Size, str]]:
    """[(kind, size, dtype)] for ``level`` (tiny, quick, full), cheapest first."""
    S = _sizes(level)
    odd = "H17" if level == "tiny" else "H33"
    configs = ["layers2", "bidir", "batch_first", "nobias", "packed", "B1", "T1", odd, "graphs"]
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

    if level == "tiny":  # a rehearsal of the script on the CPU interpreter (its tests)
        add(list(KINDS), ["base"], ["fp32"])
        add(["lstm", "gru"], ["base"], ["bf16"])
        add(["lstm", "gru"], ["packed"], ["fp32"])
        add(["lstm"], ["layers2", "B1", "T1", "graphs"], ["fp32"])
        add(["gru"], [odd], ["fp32"])
    elif level == "quick":
        add(list(KINDS), ["base"], ["fp32", "tf32", "fp16", "bf16"])
        add(["lstm", "lstm-proj", "gru", "rnn-tanh"], ["layers2", "packed", "B1", "T1", odd],
            ["fp32", "bf16"])  # fmt: skip
        add(["lstm", "lstm-proj", "gru", "rnn-tanh"], ["graphs"], ["fp32", "bf16"])
        add(["lstm", "gru", "rnn-tanh"], ["medium"], ["fp32", "bf16"])
        add(["lstm", "gru", "rnn-tanh"], ["flashrnn"], ["bf16"])
    else:
        add(list(KINDS), ["base"], ["fp32", "tf32", "fp16", "bf16"])
        add(["lstm", "lstm-proj", "lstm-peephole-coupled", "gru", "rnn-tanh", "rnn-relu"],
            configs, ["fp32", "bf16"])  # fmt: skip
        add(["lstmcell", "grucell", "rnncell-tanh"], ["B1", "nobias", odd], ["fp32", "bf16"])
        add(["lstm", "lstm-proj", "lstm-peephole", "lstm-coupled", "gru", "rnn-tanh", "rnn-relu"],
            ["medium"], ["fp32", "tf32", "fp16", "bf16"])  # fmt: skip
        add(["lstm", "gru", "rnn-tanh"], ["flashrnn"], ["fp32", "fp16", "bf16"])
    return sorted(plan, key=_cost)  # stable: equal costs keep the order above


# The checks of the paths around the kernels (one task each, in this order: quick ones first;
# "compile-ro" is torch.compile(mode="reduce-overhead"), CUDA only). Backend "auto": the check
# is about backend="auto" itself.
PATH_CHECKS = (
    ("auto", ("auto",)),
    ("convert", FUSED_BACKENDS),
    ("hvp", FUSED_BACKENDS),
    ("autotune", ("auto",)),
    ("compile", FUSED_BACKENDS),
    ("compile-ro", FUSED_BACKENDS),
    ("schedules", FUSED_BACKENDS),
)
# run after the bench: the least important
EXTRA_CHECKS = ("ddp", "autocast")

# Bench: [(suite, dtypes)] in the order they run, most important first: the flashrnn size in the
# half-precision dtypes (the headline comparison), fastrnns, then the fp32 flavours of both, then
# the other suites. Every suite runs fwd and fwdbwd, stepwise (CUDA graphs on, as by default) and
# persistent, against torch.nn (cuDNN). fp32 = TF32 off, tf32 = TF32 on.
_ALL_DTYPES = ("bf16", "fp16", "tf32", "fp32")
BENCH_PLAN = {
    "full": [
        ("flashrnn", ("fp16", "bf16")),
        ("fastrnns", _ALL_DTYPES),
        ("flashrnn", ("tf32", "fp32")),
        ("deepbench", _ALL_DTYPES),
        ("small-batch", _ALL_DTYPES),
        ("large", _ALL_DTYPES),
        ("stack", _ALL_DTYPES),
    ],
    "quick": [("flashrnn", ("fp16", "bf16")), ("fastrnns", ("bf16",))],
}
# level -> (warmup, max reps, seconds per side): the CLI's defaults are 10/100/2 s; here 144
# configs must fit a few minutes; >= 10 timed runs still give a median and quartiles
# (timing.MIN_REPS). The warm-up includes the CUDA-graph capture (second call of a key).
BENCH_TIMING = {"full": (2, 10, 0.1), "quick": (3, 15, 0.15), "tiny": (1, 3, 0.1)}
# level -> (steps per barrier launch, repeats, launches per launch-floor round)
MICRO = {"full": (10000, 5, 2000), "quick": (10000, 5, 2000), "tiny": (20, 2, 20)}
# level -> seconds for the whole run (--budget-s). Phases end at shares of it (PHASE_END): at its
# end a phase starts no new task (the rest are "skipped"), and kills what still runs
# PHASE_GRACE_S later; a phase that ends early leaves its time to the next.
BUDGET_S = {"full": 450.0, "quick": 200.0, "tiny": 600.0}
PHASE_END = {"correctness": 0.45, "micro": 0.52, "bench": 0.94, "extras": 1.0}
PHASE_GRACE_S = 20.0
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


def _driver_version(smi: str | None) -> str | None:
    """The driver version from `_nvidia_smi`'s CSV (its second column)."""
    lines = (smi or "").splitlines()
    if len(lines) < 2 or "," not in lines[1]:
        return None
    return lines[1].split(",")[1].strip() or None


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
    meta["driver_version"] = _driver_version(meta["nvidia_smi"])
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
        extra = KINDS[self.kind][1]
        self.eval = bool(extra.get("eval"))
        # training with zoneout or recurrent dropout draws masks: every run of the check (the
        # reference, the baseline, each fused call) draws them from the same seed. They come
        # from the device's generator, recurrent dropout's in the accumulation dtype, so the
        # reference is the torch path on the check's device in fp32 (TF32 off), not the CPU's
        # float64
        self.seeded = (
            self.grad
            and not self.eval
            and bool(extra.get("zoneout") or extra.get("recurrent_dropout"))
        )

    # --- building ------------------------------------------------------------------------

    def _kwargs(self, lib: str) -> tuple[str, dict]:
        cls_name, extra = KINDS[self.kind]
        s = self.size
        kw = {}
        for k, v in extra.items():
            if k == "proj_size":
                kw["proj_size"] = s.H // 2
            elif k == "eval":
                continue  # how the check runs, not a constructor argument
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
        model.train(self.grad and not self.eval)
        if self.seeded:
            torch.manual_seed(_seed_for(self.seed, "masks"))
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
        # stepwise: the graph cache over the calls with graphs on ({"calls", "captures",
        # "hits", "eager", "expected"}) and the largest |graphs on - graphs off| of the results
        "graphs": None,
        "graphs_vs_off_max_abs": None,
        # loops prepared per launch path during the check (fused_rnn.kernels._launch.STATS)
        "launch": None,
        # persistent: what ran ("persistent", or the launcher's fallback to the stepwise
        # kernels, with the reason it logged) and the largest ||persistent - stepwise|| /
        # ||stepwise|| over the tensors
        "ran_as": None,
        "vs_stepwise_max_rel": None,
        "dot_precision": None,
        "seconds": None,
    }


class _KernelLog(logging.Handler):
    """Collects what fused_rnn.kernels logs (DEBUG: a persistent launch that runs the stepwise
    kernels instead says so, with why)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    @contextlib.contextmanager
    def attached(self):
        log = logging.getLogger("fused_rnn.kernels")
        old = log.level
        log.setLevel(logging.DEBUG)
        log.addHandler(self)
        try:
            yield self
        finally:
            log.removeHandler(self)
            log.setLevel(old)


def _graph_expectation(device, T: int) -> str:
    """What the graph cache must show for a stepwise check of T steps (3 calls, graphs on)."""
    if T < _graph_min_steps():
        return f"eager: T={T} < GRAPH_MIN_STEPS={_graph_min_steps()}"
    if device.type != "cuda":
        return "eager: the cache replays on CUDA only"
    return "capture and replay"


def _graph_verdict(expected: str, delta: dict) -> str | None:
    """None when the cache's counters over a check (`delta`) show what `expected` says."""
    if expected == "capture and replay":
        if delta["captures"] < 1 or delta["hits"] < 1:
            return (f"graphs: expected a capture and a replay over {delta['calls']} calls, got "
                    f"{delta['captures']} captures and {delta['hits']} replays")  # fmt: skip
    elif delta["captures"] or delta["hits"]:
        return (f"graphs: expected none ({expected}), got {delta['captures']} captures and "
                f"{delta['hits']} replays")  # fmt: skip
    return None


def _launch_verdict(device, used: dict) -> str | None:
    """None when the stepwise loops of a check took the lean launch path as they must on CUDA
    (under the interpreter every loop launches plainly, by design)."""
    if device.type != "cuda":
        return None
    plain = {k: v for k, v in used.items() if k.startswith("plain:")}
    if plain:
        return f"lean launches not used: {plain}"
    return None


def _counters(info) -> dict:
    return {"captures": info.captures, "hits": info.hits, "eager": info.eager}


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
        ref_dev, ref_dt = (device, torch.float32) if ck.seeded else ("cpu", torch.float64)
        ref_model = ck.build("fused", "torch", ref_dt, ref_dev)
        ref_model.load_state_dict({k: v.to(ref_dt) for k, v in sd_dt.items()})
        q_data = {k: v.to(ck.dtype).to(ref_dt) for k, v in data.items()}
        with precision("fp32") if ck.seeded else contextlib.nullcontext():
            ref = ck.run(ref_model, q_data, lengths, ref_dev, ref_dt)
        ref = {k: None if v is None else v.to("cpu", torch.float64) for k, v in ref.items()}
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

    step_result = None  # the stepwise backend's (graphs off) result, for the persistent check
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
                runs, problems = _fused_runs(ck, backend, model, data, lengths, device, plan, row)
            if backend == "stepwise":
                step_result = runs[0]
            errs, msg = {}, ""
            for r in runs:  # every call against the reference: the worst error per tensor
                e, m = ck.compare(r, ref)
                msg = msg or m
                for k, v in e.items():
                    old = errs.get(k, 0.0)
                    errs[k] = float("nan") if (v != v or old != old) else max(old, v)
            row["errors"] = {k: [v, base_errs.get(k)] for k, v in errs.items()}
            row["max_rel_err"], row["worst_tensor"] = _worst(errs)
            diff, moved = 0.0, []
            if backend == "persistent":  # the repeats on the same inputs: bit for bit
                for r in runs[1:]:
                    for k, v in runs[0].items():
                        if not _bits_equal(v, r.get(k)):
                            moved.append(k)
                            if v is not None and r.get(k) is not None:
                                d = (v.double() - r[k].double()).abs().max().item()
                                diff = max(diff, d) if d == d else float("nan")
                row["repeat_max_abs_diff"] = diff if len(runs) > 1 else None
                if step_result is not None:
                    vs = max((_rel_err(v, step_result[k].double().cpu()) for k, v in
                              runs[0].items() if v is not None and step_result.get(k) is not None),
                             default=None)  # fmt: skip
                    row["vs_stepwise_max_rel"] = vs
                    if vs is not None and not vs <= 2 * row["tol"]:
                        problems.append(f"persistent vs stepwise {_fmt_err(vs)} > 2 tol")
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
            if problems:
                row["status"] = "fail"
                row["message"] += "; ".join(problems) + "; "
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


def _fused_runs(ck: _Check, backend: str, model, data, lengths, device, plan, row):
    """Runs a fused model as its backend's check asks; returns (results, problems).

    stepwise: with CUDA graphs off once, then on for 3 calls (the cache's default captures a key
    on its second call: eager, capture, replay), where the sequence is long enough for the
    graph cache (GRAPH_MIN_STEPS); the cache's counters over the 3 calls must show a capture and
    a replay on CUDA, none elsewhere. Shorter sequences: one call. persistent: `repeats` calls
    on the same inputs (compared bit for bit by the caller), noting whether the launcher ran the
    persistent kernels or fell back to the stepwise ones. Both: the launch path of every
    stepwise loop (lean on CUDA). Results: every call's, the graphs-off one first."""
    from fused_rnn import _graphs
    from fused_rnn.kernels import _launch

    def call():
        out = ck.run(model, data, lengths, device, ck.dtype)
        _sync(device)
        return out

    problems: list[str] = []
    before = _launch.STATS.copy()
    if backend == "stepwise":
        T = 1 if ck.cell else ck.size.T
        expected = _graph_expectation(device, T)
        n = 3 if T >= _graph_min_steps() else 1
        _graphs.clear_graph_cache()
        try:
            runs = []
            if n > 1:
                _graphs.set_enabled(False)
                runs.append(call())
            _graphs.set_enabled(True)
            info0 = _counters(_graphs.cache_info())
            for _ in range(n):
                runs.append(call())
            info1 = _counters(_graphs.cache_info())
        finally:
            _graphs.set_enabled(None)
            _graphs.clear_graph_cache()
        delta = {k: info1[k] - info0[k] for k in info0}
        row["graphs"] = {"calls": n, **delta, "expected": expected}
        why = _graph_verdict(expected, {"calls": n, **delta})
        if why:
            problems.append(why)
        if n > 1:
            diffs = [(a.double() - runs[-1][k].double()).abs().max().item()
                     for k, a in runs[0].items()
                     if a is not None and runs[-1].get(k) is not None and a.numel()]  # fmt: skip
            row["graphs_vs_off_max_abs"] = max(diffs, default=0.0)
        row["repeats"] = len(runs)
    else:
        with _KernelLog().attached() as klog:
            runs = [call() for _ in range(plan["repeats"])]
        fallback = [m for m in klog.messages if "stepwise instead" in m]
        row["ran_as"] = "persistent"
        if fallback:
            row["ran_as"] = f"stepwise kernels ({_short(fallback[0], 200)})"
        row["repeats"] = len(runs)
    used = {k: v for k, v in (_launch.STATS - before).items() if v}
    row["launch"] = used
    if used.get("lean", 0) + used.get("plain", 0):
        why = _launch_verdict(device, used)
        if why:
            problems.append(why)
    return runs, problems


# ---------------------------------------------------------------------------- path checks
#
# Each check of a path around the kernels gets a `_Ctx` and returns its largest relative error
# (or None); what is wrong besides goes into ctx.problems (the check then fails), facts into
# ctx.details. Sizes: ctx.tiny for the CPU interpreter, else sequences of at least
# GRAPH_MIN_STEPS steps, so that the stepwise loops run through the CUDA-graph cache on a GPU.


@dataclasses.dataclass
class _Ctx:
    device: object
    backend: str
    seed: int
    tiny: bool
    row: dict
    problems: list = dataclasses.field(default_factory=list)
    details: dict = dataclasses.field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def steps(self, tiny_T: int) -> int:
        return tiny_T if self.tiny else _graph_min_steps() + 4

    def expect(self, ok: bool, what: str) -> None:
        if not ok:
            self.problems.append(what)


def _make_net(backend: str, I: int = 16, H: int = 32):  # noqa: E741
    """A two-layer fused LSTM and a linear head whose forward returns a scalar loss (the output,
    the final h and c all reach it)."""
    import torch

    import fused_rnn

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = fused_rnn.LSTM(I, H, num_layers=2, batch_first=True, backend=backend)
            self.head = torch.nn.Linear(H, 8)

        def forward(self, x):
            y, (h, c) = self.rnn(x)
            return self.head(y).sum() + (h * h).sum() + c.mean()

    return Net()


def _loss_grads(model, x) -> list:
    """[loss, d loss / d x, d loss / d every parameter], detached clones."""
    import torch

    loss = model(x)
    gs = torch.autograd.grad(loss, [x, *model.parameters()])
    return [t.detach().clone() for t in (loss, *gs)]


def _max_rel(got, ref) -> float:
    import torch

    return max(_rel_err(u, v.detach().to("cpu", torch.float64)) for u, v in zip(got, ref))


@contextlib.contextmanager
def _dispatch_sandbox(ctx: _Ctx, **env):
    """fused_rnn.dispatch with the environment variables `env` set (None: unset; restored on the
    way out, with any later change to them), decisions forgotten on the way in and out. Off
    CUDA a rehearsal: dispatch.device_info reports an sm_90 GPU for CPU tensors (the fused
    backends run under the interpreter), as tests/test_dispatch.py does."""
    from fused_rnn import dispatch

    old_env = {k: os.environ.get(k) for k in env}
    old_info = dispatch.device_info
    try:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = str(v)
        if not ctx.cuda:
            fake = dispatch.DeviceInfo("CPU rehearsal (not a GPU)", (9, 0))
            dispatch.device_info = lambda device: fake
            ctx.details["rehearsal"] = "CPU: dispatch.device_info reports sm_90 for CPU tensors"
        dispatch.forget()
        yield dispatch
    finally:
        dispatch.device_info = old_info
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        dispatch.forget()


@contextlib.contextmanager
def _cudnn_enabled(flag: bool):
    """torch.backends.cudnn.enabled = flag for the body, and nothing else (cudnn.flags() also
    resets the TF32 switches to its own defaults)."""
    import torch

    old = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = flag
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = old


def _auto_sizes(ctx: _Ctx) -> tuple[int, int, int, int]:
    return (4, 2, 8, 16) if ctx.tiny else (32, 8, 32, 64)


def _check_auto(ctx: _Ctx) -> float | None:
    """backend="auto" resolves as the policy says (fused_rnn.dispatch.explain, per call).

    1. The shipped policy (fused_rnn/policy.json): each call's key resolves to the entry's
       winner, or with no entry to torch's native op (rule 6).
    2. A policy written here naming a different winner per cell (LSTM stepwise, GRU persistent,
       RNN torch), read through FUSED_RNN_POLICY: each call resolves to it ("policy: ..."),
       and the module's output equals backend="torch"'s within the fp32 tolerance.
    3. torch's flags over the policy: cudnn.enabled = False gives torch (rule 2);
       deterministic algorithms keep the fused winner (both fused backends are deterministic).
    """
    import torch

    import fused_rnn

    T, B, I, H = _auto_sizes(ctx)  # noqa: E741
    wanted = {"LSTM": "stepwise", "GRU": "persistent", "RNN": "torch"}
    ms = {"stepwise": {"torch": 2.0, "stepwise": 1.0, "persistent": 1.5},
          "persistent": {"torch": 2.0, "stepwise": 1.8, "persistent": 1.0},
          "torch": {"torch": 1.0, "stepwise": 2.0, "persistent": 2.0}}  # fmt: skip
    g = torch.Generator().manual_seed(ctx.seed)
    x = torch.randn(T, B, I, generator=g).to(ctx.device)
    models = {}
    for cls in wanted:
        auto = getattr(fused_rnn, cls)(I, H, backend="auto").to(ctx.device)
        ref = getattr(fused_rnn, cls)(I, H, backend="torch").to(ctx.device)
        ref.load_state_dict(auto.state_dict())
        models[cls] = (auto.eval(), ref.eval())
    policy_path = Path(tempfile.mkdtemp(prefix="gpu_check_policy_")) / "policy.json"
    from fused_rnn import dispatch as _d

    err = 0.0
    try:
        with torch.no_grad(), _dispatch_sandbox(ctx, **{_d.POLICY_ENV: None}) as dispatch:
            shipped, keys = [], {}
            entries = dispatch.load_policy()["entries"]
            for cls, (auto, _) in models.items():
                r = dispatch.explain(auto, x, file=None)[-1]
                keys[cls] = (r.key, r.shape)
                entry = entries.get(r.key)
                want = entry["backend"] if entry else "torch"
                shipped.append([cls, r.key, r.backend, r.reason])
                said = "policy" if entry else "no measurement"
                ctx.expect(r.backend == want and said in r.reason,
                           f"shipped policy: {cls} resolved to {r.backend} ({r.reason}), "
                           f"expected {want}")  # fmt: skip
            ctx.details["shipped_policy"] = shipped

            entries = {keys[c][0]: {"backend": w, "shapes": [{"shape": keys[c][1], "run": 0,
                                                              "ms": ms[w]}]}
                       for c, w in wanted.items()}  # fmt: skip
            doc = {"format": 1, "source": "gpu_check: a synthetic policy", "min_gain": 1.05,
                   "runs": [], "entries": entries}  # fmt: skip
            policy_path.write_text(json.dumps(doc))
            os.environ[_d.POLICY_ENV] = str(policy_path)
            dispatch.forget()
            got = []
            for cls, (auto, ref) in models.items():
                r = dispatch.explain(auto, x, file=None)[-1]
                got.append([cls, r.key, r.backend, r.reason])
                ctx.expect(r.backend == wanted[cls] and r.reason.startswith("policy"),
                           f"written policy: {cls} resolved to {r.backend} ({r.reason}), "
                           f"expected {wanted[cls]}")  # fmt: skip
                y, y_ref = auto(x)[0], ref(x)[0]
                err = max(err, _rel_err(y, y_ref.double().cpu()))
            ctx.details["written_policy"] = got

            flags = []
            lstm = models["LSTM"][0]
            with _cudnn_enabled(False):
                r = dispatch.explain(lstm, x, file=None)[-1]
            flags.append(["cudnn.enabled=False", r.backend, r.reason])
            ctx.expect(
                r.backend == "torch" and "cudnn.enabled" in r.reason,
                f"cudnn.enabled=False: LSTM resolved to {r.backend} ({r.reason})",
            )
            old = (torch.are_deterministic_algorithms_enabled(),
                   torch.is_deterministic_algorithms_warn_only_enabled())  # fmt: skip
            try:
                # warn_only: cuBLAS would otherwise refuse without CUBLAS_WORKSPACE_CONFIG
                torch.use_deterministic_algorithms(True, warn_only=True)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    r = dispatch.explain(lstm, x, file=None)[-1]
            finally:
                torch.use_deterministic_algorithms(old[0], warn_only=old[1])
            flags.append(["deterministic", r.backend, r.reason])
            ctx.expect(
                r.backend == "stepwise" and "deterministic" in r.reason,
                f"deterministic algorithms: LSTM resolved to {r.backend} ({r.reason})",
            )
            ctx.details["flags"] = flags
    finally:
        shutil.rmtree(policy_path.parent, ignore_errors=True)
    return err


def _host_timer(backend, run, device, **_) -> float:
    """Host milliseconds of one run() after a warm-up: the autotuner's timer in the CPU
    rehearsal, where CUDA events do not exist (what is checked there is the autotuning's
    bookkeeping, not which backend is faster)."""
    run()
    t0 = time.perf_counter()
    run()
    return (time.perf_counter() - t0) * 1e3


def _check_autotune(ctx: _Ctx) -> float | None:
    """On-device autotuning end to end (fused_rnn.set_autotune): for an LSTM trained (fwdbwd)
    and a GRU in inference (fwd), the first call times every candidate and writes the cache
    file; the second call, and a call after dispatch.forget() (memory dropped, the file read
    again), time nothing and run the same backend; the outputs equal backend="torch"'s."""
    import torch

    import fused_rnn
    from fused_rnn import dispatch as _d

    T, B, I, H = _auto_sizes(ctx)  # noqa: E741
    folder = Path(tempfile.mkdtemp(prefix="gpu_check_autotune_"))
    timed: list[str] = []
    real_timer = _d._timer
    timer = real_timer if ctx.cuda else _host_timer

    def counting(backend, run, device, **kw):
        timed.append(backend)
        return timer(backend, run, device, **kw)

    err, shapes = 0.0, []
    try:
        with _dispatch_sandbox(ctx, **{_d.CACHE_DIR_ENV: folder}) as dispatch:
            dispatch._timer = counting
            dispatch.set_autotune(True)
            for cls, grad in (("LSTM", True), ("GRU", False)):
                g = torch.Generator().manual_seed(ctx.seed + len(shapes))
                auto = getattr(fused_rnn, cls)(I, H, backend="auto").to(ctx.device)
                ref = getattr(fused_rnn, cls)(I, H, backend="torch").to(ctx.device)
                ref.load_state_dict(auto.state_dict())
                x = torch.randn(T, B, I, generator=g).to(ctx.device).requires_grad_(grad)
                seen = []
                with torch.set_grad_enabled(grad):
                    for forget in (False, False, True):
                        if forget:
                            dispatch.forget()  # drops what is in memory: the file must answer
                        n0 = len(timed)
                        r = dispatch.explain(auto, x, file=None)[-1]
                        seen.append([r.backend, r.reason, timed[n0:]])
                    y, y_ref = auto(x)[0], ref(x)[0]
                err = max(err, _rel_err(y, y_ref.detach().double().cpu()))
                key = r.key
                path = dispatch.cache_path()
                doc = json.loads(path.read_text()) if path.exists() else {}
                stored = any(key in e for e in doc.get("environments", {}).values())
                shapes.append({"cell": cls, "grad": grad, "key": key, "calls": seen,
                               "cache_file": path.name if path.exists() else None,
                               "stored": stored})  # fmt: skip
                first, second, third = seen
                ctx.expect(
                    len(first[2]) >= 2 and "autotuned now" in first[1],
                    f"{cls}: the first call did not autotune ({first[1]}; timed {first[2]})",
                )
                ctx.expect(stored, f"{cls}: key {key} not in the cache file {path}")
                for n, (b, why, t) in ((2, second), (3, third)):
                    ctx.expect(not t and b == first[0] and "autotune cache" in why,
                               f"{cls}: call {n} timed {t} or ran {b} ({why}), expected a cache "
                               f"hit on {first[0]}")  # fmt: skip
    finally:
        _d._timer = real_timer
        _d.set_autotune(None)
        shutil.rmtree(folder, ignore_errors=True)
    ctx.details["shapes"] = shapes
    return err


def _hvp_outputs(out) -> list:
    if not isinstance(out, tuple):
        return [out]
    y, h = out
    return [y, *h] if isinstance(h, tuple) else [y, h]


def _hvp(module, x, us, vs):
    """(H v) w.r.t. x and every parameter for L = sum_i <out_i, u_i>: the gradient with
    create_graph=True, then the gradient of <grad, v>."""
    import torch

    outs = _hvp_outputs(module(x))
    loss = sum((o * u).sum() for o, u in zip(outs, us, strict=True))
    wrt = [x, *module.parameters()]
    grads = torch.autograd.grad(loss, wrt, create_graph=True)
    dot = sum((gr * v).sum() for gr, v in zip(grads, vs, strict=True))
    return torch.autograd.grad(dot, wrt, allow_unused=True)


def _check_hvp(ctx: _Ctx) -> float | None:
    """Second-order gradients on the device: Hessian-vector products w.r.t. the input and every
    parameter through `ctx.backend` (fp32, TF32 off) against fused_rnn's torch backend in float64
    on the CPU, for a 2-layer bidirectional LSTM, a GRU, a ReLU RNN and an LSTMCell; the torch
    backend's own fp32 error on the device is recorded beside it (details["baseline"]), with
    cuDNN off: cuDNN's RNN has no double backward, torch's non-cuDNN op has."""
    import torch

    import fused_rnn

    T = ctx.steps(3)
    B, I, H = (2, 3, 4) if ctx.tiny else (4, 8, 16)  # noqa: E741
    cases = {"LSTM": ("LSTM", dict(num_layers=2, bidirectional=True)), "GRU": ("GRU", {}),
             "RNN-relu": ("RNN", dict(nonlinearity="relu")),
             "LSTMCell": ("LSTMCell", {})}  # fmt: skip
    g = torch.Generator().manual_seed(ctx.seed)
    worst, base_worst = 0.0, 0.0
    for name, (cls, kw) in cases.items():
        ref = getattr(fused_rnn, cls)(I, H, **kw, backend="torch").double()
        x64 = torch.randn(B, I, generator=g, dtype=torch.float64) if cls.endswith("Cell") else (
            torch.randn(T, B, I, generator=g, dtype=torch.float64))  # fmt: skip
        outs = _hvp_outputs(ref(x64))
        us = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]
        vs = [torch.randn(t.shape, generator=g, dtype=torch.float64)
              for t in (x64, *ref.parameters())]  # fmt: skip
        expected = _hvp(ref, x64.clone().requires_grad_(), us, vs)
        errs = {}
        for which in (ctx.backend, "torch"):
            m = getattr(fused_rnn, cls)(I, H, **kw, backend=which).to(ctx.device)
            m.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
            dev = [t.to(ctx.device, torch.float32) for t in us], [
                t.to(ctx.device, torch.float32) for t in vs]  # fmt: skip
            x = x64.to(ctx.device, torch.float32).requires_grad_()
            with _cudnn_enabled(which != "torch"):
                got = _hvp(m, x, *dev)
            e = 0.0
            for a, b in zip(got, expected, strict=True):
                if a is None and b is None:  # a parameter the second-order term never reaches
                    continue
                b = torch.zeros(a.shape, dtype=torch.float64) if b is None else b.detach()
                a = torch.zeros_like(b) if a is None else a
                e = max(e, _rel_err(a, b))
            errs[which] = e
        worst, base_worst = max(worst, errs[ctx.backend]), max(base_worst, errs["torch"])
        ctx.details[name] = {"fused": errs[ctx.backend], "torch_backend_fp32": errs["torch"]}
    ctx.details["baseline"] = base_worst
    return worst


def _fused_op_nodes(graphs) -> int:
    """Calls of fused_rnn:: operators in dynamo's graphs."""
    return sum(1 for gm in graphs for n in gm.graph.nodes
               if n.op == "call_function" and str(n.target).startswith("fused_rnn."))  # fmt: skip


def _check_compile(ctx: _Ctx) -> float | None:
    """torch.compile(fullgraph=True) of a 2-layer fused LSTM and a head: three compiled calls on
    fresh inputs (loss and the gradients of the input and every parameter) match eager, and
    they ran one graph, compiled once (no recompile), holding one fused_rnn operator per layer.
    Inductor on CUDA; dynamo's "eager" backend off CUDA (inductor compiles for tens of seconds
    on a small CPU)."""
    import torch
    import torch._dynamo

    T = ctx.steps(6)
    net = _make_net(ctx.backend).to(ctx.device)
    g = torch.Generator().manual_seed(ctx.seed)
    xs = [torch.randn(4, T, 16, generator=g).to(ctx.device).requires_grad_() for _ in range(3)]
    name = "inductor" if ctx.cuda else "eager"
    inner = torch._dynamo.lookup_backend(name)
    graphs = []

    def backend(gm, example_inputs):  # dynamo's graphs, on their way to the real backend
        graphs.append(gm)
        return inner(gm, example_inputs)

    torch._dynamo.reset()
    try:
        compiled = torch.compile(net, fullgraph=True, backend=backend)
        err = 0.0
        for x in xs:
            err = max(err, _max_rel(_loss_grads(compiled, x), _loss_grads(net, x)))
    finally:
        torch._dynamo.reset()
    nodes = _fused_op_nodes(graphs)
    ctx.details.update(compile_backend=name, graphs=len(graphs), fused_op_nodes=nodes)
    ctx.expect(len(graphs) == 1, f"{len(graphs)} graphs compiled over 3 calls, expected 1")
    ctx.expect(nodes == 2, f"{nodes} fused_rnn operator nodes, expected 2 (one per layer)")
    return err


def _check_compile_ro(ctx: _Ctx) -> float | None:
    """torch.compile(mode="reduce-overhead"): inductor captures the model, fused_rnn operators
    included, into its own CUDA graphs. fused_rnn's graph cache must step aside while that
    capture runs (a capture inside a capture fails). Four training steps on fresh inputs match
    eager, and inductor did not skip CUDA graphs (its cudagraph_skips counter)."""
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters

    from fused_rnn import _graphs

    T = ctx.steps(6)
    net = _make_net(ctx.backend).to(ctx.device)
    g = torch.Generator().manual_seed(ctx.seed)
    xs = [torch.randn(4, T, 16, generator=g).to(ctx.device).requires_grad_() for _ in range(4)]
    torch._dynamo.reset()
    skips0 = dict(counters["inductor"])
    info0 = _counters(_graphs.cache_info())
    try:
        compiled = torch.compile(net, mode="reduce-overhead", fullgraph=True)
        err = 0.0
        for x in xs:
            torch.compiler.cudagraph_mark_step_begin()
            got = _loss_grads(compiled, x)  # clones: the next replay overwrites the outputs
            err = max(err, _max_rel(got, _loss_grads(net, x)))
    finally:
        torch._dynamo.reset()
    info1 = _counters(_graphs.cache_info())
    skipped = counters["inductor"].get("cudagraph_skips", 0) - skips0.get("cudagraph_skips", 0)
    ctx.details.update(inductor_cudagraph_skips=skipped,
                       fused_graph_cache={k: info1[k] - info0[k] for k in info0})  # fmt: skip
    ctx.expect(skipped == 0, f"inductor skipped CUDA graphs {skipped} time(s): nothing checked")
    return err


def _check_convert(ctx: _Ctx) -> float | None:
    """fused_rnn.convert of a model holding an nn.LSTM (2 layers, batch_first) on the device:
    the LSTM becomes fused_rnn.LSTM on `ctx.backend` keeping its Parameter objects, and the
    model's output and gradients match float64; fused_rnn.revert gives back an nn.LSTM that
    computes what it computed before the round trip (cuDNN on CUDA)."""
    import torch
    from torch import nn

    import fused_rnn

    T = ctx.steps(5)
    B, I, H = 3, 8, 16  # noqa: E741

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(I, H, num_layers=2, batch_first=True)
            self.head = nn.Linear(H, 4)

        def forward(self, x):
            return self.head(self.rnn(x)[0])

    def run(model, x):
        x = x.detach().requires_grad_()
        y = model(x)
        gs = torch.autograd.grad(y.sum(), [x, *model.parameters()])
        return [y.detach(), *gs]

    model = Model().to(ctx.device)
    x = torch.randn(B, T, I, generator=torch.Generator().manual_seed(ctx.seed)).to(ctx.device)
    ref64 = copy.deepcopy(model).to("cpu", torch.float64)
    expected = run(ref64, x.double().cpu())
    before = run(model, x)
    ids = [id(p) for p in model.parameters()]
    fused_rnn.convert(model, backend=ctx.backend)
    kept = [id(p) for p in model.parameters()] == ids
    ctx.expect(type(model.rnn) is fused_rnn.LSTM, f"convert gave {type(model.rnn).__name__}")
    ctx.expect(kept, "convert did not keep the Parameter objects")
    converted = run(model, x)
    err = _max_rel(converted, expected)
    fused_rnn.revert(model)
    ctx.expect(type(model.rnn) is nn.LSTM, f"revert gave {type(model.rnn).__name__}")
    ctx.expect([id(p) for p in model.parameters()] == ids, "revert did not keep the Parameters")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        after = run(model, x)
    same = all(torch.equal(a, b) for a, b in zip(after, before))
    err_after = _max_rel(after, expected)
    ctx.expect(err_after <= TOLERANCES["fp32"][0], f"after revert: rel err {err_after:.2e}")
    ctx.details.update(baseline=_max_rel(before, expected), revert_err=err_after,
                       revert_bitwise_equal=same,
                       revert_warnings=sorted({_short(w.message, 120)
                                               for w in caught}))  # fmt: skip
    return err


def _stack_run(model, x, cots) -> list:
    """[output, final states, d(loss)/d x, d(loss)/d every parameter] of a stacked module, for
    the loss sum_i <out_i, cot_i>; detached."""
    import torch

    y, hn = model(x)
    outs = [y, *(hn if isinstance(hn, tuple) else (hn,))]
    loss = sum((o * c.to(o.device, o.dtype)).sum() for o, c in zip(outs, cots, strict=True))
    grads = torch.autograd.grad(loss, [x, *model.parameters()])
    return [t.detach() for t in (*outs, *grads)]


def _check_schedules(ctx: _Ctx) -> float | None:
    """Stacked networks on the schedules that run layer-directions at once (fused_rnn._schedule)
    against the serial order, float64 and torch.nn, fp32 with TF32 off:

    1. a 3-layer (--tiny: 2) unidirectional LSTM as a wavefront, forced to chunks of
       GRAPH_MIN_STEPS steps (four full chunks and a short one: on CUDA each lane's stepwise
       chunk loop is captured and replayed from a CUDA graph, on its own stream), and on the
       schedule chosen for it
       (explain must report what fused_rnn._schedule.decide says; off CUDA that is the serial
       order, not run twice);
    2. a 2-layer (--tiny: 1) bidirectional GRU on the directions schedule (chosen on CUDA)
       and serially;
    3. training with dropout between layers, zoneout and recurrent dropout under one seed: the
       wavefront (LSTM) and on CUDA the directions schedule (GRU) equal the serial order (the
       same masks).

    Returned: the worst error of the fused schedules against float64 (output, final states,
    the gradients of the input and every parameter); torch.nn's own beside it
    (details["baseline"]); schedule against serial in details and checked against the same
    tolerance. Off CUDA (the rehearsal) the schedules are forced and the streams are no-ops."""
    import torch
    from torch import nn

    import fused_rnn
    from fused_rnn import _graphs, _schedule

    g = _graph_min_steps()
    T, B, I, H, K = (5, 2, 3, 4, 2) if ctx.tiny else (4 * g + 3, 4, 8, 16, g)  # noqa: E741
    gen = torch.Generator().manual_seed(ctx.seed)
    tol = TOLERANCES["fp32"][0]
    worst, base_worst = 0.0, 0.0
    # --tiny: fewer layers, the interpreter runs every launch on the CPU
    L, Lb = (2, 1) if ctx.tiny else (3, 2)
    cases = {f"lstm-L{L}": ("LSTM", L, False), f"gru-L{Lb}-bi": ("GRU", Lb, True)}
    for name, (cls, layers, bi) in cases.items():
        ref = getattr(fused_rnn, cls)(I, H, layers, bidirectional=bi, backend="torch").double()
        x64 = torch.randn(T, B, I, generator=gen, dtype=torch.float64)
        cots = [torch.randn(o.shape, generator=gen, dtype=torch.float64)
                for o in _hvp_outputs(ref(x64))]  # fmt: skip
        expected = _stack_run(ref, x64.clone().requires_grad_(), cots)
        state = {k: v.float() for k, v in ref.state_dict().items()}
        x = x64.to(ctx.device, torch.float32)
        base = getattr(nn, cls)(I, H, layers, bidirectional=bi).to(ctx.device)
        base.load_state_dict(state)
        base_err = _max_rel(_stack_run(base, x.clone().requires_grad_(), cots), expected)
        m = getattr(fused_rnn, cls)(I, H, layers, bidirectional=bi, backend=ctx.backend)
        m = m.to(ctx.device)
        m.load_state_dict(state)
        runs, ran = {}, {}
        concurrent = ("directions", None) if bi else ("wavefront", K)
        schedules = {"serial": ("serial", None), concurrent[0]: concurrent, "chosen": (None, 0)}
        info0 = _counters(_graphs.cache_info())
        for label, (sched, chunk) in schedules.items():
            scope = _schedule.forced(sched, chunk) if sched else contextlib.nullcontext()
            with scope:
                if label != "serial":
                    ran[label] = _ran_schedule(m, x)
                if label != "chosen" or ctx.cuda:  # off CUDA the chosen one is the serial one
                    runs[label] = _stack_run(m, x.clone().requires_grad_(), cots)
        graphs = {k: v - info0[k] for k, v in _counters(_graphs.cache_info()).items()}
        errs = {label: _max_rel(r, expected) for label, r in runs.items()}
        vs_serial = {label: _max_rel(r, [t.double().cpu() for t in runs["serial"]])
                     for label, r in runs.items() if label != "serial"}  # fmt: skip
        want = _schedule.decide(ctx.device.type, ctx.backend, False, layers, 2 if bi else 1, T)
        ctx.expect(ran["chosen"].startswith(want.label()),
                   f"{name}: ran {ran['chosen']!r}, decide says {want.label()!r}")  # fmt: skip
        for label, e in vs_serial.items():
            ctx.expect(e <= tol, f"{name}: {label} vs serial rel err {_fmt_err(e)}")
        if ctx.cuda and ctx.backend == "stepwise" and not bi:
            ctx.expect(graphs.get("hits", 0) > 0 and graphs.get("captures", 0) >= layers,
                       f"{name}: the wavefront's chunk loops were not replayed per lane "
                       f"({graphs})")  # fmt: skip
        worst, base_worst = max(worst, *errs.values()), max(base_worst, base_err)
        ctx.details[name] = {"schedules": ran, "vs_float64": errs, "vs_serial": vs_serial,
                             "torch_nn_vs_float64": base_err, "graph_cache": graphs}  # fmt: skip

    # 3. training with every random option: the same masks on every schedule, for one seed
    train = {f"lstm-L{L}-train": ("LSTM", L, False, "wavefront", K),
             "gru-L2-bi-train": ("GRU", 2, True, "directions", None)}  # fmt: skip
    if not ctx.cuda:  # off CUDA the directions schedule runs the serial order's very operations
        train.popitem()
    for name, (cls, layers, bi, sched, chunk) in train.items():
        m = getattr(fused_rnn, cls)(I, H, layers, bidirectional=bi, dropout=0.3, zoneout=0.1,
                                    recurrent_dropout=0.2, backend=ctx.backend)  # fmt: skip
        m = m.to(ctx.device).train()
        x = torch.randn(T, B, I, generator=gen).to(ctx.device)
        D = 2 if bi else 1
        shapes = [(T, B, D * H)] + [(layers * D, B, H)] * (2 if cls == "LSTM" else 1)
        cots = [torch.randn(shape, generator=gen) for shape in shapes]
        out = {}
        for label, (s, k) in {"serial": ("serial", None), sched: (sched, chunk)}.items():
            with _schedule.forced(s, k):
                torch.manual_seed(ctx.seed)
                out[label] = _stack_run(m, x.clone().requires_grad_(), cots)
        e = _max_rel(out[sched], [t.double().cpu() for t in out["serial"]])
        ctx.details[name] = {f"{sched}_vs_serial": e}
        ctx.expect(e <= tol, f"{name}: {sched} vs serial rel err {_fmt_err(e)} (other masks?)")
    ctx.details["baseline"] = base_worst
    return worst


def _ran_schedule(model, x) -> str:
    """The schedule `model`'s stack ran on for x, as fused_rnn.dispatch.explain reports it."""
    from fused_rnn import dispatch

    rows = dispatch.explain(model, x, file=None)
    return "+".join(sorted({f"{r.schedule}: {r.schedule_reason}" for r in rows}))


def _check_autocast(ctx: _Ctx) -> float | None:
    return _autocast_check(ctx.backend, ctx.device, ctx.row)


def _check_ddp(ctx: _Ctx) -> float | None:
    import torch

    net = _make_net(ctx.backend).to(ctx.device)
    x = torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(ctx.seed))
    return _ddp_step(net, x.to(ctx.device).requires_grad_(), ctx.device, ctx.row)


_CHECKS = {
    "auto": _check_auto,
    "autotune": _check_autotune,
    "hvp": _check_hvp,
    "compile": _check_compile,
    "compile-ro": _check_compile_ro,
    "convert": _check_convert,
    "ddp": _check_ddp,
    "autocast": _check_autocast,
    "schedules": _check_schedules,
}


def _run_check(task: dict, plan: dict, device) -> None:
    """One path check ("path") or extra check ("extra"): `_CHECKS[task["what"]]` in fp32 with
    TF32 off, against its tolerance."""
    import torch

    from .runner import precision

    check = task["checks"][0]
    _emit({"ev": "start", "check": check["id"]})
    row = {"id": check["id"], "check": task["what"], "backend": check["backend"], "status": None,
           "message": "", "max_rel_err": None, "tol": TOLERANCES["fp32"][0], "details": {},
           "seconds": None}  # fmt: skip
    ctx = _Ctx(device, check["backend"], task["seed"], task.get("tiny", False), row)
    t0 = time.perf_counter()
    torch.manual_seed(task["seed"])
    try:
        with precision("fp32"):
            err = _CHECKS[task["what"]](ctx)
        _sync(device)
        if err is not None:
            row["max_rel_err"] = err
        if row["status"] is None:  # a check may have decided (unavailable, fail) itself
            row["status"] = "pass"
            if err is None or not err <= row["tol"]:
                row["status"] = "fail"
                row["message"] = f"rel err {_fmt_err(err)} > tol {row['tol']:.0e}; "
            if ctx.problems:
                row["status"] = "fail"
                row["message"] += "; ".join(ctx.problems)
    except Exception as exc:
        row["status"] = "error"
        row["message"] = f"{type(exc).__name__}: {_short(exc, 600)}"
        traceback.print_exc()
        if _fatal_cuda(exc):
            raise
    finally:
        row["details"] = {**ctx.details, **row["details"]}
        row["message"] = row["message"].strip().rstrip(";")
        row["seconds"] = round(time.perf_counter() - t0, 3)
        _emit({"ev": "row", "kind": task["type"], "row": row})


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


def _run_micro(task: dict, plan: dict, device) -> None:
    """The barrier and launch-floor micro-benchmarks (fused_rnn.bench.barrier_bench), one
    check each, alone on the device. A barrier that never completes is a hang (the watchdog)."""
    from . import barrier_bench as bb

    steps, reps, launches = task["micro"]
    for check in task["checks"]:
        _emit({"ev": "start", "check": check["id"]})
        t0 = time.perf_counter()
        try:
            if check["what"] == "barrier":
                row = bb.measure_barrier(check["programs"], device, steps, reps)
            else:
                row = bb.measure_launch(check["path"], device, launches, reps)
        except Exception as exc:
            row = {"what": check["what"], "status": "error",
                   "message": f"{type(exc).__name__}: {_short(exc, 400)}"}  # fmt: skip
            traceback.print_exc()
            if _fatal_cuda(exc):
                _emit({"ev": "row", "kind": "micro", "row": {**row, "id": check["id"]}})
                raise
        row.update(id=check["id"], backend=check["backend"],
                   seconds=round(time.perf_counter() - t0, 3))  # fmt: skip
        _emit({"ev": "row", "kind": "micro", "row": row})


def _run_bench(task: dict, plan: dict, device) -> None:
    from .runner import Config, TimingOptions, run_config
    from .suites import Shape

    shape = Shape(**task["shape"])
    cfg = Config(task["suite"], shape, task["dtype"], task["mode"])
    ids = {c["backend"]: c["id"] for c in task["checks"]}
    opts = TimingOptions(*plan["bench_timing"])
    _emit({"ev": "start", "check": task["id"] + "/torch.nn"})
    fatal = []
    before = {}

    def start(row):
        before.update(_counters(_graphs.cache_info()))
        _emit({"ev": "start", "check": ids[row.backend]})

    def done(row):
        # the graph cache over the row (captures and replays of the stepwise loops: the timed
        # runs of a stepwise row are replays), then its memory back before the next row
        after = _counters(_graphs.cache_info())
        graphs = {k: after[k] - before.get(k, 0) for k in after}
        _graphs.clear_graph_cache()
        _emit({"ev": "row", "kind": "bench",
               "row": {"id": ids[row.backend], **row.as_dict(), "graphs": graphs}})  # fmt: skip
        if row.error and _fatal_cuda(Exception(row.error)):
            fatal.append(row.error)

    from fused_rnn import _graphs

    run_config(cfg, ["none"], list(ids), device, opts, on_row_start=start, on_row_done=done)
    if fatal:
        raise RuntimeError(fatal[0])


_RUNNERS = {
    "correctness": _run_correctness,
    "path": _run_check,
    "extra": _run_check,
    "micro": _run_micro,
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
        if "poison" in task:  # NaN-filled kernel outputs (read by fused_rnn.kernels per call)
            os.environ["FUSED_RNN_POISON"] = "1" if task["poison"] else "0"
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

    def __init__(self, name: str, tasks: list[dict], env: dict, optional: bool = False):
        self.name, self.env = name, env
        # an optional lane (compiling ahead) does not hold its phase open: it is stopped, its
        # tasks dropped without rows, when the other lanes are done
        self.optional = optional
        # a kept lane's worker waits for more tasks when its queue is empty (the next phase
        # reuses it: no new process, imports and CUDA context); Supervisor.close ends it
        self.keep = False
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
        self.draining: str | None = None  # why no new task starts (the phase's time is up)

    # --- workers -------------------------------------------------------------------------

    def _start(self, lane: Lane) -> None:
        """A fresh worker for the lane, given the lane's next task (if any is left to run)."""
        self._drop_tripped(lane)
        if self.draining:
            self._skip_pending(lane, self.draining)
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
        if self.draining:
            self._skip_pending(lane, self.draining)
        try:
            if lane.pending:
                task = lane.pending[0]
                lane.proc.stdin.write(json.dumps(task) + "\n")
                lane.proc.stdin.flush()
                lane.current = f"{task['id']} (starting)"
                lane.deadline = _now() + self._timeout(task) + extra_s
            elif lane.keep:  # idle until the next phase gives it tasks
                lane.current, lane.deadline, lane.done = None, None, True
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

    def run(self, lanes: list[Lane], soft: float, hard: float, label: str) -> None:
        """Runs the lanes' tasks until the required (not optional) lanes are done. From `soft`
        on no task starts (the rest are "skipped"); at `hard` what still runs is killed."""
        self.draining = None
        if _now() >= soft:
            self.draining = f"not started: the budget for the {label} phase was spent (--budget-s)"
        for lane in lanes:
            lane.done = not lane.pending
            if not lane.done:
                if self.draining and lane.optional:
                    self._drop(lane)
                elif lane.proc is not None and lane.proc.poll() is None:  # a kept worker
                    self._send(lane)
                else:
                    self._start(lane)
        try:
            self._loop(lanes, soft, hard, label)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: report what finished, skip the rest
            self.interrupted = True
            self._abort(lanes, "interrupted")
        except BaseException:
            for lane in lanes:
                self._kill(lane)
            raise
        for lane in lanes:
            if lane.optional and not lane.done:
                self._drop(lane)

    def _loop(self, lanes: list[Lane], soft: float, hard: float, label: str) -> None:
        while not all(lane.done for lane in lanes if not lane.optional):
            now = _now()
            if now >= hard:
                self._abort(lanes, f"killed: the {label} phase ran out of time (--budget-s)")
                return
            if now >= soft and not self.draining:
                self.draining = f"not started: the {label} phase ran out of time (--budget-s)"
                for lane in lanes:
                    if lane.optional:
                        self._drop(lane)
                    elif len(lane.pending) > 1 or (lane.pending and lane.proc is None):
                        head = [] if lane.proc is None else [lane.pending.popleft()]
                        self._skip_pending(lane, self.draining)
                        lane.pending.extendleft(head)
            alarms = [soft if not self.draining else hard, hard]
            wake = min(alarms + [ln.deadline for ln in lanes if not ln.done and ln.deadline])
            try:
                lane, gen, what, payload = self.events.get(timeout=max(0.05, wake - now))
            except queue.Empty:
                lane = None
            if lane is not None and gen == lane.gen and not lane.done:
                self._handle(lane, what, payload, lanes)
            for ln in lanes:
                if not ln.done and ln.deadline is not None and _now() > ln.deadline:
                    self._hang(ln, lanes)

    def close(self, lane: Lane) -> None:
        """Ends a kept lane's worker (its stdin closed: it exits), killed if it lingers."""
        if lane.proc is not None and lane.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                lane.proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                lane.proc.wait(timeout=30)
        self._kill(lane)

    def _skip_pending(self, lane: Lane, why: str) -> None:
        """Reports every check of the lane's tasks not yet given to a worker as skipped."""
        while lane.pending:
            task = lane.pending.popleft()
            for c in task["checks"]:
                self.sink(task["type"], _failed_row(task, c, "skipped", why), task)

    def _drop(self, lane: Lane) -> None:
        """Stops an optional lane: its worker killed, its tasks dropped without rows."""
        self._kill(lane)
        lane.gen += 1
        lane.pending.clear()
        lane.done = True

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
            if lane.optional:
                self._drop(lane)
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
        return {"id": check["id"], "backend": check["backend"],
                "status": "skipped" if status == "skipped" else "error",
                "error": f"{status}: {message}"}  # fmt: skip
    extra = {k: v for k, v in check.items() if k not in ("id", "backend")}  # micro: programs...
    return {"id": check["id"], "backend": check["backend"], "check": task.get("what"), **extra,
            "status": status, "message": message}  # fmt: skip


# ============================================================================ planning


def _only(args, check_id: str) -> bool:
    return args.only is None or re.search(args.only, check_id) is not None


@dataclasses.dataclass
class Plan:
    """The tasks of a run, phase by phase, and the rows known without running anything."""

    correctness: list = dataclasses.field(default_factory=list)
    paths: list = dataclasses.field(default_factory=list)
    warm: list = dataclasses.field(default_factory=list)  # bench kernels compiled ahead
    micro: list = dataclasses.field(default_factory=list)
    bench: list = dataclasses.field(default_factory=list)
    extras: list = dataclasses.field(default_factory=list)
    pre: list = dataclasses.field(default_factory=list)  # (kind, row, task): unavailable here

    def checks(self, phase: str) -> int:
        return sum(len(t["checks"]) for t in getattr(self, phase))


def _bench_configs(level: str, suite_names=None):
    """[(suite, shape, dtype, mode)] in the order they run (BENCH_PLAN)."""
    from .suites import SUITES, custom_suite

    if level == "tiny":  # one cell, both modes: the bench path on the interpreter
        suite = custom_suite(3, 2, 8, 8)
        groups = [(dataclasses.replace(suite, shapes=suite.shapes[:1]), ("fp32",))]
    else:
        names = BENCH_PLAN[level]
        if suite_names:
            names = [(s, d) for s, d in BENCH_PLAN["full"] if s in suite_names]
        groups = [(SUITES[s], dts) for s, dts in names]
    out = []
    for suite, dtypes in groups:
        for dtype in dtypes:
            for shape in suite.shapes:
                for mode in suite.modes:
                    out.append((suite.name, shape, dtype, mode))
    return out


def plan_tasks(args, device, level: str, base_seed: int) -> Plan:
    """Every task of the run for `level` on `device`, in the order each phase runs them."""
    from fused_rnn import dispatch

    def why_not(backend, mode):
        if backend == "auto":
            return None
        return dispatch.unavailable_reason(backend, mode, device)

    plan = Plan()
    tiny = level == "tiny"
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
                plan.pre.append(("correctness", _failed_row(task, check, "unavailable", reason),
                                 task))  # fmt: skip
            else:
                task["checks"].append(check)
        if task["checks"]:
            plan.correctness.append(task)

    def single(kind, what, backend, weight):
        cid = f"{what}/{backend}"
        if not _only(args, cid):
            return
        task = {"type": kind, "id": cid, "what": what, "seed": _seed_for(base_seed, cid),
                "weight": weight, "tiny": tiny,
                "checks": [{"id": cid, "backend": backend}]}  # fmt: skip
        reason = why_not(backend, "LSTM")
        if what == "compile-ro" and device.type != "cuda":
            reason = ("needs CUDA: torch.compile(mode='reduce-overhead') records CUDA graphs "
                      "(skipped on CPU)")  # fmt: skip
        if reason:
            plan.pre.append((kind, _failed_row(task, task["checks"][0], "unavailable", reason),
                             task))  # fmt: skip
        else:
            getattr(plan, "paths" if kind == "path" else "extras").append(task)

    # --tiny (the CPU rehearsal): dynamo alone takes ~20 s per compile check on a small CPU, and
    # the extras are the least important: one fused backend each there
    once = ("compile", *EXTRA_CHECKS) if tiny else ()
    if not args.no_paths:
        for what, backends in PATH_CHECKS:
            for b in backends[:1] if what in once else backends:
                # torch.compile and autotuning time several compilations: more time to answer
                single("path", what, b, 4.0 if what.startswith(("compile", "autotune")) else 2.0)
    if not args.no_extras:
        for what in EXTRA_CHECKS:
            for b in FUSED_BACKENDS[:1] if what in once else FUSED_BACKENDS:
                single("extra", what, b, 3.0)

    if not args.no_micro:
        from . import barrier_bench

        checks = [{"id": f"barrier/p{p}", "what": "barrier", "programs": p, "backend": "barrier"}
                  for p in barrier_bench.GRIDS]  # fmt: skip
        checks += [{"id": f"launch/{p}", "what": "launch", "path": p, "backend": "launch"}
                   for p in barrier_bench.LAUNCH_PATHS]  # fmt: skip
        checks = [c for c in checks if _only(args, c["id"])]
        if checks:
            plan.micro.append({"type": "micro", "id": "micro", "micro": MICRO[level],
                               "weight": 1.0, "checks": checks})  # fmt: skip

    if not args.no_bench:
        for suite, shape, dtype, mode in _bench_configs(level, args.bench_suite):
            tid = f"{suite}/{shape.cell}/{dtype}/{mode}"
            checks = [{"id": f"{tid}/{b}", "backend": b} for b in FUSED_BACKENDS]
            checks = [c for c in checks if _only(args, c["id"])]
            if not checks:
                continue
            plan.bench.append({"type": "bench", "id": tid, "suite": suite,
                               "shape": shape.as_dict(), "dtype": dtype, "mode": mode,
                               "weight": 2.0, "checks": checks})  # fmt: skip
            for c in checks:
                # compile ahead, in parallel (the interpreter compiles nothing)
                if device.type == "cuda" and not why_not(c["backend"], _dispatch_mode(shape.cell)):
                    wid = "warm/" + c["id"]
                    plan.warm.append({"type": "warm", "id": wid, "shape": shape.as_dict(),
                                      "dtype": dtype, "mode": mode, "weight": 2.0,
                                      "checks": [{"id": wid,
                                                  "backend": c["backend"]}]})  # fmt: skip
    return plan


# The time model behind --plan: estimates (seconds on the GPU machine), not measurements; none of
# these has been timed on a GPU yet. Triton compiles dominate the correctness checks (about a
# second per kernel variant on the GPU machine's CPUs; checks of one cell, dtype and hidden size
# share most variants through Triton's disk cache); the flashrnn size adds a float64 reference
# of 1024 steps on the CPU. A bench row costs its timed runs plus building, comparing with
# torch.nn, explaining, the graph capture and freeing memory; the per-step times are DESIGN.md's
# cuDNN figures (2 / 5 µs fwd / fwdbwd at B=16 H=768), doubled for the fused backends.
EST = {
    "startup_s": 15.0,  # imports, CUDA init, the environment record
    "check_s": {"small": 1.0, "medium": 2.5, "flashrnn": 6.0},  # per correctness check
    "path_s": {
        "auto": 5.0,
        "convert": 4.0,
        "hvp": 6.0,
        "autotune": 15.0,
        "compile": 30.0,
        "compile-ro": 40.0,
        "ddp": 5.0,
        "autocast": 6.0,
        "schedules": 8.0,
    },  # fmt: skip
    "micro_s": {"barrier": 1.5, "launch": 1.0},
    "bench_row_s": 0.35,  # per side: build, compare, explain, graph capture, free
    "bench_compile_s": 2.0,  # per fused row whose kernels were not compiled ahead
    "us_per_step": {"fwd": (2.0, 4.0), "fwdbwd": (5.0, 10.0)},  # (torch.nn, fused)
}


def _bench_row_estimate(task: dict, timing: tuple) -> float:
    """Seconds for one bench config: the torch.nn side and each fused row."""
    warmup, reps, budget = timing
    s = task["shape"]
    steps = s["seq_len"] * s["num_layers"] * (2 if s["bidirectional"] else 1)
    work = s["batch"] * s["hidden_size"] ** 2 / (16 * 768**2)  # vs the B=16 H=768 figures
    total = 0.0
    for i, us in enumerate(EST["us_per_step"][task["mode"]]):
        call = steps * us * max(1.0, work) * 1e-6
        n = min(reps, max(10, int(budget / call))) if budget else reps
        sides = 1 if i == 0 else len(task["checks"])
        total += sides * (EST["bench_row_s"] + (warmup + n + 4) * call)
    return total


def task_cost(task: dict) -> float:
    """Estimated seconds of a correctness or path task on the GPU machine (EST)."""
    if task["type"] == "correctness":
        name = task["size"]["name"]
        return EST["check_s"][name if name in ("medium", "flashrnn") else "small"] * len(
            task["checks"]
        )
    return EST["path_s"][task["what"]]


def _balance(tasks: list[dict], n: int) -> list[list[dict]]:
    """`tasks` dealt to n queues of about equal estimated time (the longest first, each to the
    least loaded queue), each queue in the order of `tasks` (cheapest first)."""
    n = max(1, n)
    loads, queues = [0.0] * n, [[] for _ in range(n)]
    index = {id(t): i for i, t in enumerate(tasks)}
    for t in sorted(tasks, key=task_cost, reverse=True):
        j = loads.index(min(loads))
        loads[j] += task_cost(t)
        queues[j].append(t)
    return [sorted(q, key=lambda t: index[id(t)]) for q in queues]


def estimate(plan: Plan, level: str, workers: int, warmers: int = 0, extra_lanes: int = 1):
    """[(stage, items, seconds, how)] of the plan on a GPU (a model: EST), in run order.
    `workers`: the correctness phase's workers (path checks included); `warmers`: the workers
    compiling the bench's kernels meanwhile; `extra_lanes`: workers of the extras."""
    tasks = plan.correctness + plan.paths
    phase1 = max([sum(map(task_cost, tasks)) / max(1, workers)] + [task_cost(t) for t in tasks])
    micro = sum(EST["micro_s"][c["what"]] for t in plan.micro for c in t["checks"])
    bench = sum(_bench_row_estimate(t, BENCH_TIMING[level]) for t in plan.bench)
    # kernels specialise on the cell, dtype, sizes and mode; the warm-up workers compile during
    # the correctness phase, the bench compiles the rest itself
    kinds = {(t["shape"]["cell"], t["shape"]["hidden_size"], t["shape"]["batch"], t["dtype"],
              t["mode"], c["backend"]) for t in plan.bench for c in t["checks"]}  # fmt: skip
    compile_s = EST["bench_compile_s"] * len(kinds)
    left = max(0.0, compile_s - phase1 * warmers) if plan.warm or not warmers else compile_s
    lanes = max(1, min(extra_lanes, len(plan.extras)))
    extras = max([sum(EST["path_s"][t["what"]] for t in plan.extras) / lanes]
                 + [EST["path_s"][t["what"]] for t in plan.extras])  # fmt: skip
    return [
        ("startup", 1, EST["startup_s"], "imports, CUDA, environment"),
        ("correctness", plan.checks("correctness") + plan.checks("paths"), phase1,
         f"{workers} workers: {plan.checks('correctness')} checks of the kernels, "
         f"{plan.checks('paths')} of the paths"),
        ("micro", plan.checks("micro"), micro, "alone on the device"),
        ("bench", plan.checks("bench"), bench + left,
         f"alone; {len(plan.bench)} configs; {compile_s - left:.0f} of {compile_s:.0f} s of "
         f"compiling done ahead by {warmers} workers"),
        ("extras", plan.checks("extras"), extras, f"{lanes} workers"),
    ]  # fmt: skip


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


def _paths_summary(correctness: list[dict]) -> list[str]:
    """The graph cache, the launch paths and the persistent repeats over the correctness rows."""
    out = []
    graphed = [r for r in correctness if r.get("graphs")]
    long = [r for r in graphed if not r["graphs"]["expected"].startswith("eager: T=")]
    if graphed:
        caps = sum(r["graphs"]["captures"] for r in long)
        hits = sum(r["graphs"]["hits"] for r in long)
        off = max((r["graphs_vs_off_max_abs"] for r in long
                   if r.get("graphs_vs_off_max_abs") is not None), default=None)  # fmt: skip
        want = collections.Counter(r["graphs"]["expected"] for r in long)
        out.append(f"  CUDA graphs (stepwise, T >= {_graph_min_steps()}): {len(long)} checks "
                   f"({'; '.join(f'{n} {k}' for k, n in want.items()) or '-'}): {caps} captures, "
                   f"{hits} replays, max |graphs on - off| {_fmt_err(off)}; "
                   f"{len(graphed) - len(long)} shorter checks")  # fmt: skip
    launch = collections.Counter()
    for r in correctness:
        launch.update(r.get("launch") or {})
    if launch:
        out.append("  launch paths of the stepwise loops: "
                   + ", ".join(f"{k} {v}" for k, v in sorted(launch.items())))  # fmt: skip
    pers = [r for r in correctness if r["backend"] == "persistent" and r.get("ran_as")]
    if pers:
        fell = sum(not r["ran_as"].startswith("persistent") for r in pers)
        vs: dict = {}
        for r in pers:
            if r.get("vs_stepwise_max_rel") is not None:
                vs[r["dtype"]] = max(vs.get(r["dtype"], 0.0), r["vs_stepwise_max_rel"])
        reps = sorted({r["repeats"] for r in pers})
        out.append(f"  persistent: {len(pers)} checks x {'/'.join(map(str, reps))} runs, "
                   f"{sum(r['status'] == 'race' for r in pers)} races; ran persistent in "
                   f"{len(pers) - fell}, the stepwise kernels in {fell} (too big for the grid); "
                   "max ||persistent - stepwise|| / ||stepwise||: "
                   + (", ".join(f"{d} {_fmt_err(v)}" for d, v in vs.items()) or "-"))  # fmt: skip
    return out


def _checks_summary(title: str, rows: list[dict]) -> list[str]:
    if not rows:
        return []
    out = [title]
    for r in rows:
        err = r.get("max_rel_err")
        err = f"rel err {_fmt_err(err)}" if err is not None else ""
        out.append(
            f"  {r['id']:<22} {r['status']:<11} {err:<18} {_short(r.get('message', ''), 70)}"
        )
    return out


def _micro_summary(rows: list[dict]) -> list[str]:
    """One line for the barrier (per grid size), one for the launch floor."""
    if not rows:
        return []
    out = []
    bar = [r for r in rows if r.get("what") == "barrier"]
    if bar:
        parts = []
        for r in bar:
            tag = r["id"].rsplit("/", 1)[-1]
            if r["status"] != "ok":
                parts.append(f"{tag} {r['status']}")
            elif r.get("stamp_median_ns") is not None:
                parts.append(f"{tag} {r['stamp_median_ns']:.0f}/{r['slope_median_ns']:.0f}")
            else:
                parts.append(f"{tag} {r['interpreter_ns_per_crossing'] / 1e3:.0f} µs (interp.)")
        out.append("  barrier, ns per crossing (stamps median / slope): " + ", ".join(parts))
    lau = [r for r in rows if r.get("what") == "launch"]
    if lau:
        parts = []
        for r in lau:
            if r["status"] != "ok":
                parts.append(f"{r['id'].rsplit('/', 1)[-1]} {r['status']}")
            else:
                dev = f"/{r['device_us']:.2f}" if r.get("device_us") is not None else ""
                path = f" ({r['launch_path']})" if r.get("launch_path") == "plain" else ""
                parts.append(f"{r['path']}{path} {r['host_us']:.2f}{dev}")
        out.append("  launch, µs per launch (host/device): " + ", ".join(parts))
    bad = [r for r in rows if r["status"] in _CORR_BAD]
    for r in bad[:5]:
        out.append(f"  {r['status']:<7} {r['id']:<16} {_short(r.get('message', ''), 90)}")
    return ["micro-benchmarks:"] + out


def _geomean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def _bench_summary(rows, device_type: str) -> list[str]:
    """One line per suite and dtype: per mode and fused backend the geometric mean over the
    cells of x = baseline ms / fused ms (the full table is printed above, and in bench.json)."""
    if not rows:
        return []
    base = "cuDNN" if device_type == "cuda" else "torch.nn"
    short = {
        b: {"stepwise": "stepw", "persistent": "persist"}.get(b, b[:7]) for b in FUSED_BACKENDS
    }
    out = [f"bench: x = {base} ms / fused ms (> 1: fused_rnn is faster), geometric mean over "
           f"the cells; n = rows ok of all; '!' = a row disagreed with torch.nn"]  # fmt: skip
    table: dict = {}
    for r in rows:
        table.setdefault((r.suite, r.dtype), []).append(r)
    modes = [m for m in ("fwd", "fwdbwd") if any(r.mode == m for r in rows)]
    head = (
        f"{'suite':<12}{'dtype':<6}"
        + "".join(f" |{m:>7}" + "".join(f"{short[b]:>8}" for b in FUSED_BACKENDS) for m in modes)
        + f" |{'n':>7}"
    )
    out += [head, "-" * len(head)]
    for (suite, dtype), rs in table.items():
        line = f"{suite:<12}{dtype:<6}"
        for m in modes:
            line += f" |{'':>7}"
            for b in FUSED_BACKENDS:
                mine = [r for r in rs if r.mode == m and r.backend == b]
                g = _geomean([r.ratio for r in mine if r.status in ("ok", "mismatch")])
                flag = "!" if any(r.status == "mismatch" for r in mine) else ""
                line += f"{(_num(g, 2) if g else '-') + flag:>8}"
        ok = sum(r.status == "ok" for r in rs)
        line += f" |{f'{ok}/{len(rs)}':>7}"
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
        description="Correctness of every fused path against float64 and torch.nn, the barrier "
        "and launch micro-benchmarks, then timing against cuDNN, in one call. Prints a short "
        "summary table last.",
    )
    p.add_argument("--device", help="cuda[:N] or cpu (cpu: correctness under TRITON_INTERPRET)")
    lvl = p.add_mutually_exclusive_group()
    lvl.add_argument("--quick", action="store_true",
                     help="fewer checks; bench flashrnn fp16/bf16 and fastrnns bf16")  # fmt: skip
    lvl.add_argument("--tiny", action="store_true", help="tiny sizes (CPU interpreter tests)")
    p.add_argument("--out", help="output folder (default $OUT, else gpu_check_out/<stamp>)")
    p.add_argument("--budget-s", type=float, metavar="S",
                   help="seconds for the whole run (default 450, --quick 200, --tiny 300): each "
                   "phase starts no new work past its share; what did not run is 'skipped', and "
                   "the files and the table are written all the same")  # fmt: skip
    p.add_argument("--max-minutes", type=float, metavar="M", help="--budget-s in minutes")
    p.add_argument("--plan", action="store_true",
                   help="print the GPU plan: checks per stage x estimated seconds (a model), "
                   "against the budget; run nothing")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="--plan, and list the tasks")
    p.add_argument("--no-correctness", action="store_true", help="skip the correctness checks")
    p.add_argument("--no-paths", action="store_true",
                   help="skip the path checks (auto, autotune, second order, compile, "
                   "convert)")  # fmt: skip
    p.add_argument("--no-micro", action="store_true", help="skip the micro-benchmarks")
    p.add_argument("--no-bench", action="store_true", help="skip timing")
    p.add_argument("--no-extras", action="store_true", help="skip the DDP and autocast checks")
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
    p.add_argument(
        "--repeats",
        type=int,
        help="runs per persistent check on the same inputs (default 5, --tiny 2)",
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


# CPUs of the GPU machine the plan is made for (--plan on another machine); workers of the extras
GPU_MACHINE_CPUS = 16
EXTRA_LANES = 2


def _workers(device, cpus: int | None = None) -> tuple[int, int, int]:
    """(correctness workers, path-check lanes, compile warm-up workers) for this machine: on a
    GPU machine Triton compiles dominate and run on the CPUs; on a CPU one worker each."""
    cpus = cpus or os.cpu_count() or 2
    if device.type != "cuda":
        return 1, 1, 0
    return max(1, min(4, cpus // 4)), 2, max(1, min(4, cpus // 4))


def print_plan(plan: Plan, level: str, budget_s: float, workers: tuple[int, int, int],
               tasks: bool = False) -> float:  # fmt: skip
    """The plan's stages with their item counts and estimated seconds (EST: a model of the GPU
    machine, not a measurement) for `workers` = `_workers(...)`; returns the estimated total."""
    jobs, path_lanes, warmers = workers
    rows = estimate(plan, level, jobs + (path_lanes if plan.paths else 0), warmers, EXTRA_LANES)
    total = sum(s for _, _, s, _ in rows)
    print(f"plan ({level}) on a GPU, estimated (a model, not a measurement): "
          f"{total:.0f} s of a {budget_s:.0f} s budget")  # fmt: skip
    for stage, n, sec, how in rows:
        end = f"(ends by {PHASE_END[stage]:.0%} of the budget)" if stage in PHASE_END else ""
        print(f"  {stage:<12} {n:>5} items  ~{sec:>5.0f} s  {how} {end}".rstrip())
    if tasks:
        for phase in ("correctness", "paths", "micro", "bench", "extras"):
            for t in getattr(plan, phase):
                print(f"  {phase}: {t['id']}: " + ", ".join(c["id"].rsplit("/", 1)[-1]
                                                          for c in t["checks"]))  # fmt: skip
    return total


def _main(parser, args, argv) -> int:
    t_start = _now()
    level = "tiny" if args.tiny else "quick" if args.quick else "full"
    if args.device and args.device.startswith("cpu") and not os.environ.get("TRITON_INTERPRET"):
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
        print(f"{PROG}: --device cpu: set TRITON_INTERPRET=1 (Triton's CPU interpreter)")
    import torch

    from .cli import _resolve_device

    if args.jobs is not None and args.jobs < 1:
        parser.error("--jobs must be >= 1")
    budget_s = args.budget_s or (args.max_minutes * 60 if args.max_minutes else BUDGET_S[level])
    if budget_s <= 0:
        parser.error("--budget-s must be positive")
    args.hang_timeout = args.hang_timeout or HANG_TIMEOUT_S[level]
    if args.plan or args.dry_run:  # the GPU plan, whatever this machine has
        cuda = torch.device("cuda")
        plan = plan_tasks(args, cuda, level, 0)
        jobs, path_lanes, warmers = _workers(cuda, GPU_MACHINE_CPUS)
        print_plan(plan, level, budget_s, (args.jobs or jobs, path_lanes, warmers),
                   tasks=args.dry_run)  # fmt: skip
        return 0
    device = _resolve_device(parser, args.device)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out or os.environ.get("OUT") or Path("gpu_check_out") / stamp)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "gpu_check.log", "w", buffering=1)  # noqa: SIM115
    signal.signal(signal.SIGTERM, _sigterm)
    old_out, old_err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(old_out, log), _Tee(old_err, log)
    try:
        return _run(args, argv, level, device, out, t_start, budget_s)
    finally:
        sys.stdout.flush()
        sys.stdout, sys.stderr = old_out, old_err
        log.close()


# the files a run writes (at most 8, flat, names of letters, digits and ._-: what a GPU machine's
# output folder returns)
FILES = ("env.json", "correctness.json", "micro.json", "bench.json", "bench.csv", "policy.json",
         "summary.txt", "gpu_check.log")  # fmt: skip
_BAD = {"fail", "race", "hang", "crash", "error"}


class _Results:
    """Rows as they arrive, and the files they go to (rewritten at most every 2 s while a phase
    runs, and at every phase's end: a run cut short keeps what finished)."""

    def __init__(self, out: Path, meta: dict, bmeta: dict, rank: dict):
        self.out, self.meta, self.bmeta, self.rank = out, meta, bmeta, rank
        self.rows = {k: [] for k in ("correctness", "path", "extra", "micro", "warm")}
        self.bench: list = []  # (check id, runner Row)
        self.graph_stats: dict = {}
        self.count = 0
        self._last: dict = {}

    def _due(self, what: str, force: bool) -> bool:
        if force or _now() - self._last.get(what, 0.0) > 2.0:
            self._last[what] = _now()
            return True
        return False

    def _ordered(self, rows: list[dict]) -> list[dict]:
        return sorted(rows, key=lambda r: self.rank.get(r["id"], 1e9))

    def write_correctness(self, force: bool = False) -> None:
        if self._due("correctness", force):
            doc = {"meta": {k: self.meta.get(k) for k in ("date_utc", "device_name", "level",
                                                           "base_seed")},
                   "tolerances": {k: {"tol": v[0], "reason": v[1]} for k, v in TOLERANCES.items()},
                   "rows": self._ordered(self.rows["correctness"]),
                   "paths": self._ordered(self.rows["path"]),
                   "extras": self._ordered(self.rows["extra"]),
                   "bench_warmup": [r for r in self.rows["warm"]
                                    if r["status"] != "ok"]}  # fmt: skip
            _write_json(self.out / "correctness.json", doc,
                        ("rows", "paths", "extras", "bench_warmup"))  # fmt: skip

    def write_micro(self, force: bool = False) -> None:
        if self._due("micro", force):
            doc = {"meta": {k: self.meta.get(k) for k in ("date_utc", "device_name", "level")},
                   "note": "fused_rnn.bench.barrier_bench: the grid barrier per crossing (ns) "
                           "and the launch floor (µs per launch); off CUDA the interpreter's "
                           "times, not a GPU's",
                   "rows": self._ordered(self.rows["micro"])}  # fmt: skip
            _write_json(self.out / "micro.json", doc, ("rows",))

    def write_bench(self, force: bool = False) -> list:
        from . import report

        rows = [r for _, r in sorted(self.bench, key=lambda ir: self.rank.get(ir[0], 1e9))]
        if self._due("bench", force) and self.bench:
            self.bmeta["graph_stats"] = self.graph_stats
            report.write_json(self.out / "bench.json", self.bmeta, rows)
            report.write_csv(self.out / "bench.csv", rows)
        return rows


def _run(args, argv, level, device, out: Path, t_start, budget_s) -> int:
    from . import report

    base_seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    meta = collect_env(device, args, argv)
    meta["level"], meta["base_seed"], meta["label"] = level, base_seed, args.label
    meta["budget_s"] = budget_s
    _print_env(meta)
    plan = plan_tasks(args, device, level, base_seed)
    if args.no_correctness:
        plan.correctness = []
        plan.pre = [p for p in plan.pre if p[0] != "correctness"]
    jobs, path_lanes, n_warm = _workers(device)
    jobs = args.jobs or jobs
    est = None
    if device.type == "cuda":
        est = print_plan(plan, level, budget_s, (jobs, path_lanes, n_warm))
    meta["estimate_s"] = est
    print(f"run: {level} on {device}; correctness {plan.checks('correctness')} checks in "
          f"{len(plan.correctness)} tasks, paths {plan.checks('paths')}, micro "
          f"{plan.checks('micro')}, bench {len(plan.bench)} configs ({len(plan.warm)} compile "
          f"warm-ups), extras {plan.checks('extras')} (+{len(plan.pre)} unavailable here); seed "
          f"{base_seed}; budget {budget_s:.0f} s; out {out}")  # fmt: skip

    cpus = os.cpu_count() or 2
    n_proc = jobs + (path_lanes if plan.paths else 0) + (n_warm if plan.warm else 0)
    # NaN-poisoned kernel outputs for the checks, never for timing: set per task in the worker
    env = {k: v for k, v in os.environ.items() if k != "FUSED_RNN_POISON"}
    env["PYTHONUNBUFFERED"] = "1"
    for ph in ("correctness", "paths", "extras", "micro", "bench", "warm"):
        for t in getattr(plan, ph):
            t["poison"] = ph in ("correctness", "paths", "extras") and not args.no_poison
    common = {
        "device": str(device), "threads": max(1, cpus // max(1, n_proc)),
        "repeats": args.repeats or (2 if level == "tiny" else 5),
        "bench_timing": BENCH_TIMING[level], "inject": args.inject,
    }  # fmt: skip
    env_path = out / "env.json"
    _write_json(env_path, meta)

    order = [c["id"] for ph in ("correctness", "paths", "micro", "bench", "extras")
             for t in getattr(plan, ph) for c in t["checks"]]  # fmt: skip
    order += [row["id"] for _, row, _ in plan.pre]
    bmeta = report.metadata(device, ["python", "-m", "fused_rnn.bench.gpu_check", *argv],
                            {"level": level, "bench_timing": BENCH_TIMING[level]})  # fmt: skip
    bmeta["tool"] = "fused_rnn.bench.gpu_check"
    res = _Results(out, meta, bmeta, {cid: i for i, cid in enumerate(order)})
    total = plan.checks("correctness") + plan.checks("paths") + plan.checks("extras")

    def sink(kind, row, task):
        if kind == "warm":
            res.rows["warm"].append(row)
            if row["status"] != "ok":
                print(f"  warm-up {row['status']}: {row['id']} {_short(row.get('message'), 150)}")
            return
        if kind == "bench":
            r = _bench_row(row, task)
            res.bench.append((row["id"], r))
            if row.get("graphs"):
                res.graph_stats[row["id"]] = row["graphs"]
            print(f"  bench {row['id']:<44} {r.status:<11} torch.nn {_num(r.torch_ms)} ms, "
                  f"fused {_num(r.fused_ms)} ms, x {_num(r.ratio, 2)}")  # fmt: skip
            res.write_bench()
            return
        res.rows[kind].append(row)
        if kind == "micro":
            print(
                f"  micro {row['id']:<16} {row['status']:<11} "
                f"{_short(row.get('reason') or row.get('message') or _micro_brief(row), 100)}"
            )
            res.write_micro()
            return
        if row["status"] != "unavailable":
            res.count += 1
        err = row.get("max_rel_err")
        base = row.get("baseline_max_rel_err")
        extra = f"err {_fmt_err(err)}" + (f" (base {_fmt_err(base)})" if base is not None else "")
        count = f"{res.count:>4}" if row["status"] != "unavailable" else "   -"
        print(f"[{count}/{total}] {row['status'].upper():<11} {row['id']:<40} "
              f"{extra:<28} {_short(row.get('message', ''), 90)}")  # fmt: skip
        res.write_correctness()

    for kind, row, task in plan.pre:
        sink(kind, row, task)

    workdir = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    sup = Supervisor(args, device, common, workdir, sink)
    t_end = t_start + budget_s
    times = {}

    def phase(name: str, lanes: list[Lane]) -> None:
        lanes = [ln for ln in lanes if ln.pending]
        if not lanes:
            return
        t0 = _now()
        soft = t_start + PHASE_END[name] * budget_s
        hard = min(soft + PHASE_GRACE_S, t_end) if name != "extras" else t_end
        if sup.interrupted:
            soft = hard = t0
        workers = ", ".join(f"{ln.name}: {len(ln.pending)}" for ln in lanes)
        print(f"--- {name}: tasks per worker {workers}; starts nothing new after "
              f"{max(0.0, soft - t0):.0f} s")  # fmt: skip
        sup.run(lanes, soft, hard, name)
        times[name] = round(_now() - t0, 1)
        res.write_correctness(force=True)
        res.write_micro(force=True)
        res.write_bench(force=True)

    queues = _balance(plan.correctness + plan.paths, jobs + (path_lanes if plan.paths else 0))
    lanes = [Lane(f"c{j}", q, env) for j, q in enumerate(queues)]
    lanes += [Lane(f"w{j}", plan.warm[j::n_warm], env, optional=True)
              for j in range(n_warm)]  # fmt: skip
    phase("correctness", lanes)
    # micro, bench and the first lane of the extras: one worker, alone on the device
    chain = Lane("m", [], env)
    chain.keep = True
    chain.pending.extend(plan.micro)
    phase("micro", [chain])
    chain.name = "b"
    chain.pending.extend(plan.bench)
    phase("bench", [chain])
    bench_rows = res.write_bench(force=True)
    if bench_rows:
        print(report.format_table(bench_rows, header="full bench table (fused_rnn.bench.report)"))
    queues = _balance(plan.extras, EXTRA_LANES if device.type == "cuda" else 1)
    chain.name = "x0"
    chain.pending.extend(queues[0])
    phase("extras", [chain] + [Lane(f"x{j}", q, env) for j, q in enumerate(queues) if j])
    sup.close(chain)
    shutil.rmtree(workdir, ignore_errors=True)

    policy_note = _write_policy(out, bench_rows) if bench_rows else None
    meta["runtime_s"] = {**times, "total": round(_now() - t_start, 1)}
    meta["hangs"], meta["crashes"] = dict(sup.hangs), dict(sup.crashes)
    meta["skipped_backends"] = sup.tripped
    meta["policy"] = policy_note
    _write_json(env_path, meta)
    res.write_correctness(force=True)
    res.write_micro(force=True)

    lines, ok, incomplete = _summary(meta, res, bench_rows, sup, device, args, base_seed, out)
    lines.append(_result_line(ok, incomplete, res, bench_rows, _now() - t_start, out))
    text = "\n".join(lines)
    (out / "summary.txt").write_text(text + "\n")
    print(text)
    return 0 if ok and not incomplete else 1


def _micro_brief(row: dict) -> str:
    if row.get("stamp_median_ns") is not None:
        return (f"{row['stamp_median_ns']:.0f} ns/crossing (stamps), "
                f"{row['slope_median_ns']:.0f} (slope)")  # fmt: skip
    if row.get("host_us") is not None:
        dev = f", device {row['device_us']:.2f}" if row.get("device_us") is not None else ""
        return f"host {row['host_us']:.2f} µs/launch{dev}"
    if row.get("interpreter_ns_per_crossing") is not None:
        return f"interpreter {row['interpreter_ns_per_crossing'] / 1e3:.0f} µs/crossing"
    return ""


def _write_policy(out: Path, bench_rows) -> str:
    """policy.json from this run's bench.json (fused_rnn.bench.build_policy), or why not."""
    from . import build_policy

    try:
        doc = json.loads((out / "bench.json").read_text())
        policy = build_policy.build([("bench.json", doc)])
    except (OSError, ValueError) as e:  # PolicyError is a ValueError: not a CUDA run
        return f"not built: {_short(e, 200)}"
    (out / "policy.json").write_text(build_policy.dumps(policy))
    wins = collections.Counter(e["backend"] for e in policy["entries"].values())
    return (f"policy.json: {len(policy['entries'])} keys (winners: "
            f"{', '.join(f'{b} {n}' for b, n in sorted(wins.items())) or 'none'})")  # fmt: skip


def _summary(meta, res: _Results, bench_rows, sup, device, args, base_seed, out):
    """(the summary table's lines, nothing failed, something did not run)."""
    lines = ["", "=" * 30 + f" {PROG} summary " + "=" * 30]
    lines.append(
        f"{meta.get('device_name')} | driver {meta.get('driver_version')} | CUDA "
        f"{meta.get('cuda_version')} | cuDNN {meta.get('cudnn_version')} | torch "
        f"{meta['torch_version']} | triton {meta['triton_version']} | {meta['date_utc']} | git "
        f"{meta.get('git_commit') or meta.get('git_commit_cwd') or 'unknown'} | src "
        f"{meta.get('source_sha256_16')} | seed {base_seed}"
        + (f" | {args.label}" if args.label else "")
    )
    corr = res.rows["correctness"]
    if corr:
        lines += _corr_summary(corr, device.type)
        lines += _paths_summary(corr)
    lines += _checks_summary("paths (fp32, TF32 off):", res._ordered(res.rows["path"]))
    lines += _micro_summary(res._ordered(res.rows["micro"]))
    if bench_rows:
        lines += _bench_summary(bench_rows, device.type)
    lines += _checks_summary("extras:", res._ordered(res.rows["extra"]))
    if meta.get("policy"):
        lines.append(f"policy: {meta['policy']}")
    if sup.tripped:
        lines.append("skipped backends: " + "; ".join(sup.tripped.values()))
    if sup.interrupted:
        lines.append("INTERRUPTED: unfinished checks are 'skipped'")
    # stepwise is the baseline fused backend: on CUDA it must be there, or nothing was checked
    no_stepwise = [m for m, bs in meta["backends"].items() if bs["stepwise"] != "available"]
    if device.type == "cuda" and no_stepwise:
        lines.append(f"NO STEPWISE BACKEND on CUDA for {', '.join(no_stepwise)}: "
                     f"{meta['backends'][no_stepwise[0]]['stepwise']}")  # fmt: skip
    rows = [r for k in ("correctness", "path", "extra", "micro") for r in res.rows[k]]
    bad = [r for r in rows if r["status"] in _BAD]
    bad += [r for r in bench_rows if r.status in ("error", "mismatch")]
    skipped = [r for r in rows if r["status"] == "skipped"]
    skipped += [r for r in bench_rows if r.status == "skipped"]
    ok = not bad and not (device.type == "cuda" and no_stepwise)
    return lines, ok, bool(skipped) or sup.interrupted


def _result_line(ok: bool, incomplete: bool, res: _Results, bench_rows, seconds, out) -> str:
    def tally(rows):
        c = collections.Counter(r["status"] for r in rows)
        return f"{c.get('pass', 0)}/{len(rows)} pass" + "".join(
            f", {n} {s}" for s, n in sorted(c.items()) if s not in ("pass",)
        )

    verdict = "FAIL" if not ok else "INCOMPLETE" if incomplete else "PASS"
    bench_bad = sum(r.status in ("error", "mismatch") for r in bench_rows)
    bench_skip = sum(r.status == "skipped" for r in bench_rows)
    return (f"RESULT: {verdict}: correctness {tally(res.rows['correctness'])}; paths "
            f"{tally(res.rows['path'])}; micro {len(res.rows['micro'])} rows "
            f"({sum(r['status'] in _BAD for r in res.rows['micro'])} failed); bench "
            f"{len(bench_rows)} rows ({bench_bad} failed, {bench_skip} skipped); extras "
            f"{tally(res.rows['extra'])}; {seconds:.0f} s; files in {out}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
