"""Compile-time evidence for the recurrent kernels on sm_90, on a machine without a GPU.

    python -m fused_rnn.bench.kernel_report [--quick] [--suite NAME ...] [--dtype fp16,bf16,fp32]
                                            [--strategy persistent,stepwise] [--jobs N] [--json]
    python -m fused_rnn.bench.kernel_report --options [--dtype fp16,bf16] [--jobs N] [--json]

For every benchmark suite size (bench/suites.py), cell and dtype it runs the kernel launchers
(kernels/lstm.py, kernels/gru.py) on "meta" tensors, which hold shapes but no data, and catches
each kernel launch instead of running it: the persistent kernels at `launch_persistent`, the
stepwise ones at Triton's `JITFunction.run`. Each caught launch is compiled for the H100/H200
(`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`, with the launch's
constexprs, options and specialisations) and read back:

    grid      programs (persistent: one launch per sequence; stepwise: per step)
    regs      registers per thread, and stack bytes (spills), from `cuobjdump --dump-resource-usage`
    smem      shared memory per program (the compiled kernel's metadata)
    mma       wgmma (sm_90's warpgroup MMA), mma.sync, or none
    per step  bar.sync, global loads (ld.global and cp.async) and the bytes they move per
              program, counted in the PTX: persistent kernels in the body of their time loop
              (the batch-chunk loop inside counted once, the grid barrier's spin once);
              stepwise kernels in the whole kernel, a reduction loop's body once per trip
    runs      for the persistent kernels, what `_common.refusal` says of the compiled kernel on
              a 132-SM sm_90 (H100 SXM, H200): co-residency, shared memory, spills

Compiles are cached by Triton (TRITON_CACHE_DIR): the first full run takes minutes on two cores,
later ones seconds. `--quick` reports the flashrnn size in fp16 and bf16 only. `--options`
reports instead the persistent kernels with zoneout, recurrent dropout and layer norm switched
on (OPTION_VARIANTS: the same kernels, other constexprs) at the flashrnn size, in fp16 and bf16
unless --dtype says otherwise. Nothing here is a timing: these are properties of the compiled
code.
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU even where tests interpret

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Sequence  # noqa: E402

from .suites import SUITES  # noqa: E402

__all__ = ["main", "Launch", "Spec", "capture", "compile_spec", "compile_launch", "build",
           "ptx_step_counts"]  # fmt: skip

GPU_SUITES = ("fastrnns", "flashrnn", "deepbench", "small-batch", "large", "stack")
DTYPES = ("fp16", "bf16", "fp32")
STRATEGIES = ("persistent", "stepwise")
_CELL_MODE = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN_TANH"}


def _sm90():
    from fused_rnn.kernels import _common

    return _common.DeviceProps(sm_count=132)  # H100 SXM and H200: sm_90, 132 SMs


SM90 = None  # set on first use (importing _common imports triton)


@dataclasses.dataclass
class Launch:
    """One caught kernel launch, as the launcher would have run it."""

    label: str  # e.g. "lstm fwd"
    kernel: object  # the JITFunction (under heuristics)
    kwargs: dict  # every argument and launch option, by name
    grid: tuple
    persistent: bool
    onchip_bytes: int = 0  # the launcher's shared memory estimate (persistent)
    trips: int = 1  # stepwise: trips of the kernel's reduction loop(s)
    tiles: str = ""  # the tiling, in words
    alternatives: list = dataclasses.field(default_factory=list)  # persistent: next choices


def _meta(shape, dtype):
    import torch

    return torch.empty(shape, dtype=dtype, device="meta")


def capture(cell: str, T: int, B: int, H: int, P: int, dtype, strategy: str,
            variant: dict | None = None) -> list[Launch]:  # fmt: skip
    """Runs the forward and backward launchers of `cell` at this size on meta tensors, catching
    the launches of `strategy`: the persistent launch of each direction, or the second launch of
    each stepwise kernel (the first step of the backward has no recurrent product). `variant`:
    LSTM/GRU options lens, peep, coupled, and the options zoneout, dropout, ln (bools)."""
    import torch
    import triton

    from fused_rnn.kernels import _common, _launch
    from fused_rnn.kernels import gru as gru_mod
    from fused_rnn.kernels import lstm as lstm_mod

    global SM90
    SM90 = SM90 or _sm90()
    caught: list[Launch] = []
    seen: dict = {}
    persistent = strategy == "persistent"

    def fake_persistent(kernel, tiles, *, barriers, device, **kwargs):
        # every choice launch_persistent would try, in its order
        names = _common._arg_names(kernel)
        name = _jit_function(kernel).__name__
        launches = []
        for t in [tiles] if isinstance(tiles, _common.PersistentTiles) else tiles:
            kw = {**kwargs, **{k: v for k, v in t.meta().items() if k in names or k == "num_warps"}}
            kw.update({k: v for k, v in _common.persistent_options().items() if k not in kw})
            kw["cnt"] = _meta((1,), torch.int32)
            what = f"{t.units} units x {t.batch} seqs, K chunks <= {t.max_k}"
            launches.append(Launch(name, kernel, kw, t.grid, True, t.onchip_bytes, tiles=what))
        launches[0].alternatives = launches[1:]
        caught.append(launches[0])
        return True

    real_run = triton.runtime.jit.JITFunction.run

    def fake_run(self, *args, grid, warmup, **kwargs):
        if args:
            raise TypeError(f"{self.__name__}: launched with positional arguments")
        n = seen[self.__name__] = seen.get(self.__name__, 0) + 1
        if n == 2:
            g = grid(kwargs) if callable(grid) else grid
            what = " x ".join(f"{k}={kwargs[k]}" for k in ("BLOCK_H", "BLOCK_P", "BLOCK_B")
                              if k in kwargs)  # fmt: skip
            caught.append(Launch(self.__name__, self, dict(kwargs), tuple(g), False, tiles=what))

    patches = [
        (_common, "device_props", lambda device: SM90),
        (lstm_mod, "device_props", lambda device: SM90),
        (gru_mod, "device_props", lambda device: SM90),
        (lstm_mod, "launch_persistent", fake_persistent),
        (gru_mod, "launch_persistent", fake_persistent),
        (triton.runtime.jit.JITFunction, "run", fake_run),
    ]
    old = [(m, n, getattr(m, n)) for m, n, _ in patches]
    try:
        for m, n, v in patches:
            setattr(m, n, v)
        # every stepwise launch through JITFunction.run, where fake_run catches it: the lean
        # launcher (kernels/_launch.py) would ask the driver for a device this machine lacks
        with _launch.lean_launches(False):
            _run_cell(cell, T, B, H, P, dtype, persistent, variant or {})
    finally:
        for m, n, v in old:
            setattr(m, n, v)
        assert triton.runtime.jit.JITFunction.run is real_run
    for c in caught:
        for a in [c, *c.alternatives]:
            a.label = _label(a.label, cell)
        if not c.persistent:
            c.trips = _trips(c, H, P)
    caught = [c for c in caught if c.persistent == persistent]
    if not caught:
        raise RuntimeError(f"no {strategy} launch caught for {cell} T{T} B{B} H{H}")
    return caught


def _label(name: str, cell: str) -> str:
    names = {
        "_lstm_fwd_persistent_kernel": "fwd",
        "_lstm_bwd_persistent_kernel": "bwd",
        "_fwd_persistent_kernel": "fwd",
        "_bwd_persistent_kernel": "bwd",
        "_lstm_fwd_cell_kernel": "fwd cell",
        "_lstm_fwd_proj_kernel": "fwd proj",
        "_lstm_bwd_cell_kernel": "bwd cell",
        "_lstm_bwd_dh_kernel": "bwd dh",
        "_fwd_step_kernel": "fwd step",
        "_bwd_step_kernel": "bwd step",
    }
    return f"{cell} {names.get(name, name)}"


def _trips(c: Launch, H: int, P: int) -> int:
    """Trips of a stepwise kernel's reduction loop (`_mm_tile` over BLOCK_K chunks)."""
    kw = c.kwargs
    bk = kw.get("BLOCK_K", 1)
    K = {
        "lstm fwd cell": kw.get("R", H),
        "lstm fwd proj": H,
        "lstm bwd cell": kw.get("R", H) if kw.get("w_hr") is not None else kw.get("G", 4) * H,
        "lstm bwd dh": kw.get("GH", 4 * H),
    }.get(c.label, H)
    return -(-K // bk)


def _run_cell(cell, T, B, H, P, dtype, persistent, variant):
    import torch

    from fused_rnn.kernels import gru as gru_mod
    from fused_rnn.kernels import lstm as lstm_mod

    lengths = _meta((B,), torch.int64) if variant.get("lens") else None
    if cell == "lstm":
        coupled = bool(variant.get("coupled"))
        G, R = 3 if coupled else 4, P or H
        gx, w_hh = _meta((T, B, G * H), dtype), _meta((G * H, R), dtype)
        w_hr = _meta((P, H), dtype) if P else None
        w_ch = _meta(((G - 1) * H,), dtype) if variant.get("peep") else None
        y, hs, cs, gates, ms, *aux = lstm_mod.lstm_fwd(
            gx, _meta((B, R), dtype), _meta((B, H), dtype), w_hh, w_hr, w_ch, lengths, False,
            coupled, True, *_options(variant, cell, B, R, H, G, dtype), persistent=persistent,
        )  # fmt: skip
        ln = variant.get("ln")
        needs = (True,) * 4 + (bool(P), w_ch is not None) + ((True,) * 3 if ln else ())
        lstm_mod.lstm_bwd(
            _meta((T, B, R), dtype), _meta((B, R), dtype), _meta((B, H), dtype), hs, cs, gates,
            ms, w_hh, w_hr, w_ch, lengths, False, coupled, needs, aux[0] if ln else None,
            *_options(variant, cell, B, R, H, G, dtype), persistent=persistent,
        )  # fmt: skip
    else:
        c = gru_mod.CELL_GRU if cell == "gru" else gru_mod.CELL_RNN_TANH
        G = 3 if cell == "gru" else 1
        gx, w_hh = _meta((T, B, G * H), dtype), _meta((G * H, H), dtype)
        b_hn = _meta((H,), dtype) if cell == "gru" else None
        opts = _options(variant, cell, B, H, H, G, dtype)
        y, hs, ws, *aux = gru_mod.gru_fwd(
            c, gx, _meta((B, H), dtype), w_hh, b_hn, lengths, False, True, *opts,
            persistent=persistent,
        )  # fmt: skip
        ln = opts[-1] is not None if opts else False
        gru_mod.gru_bwd(
            c, _meta((T, B, H), dtype), _meta((B, H), dtype), hs, ws, w_hh, lengths, False,
            (True, True, True, cell == "gru") + ((True,) if ln else ()), aux[0] if ln else None,
            *opts, persistent=persistent,
        )  # fmt: skip


def _options(variant: dict, cell: str, B: int, R: int, H: int, G: int, dtype) -> tuple:
    """The launchers' option arguments for `variant`'s zoneout (in training: masks drawn from a
    (seed, offset) tensor), dropout (recurrent dropout's (B, R) mask) and ln (layer norm; the
    LSTM's with LN_c), in their order after `store`; () without options."""
    import torch

    if not any(variant.get(k) for k in ("zoneout", "dropout", "ln")):
        return ()
    z = 0.25 if variant.get("zoneout") else 0.0
    rng = _meta((2,), torch.int64) if z else None
    drop = _meta((B, R), torch.float32) if variant.get("dropout") else None
    ln = variant.get("ln") and cell != "rnn"
    ln_hh = _meta((G * H,), dtype) if ln else None
    if cell == "lstm":
        ln_c = (_meta((H,), dtype), _meta((H,), dtype)) if ln else (None, None)
        return (rng, z, z, 1, drop, ln_hh) + ln_c
    return (rng, z, 1, drop, ln_hh)


# --------------------------------------------------------------------------- compiling

_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "launch_cooperative_grid")
_PTR = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32", "float64": "*fp64",
        "int64": "*i64", "int32": "*i32"}  # fmt: skip


