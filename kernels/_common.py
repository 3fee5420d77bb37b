"""Helpers shared by every cell's kernels (lstm.py, gru.py).

Host side: interpreter detection, the `tl.dot` precision that matches cuDNN's RNN, block sizes,
the output allocator (NaN-poisoned on request, so tests prove every element is written), and
the persistent kernels' launch: tiles, the co-residency bound of a grid, the persistent-or-stepwise
decision (`choose`) and the cooperative launch (`launch_persistent`).
Device side: numerically safe `_sigmoid` and `_tanh`, `_dot`, the chunked product `_mm_tile` of
the stepwise kernels (and `_mm_tile_scaled`, recurrent dropout's), the live-step mask `_live`,
the zoneout masks (`_zoneout_keep`, `_zoneout_factor`, `_zone`), and the grid barrier
`_grid_barrier` and split-K products of the persistent kernels.

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
    "device_props",
    "max_coresident",
    "choose",
    "PERSISTENT_WARPS",
    "persistent_tiles",
    "forced_persistent_tiles",
    "concurrent_programs",
    "split_k",
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
    "_mm_tile_scaled",
    "LN_EPS",
    "_ln_rec_kernel",
    "_ln_stats",
    "_ln_sums",
    "_ln_gate",
    "_mm_tile_ln",
    "_grid_barrier",
    "_load_split_a",
    "_load_split_b",
    "_dot_split",
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
# `max_coresident` bounds the grid from the device's per-SM limits and the compiled kernel's
# registers and shared memory; `choose` says whether the persistent kernel may run;
# `launch_persistent` launches it (cooperatively where Triton offers it, which makes the driver
# refuse rather than hang a grid that does not fit) or reports that the caller must fall back
# to the stepwise kernels.

# Registers are allocated per warp in units of 256; every block reserves 1 KB of shared memory
# (sm_80 and later): CUDA's occupancy rules.
REG_ALLOC_UNIT = 256
SMEM_RESERVED_PER_BLOCK = 1024

# A persistent program owns an SM (one per SM), so it may use the whole register file: 8 warps
# (one chunk of the split-K products each) at up to 255 registers (8 x 32 x 255 < 64K). Under
# ptxas's default budget some kernels stopped at 127 registers and spilled 8-16 bytes on sm_90;
# with maxnreg=255 none spilled (bench/NOTES.md).
PERSISTENT_WARPS = 8
PERSISTENT_MAXNREG = 255
# The split-K accumulators are SPLIT x BLOCK_H x BLOCK_B per gate: batch tiles of 64 spilled
# (255 registers + ~500 bytes on sm_90); 32 do not.
PERSISTENT_MAX_BLOCK_B = 32


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
    """One persistent launch: its number of programs and the weight bytes each keeps on chip."""

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


def choose(props: DeviceProps, res: KernelResources | None, cfg: PersistentConfig) -> str:
    """Returns "persistent" when the persistent kernel can run safely as designed, else "stepwise".

    Persistent needs: the weight slice of one program fits the shared memory a block may use;
    the grid is at most one program per SM and (given the compiled kernel's `res`) all programs
    can be resident at once; the kernel does not spill (a spilled weight slice is re-read from
    memory every step, which is what persistence is meant to avoid). Without `res` (before
    compiling) only the first two are judged.
    """
    if cfg.programs < 1 or cfg.onchip_bytes > props.smem_per_block:
        return "stepwise"
    if cfg.programs > props.sm_count:
        return "stepwise"
    if res is not None:
        if res.n_spills > 0 or cfg.programs > max_coresident(props, res):
            return "stepwise"
    return "persistent"


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


def split_k(block_k: int, warps: int) -> int:
    """Chunks of a persistent kernel's reduction: one per warp, each at least 16 wide."""
    return max(1, min(warps, block_k // 16))


# Test hooks. Triton's interpreter runs a grid's programs one after another, so by default a
# persistent kernel runs there as ONE program: a grid barrier over several would wait forever.
# A test executor that runs each program in its own thread declares it with
# `concurrent_programs`, and asks for GPU-like tiling with `forced_persistent_tiles`; whatever
# tiling the persistent kernels use, they honour the hook's shares per program.
_FORCED_TILES: tuple[int, int, int | None] | None = None
_CONCURRENT_PROGRAMS = False


@contextlib.contextmanager
def forced_persistent_tiles(units: int = 16, proj_rows: int = 16, batch: int | None = 16):
    """Within the body, every persistent launch gives each program `units` hidden units (all
    gates), `proj_rows` rows of h (with a projection) and `batch` sequences (None: the whole
    batch), on a GPU and under the interpreter alike. Powers of two; a GPU's `tl.dot` needs
    at least 16. A tiling that never splits the batch (W_hh held once by the grid) ignores
    `batch`. A test hook: it decides tiling only, never what the kernels compute."""
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


def persistent_tiles(H: int, B: int, P: int = 0, sm_count: int = 1):
    """(BLOCK_H, BLOCK_P, BLOCK_B, grid) of a persistent kernel.

    Programs own BLOCK_H hidden units (all gates) and, with a projection, BLOCK_P rows of h, for
    a BLOCK_B tile of the batch; grid = (unit blocks, batch tiles). Under `forced_persistent_tiles`
    the shares it names. Otherwise under the interpreter one program covers everything
    (programs run one after another there, so a barrier only works with one); on a GPU the
    smallest MMA tile (16) unless that needs more programs than SMs.
    """
    if _FORCED_TILES is not None:
        BLOCK_H, BLOCK_P, BLOCK_B = _FORCED_TILES
        BLOCK_B = BLOCK_B or block_size(B, 16, 1 << 30)
        n_u = max(triton.cdiv(H, BLOCK_H), triton.cdiv(P, BLOCK_P))
        return BLOCK_H, BLOCK_P, BLOCK_B, (n_u, triton.cdiv(B, BLOCK_B))
    if is_interpreter():
        whole = functools.partial(block_size, lo=16, hi=1 << 30)
        return whole(H), whole(P), whole(B), (1, 1)
    BLOCK_B = block_size(B, 16, PERSISTENT_MAX_BLOCK_B)
    n_b = triton.cdiv(B, BLOCK_B)
    BLOCK_H = BLOCK_P = 16
    while max(triton.cdiv(H, BLOCK_H), triton.cdiv(P, BLOCK_P)) * n_b > sm_count:
        if triton.cdiv(H, BLOCK_H) >= triton.cdiv(P, BLOCK_P):
            BLOCK_H *= 2
        else:
            BLOCK_P *= 2
    n_u = max(triton.cdiv(H, BLOCK_H), triton.cdiv(P, BLOCK_P))
    return BLOCK_H, BLOCK_P, BLOCK_B, (n_u, n_b)


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


def launch_persistent(kernel, grid, *, barriers: int, onchip_bytes: int, device, **kwargs) -> bool:
    """Launches persistent `kernel` on `grid` with a fresh zeroed barrier counter `cnt`.

    Returns False, launching nothing, when `choose` rejects the launch (the grid could not be
    co-resident, the weight slice does not fit on chip, or the kernel spills): the caller then
    runs the stepwise kernels. `barriers` is the number of grid barriers the kernel crosses.
    Launch options: PERSISTENT_WARPS warps, maxnreg and a cooperative launch where the
    installed Triton has them. Refusals are logged (logger "fused_rnn.kernels", DEBUG).
    """
    name = getattr(getattr(kernel, "fn", kernel), "__name__", type(kernel).__name__)
    programs = grid[0] * grid[1]
    kwargs.setdefault("num_warps", PERSISTENT_WARPS)
    if is_interpreter():
        if programs > 1 and barriers > 0 and not _CONCURRENT_PROGRAMS:
            raise RuntimeError(
                "the interpreter runs programs one after another: a grid barrier over "
                f"{programs} programs would never be reached by all of them "
                "(unless a test runs them concurrently: `concurrent_programs`)"
            )
        kernel[grid](cnt=torch.zeros(1, dtype=torch.int32, device=device), **kwargs)
        return True
    props = device_props(device)
    cfg = PersistentConfig(programs, onchip_bytes)
    if choose(props, None, cfg) != "persistent":
        _log.debug("%s: stepwise instead (before compiling): %s, %s", name, cfg, props)
        return False
    cnt = torch.zeros(1, dtype=torch.int32, device=device)  # monotonic: never reset, no ABA
    options = _cuda_launch_options()
    if "maxnreg" in options:
        kwargs.setdefault("maxnreg", PERSISTENT_MAXNREG)
    if "launch_cooperative_grid" in options:
        kwargs["launch_cooperative_grid"] = True
    compiled = kernel.warmup(cnt=cnt, grid=grid, **kwargs)
    try:
        compiled._init_handles()  # loads the binary: fills n_regs / n_spills
    except triton.runtime.errors.OutOfResources as e:
        _log.debug("%s: stepwise instead: %s", name, e)
        return False
    res = KernelResources(
        n_regs=compiled.n_regs,
        shared=compiled.metadata.shared,
        num_warps=compiled.metadata.num_warps,
        n_spills=compiled.n_spills,
    )
    if choose(props, res, cfg) != "persistent":
        _log.debug("%s: stepwise instead: %s, %s, %s", name, cfg, res, props)
        return False
    kernel[grid](cnt=cnt, **kwargs)
    return True


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
):
    """b_acc + A[o_m, :K] @ X[o_b, :K]^T, a `tl.dot` per BLOCK_K chunk of the reduction."""
    for k in range(0, K, BLOCK_K):
        o_k = k + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        b_a = tl.load(
            a + o_m[:, None] * stride_am + o_k[None, :] * stride_ak,
            mask=m_m[:, None] & m_k[None, :],
            other=0.0,
        )
        b_x = tl.load(
            x + o_b[None, :] * stride_xb + o_k[:, None], mask=m_k[:, None] & m_b[None, :], other=0.0
        )
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
# width W is one Philox4x32-10 draw (tl.philox, Salmon et al. 2011) under the 64-bit key
# rng[0], counter (b * W + j, t, 2 * z_stream + WHICH, rng[1] mod 2**32), z_stream the
# layer-direction index and WHICH 0 for h, 1 for c: the unit keeps its previous value when the
# first output word u has (u >> 1) < floor(p * 2**31). (The kernels' argument is z_stream:
# Triton's launcher reserves the keyword `stream`.) fused_rnn._rng computes the same bits in
# torch ops (the torch path and the tests); tests check the two bit for bit. Nothing of size
# T x B x W is stored: backward draws the masks again.


def zoneout_threshold(p: float) -> int:
    """The int32 threshold of a keep probability p in [0, 1): floor(p * 2**31)."""
    return min(int(p * 2**31), 2**31 - 1)


@triton.jit
def _zoneout_keep(rng, t, z_stream, o_w, o_b, W, WHICH: tl.constexpr, thr):
    """(BLOCK_W, BLOCK_B) int1: units o_w of rows o_b keep their previous value at step t.

    rng: (2,) int64 (seed, offset); thr: int32 `zoneout_threshold`."""
    seed = tl.load(rng)
    c0 = (o_b[None, :] * W + o_w[:, None]).to(tl.uint32)
    zero = c0 * 0
    # tl.cast: a compiled kernel may see z_stream (or t) as a specialised Python int (value 1)
    c1 = zero + tl.cast(t, tl.uint32)
    c2 = zero + tl.cast(z_stream * 2 + WHICH, tl.uint32)
    c3 = zero + tl.load(rng + 1).to(tl.uint32)
    u, _, _, _ = tl.philox(seed, c0, c1, c2, c3)
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


@triton.jit
def _mm_tile_scaled(
    b_acc,  # (BLOCK_M, BLOCK_B) ACC accumulator
    a,  # A[m, k] at a + m * stride_am + k * stride_ak
    x,  # X[b, k] at x + b * stride_xb + k (rows of a row-major (B, *) slab)
    s,  # S[b, k] at s + b * stride_xb + k, ACC: multiplies X (recurrent dropout's mask)
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
):
    """b_acc + A[o_m, :K] @ (X ⊙ S)[o_b, :K]^T: `_mm_tile` with X scaled elementwise by S (in
    ACC, rounded back to X's dtype for the product)."""
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
        b_s = tl.load(s + o_x, mask=m_x, other=0.0)
        b_x = (b_x.to(b_s.dtype) * b_s).to(b_x.dtype)
        b_acc = _dot(b_a, b_x, b_acc, DOT_PREC)
    return b_acc


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
# Memory: forward keeps û (T, B, G*H) and rstd (T, B) in fp32, and for the LSTM the mean and
# rstd of c' (T, B, 2): with the LSTM's gates that is about twice the saved activations of a
# plain layer. Keeping the raw u instead would cost the same in fp32 (in fp16 / bf16 the
# normalisation would amplify its rounding); û saves backward a subtraction and a multiply.

LN_EPS = 1e-5  # nn.LayerNorm's default
_LN_EPS = tl.constexpr(LN_EPS)  # what a jit function may read


@triton.heuristics({"HAS_DROP": lambda a: a["drop"] is not None})
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
    HAS_DROP: tl.constexpr,
):
    """Phase 1 of a layer-normalised step: the recurrent product of rows o_n of W_hh for batch
    rows o_b, and its partial statistics (module comment above)."""
    i_n, i_b = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    m_n, m_b = o_n < N, o_b < B
    p_h = hs + s_in.to(tl.int64) * B * R
    b_u = tl.zeros([BLOCK_N, BLOCK_B], dtype=ACC)
    if HAS_DROP:
        b_u = _mm_tile_scaled(b_u, w_hh, p_h, drop, R, 1, R, o_n, m_n, o_b, m_b, R, DOT_PREC,
                              BLOCK_K)  # fmt: skip
    else:
        b_u = _mm_tile(b_u, w_hh, p_h, R, 1, R, o_n, m_n, o_b, m_b, R, DOT_PREC, BLOCK_K)
    m_nb = m_n[:, None] & m_b[None, :]
    tl.store(lnb + t.to(tl.int64) * TS + o_b[None, :] * LD + o_n[:, None], b_u, mask=m_nb)
    n_p = tl.minimum(N - i_n * BLOCK_N, BLOCK_N).to(ACC)
    b_mean = tl.sum(tl.where(m_nb, b_u, 0.0), axis=0) / n_p
    b_dev = tl.where(m_nb, b_u - b_mean[None, :], 0.0)
    p_part = part + (i_n * B + o_b) * 2
    tl.store(p_part, b_mean, mask=m_b)
    tl.store(p_part + 1, tl.sum(b_dev * b_dev, axis=0), mask=m_b)


@triton.jit
def _ln_stats(part, o_b, m_b, B, N, n_blocks, block_n, ACC: tl.constexpr):
    """(mean, rstd) (BLOCK_B,) in ACC of rows o_b over N values, from the per-block (mean, M2)
    partials of `_ln_rec_kernel` (n_blocks blocks of block_n values, the last one short)."""
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


# Split-K products of the persistent kernels. Their weight slices are only 16 rows high (the
# smallest MMA tile), too few to share among warps, so with a plain (16, K) x (K, N) `tl.dot`
# every warp held all of A: ~256 registers and spills on sm_90 at K = 1024. Cut into SPLIT
# chunks as a batched (SPLIT, 16, K/SPLIT) x (SPLIT, K/SPLIT, N) dot, the warps take a chunk
# each (Triton lays the batch dimension across warps); a sum over the chunks finishes it.


@triton.jit
def _load_split_a(p, o_m, m_m, stride_m, stride_k, K, SPLIT: tl.constexpr, BLOCK_K: tl.constexpr):
    """(SPLIT, BLOCK_M, BLOCK_K // SPLIT) tile of A[m, k] = p[m * stride_m + k * stride_k] for
    rows o_m and k < K (zero elsewhere), the reduction split in SPLIT consecutive chunks."""
    CHUNK: tl.constexpr = BLOCK_K // SPLIT
    o_k = tl.arange(0, SPLIT)[:, None, None] * CHUNK + tl.arange(0, CHUNK)[None, None, :]
    return tl.load(
        p + o_m[None, :, None] * stride_m + o_k * stride_k,
        mask=m_m[None, :, None] & (o_k < K),
        other=0.0,
    )


@triton.jit
def _load_split_b(p, o_n, m_n, stride_n, K, SPLIT: tl.constexpr, BLOCK_K: tl.constexpr):
    """(SPLIT, BLOCK_K // SPLIT, BLOCK_N) tile of X^T, X[n, k] = p[n * stride_n + k], for rows
    o_n and k < K (zero elsewhere). X was written by other programs before a grid barrier: the
    load goes to L2 (".cg"), never to a stale L1 line."""
    CHUNK: tl.constexpr = BLOCK_K // SPLIT
    o_k = tl.arange(0, SPLIT)[:, None, None] * CHUNK + tl.arange(0, CHUNK)[None, :, None]
    return tl.load(
        p + o_n[None, None, :] * stride_n + o_k,
        mask=(o_k < K) & m_n[None, None, :],
        other=0.0,
        cache_modifier=".cg",
    )


@triton.jit
def _dot_split(a, b, acc, DOT_PREC: tl.constexpr):
    """acc + A @ X^T from split tiles a = `_load_split_a`, b = `_load_split_b`."""
    part = tl.zeros((a.shape[0], a.shape[1], b.shape[2]), dtype=acc.dtype)
    return acc + tl.sum(_dot(a, b, part, DOT_PREC), axis=0)
