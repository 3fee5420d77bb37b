"""Helpers shared by every cell's kernels (lstm.py, gru.py).

Host side: interpreter detection, the `tl.dot` precision that matches cuDNN's RNN, block sizes,
the output allocator (NaN-poisoned on request, so tests prove every element is written), and
the persistent kernels' launch: their tiling (`persistent_tiles`), the co-residency bound of a
grid, the persistent-or-stepwise decision (`choose`, `refusal`) and the cooperative launch
(`launch_persistent`).
Device side: numerically safe `_sigmoid` and `_tanh`, `_dot`, the chunked product `_mm_tile` of
the stepwise kernels (with recurrent dropout's mask on X when given), the live-step mask `_live`,
the zoneout masks (`_zoneout_keep`, `_zoneout_factor`, `_zone`), the layer norm of the
recurrence (`_ln_rec_kernel` and its helpers, `_ln_du` for the persistent backward), and for
the persistent kernels the grid barrier `_grid_barrier`, the chunked operands and products
(`_k_tiles`, `_dot_tiles`) and the gate-stacked tiles' splitting (`_split_gates`, `_diag_sum`).

Public names here are used by all cells: keep them stable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os

import torch
import triton
import triton.language as tl

__all__ = [
    "POISON",
    "is_interpreter",
    "poison_enabled",
    "poisoned",
    "new_output",
    "acc_dtype",
    "dot_precision",
    "next_pow2",
    "block_size",
    "block_b",
    "block_h",
    "block_k",
    "num_warps",
    "DeviceProps",
    "KernelResources",
    "PersistentConfig",
    "PersistentTiles",
    "device_props",
    "max_coresident",
    "refusal",
    "choose",
    "PERSISTENT_WARPS",
    "PERSISTENT_MAX_K",
    "PERSISTENT_MAX_K_BWD",
    "padded_gates",
    "k_chunks",
    "persistent_tiles",
    "forced_persistent_tiles",
    "concurrent_programs",
    "persistent_tile_choices",
    "cooperative_launch_available",
    "persistent_options",
    "launch_persistent",
    "_sigmoid",
    "_tanh",
    "_dot",
    "_mm_tile",
    "_live",
    "zoneout_threshold",
    "_zoneout_keep",
    "_zoneout_factor",
    "_zone",
    "LN_EPS",
    "_ln_rec_kernel",
    "_ln_partials",
    "_ln_stats",
    "_ln_sums",
    "_ln_stats_all",
    "_ln_sums_all",
    "_part_at",
    "_ln_gate",
    "_mm_tile_ln",
    "_ln_du",
    "_grid_barrier",
    "_k_tiles",
    "_dot_tiles",
    "_split_gates",
    "_diag_sum",
]

_log = logging.getLogger("fused_rnn.kernels")

# Module switch for NaN-filled outputs (tests); the env var FUSED_RNN_POISON=1 does the same.
POISON = False


def is_interpreter() -> bool:
    """True when Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------- outputs