def _jit_function(kernel):
    import triton

    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


@dataclasses.dataclass
class Spec:
    """A launch reduced to what compiling it needs (picklable, for worker processes)."""

    module: str
    name: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict


def compile_spec(launch: Launch) -> Spec:
    """The signature, constexprs, attributes and options of `launch` as Triton's launcher
    specialises it: pointers 16-byte aligned, ints divisible by 16 marked so and ints equal to
    1 constant (except parameters the kernel does not specialise)."""
    import torch

    fn = _jit_function(launch.kernel)
    kw = dict(launch.kwargs)
    k = launch.kernel
    while k is not fn:  # constexprs of @triton.heuristics, as Heuristics.run fills them in
        for name, rule in getattr(k, "values", {}).items():
            kw[name] = rule(kw)
        k = k.fn
    options = {k: kw[k] for k in _LAUNCH_OPTIONS if k in kw}
    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        name = p.name
        if name not in kw:
            raise KeyError(f"{fn.__name__}: no value for {name}")
        v = kw[name]
        if p.is_constexpr or v is None or isinstance(v, (str, float)) and not isinstance(v, bool):
            consts[name] = v
            sig[name] = "constexpr"
        elif isinstance(v, torch.Tensor):
            sig[name] = _PTR[str(v.dtype).removeprefix("torch.")]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            if not p.do_not_specialize and v == 1:
                consts[name] = 1
                sig[name] = "constexpr"
                continue
            sig[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if not p.do_not_specialize and v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"{fn.__name__}: cannot compile argument {name}={v!r}")
    return Spec(fn.fn.__module__, fn.__name__, sig, consts, attrs, options)


def _bin(tool: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


@dataclasses.dataclass
class Compiled:
    regs: int
    stack: int
    smem: int
    num_warps: int
    mma: str
    bar_sync: int
    ld_global: int
    ld_bytes: int
    verdict: str


def compile_launch(launch: Launch) -> Compiled:
    """Compiles `launch` for sm_90 and reads its resources and per-step counts."""
    return _compiled(compile_spec(launch), launch.persistent, launch.trips, launch.grid,
                     launch.onchip_bytes)  # fmt: skip


def build(spec: Spec):
    """triton.compile of `spec` for sm_90: the CompiledKernel (PTX in .asm["ptx"])."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget

    fn = _jit_function(getattr(importlib.import_module(spec.module), spec.name))
    src = triton.compiler.ASTSource(
        fn=fn, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs
    )
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=spec.options)


def _compiled(spec: Spec, persistent: bool, trips: int, grid, onchip_bytes: int) -> Compiled:
    from fused_rnn.kernels import _common

    global SM90
    SM90 = SM90 or _sm90()
    ck = build(spec)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        out = subprocess.run(
            [_bin("cuobjdump"), "--dump-resource-usage", f.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    regs, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", out).groups())
    ptx = ck.asm["ptx"]
    warps = ck.metadata.num_warps
    counts = ptx_step_counts(ptx, persistent, trips)
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "none"
    verdict = "stepwise"
    if persistent:
        res = _common.KernelResources(regs, ck.metadata.shared, warps, n_spills=stack)
        cfg = _common.PersistentConfig(int(grid[0]), onchip_bytes)
        why = _common.refusal(SM90, res, cfg)
        verdict = "yes" if why is None else f"no: {why}"
    return Compiled(
        regs, stack, ck.metadata.shared, warps, mma, counts["bar.sync"], counts["ld.global"],
        counts["ld.bytes"] * warps * 32, verdict,
    )  # fmt: skip


# --------------------------------------------------------------------------- PTX loops

_BLOCK = re.compile(r"^(\$L__(BB\d+_\d+):|// %bb\.(\d+):)")
_LD_BYTES = {"b8": 1, "b16": 2, "b32": 4, "b64": 8, "u8": 1, "u16": 2, "u32": 4, "u64": 8,
             "f32": 4, "f64": 8, "s32": 4, "s64": 8}  # fmt: skip


def _blocks(ptx: str):
    """[(name, loop comment, instructions)] of the PTX's basic blocks, in order. LLVM annotates
    a block's loop membership in comments ("=>This Loop Header: Depth=1", "in Loop: Header=BB0_2
    Depth=1", "Child Loop BB0_4 Depth 2")."""
    out, cur = [], ["entry", "", []]
    lines = ptx.splitlines()
    i = 0
    while i < len(lines):
        m = _BLOCK.match(lines[i])
        if m:
            out.append(cur)
            comment = lines[i][m.end() :]
            while i + 1 < len(lines) and lines[i + 1].strip().startswith("//"):
                i += 1
                comment += " " + lines[i].strip()
            cur = [m.group(2) or f"BB0_{m.group(3)}", comment + " ", []]
        else:
            s = lines[i].strip()
            if s and not s.startswith(("//", ".", "{", "}")):
                cur[2].append(s)
        i += 1
    out.append(cur)
    return out


def _loop(blocks, header):
    """Blocks of the loop headed by `header`, nested loops included."""
    heads, grew = {header}, True
    while grew:
        grew = False
        for name, comment, _ in blocks:
            if name in heads:
                for c in re.findall(r"Child Loop (BB\d+_\d+)", comment):
                    grew |= c not in heads
                    heads.add(c)
    keys = [f"Header={h} " for h in heads] + [f"Parent Loop {h} " for h in heads]
    return [b for b in blocks if b[0] in heads or any(k in b[1] for k in keys)]


def _count(instrs) -> dict:
    n = {"bar.sync": 0, "ld.global": 0, "ld.bytes": 0}
    for s in instrs:
        op = s.split()[1] if s.startswith("@") else s.split()[0]
        if op.startswith("bar.sync") or op.startswith("barrier.sync"):
            n["bar.sync"] += 1
        elif op.startswith("ld.global") and ".acquire" not in op:
            n["ld.global"] += 1
            parts = op.split(".")
            width = int(parts[-2][1:]) if parts[-2].startswith("v") else 1
            n["ld.bytes"] += width * _LD_BYTES.get(parts[-1], 4)
        elif op.startswith("cp.async.") and ".shared.global" in op:
            # cp.async.cg.shared.global [dst], [src], size(, src_size): pipelined loads
            n["ld.global"] += 1
            n["ld.bytes"] += int(s.split(",")[2].strip().rstrip(";"), 0)
    return n


def ptx_step_counts(ptx: str, persistent: bool, trips: int = 1) -> dict:
    """bar.sync, ld.global and bytes per thread of one time step, from the PTX.

    Persistent: the instructions of the time loop (the outermost loop holding the grid
    barrier's `red.global`), each counted once. Stepwise: the whole kernel, an outermost loop's
    body counted `trips` times."""
    blocks = _blocks(ptx)
    headers = [b[0] for b in blocks if re.search(r"=>\s*This (Inner )?Loop Header: Depth=1", b[1])]
    if persistent:
        for h in headers:
            body = [s for b in _loop(blocks, h) for s in b[2]]
            if any("red.global" in s or "atom.global" in s for s in body):
                return _count(body)
        raise ValueError("no time loop (a loop with the grid barrier) in the PTX")
    total = _count(s for b in blocks for s in b[2])
    for h in headers:
        body = _count(s for b in _loop(blocks, h) for s in b[2])
        for k in total:
            total[k] += (trips - 1) * body[k]
    return total


# --------------------------------------------------------------------------- report


@dataclasses.dataclass
class Choice:
    """One tiling of a launch, reduced to what compiling and judging it needs."""

    spec: Spec | None
    grid: tuple
    onchip_bytes: int
    tiles: str
    error: str = ""


@dataclasses.dataclass
class Row:
    suite: str
    size: str
    dtype: str
    strategy: str
    label: str
    persistent: bool
    trips: int
    choices: list  # [Choice]: the launcher's order; stepwise has one
    taken: int = 0  # the choice reported: the first the launcher would launch
    result: Compiled | None = None
    error: str = ""
    passed_over: str = ""  # why earlier choices were not taken

    @property
    def choice(self) -> Choice:
        return self.choices[self.taken]


# LSTM/GRU options at the flashrnn size (full run): they must compile without spills too
VARIANTS = [
    ("lstm", dict(lens=True, peep=True, coupled=True), 0, "lengths, peepholes, coupled"),
    ("lstm", dict(), 256, "proj 256"),
    ("gru", dict(lens=True), 0, "lengths"),
]


# The options in the persistent kernels (--options), at the flashrnn size: zoneout of c and h
# (training: Philox masks), recurrent dropout, layer norm (the LSTM's LN_hh and LN_c, the GRU's
# LN_hh; the RNN has none), with lengths
_ALL = dict(lens=True, zoneout=True, dropout=True, ln=True)
OPTION_VARIANTS = [
    ("lstm", dict(zoneout=True, dropout=True), 0, "zoneout, recurrent dropout"),
    ("lstm", dict(ln=True), 0, "layer norm"),
    ("lstm", _ALL, 0, "lengths, zoneout, recurrent dropout, layer norm"),
    ("lstm", dict(_ALL, peep=True), 256, "proj 256, peepholes, all options"),
    ("gru", _ALL, 0, "lengths, zoneout, recurrent dropout, layer norm"),
    ("rnn", dict(lens=True, zoneout=True, dropout=True), 0, "lengths, zoneout, recurrent dropout"),
]


def _plan(suites, dtypes, strategies, variants: bool, options: bool = False) -> list[Row]:
    import torch

    tdt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    work, done = [], set()
    flash = SUITES["flashrnn"].shapes[0]
    for cell, variant, P, what in OPTION_VARIANTS if options else ():
        key = (cell, flash.seq_len, flash.batch, flash.hidden_size, P)
        work.append(("flashrnn", key, variant, what))
    for name in [] if options else suites:
        for shape in SUITES[name].shapes:
            key = (shape.cell, shape.seq_len, shape.batch, shape.hidden_size, shape.proj_size)
            if key not in done:
                done.add(key)
                work.append((name, key, {}, ""))
    if variants and not options:  # at the flashrnn size
        for cell, variant, P, what in VARIANTS:
            key = (cell, flash.seq_len, flash.batch, flash.hidden_size, P)
            work.append(("flashrnn", key, variant, what))
    rows = []
    for name, key, variant, what in work:
        cell, T, B, H, P = key
        size = f"T{T} B{B} H{H}" + (f", {what}" if what else "")
        for dt in dtypes:
            for strategy in strategies:
                if variant and strategy != "persistent":
                    continue
                for ln in capture(cell, T, B, H, P, tdt[dt], strategy, variant):
                    choices = []
                    for a in [ln, *ln.alternatives]:
                        try:
                            choices.append(Choice(compile_spec(a), a.grid, a.onchip_bytes, a.tiles))
                        except Exception as e:  # reported in the table, never hidden
                            choices.append(Choice(None, a.grid, a.onchip_bytes, a.tiles,
                                                  f"{type(e).__name__}: {e}"))  # fmt: skip
                    rows.append(Row(name, size, dt, strategy, ln.label, ln.persistent, ln.trips,
                                    choices))  # fmt: skip
    return rows


def _compile_row(row: Row) -> Row:
    """Compiles the row's choices in the launcher's order up to the first it would launch;
    where none would, the row reports the first."""
    notes, first = [], None
    for i, c in enumerate(row.choices):
        res, err = None, c.error
        if c.spec is not None:
            try:
                res = _compiled(c.spec, row.persistent, row.trips, c.grid, c.onchip_bytes)
            except Exception as e:  # reported in the table, never hidden
                err = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        first = first or (res, err)
        if res is not None and (not row.persistent or res.verdict == "yes"):
            row.taken, row.result, row.error, row.passed_over = i, res, "", "; ".join(notes)
            return row
        notes.append(f"{c.tiles}: {res.verdict.removeprefix('no: ') if res else err}")
    row.taken, (row.result, row.error) = 0, first
    row.passed_over = "; ".join(notes[1:]) and "every choice refused; also " + "; ".join(notes[1:])
    return row


def format_rows(rows: Sequence[Row]) -> str:
    """A markdown table of the compiled kernels, and the choices the launcher passed over."""
    head = (
        "| suite | size | kernel | dtype | tiles | grid | regs | stack (B) | smem (KB) | mma | "
        "bar.sync / step | global loads / step | KB loaded / step / program | runs |"
    )
    lines, notes = [head, "|" + "---|" * 14], []
    for r in rows:
        c = r.choice
        grid = "x".join(map(str, c.grid))
        name = f"{r.label} ({r.strategy})"
        start = f"| {r.suite} | {r.size} | {name} | {r.dtype} | {c.tiles} | {grid} |"
        if r.result is None:
            lines.append(start + " |" * 7 + f" error: {r.error} |")
            continue
        k = r.result
        runs = k.verdict + (f" (choice {r.taken + 1})" if r.taken else "")
        notes += (
            [f"- {r.suite} {r.size} {name} {r.dtype}: {r.passed_over}"] if r.passed_over else []
        )
        lines.append(
            f"{start} {k.regs} | {k.stack} | {k.smem / 1024:.0f} | {k.mma} | {k.bar_sync} | "
            f"{k.ld_global} | {k.ld_bytes / 1024:.1f} | {runs} |"
        )
    if notes:
        lines += ["", "Tilings the launcher passes over, in its order (it tries the next):", ""]
        lines += notes
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fused_rnn.bench.kernel_report",
        description="Compile the recurrent kernels for sm_90 at the benchmark sizes (no GPU "
        "needed) and report registers, spills, shared memory, MMA kind and per-step counts.",
    )
    p.add_argument("--quick", action="store_true", help="flashrnn size, fp16 and bf16 only")
    p.add_argument("--suite", action="append", choices=GPU_SUITES, help="(repeatable)")
    p.add_argument("--dtype", default=",".join(DTYPES), help="comma list of fp16,bf16,fp32")
    p.add_argument("--strategy", default=",".join(STRATEGIES), help="persistent,stepwise")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="processes")
    p.add_argument("--json", action="store_true", help="one JSON object per kernel instead")
    p.add_argument(
        "--options",
        action="store_true",
        help="the persistent kernels with zoneout, recurrent dropout and layer norm at the "
        "flashrnn size instead",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    suites = args.suite or (["flashrnn"] if args.quick else list(GPU_SUITES))
    quick_dtypes = args.quick or (args.options and args.dtype == ",".join(DTYPES))
    dtypes = ["fp16", "bf16"] if quick_dtypes else args.dtype.split(",")
    strategies = ["persistent"] if args.options else args.strategy.split(",")
    for v, allowed in ((dtypes, DTYPES), (strategies, STRATEGIES)):
        bad = [x for x in v if x not in allowed]
        if bad:
            raise SystemExit(f"unknown {bad}; choose from {allowed}")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    rows = _plan(suites, dtypes, strategies, variants="flashrnn" in suites and not args.quick,
                 options=args.options)  # fmt: skip
    print(f"compiling {len(rows)} kernels for sm_90 ...", file=sys.stderr)
    if args.jobs > 1:
        with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(_compile_row, rows))
    else:
        rows = [_compile_row(r) for r in rows]
    if args.json:
        for r in rows:
            print(json.dumps(_as_dict(r)))
    else:
        print(format_rows(rows))
    return 1 if any(r.error for r in rows) else 0


def _as_dict(r: Row) -> dict:
    out = dict(suite=r.suite, size=r.size, kernel=r.label, strategy=r.strategy, dtype=r.dtype,
               tiles=r.choice.tiles, grid=list(r.choice.grid), choice=r.taken + 1,
               passed_over=r.passed_over, error=r.error)  # fmt: skip
    if r.result is not None:
        out.update(dataclasses.asdict(r.result))
    return out


if __name__ == "__main__":
    sys.exit(main())