def poison_enabled() -> bool:
    return POISON or os.environ.get("FUSED_RNN_POISON", "0").lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def poisoned(flag: bool = True):
    """Context manager turning the NaN poison of `new_output` on (or off) for its body."""
    global POISON
    old, POISON = POISON, flag
    try:
        yield
    finally:
        POISON = old


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised buffer a kernel must fill completely: NaN-filled when poison is on."""
    if poison_enabled() and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# --------------------------------------------------------------------------- numerics


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / cell-state dtype: fp32, except fp64 stays fp64 (interpreter tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cudnn_rnn_allows_tf32() -> bool:
    cudnn = torch.backends.cudnn
    rnn = getattr(cudnn, "rnn", None)
    prec = getattr(rnn, "fp32_precision", None) if rnn is not None else None
    if isinstance(prec, str):  # torch >= 2.9: the per-op flag cuDNN's RNN actually reads
        return prec.lower() == "tf32"
    return bool(cudnn.allow_tf32)


def dot_precision(dtype: torch.dtype) -> str:
    """`input_precision` for `tl.dot` on operands of `dtype`, following cuDNN's RNN.

    fp32 uses TF32 when torch lets cuDNN's RNN use it (`torch.backends.cudnn.allow_tf32`, or
    `torch.backends.cudnn.rnn.fp32_precision` on newer torch), otherwise exact "ieee".
    fp16/bf16/fp64 ignore the option; the interpreter always computes exactly ("ieee").
    """
    if dtype != torch.float32 or is_interpreter():
        return "ieee"
    return "tf32" if _cudnn_rnn_allows_tf32() else "ieee"


# --------------------------------------------------------------------------- block sizes


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def block_size(n: int, lo: int = 16, hi: int = 64) -> int:
    """The power of two covering `n`, clamped to [lo, hi]; `tl.dot` needs every dim >= 16."""
    return max(lo, min(hi, next_pow2(n)))


def block_b(B: int) -> int:
    """Batch tile (the MMA's N side): padded up to 16, at most 64 (128 under the interpreter)."""
    return block_size(B, 16, 128 if is_interpreter() else 64)


def block_h(H: int, n_b_tiles: int = 1) -> int:
    """Tile of hidden units (or projection rows) one program owns.

    Under the interpreter, as few programs as possible (each costs Python time). On a GPU,
    small tiles so that the per-step grid covers the SMs: the per-step work is latency bound.
    """
    if is_interpreter():
        return block_size(H, 16, 128)
    return 16 if H * n_b_tiles <= 8192 else 32


def block_k(K: int) -> int:
    """Reduction chunk of a `tl.dot` loop (over R, H, P or G*H)."""
    return block_size(K, 16, 128 if is_interpreter() else 64)


def num_warps(block_m: int, block_n: int) -> int:
    """Warps for a program holding (block_m, block_n) accumulators.

    Not fewer than 4: with 1-2 warps an LSTM forward program (4 gate tiles of W in flight)
    hit 255 registers and spilled to the stack on sm_90; 4 warps need ~180 and no stack.
    """
    return 8 if block_m * block_n >= 128 * 64 else 4


# --------------------------------------------------------------------------- persistent launch
#
# A persistent kernel's programs wait for each other at a grid barrier every step, so all of
# them must be resident at once: a program that waits for one that cannot start deadlocks.
# `persistent_tiles` cuts the work into programs (each owns a block of hidden units, all their
# gates, for every sequence of the batch, so the grid holds W_hh once); `max_coresident`
# bounds the grid from the device's per-SM limits and the compiled kernel's registers and
# shared memory; `choose` says whether the persistent kernel may run; `launch_persistent`
# launches it with a cooperative launch (the driver refuses, rather than hangs, a grid that
# does not fit) or reports that the caller must fall back to the stepwise kernels.

# Registers are allocated per warp in units of 256; every block reserves 1 KB of shared memory
# (sm_80 and later): CUDA's occupancy rules.
REG_ALLOC_UNIT = 256
SMEM_RESERVED_PER_BLOCK = 1024

# One warpgroup per program. On sm_90 a `tl.dot` whose M is a multiple of 64 compiles to wgmma
# (m64nNk16: each of the 4 warps owns 16 rows); with 8 warps Triton gives the two warpgroups
# halves of N, and each would read all of A (the weights) from shared memory every step.
# Programs whose M is 128 or more take 8 warps (`PersistentTiles.num_warps`).
PERSISTENT_WARPS = 4
# One program per SM may use the whole register file; ptxas's default budget under Triton's
# register-allocation options spilled a few bytes in some kernels (bench/NOTES.md).
PERSISTENT_MAXNREG = 255
# The reduction over K (H, or P with a projection) is cut into chunks of at most this many,
# then powers of two down to 16: no padding to a power of two (768 = 512 + 256). Every chunk is
# one `tl.dot` (one wgmma group and its wait), so few wide chunks are best; the backward's are
# narrower: its operand staged per step is 4x the forward's and passes through registers, and
# at H=768 chunks of 512 made ptxas spill; kernels with an mma.sync product use 128
# (bench/NOTES.md).
PERSISTENT_MAX_K = 512
PERSISTENT_MAX_K_BWD = 256
# wgmma's M per warpgroup: gates x units per program reach it where they can
MMA_M = 64
# Widest batch chunk (the MMA's N side; the backward's is G x this): accumulators and the
# staged operand grow with it.
PERSISTENT_MAX_BLOCK_B = 64


@dataclasses.dataclass(frozen=True)
class DeviceProps:
    """Per-SM limits that decide how many programs can be resident at once (H100 defaults)."""

    sm_count: int
    regs_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    smem_per_sm: int = 228 * 1024
    smem_per_block: int = 227 * 1024  # the opt-in maximum one block may ask for
    warp_size: int = 32


@dataclasses.dataclass(frozen=True)
class KernelResources:
    """What one program of a compiled kernel uses (CompiledKernel.n_regs, .metadata.shared...)."""

    n_regs: int
    shared: int  # bytes
    num_warps: int
    n_spills: int = 0  # bytes of local memory (register spills)


@dataclasses.dataclass(frozen=True)
class PersistentConfig:
    """One persistent launch: its number of programs and the shared memory each needs on chip
    (its weight slices plus the staged MMA operand: an estimate before compiling)."""

    programs: int
    onchip_bytes: int


def max_coresident(props: DeviceProps, res: KernelResources) -> int:
    """How many programs of a kernel using `res` can be resident on the device at once."""
    threads = res.num_warps * props.warp_size
    if threads > props.max_threads_per_sm or res.shared > props.smem_per_block:
        return 0
    regs_per_warp = -(-max(res.n_regs, 1) * props.warp_size // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = (props.regs_per_sm // regs_per_warp) // res.num_warps
    by_threads = props.max_threads_per_sm // threads
    by_smem = props.smem_per_sm // (res.shared + SMEM_RESERVED_PER_BLOCK)
    per_sm = min(by_regs, by_threads, by_smem, props.max_blocks_per_sm)
    return max(per_sm, 0) * props.sm_count


def refusal(props: DeviceProps, res: KernelResources | None, cfg: PersistentConfig) -> str | None:
    """Why the persistent kernel may not run as `cfg` on `props` (None: it may).

    It needs: the shared memory of one program fits what a block may use; the grid is at most
    one program per SM and (given the compiled kernel's `res`) all programs can be resident at
    once; the kernel does not spill (a spilled weight slice is re-read from memory every step,
    which is what persistence is meant to avoid). Without `res` (before compiling) only the
    first two are judged, on the estimate in `cfg`.
    """
    if cfg.programs < 1:
        return "empty grid"
    if cfg.onchip_bytes > props.smem_per_block:
        return (
            f"needs {cfg.onchip_bytes} B of shared memory, a block may have {props.smem_per_block}"
        )
    if cfg.programs > props.sm_count:
        return f"{cfg.programs} programs, {props.sm_count} SMs"
    if res is not None:
        if res.n_spills > 0:
            return f"spills {res.n_spills} B"
        fit = max_coresident(props, res)
        if cfg.programs > fit:
            return f"{cfg.programs} programs, {fit} can be co-resident"
    return None


def choose(props: DeviceProps, res: KernelResources | None, cfg: PersistentConfig) -> str:
    """ "persistent" when the persistent kernel can run safely as designed, else "stepwise"
    (`refusal` says why)."""
    return "stepwise" if refusal(props, res, cfg) else "persistent"


@functools.cache
def _device_props(index: int) -> DeviceProps:
    p = torch.cuda.get_device_properties(index)
    per_block = getattr(p, "shared_memory_per_block_optin", 0)
    if not per_block:
        triton_props = triton.runtime.driver.active.utils.get_device_properties(index)
        per_block = triton_props["max_shared_mem"]
    return DeviceProps(
        sm_count=p.multi_processor_count,
        regs_per_sm=getattr(p, "regs_per_multiprocessor", 65536),
        max_threads_per_sm=getattr(p, "max_threads_per_multi_processor", 2048),
        # 16 is the smallest per-SM block limit of the GPUs Triton supports (sm_75)
        max_blocks_per_sm=16,
        smem_per_sm=getattr(p, "shared_memory_per_multiprocessor", 0)
        or per_block + SMEM_RESERVED_PER_BLOCK,
        smem_per_block=per_block,
        warp_size=getattr(p, "warp_size", 32),
    )


def device_props(device) -> DeviceProps:
    """The co-residency limits of a CUDA device (cached per device)."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_props(index)


# Test hooks. Triton's interpreter runs a grid's programs one after another, so by default a
# persistent kernel runs there as ONE program: a grid barrier over several would wait forever.
# A test executor that runs each program in its own thread declares it with
# `concurrent_programs`, and asks for GPU-like tiling with `forced_persistent_tiles`
# (`persistent_tiles` honours its shares per program).
_FORCED_TILES: tuple[int, int, int | None] | None = None
_CONCURRENT_PROGRAMS = False


@contextlib.contextmanager
def forced_persistent_tiles(units: int = 16, proj_rows: int = 16, batch: int | None = 16):
    """Within the body, every persistent launch gives each program `units` hidden units (all
    gates) and `proj_rows` rows of h (with a projection), and loops over the batch `batch`
    sequences at a time (None: the whole batch in one chunk), on a GPU and under the
    interpreter alike. Powers of two; a GPU's `tl.dot` needs at least 16 on each side. A test
    hook: it decides tiling only, never what the kernels compute."""
    global _FORCED_TILES
    for n in (units, proj_rows) + ((batch,) if batch is not None else ()):
        if n < 1 or n & (n - 1):
            raise ValueError(f"tile sizes must be powers of two, got {n}")
    old, _FORCED_TILES = _FORCED_TILES, (units, proj_rows, batch)
    try:
        yield
    finally:
        _FORCED_TILES = old


@contextlib.contextmanager
def concurrent_programs():
    """Declares, for the body, that the interpreter runs a grid's programs concurrently (set
    by a test executor that gives each program a thread): `launch_persistent` then lets a grid
    barrier span several programs there."""
    global _CONCURRENT_PROGRAMS
    old, _CONCURRENT_PROGRAMS = _CONCURRENT_PROGRAMS, True
    try:
        yield
    finally:
        _CONCURRENT_PROGRAMS = old


def padded_gates(G: int) -> int:
    """Gate blocks a persistent program stacks on the MMA's M side: 4 (LSTM; the GRU's and the
    coupled LSTM's 3 plus a zero block, as tensor sizes are powers of two) or 1 (Elman RNN)."""
    return 1 if G == 1 else 4


def k_chunks(K: int, max_k: int = PERSISTENT_MAX_K) -> list[int]:
    """Sizes of the chunks a persistent kernel cuts a reduction over K into (`_k_tiles`):
    max_k as often as it fits, then the powers of two of the rest rounded up to 16."""
    k16 = -(-K // 16) * 16
    rest = k16 % max_k
    return [max_k] * (k16 // max_k) + [
        s for s in (max_k >> j for j in range(1, 8)) if s >= 16 and rest & s
    ]


@dataclasses.dataclass(frozen=True)
class PersistentTiles:
    """How a persistent launch cuts its work (kernels' constexprs BLOCK_U, BLOCK_P, BLOCK_B).

    Program i owns hidden units [i*units, (i+1)*units) (all their gates) and, with a
    projection, rows [i*rows, (i+1)*rows) of h, for every sequence: the batch is looped over
    inside, `batch` sequences (the MMA's N side) at a time. The grid holds each weight once.
    """

    units: int
    rows: int
    batch: int
    programs: int
    onchip_bytes: int  # estimate: weight slices + the largest staged MMA operand
    mma_m: int  # rows of the widest recurrent MMA (gates x units): wgmma on sm_90 from 64
    max_k: int  # widest chunk of a reduction (`k_chunks`)

    @property
    def grid(self) -> tuple[int]:
        return (self.programs,)

    @property
    def num_warps(self) -> int:
        return PERSISTENT_WARPS if self.mma_m <= MMA_M else 2 * PERSISTENT_WARPS

    def meta(self) -> dict:
        """The kernels' tile constexprs and warps (a kernel without a projection has no
        BLOCK_P: `launch_persistent` passes only what the kernel takes)."""
        return dict(BLOCK_U=self.units, BLOCK_P=self.rows, BLOCK_B=self.batch, MAX_K=self.max_k,
                    num_warps=self.num_warps)  # fmt: skip


def _tiles_at(H, B, P, G, elt, backward, units, rows, batch, max_k=None) -> PersistentTiles:
    """PersistentTiles for given block sizes, with the shared memory estimate."""
    GP = padded_gates(G)
    R = P or H
    n = max(triton.cdiv(H, units), triton.cdiv(P, rows) if P else 0)
    if not backward:
        # W_hh rows of the units' gates (GP*units, R); W_hr rows (rows, H); h^T / m^T (K, batch)
        weights = GP * units * R + (rows * H if P else 0)
        staged = max(R, H if P else 0) * batch
        acc = GP * units * batch
    else:
        # W_hh columns of the units (rows of h with P) per gate (GP*q, H), W_hr^T (units, P);
        # da of all gates (H, GP*batch); with P also dh^T (P, batch)
        q = rows if P else units
        weights = GP * q * H + (units * P if P else 0)
        staged = H * GP * batch
        acc = GP * q * GP * batch
    onchip = (weights + staged) * elt + 4 * acc + SMEM_RESERVED_PER_BLOCK
    # rows of the kernel's products: the recurrent one (gates x units, or x rows of h in the
    # backward with a projection) and the projection's (rows of h, or units)
    ms = [GP * (rows if backward and P else units)] + ([units if backward else rows] if P else [])
    # mma.sync (M < 64) unrolls a chunk's whole reduction per warp: narrow chunks keep
    # registers low (bench/NOTES.md)
    if max_k is None:
        max_k = 128 if min(ms) < MMA_M else PERSISTENT_MAX_K_BWD if backward else PERSISTENT_MAX_K
    return PersistentTiles(units, rows if P else units, batch, n, onchip, max(ms), max_k)


def persistent_tiles(H: int, B: int, *, G: int, P: int = 0, elt: int = 2, backward: bool = False,
                     props: DeviceProps | None = None, units: int | None = None,
                     batch: int | None = None) -> PersistentTiles:  # fmt: skip
    """The tiling of a persistent launch (forward, or `backward`) for G gates of H units, a
    batch of B, projection P (0: none) and `elt`-byte operands on a device with `props` (None:
    the interpreter).

    Units per program: the fewest that put 64 rows (gates x units) on the MMA's M side, so
    sm_90 runs wgmma (LSTM/GRU 16 units, RNN 64), as long as the grid stays within one program
    per SM and the weight slices plus the staged operand fit one block's shared memory; where
    no such size fits (fp32 LSTM at H=768, RNN at H=1760), the fewest units that fit (a smaller
    M: mma.sync). Batch chunk: the widest (up to 64, the batch rounded up to a power of two)
    that still fits. A size that fits nowhere is returned anyway, `choose` refuses it.
    Under the interpreter one program covers everything in one chunk (there programs run one
    after another, so a barrier only works with one). `units` and `batch` force those sizes,
    and so does `forced_persistent_tiles` (tests). The search is over a bounded list of sizes:
    it returns whatever B is.
    """
    GP = padded_gates(G)
    b_lo = 16 if not backward else max(16 // GP, 1)
    b_hi = max(b_lo, min(PERSISTENT_MAX_BLOCK_B, next_pow2(B)))
    b_sizes = [b for b in (64, 32, 16, 8, 4, 2, 1) if b_lo <= b <= b_hi]
    if _FORCED_TILES is not None and units is None and batch is None:
        f_units, f_rows, f_batch = _FORCED_TILES
        b = f_batch or max(b_lo, next_pow2(B))
        return _tiles_at(H, B, P, G, elt, backward, f_units, f_rows if P else f_units, b)
    if props is None:  # the interpreter: one program, one batch chunk
        units = units or next_pow2(H)
        batch = batch or max(b_lo, next_pow2(B))
        props = DeviceProps(sm_count=1, smem_per_block=1 << 62)
    budget, sm_count = props.smem_per_block, props.sm_count

    def rows_for(u):  # rows of h per program: never more programs than the units need
        return max(16, next_pow2(triton.cdiv(P, triton.cdiv(H, u)))) if P else u

    def fit(u):  # the widest batch chunk that fits at u units, else the narrowest
        sizes = [batch] if batch is not None else b_sizes
        tiles = [_tiles_at(H, B, P, G, elt, backward, u, rows_for(u), b) for b in sizes]
        ok = [t for t in tiles if t.onchip_bytes <= budget]
        return ok[0] if ok else tiles[-1]

    if units is not None:
        return fit(units)
    u_max = next_pow2(max(H, 16))
    # every product has M >= 16 (tl.dot); the backward's projection product has M = units
    u_min = 16 if P and backward else max(1, 16 // GP)
    cands = [fit(u) for u in (1 << i for i in range(u_max.bit_length())) if u >= u_min]
    if not cands:
        cands = [fit(u_max)]
    ok = [t for t in cands if t.programs <= sm_count and t.onchip_bytes <= budget]
    wgmma = [t for t in ok if t.mma_m >= MMA_M]
    if wgmma:
        return wgmma[0]
    if ok:
        return ok[0]
    within = [t for t in cands if t.programs <= sm_count]
    return within[0] if within else cands[-1]


def persistent_tile_choices(H: int, B: int, *, G: int, P: int = 0, elt: int = 2,
                            backward: bool = False, props: DeviceProps | None = None,
                            units: int | None = None, batch: int | None = None):  # fmt: skip
    """What `launch_persistent` tries, in order: `persistent_tiles`' choice, then the same units
    with narrower reduction chunks, then narrower batch chunks. Registers are what runs out
    (the operand staged each step passes through them): where a compiled choice spills, a
    narrower one may not; narrower K chunks only cost a wgmma wait each, narrower batch chunks
    read the weights from shared memory once more per step. Under the interpreter (props
    None) or with forced sizes: the one choice."""
    t = persistent_tiles(H, B, G=G, P=P, elt=elt, backward=backward, props=props, units=units,
                         batch=batch)  # fmt: skip
    if props is None or units is not None or batch is not None or _FORCED_TILES is not None:
        return [t]
    lo = 16 if not backward else max(16 // padded_gates(G), 1)
    out = [t]
    for b in (t.batch, t.batch // 2, lo):
        for k in (t.max_k, t.max_k // 2, 128):
            if b >= lo and 128 <= k <= t.max_k:
                c = _tiles_at(H, B, P, G, elt, backward, t.units, t.rows, b, k)
                if c not in out:
                    out.append(c)
    return out


@functools.cache
def _cuda_launch_options() -> frozenset:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return frozenset()
    return frozenset(f.name for f in dataclasses.fields(CUDAOptions))


def cooperative_launch_available() -> bool:
    """Whether the installed Triton has the `launch_cooperative_grid` launch option (>= 3.2)."""
    return "launch_cooperative_grid" in _cuda_launch_options()


# What the CUDA driver says (through Triton's launcher, a RuntimeError "Triton Error [CUDA]:
# ...") when it refuses a cooperative launch: more blocks than can be co-resident (MPS or a
# green context limiting the SMs), or cooperative launches not supported there.
_LAUNCH_REFUSALS = ("cooperative launch", "not supported", "not permitted")
_warned: set = set()


def _is_launch_refusal(e: Exception) -> bool:
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and any(r in msg for r in _LAUNCH_REFUSALS)


def _refuse(name: str, why: str, warn: bool = False) -> bool:
    """Logs why `name` runs stepwise instead of persistent; returns False (nothing launched)."""
    if warn and (name, why) not in _warned:
        _warned.add((name, why))
        _log.warning("%s: running the stepwise kernels instead: %s", name, why)
    else:
        _log.debug("%s: running the stepwise kernels instead: %s", name, why)
    return False


def persistent_options() -> dict:
    """Launch options of a persistent kernel that the installed Triton has: maxnreg (one
    program per SM may use the register file) and the cooperative launch."""
    options = _cuda_launch_options()
    out = {"maxnreg": PERSISTENT_MAXNREG, "launch_cooperative_grid": True}
    return {k: v for k, v in out.items() if k in options}


def _arg_names(kernel):
    while kernel is not None and not hasattr(kernel, "arg_names"):
        kernel = getattr(kernel, "fn", None)
    return getattr(kernel, "arg_names", None)


def launch_persistent(kernel, tiles, *, barriers: int, device, **kwargs) -> bool:
    """Launches persistent `kernel` with a fresh zeroed barrier counter `cnt`, tiled as the
    first of `tiles` (PersistentTiles, or a list of them in order of preference, from
    `persistent_tile_choices`) that compiles within the limits.

    Returns False, launching nothing, when the launch cannot be made safe: `choose` rejects
    every choice (the grid could not be co-resident, one program's shared memory does not fit
    on chip, or the compiled kernel spills), the installed Triton has no cooperative launch
    (before 3.2: without it nothing guarantees co-residency and a grid barrier could hang), or
    the driver refuses the cooperative launch (MPS or green contexts limiting the SMs). The
    caller then runs the stepwise kernels. `barriers` is the number of grid barriers the kernel
    crosses. Launch options: the tiles' warps, maxnreg, cooperative launch. Refusals are
    logged (logger "fused_rnn.kernels": DEBUG, a driver refusal WARNING once).
    """
    name = getattr(getattr(kernel, "fn", kernel), "__name__", type(kernel).__name__)
    choices = [tiles] if isinstance(tiles, PersistentTiles) else list(tiles)
    names = _arg_names(kernel)

    def args(t):
        meta = {
            k: v for k, v in t.meta().items() if names is None or k in names or k == "num_warps"
        }
        return {**kwargs, **meta}

    if is_interpreter():
        t = choices[0]
        if t.programs > 1 and barriers > 0 and not _CONCURRENT_PROGRAMS:
            raise RuntimeError(
                "the interpreter runs programs one after another: a grid barrier over "
                f"{t.programs} programs would never be reached by all of them "
                "(unless a test runs them concurrently: `concurrent_programs`)"
            )
        kernel[t.grid](cnt=torch.zeros(1, dtype=torch.int32, device=device), **args(t))
        return True
    if barriers > 0 and not cooperative_launch_available():
        return _refuse(name, "this Triton has no cooperative launch (3.2 or later has)")
    props = device_props(device)
    cnt = torch.zeros(1, dtype=torch.int32, device=device)  # monotonic: never reset, no ABA
    why = "no tiling"
    for t in choices:
        cfg = PersistentConfig(t.programs, t.onchip_bytes)
        why = refusal(props, None, cfg)
        if why:
            why = f"{t}: {why} (before compiling)"
            continue
        kw = args(t)
        kw.update({k: v for k, v in persistent_options().items() if k not in kw})
        compiled = kernel.warmup(cnt=cnt, grid=t.grid, **kw)
        try:
            compiled._init_handles()  # loads the binary: fills n_regs / n_spills
        except triton.runtime.errors.OutOfResources as e:
            why = f"{t}: {e}"
            continue
        res = KernelResources(
            n_regs=compiled.n_regs,
            shared=compiled.metadata.shared,
            num_warps=compiled.metadata.num_warps,
            n_spills=compiled.n_spills,
        )
        why = refusal(props, res, cfg)
        if why:
            why = f"{t}: {why}: {res}"
            continue
        try:
            kernel[t.grid](cnt=cnt, **kw)
        except RuntimeError as e:
            if not _is_launch_refusal(e):
                raise
            return _refuse(name, f"the driver refused the cooperative launch: {e}", warn=True)
        return True
    return _refuse(name, why)


# --------------------------------------------------------------------------- jit helpers

# Read at trace time by `_dot`; a compiled (GPU) kernel never sees the interpreter branch.
_INTERPRET = tl.constexpr(is_interpreter())


@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr):
    """`tl.dot(a, b, acc)` with `input_precision=DOT_PREC`; acc's dtype is the result's.

    The CPU interpreter (Triton 3.9) multiplies bf16 operands as their raw uint16 bits; there
    both are widened to fp32 first, which is exact and what the tensor cores compute on a GPU.
    """
    if _INTERPRET:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    # out_dtype named: Triton 3.6 asserts it equals the accumulator's (fp64 under the interpreter)
    return tl.dot(a, b, acc, input_precision=DOT_PREC, out_dtype=acc.dtype)


@triton.jit
def _mm_tile(
    b_acc,  # (BLOCK_M, BLOCK_B) ACC accumulator
    a,  # A[m, k] at a + m * stride_am + k * stride_ak
    x,  # X[b, k] at x + b * stride_xb + k (rows of a row-major (B, *) slab)
    stride_am,
    stride_ak,
    stride_xb,
    o_m,
    m_m,
    o_b,
    m_b,
    K,
    DOT_PREC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    s=None,  # S[b, k] at s + b * stride_xb + k, ACC, or None: multiplies X (recurrent dropout)
):
    """b_acc + A[o_m, :K] @ (X ⊙ S)[o_b, :K]^T, a `tl.dot` per BLOCK_K chunk of the reduction;
    X ⊙ S is formed in ACC and rounded back to X's dtype for the product; without S, X."""
    for k in range(0, K, BLOCK_K):
        o_k = k + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        b_a = tl.load(
            a + o_m[:, None] * stride_am + o_k[None, :] * stride_ak,
            mask=m_m[:, None] & m_k[None, :],
            other=0.0,
        )
        m_x = m_k[:, None] & m_b[None, :]
        o_x = o_b[None, :] * stride_xb + o_k[:, None]
        b_x = tl.load(x + o_x, mask=m_x, other=0.0)
        if s is not None:
            b_s = tl.load(s + o_x, mask=m_x, other=0.0)
            b_x = (b_x.to(b_s.dtype) * b_s).to(b_x.dtype)
        b_acc = _dot(b_a, b_x, b_acc, DOT_PREC)
    return b_acc


@triton.jit
def _sigmoid(x):
    """σ(x) without overflow: exp is only taken of -|x|, so no inf/inf for large |x|."""
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    return tl.where(x >= 0, r, e * r)


@triton.jit
def _tanh(x):
    """tanh(x) = sign(x) (1 - e) / (1 + e) with e = exp(-2|x|) in (0, 1]: no overflow."""
    e = tl.exp(-2.0 * tl.abs(x))
    r = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, r, -r)


@triton.jit
def _live(lengths, t, o_b, m_b, HAS_LEN: tl.constexpr):
    """(1, BLOCK_B) mask of the sequences for which step t is live (t < lengths[b])."""
    if HAS_LEN:
        b_len = tl.load(lengths + o_b, mask=m_b, other=0)
        return (t < b_len)[None, :]
    else:
        return m_b[None, :]


# --------------------------------------------------------------------------- zoneout
#
# The mask of zoneout (Krueger et al. 2016) at time step t, batch row b and unit j of a state of
# width W comes from Philox4x32-10 (tl.philox, Salmon et al. 2011) under the 64-bit key
# rng[0]: with e = b * W + j, counter (e >> 2, t + (rng[1] >> 32), 2 * z_stream + WHICH,
# rng[1] mod 2**32), z_stream the layer-direction index and WHICH 0 for h, 1 for c, the unit
# keeps its previous value when output word u = e mod 4 has (u >> 1) < floor(p * 2**31) (four
# consecutive elements share a counter, one word each). rng[1]'s high word is a
# step offset (0 for a whole sequence; t0 for a call over its steps t0..). (The kernels'
# argument is z_stream: Triton's launcher reserves the keyword `stream`.) fused_rnn._rng computes
# the same bits in torch ops (the torch path and the tests); tests check the two bit for bit.
# Nothing of size T x B x W is stored: backward draws the masks again.


def zoneout_threshold(p: float) -> int:
    """The int32 threshold of a keep probability p in [0, 1): floor(p * 2**31)."""
    return min(int(p * 2**31), 2**31 - 1)


@triton.jit
def _zoneout_keep(rng, t, z_stream, o_w, o_b, W, WHICH: tl.constexpr, thr):
    """(BLOCK_W, BLOCK_B) int1: units o_w of rows o_b keep their previous value at step t
    (fused_rnn._rng's generator: four elements share a Philox counter, one word each).

    rng: (2,) int64 (seed, offset; the offset's high word a step offset); thr: int32
    `zoneout_threshold`."""
    seed = tl.load(rng)
    e = o_b[None, :] * W + o_w[:, None]  # flat index: word e % 4 of counter e >> 2
    c0 = (e >> 2).to(tl.uint32)
    zero = c0 * 0
    # tl.cast: a compiled kernel may see z_stream (or t) as a specialised Python int (value 1)
    offset = tl.load(rng + 1)
    c1 = zero + (tl.cast(t, tl.uint32) + (offset >> 32).to(tl.uint32))
    c2 = zero + tl.cast(z_stream * 2 + WHICH, tl.uint32)
    c3 = zero + offset.to(tl.uint32)
    u0, u1, u2, u3 = tl.philox(seed, c0, c1, c2, c3)
    k = e & 3
    u = tl.where(k == 0, u0, tl.where(k == 1, u1, tl.where(k == 2, u2, u3)))
    return (u >> 1).to(tl.int32) < thr


@triton.jit
def _zoneout_factor(rng, t, z_stream, o_w, o_b, W, z, thr, WHICH: tl.constexpr,
                    HAS_RNG: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """(BLOCK_W, BLOCK_B) zoneout factor d in ACC: the 0/1 mask in training (HAS_RNG), else the
    probability z (the expectation, evaluation)."""
    if HAS_RNG:
        keep = _zoneout_keep(rng, t, z_stream, o_w, o_b, W, WHICH, thr)
        return tl.where(keep, 1.0, 0.0).to(ACC)
    else:
        return tl.zeros([o_w.shape[0], o_b.shape[0]], dtype=ACC) + z


@triton.jit
def _zone(b_old, b_new, rng, t, z_stream, o_w, o_b, W, z, thr, WHICH: tl.constexpr,
          HAS_RNG: tl.constexpr):  # fmt: skip
    """Zoneout of a (BLOCK_W, BLOCK_B) state: the old value where the mask keeps it, else the
    new one (training, exact); z * old + (1 - z) * new without rng (evaluation). In the dtype
    of b_new."""
    if HAS_RNG:
        keep = _zoneout_keep(rng, t, z_stream, o_w, o_b, W, WHICH, thr)
        return tl.where(keep, b_old.to(b_new.dtype), b_new)
    else:
        return (b_new + z * (b_old.to(b_new.dtype) - b_new)).to(b_new.dtype)


# --------------------------------------------------------------------------- layer norm
#
# Layer norm of the recurrent product (Ba, Kiros & Hinton 2016), u = h W_hh^T: each batch row's
# G*H values are normalised together, û = (u - mean) * rstd, then scaled by the gain γ (the bias
# folds into gx). A stepwise program owns a block of units (all G gates) of a block of rows, so
# a row's statistics need the products of every program: a reduction across programs, at every
# step. The schemes considered, with per-step costs at B=16, H=768 on an H200 (estimates from
# launch latency and bandwidth, not measurements):
#
#   (a) one program per batch tile owning all G*H rows: one launch per step, but that program
#       reads all of W_hh (4.7 MB in fp16 for the LSTM) every step from one SM's share of the
#       bandwidth (~0.1-0.2 TB/s): ~25-50 µs per step, against ~2 µs for a step spread over the
#       SMs. Only for tiny H.
#   (b) statistics from algebra on W_hh: mean(u) = h · mean_rows(W_hh) is cheap anywhere, but
#       var(u) = h M h^T / (G*H) - mean², M = W_hh^T W_hh, costs R² per row in every program
#       (R / (G * BLOCK_H) = 12 times a program's own product at H=768) and cancels in fp32.
#   (c) two phases (this): phase 1, `_ln_rec_kernel`, forms u for a block of BLOCK_N of the G*H
#       rows and stores it (B, G*H) in fp32, with that block's mean and M2 (sum of squared
#       deviations) per batch row; phase 2, the cell kernel, merges the n_blocks partials of
#       its rows (`_ln_stats`: Chan, Golub & LeVeque's pairwise update, no E[u²] - E[u]²
#       cancellation), normalises its own tile and runs the cell. Extra per step: one launch
#       (~1.5-3 µs replayed from a CUDA graph, the dominant term), u written and read back
#       (2 x B x G*H x 4 bytes = 0.4 MB, ~0.1 µs), n_blocks (~200) partial loads per row.
#
# The LSTM's output norm LN_c over the H units of c' is a second reduction across programs: a
# third forward launch per step (the cell kernel leaves c' and o and per-program partials of
# c'; `_lstm_fwd_ln_out_kernel` merges them and forms h).
#
# Backward: du = rstd (γ ⊙ dv - mean(γ ⊙ dv) - û mean(γ ⊙ dv ⊙ û)) needs two row means per
# step. The launch that forms dh_t = du_{t+1} W_hh builds du_{t+1} chunk by chunk inside its
# product (`_mm_tile_ln`) from dv_{t+1} (the gate gradients, stored anyway), û_{t+1}, rstd_{t+1}
# and the two row sums, which the launch of step t+1 left as per-program partial sums
# (`_ln_sums`): LN_hh adds no backward launch (the GRU keeps one per step; the LSTM's LN_c adds
# a second, for the same reason as in forward).
#
# The persistent kernels (one launch; programs own blocks of units for every row and meet at
# grid barriers) run (c) as phases of a step, a grid barrier before each: forward, the product
# u of the program's gate rows (into aux, its own columns) with per-row partials (`_ln_partials`,
# one (B, programs, 2) buffer); barrier; every program merges all partials of its rows
# (`_ln_stats_all`, loads ".cg": written by other programs of the same launch) and normalises its
# own tile. LN_c: the cell phase leaves c̃, o and partials of c̃; barrier; the output phase.
# Backward: the cell phase leaves da and per-program row sums of γ da, γ da û; barrier; each
# program forms du = LN_hh'(da) of its own units (`_ln_du`) into a (B, G*H) buffer; the next
# step's product reads du where it read da (the same bytes: no extra operand traffic). A
# barrier costs what the barrier costs (bench/NOTES.md models 0.5-1 µs, unmeasured), plus the
# L2 round trip of the partials read after it (~0.3 µs, estimate): per step, forward and
# backward alike, +1 barrier for LN_hh and +1 for LN_c.
#
# Memory: forward keeps û (T, B, G*H) and rstd (T, B) in fp32, and for the LSTM the mean and
# rstd of c' (T, B, 2): with the LSTM's gates that is about twice the saved activations of a
# plain layer. Keeping the raw u instead would cost the same in fp32 (in fp16 / bf16 the
# normalisation would amplify its rounding); û saves backward a subtraction and a multiply.

LN_EPS = 1e-5  # nn.LayerNorm's default
_LN_EPS = tl.constexpr(LN_EPS)  # what a jit function may read


@triton.jit(do_not_specialize=["t", "s_in"])
def _ln_rec_kernel(
    hs,  # (T+1, B, R) states in time order: reads slot s_in
    w_hh,  # (N, R) input dtype, N = G*H rows in gate-block order
    drop,  # (B, R) ACC or None: recurrent dropout's mask on h
    lnb,  # (T or 1, B, LD) ACC: u = (h ⊙ drop) W_hh^T into columns [0, N) of slot t * TS
    part,  # (n_blocks, B, 2) ACC, out: mean and M2 of each block's u, per batch row
    t,  # time index of this step
    s_in,  # hs slot of h_{t-1}
    B,
    N,
    R,
    LD,  # row stride of lnb
    TS,  # step stride of lnb: B * LD, or 0 (one slot reused: inference)
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Phase 1 of a layer-normalised step: the recurrent product of rows o_n of W_hh for batch
    rows o_b, and its partial statistics (module comment above)."""
    i_n, i_b = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    m_n, m_b = o_n < N, o_b < B
    p_h = hs + s_in.to(tl.int64) * B * R
    b_u = tl.zeros([BLOCK_N, BLOCK_B], dtype=ACC)
    # drop None (no recurrent dropout): the launch specialises it away, the product takes no mask
    b_u = _mm_tile(b_u, w_hh, p_h, R, 1, R, o_n, m_n, o_b, m_b, R, DOT_PREC, BLOCK_K, drop)
    m_nb = m_n[:, None] & m_b[None, :]
    tl.store(lnb + t.to(tl.int64) * TS + o_b[None, :] * LD + o_n[:, None], b_u, mask=m_nb)
    n_p = tl.minimum(N - i_n * BLOCK_N, BLOCK_N)
    _ln_partials(b_u, m_nb, n_p, part + (i_n * B + o_b) * 2, m_b)


@triton.jit
def _ln_partials(b_u, m_nb, n_p, p_part, m_b):
    """Stores the mean and M2 (sum of squared deviations) over the n_p valid rows (m_nb) of each
    column of b_u (N, BLOCK_B) at p_part, p_part + 1 (p_part: (BLOCK_B,) pointers into an
    (n_blocks, B, 2) buffer, or a persistent launch's (B, programs, 2), `_part_at`): one
    block's partial statistics per batch row (`_ln_stats`, `_ln_stats_all` merge them)."""
    n_p = n_p.to(b_u.dtype)
    b_mean = tl.sum(tl.where(m_nb, b_u, 0.0), axis=0) / n_p
    b_dev = tl.where(m_nb, b_u - b_mean[None, :], 0.0)
    tl.store(p_part, b_mean, mask=m_b)
    tl.store(p_part + 1, tl.sum(b_dev * b_dev, axis=0), mask=m_b)


@triton.jit
def _ln_stats(part, o_b, m_b, B, N, n_blocks, block_n, ACC: tl.constexpr):
    """(mean, rstd) (BLOCK_B,) in ACC of rows o_b over N values, from the per-block (mean, M2)
    partials of `_ln_partials` (n_blocks blocks of block_n values, the last one short)."""
    b_sum = tl.zeros([o_b.shape[0]], dtype=ACC)
    for p in range(0, n_blocks):
        n_p = tl.minimum(N - p * block_n, block_n).to(ACC)
        b_sum += n_p * tl.load(part + (p * B + o_b) * 2, mask=m_b, other=0.0)
    b_mean = b_sum / N
    b_m2 = tl.zeros([o_b.shape[0]], dtype=ACC)
    for p in range(0, n_blocks):
        n_p = tl.minimum(N - p * block_n, block_n).to(ACC)
        p_part = part + (p * B + o_b) * 2
        b_d = tl.load(p_part, mask=m_b, other=0.0) - b_mean
        b_m2 += tl.load(p_part + 1, mask=m_b, other=0.0) + n_p * b_d * b_d
    return b_mean, 1.0 / tl.sqrt(b_m2 / N + _LN_EPS)


@triton.jit
def _ln_sums(pb, o_b, m_b, B, n_parts, ACC: tl.constexpr):
    """Two (BLOCK_B,) sums over n_parts per-program partials at pb ((n_parts, B, 2))."""
    b_s1 = tl.zeros([o_b.shape[0]], dtype=ACC)
    b_s2 = tl.zeros([o_b.shape[0]], dtype=ACC)
    for p in range(0, n_parts):
        p_pb = pb + (p * B + o_b) * 2
        b_s1 += tl.load(p_pb, mask=m_b, other=0.0)
        b_s2 += tl.load(p_pb + 1, mask=m_b, other=0.0)
    return b_s1, b_s2


@triton.jit
def _part_at(part, o_b, m_b, i_p, NP: tl.constexpr):
    """(BLOCK_B,) pointers and mask of program i_p's per-row pair at part ((B, NP, 2), the layout
    `_ln_stats_all` and `_ln_sums_all` read) for rows o_b. Programs i_p >= NP (with projection
    a launch has more programs than unit blocks) own no units and store nothing. The program
    test is made per element: a scalar int1 broadcast against m_b is not a valid mask under
    the interpreter (its splat keeps int32 data)."""
    return part + (o_b * NP + i_p) * 2, m_b & (o_b * 0 + i_p < NP)


@triton.jit
def _ln_stats_all(part, o_b, m_b, N, NP: tl.constexpr, block_n, ACC: tl.constexpr):
    """`_ln_stats` of a persistent kernel, whose NP programs (a constexpr) wrote their partials
    at part ((B, NP, 2): a batch row's partials contiguous) earlier in the same launch: read
    (".cg") as one (BLOCK_B, NP) tile each, all loads issued at once (a loop would wait for
    each in turn), a thread's elements at constant offsets from one address, and merged as
    `_ln_stats` does (Chan's pairwise update, as a sum over the tile)."""
    o_p = tl.arange(0, triton.next_power_of_2(NP))
    m_p = o_p < NP
    m_bp = m_b[:, None] & m_p[None, :]
    p_part = part + (o_b[:, None] * NP + o_p[None, :]) * 2
    b_mp = tl.load(p_part, mask=m_bp, other=0.0, cache_modifier=".cg")
    b_m2 = tl.load(p_part + 1, mask=m_bp, other=0.0, cache_modifier=".cg")
    n_p = tl.where(m_p, tl.minimum(N - o_p * block_n, block_n), 0).to(ACC)[None, :]
    b_mean = tl.sum(n_p * b_mp, axis=1) / N
    b_d = b_mp - b_mean[:, None]
    b_m2 = tl.sum(b_m2 + n_p * b_d * b_d, axis=1)
    return b_mean, 1.0 / tl.sqrt(b_m2 / N + _LN_EPS)


@triton.jit
def _ln_sums_all(pb, o_b, m_b, NP: tl.constexpr, ACC: tl.constexpr):
    """`_ln_sums` of a persistent kernel: NP programs' sums at pb ((B, NP, 2)), read as
    `_ln_stats_all` reads its partials."""
    o_p = tl.arange(0, triton.next_power_of_2(NP))
    m_bp = m_b[:, None] & (o_p < NP)[None, :]
    p_pb = pb + (o_b[:, None] * NP + o_p[None, :]) * 2
    b_s1 = tl.load(p_pb, mask=m_bp, other=0.0, cache_modifier=".cg")
    b_s2 = tl.load(p_pb + 1, mask=m_bp, other=0.0, cache_modifier=".cg")
    return tl.sum(b_s1, axis=1), tl.sum(b_s2, axis=1)


@triton.jit
def _ln_gate(p_u, p_gam, m_h, m_hb, b_mean, b_rstd):
    """γ ⊙ û of one (BLOCK_H, BLOCK_B) gate tile: û = (u - mean) rstd from the raw product u at
    p_u, stored back there (backward reads û); γ (BLOCK_H,) at p_gam."""
    b_u = tl.load(p_u, mask=m_hb, other=0.0)
    b_uh = (b_u - b_mean[None, :]) * b_rstd[None, :]
    tl.store(p_u, b_uh, mask=m_hb)
    return b_uh * tl.load(p_gam, mask=m_h, other=0.0).to(b_uh.dtype)[:, None]


@triton.jit
def _mm_tile_ln(
    b_acc,  # (BLOCK_M, BLOCK_B) ACC accumulator
    a,  # A[m, k] at a + m * stride_am + k * stride_ak
    x,  # X[b, k] at x + b * stride_xb + k: the gradient of LN's output (one gate block)
    xh,  # Û[b, k] at xh + b * stride_hb + k, ACC: LN's normalised values
    gam,  # γ[k] at gam + k: the gains of that block
    stride_am,
    stride_ak,
    stride_xb,
    stride_hb,
    o_m,
    m_m,
    o_b,
    m_b,
    K,
    b_rstd,  # (BLOCK_B,) rstd of the rows
    b_s1,  # (BLOCK_B,) mean over the row of γ ⊙ X (all blocks)
    b_s2,  # (BLOCK_B,) mean over the row of γ ⊙ X ⊙ Û
    DOT_PREC: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """b_acc + A[o_m, :K] @ DU[o_b, :K]^T with DU = rstd (γ ⊙ X - s1 - Û s2), the gradient of a
    layer norm's input, formed chunk by chunk (never stored)."""
    for k in range(0, K, BLOCK_K):
        o_k = k + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        b_a = tl.load(
            a + o_m[:, None] * stride_am + o_k[None, :] * stride_ak,
            mask=m_m[:, None] & m_k[None, :],
            other=0.0,
        )
        m_x = m_k[:, None] & m_b[None, :]
        b_x = tl.load(x + o_b[None, :] * stride_xb + o_k[:, None], mask=m_x, other=0.0)
        b_xh = tl.load(xh + o_b[None, :] * stride_hb + o_k[:, None], mask=m_x, other=0.0)
        b_g = tl.load(gam + o_k, mask=m_k, other=0.0).to(b_xh.dtype)[:, None]
        b_du = b_rstd[None, :] * (b_g * b_x.to(b_xh.dtype) - b_s1[None, :] - b_xh * b_s2[None, :])
        b_du = tl.where(m_x, b_du, 0.0)
        b_acc = _dot(b_a, b_du.to(b_a.dtype), b_acc, DOT_PREC)
    return b_acc


@triton.jit
def _ln_du(du, p_dv, p_uh, gam, b_s1, b_s2, b_rstd, o_h, m_h, o_b, m_b, N, LD_V, LD_U,
           G: tl.constexpr, H, ACC: tl.constexpr):  # fmt: skip
    """du = rstd (γ ⊙ dv - s1 - û s2), the gradient of a layer norm's input, for units o_h of
    every gate block g < G (columns g H + o_h) of rows o_b, stored into du ((B, N) row-major,
    cast to its dtype): a persistent backward's operand of the next step's product, the
    stepwise `_mm_tile_ln`'s per chunk. dv (the gradient of LN's output) at p_dv + b LD_V + n,
    û (ACC) at p_uh + b LD_U + n, γ at gam + n; b_s1, b_s2 (BLOCK_B,) the row means of γ ⊙ dv
    and γ ⊙ dv ⊙ û, b_rstd (BLOCK_B,) the rows' rstd."""
    m_hb = m_h[:, None] & m_b[None, :]
    for g in tl.static_range(G):
        o_n = g * H + o_h
        b_dv = tl.load(p_dv + o_b[None, :] * LD_V + o_n[:, None], mask=m_hb, other=0.0)
        b_uh = tl.load(p_uh + o_b[None, :] * LD_U + o_n[:, None], mask=m_hb, other=0.0)
        b_g = tl.load(gam + o_n, mask=m_h, other=0.0).to(ACC)[:, None]
        b_du = b_rstd[None, :] * (b_g * b_dv.to(ACC) - b_s1[None, :] - b_uh * b_s2[None, :])
        tl.store(du + o_b[None, :] * N + o_n[:, None], b_du.to(du.dtype.element_ty), mask=m_hb)


@triton.jit
def _grid_barrier(cnt, target):
    """Waits until every program of the grid has arrived here `target / num_programs` times.

    `cnt` is a zeroed int32 counter that only grows: each arrival adds 1 (release: this
    program's earlier stores are visible to whoever acquires the count), then the program spins
    on an acquire read until the count reaches target = (barrier index) * num_programs. Scalar
    atomics run on one thread of the program, so CTA barriers before and after order the other
    threads' stores and loads around them. Data read after the barrier is loaded with
    cache_modifier=".cg" (L2, not a possibly stale L1 line).
    """
    tl.debug_barrier()
    tl.atomic_add(cnt, 1, sem="release", scope="gpu")
    while tl.atomic_add(cnt, 0, sem="acquire", scope="gpu") < target:
        pass
    tl.debug_barrier()


# The persistent kernels' products. A reduction over K (H, or P with a projection) is cut into
# chunks (`k_chunks` on the host side): MAX_K-wide ones, then the powers of two of the rest
# (rounded up to 16, the last chunk masked), so a K of 768 is 512 + 256, never padded to 1024.
# The chunks of an operand are a tuple of tiles, one `tl.dot` each: the weights' tuple is loaded
# once before the time loop (Triton keeps it in shared memory, where wgmma reads it), the other
# operand's every step, all its chunks before the first product.


@triton.jit
def _k_tile(p_n, m_n, stride_k, OFF: tl.constexpr, SIZE: tl.constexpr, K: tl.constexpr,
            K_ROWS: tl.constexpr, CACHE: tl.constexpr):  # fmt: skip
    """Chunk [OFF, OFF + SIZE) of the reduction of an operand whose line n (a row of A, or a
    column of B) starts at pointer p_n[n] with stride_k between its K elements (zero where
    n is masked off or k >= K): (SIZE, N) with K_ROWS (a B operand), else (N, SIZE)."""
    o_k = OFF + tl.arange(0, SIZE)
    if K_ROWS:
        p = p_n[None, :] + o_k[:, None] * stride_k
        if OFF + SIZE > K:
            m = (o_k < K)[:, None] & m_n[None, :]
        else:
            m = m_n[None, :]
    else:
        p = p_n[:, None] + o_k[None, :] * stride_k
        if OFF + SIZE > K:
            m = m_n[:, None] & (o_k < K)[None, :]
        else:
            m = m_n[:, None]
    return tl.load(p, mask=m, other=0.0, cache_modifier=CACHE)


@triton.jit
def _k_tiles(p_n, m_n, stride_k, K: tl.constexpr, MAX_K: tl.constexpr, K_ROWS: tl.constexpr,
             CACHE: tl.constexpr):  # fmt: skip
    """The tuple of `_k_tile` chunks covering a reduction over K (host side: `k_chunks`)."""
    KP: tl.constexpr = (K + 15) // 16 * 16
    out = ()
    for i in tl.static_range(KP // MAX_K):
        out = out + (_k_tile(p_n, m_n, stride_k, i * MAX_K, MAX_K, K, K_ROWS, CACHE),)
    for j in tl.static_range(1, 8):
        if (MAX_K >> j) >= 16 and (KP & (MAX_K >> j)) != 0:
            # after the chunks of MAX_K and of the larger powers of two: KP's higher bits
            out = out + (
                _k_tile(
                    p_n, m_n, stride_k, tl.constexpr(KP // (2 * (MAX_K >> j)) * (2 * (MAX_K >> j))),
                    tl.constexpr(MAX_K >> j), K, K_ROWS, CACHE,
                ),
            )  # fmt: skip
    return out


@triton.jit
def _dot_tiles(a, b, acc, DOT_PREC: tl.constexpr):
    """acc + A @ B over the chunk tuples a = `_k_tiles` (rows) and b = `_k_tiles` (K_ROWS)."""
    for i in tl.static_range(len(a)):
        acc = _dot(a[i], b[i], acc, DOT_PREC)
    return acc


@triton.jit
def _split_gates(acc, BLOCK_U: tl.constexpr):
    """The 4 gate tiles (BLOCK_U, N) of a (4 * BLOCK_U, N) product whose rows are interleaved
    unit-major (row 4 u + g: gate g of unit u). In wgmma's accumulator a warp holds 16
    consecutive rows, so a unit's gates sit in one warp and are gathered without shared memory."""
    N: tl.constexpr = acc.shape[1]
    # row = 4 u + 2 hi + lo: (u, n, hi, lo), then split lo, then hi
    a = tl.permute(tl.reshape(acc, (BLOCK_U, 2, 2, N)), (0, 3, 1, 2))
    a_lo0, a_lo1 = tl.split(a)
    g0, g2 = tl.split(a_lo0)
    g1, g3 = tl.split(a_lo1)
    return g0, g1, g2, g3


@triton.jit
def _diag_sum(acc, BLOCK_U: tl.constexpr, BLOCK_B: tl.constexpr):
    """Σ_g acc[4 u + g, g BLOCK_B + b] of a (4 * BLOCK_U, 4 * BLOCK_B) product: (BLOCK_U, BLOCK_B).

    With each unit's gate rows interleaved on M (row 4 u + g) and the gates' right-hand sides
    side by side on N (column g BLOCK_B + b), one product holds every gate's term at the
    matching (row gate, column gate); the rest is discarded. In wgmma's accumulator the column
    gate is within a thread and the row gate within a warp: no shared memory."""
    a = tl.reshape(acc, (BLOCK_U, 4, 4, BLOCK_B))
    o_g = tl.arange(0, 4)
    eye = o_g[:, None] == o_g[None, :]
    a = tl.sum(tl.where(eye[None, :, :, None], a, 0.0), axis=2)  # column gate: in a thread
    g0, g1, g2, g3 = _split_gates(tl.reshape(a, (4 * BLOCK_U, BLOCK_B)), BLOCK_U)
    return g0 + g1 + g2 + g3
