"""CUDA graphs for the stepwise loops: capture a launcher's time loop once per key, then replay it.

The stepwise backend launches one kernel per time step (two with proj_size), forward and
backward. Each launch costs host time (~1.3 µs even for a lean launch, much more through
Triton's generic launch path), so for long sequences of small steps the host, not the GPU, sets
the pace. `graphed(fn, args, kwargs)` runs a launcher once eagerly as a warm-up, records the
work of a second run into a `torch.cuda.CUDAGraph`, and on later calls with the same key replays
the recording: one graph launch for the whole loop.

    out = graphed(lstm.lstm_fwd, (gx, h0, c0, ...), {"persistent": False}, key_extra=(...,))

Semantics: the result equals `fn(*args, **kwargs)` run under `torch.no_grad()` (the custom
operators' implementations already run with grad mode off), except that on a replay every
returned tensor is a fresh clone (same strides, since outputs are dense; views between
outputs are not preserved). The eager path is taken, and `fn` called with the caller's own
tensors, when graphs are off (FUSED_RNN_CUDA_GRAPHS=0, `set_enabled(False)`), under the Triton
interpreter, when no argument is a CUDA tensor or tensors live on several devices, when an
argument has a type the key cannot describe (tensor subclasses such as FakeTensor, sparse or
overlapping tensors, tensors nested in containers, arbitrary objects), when the current stream
is already capturing (torch.compile(mode="reduce-overhead"), a user's own torch.cuda.graph:
their capture then records our kernels directly), while a key has been seen fewer than
FUSED_RNN_CUDA_GRAPH_CAPTURE_AFTER times, and when one entry alone would exceed the byte bound.

What the key holds, and why (a replay repeats exactly the work recorded at capture, so
everything that steers that work on the host must be in the key):
    fn                  the launcher (by identity).
    tensor arguments    (shape, stride, dtype, device index). Shapes carry every Python int the
                        launcher derives from them (T, B, H, the grid, the block sizes); strides
                        and dtype select kernel specialisations and address arithmetic.
                        Not in the key: the data pointer and storage offset (the graph always
                        reads the static copies, which are freshly allocated, so the caller's
                        alignment never reaches a kernel), requires_grad (grad mode is off).
    other arguments     by type and value: None, bool, int, float (by its exact bits), str,
                        torch.dtype, torch.device, and tuples/lists of these. The type is kept so
                        that True and 1 (equal and hash-equal in Python) stay distinct keys.
    key_extra           the caller's: state outside the arguments that changes what the launcher
                        records, e.g. the Triton dot precision chosen from torch's cuDNN TF32
                        flags and the NaN-poison switch (FUSED_RNN_POISON changes the fills).
    torch state         read here on every call (`_torch_state`): the cuBLAS TF32 and reduced-
                        precision-reduction flags (the launchers run torch GEMMs, whose math mode
                        is fixed when they are recorded), autocast on CUDA and its dtype, and
                        deterministic-algorithms mode.
Triton and torch versions are not in the key: the cache lives in one process, they cannot
change within it.

Hazards, and what a launcher passed to `graphed` must honour:
- It must be a pure function of its arguments and of the key_extra state. A host value read
  elsewhere (a module global, an environment variable, a tensor's value) is frozen at capture.
  Lengths tensors are fine: they are device tensors, copied in before each replay; Python ints
  such as T reach the key through the shapes.
- No synchronisation, `.item()`, `.tolist()`, `.cpu()`, pinned host memory or host-to-device
  copies of host data inside it: they are illegal during capture (the capture fails with an
  error, which `graphed` reports naming FUSED_RNN_CUDA_GRAPHS=0) or, for host data, would be
  frozen at capture.
- It must not write to its tensor arguments: a replay writes to the static copies, so an in-place
  update would no longer reach the caller's tensor. The backward launchers copy dh_T / dc_T into
  fresh accumulators (allocated inside the recording, in the graph's pool) before updating them
  in place, so their in-place buffers never alias an argument.
- Kernels must be compiled before capture: compiling launches nothing on the stream, but
  Triton's first call may load modules and autotune (which synchronises). The warm-up run does
  all one-time work on the capture stream: JIT compile and load, cuBLAS handle and workspace
  for that stream, the launchers' cached device properties.
- Persistent kernels: a fresh zeroed barrier counter is allocated inside the recording, so each
  replay zeroes it again (the memset is part of the graph). Recording a cooperative launch needs
  a driver that supports cooperative kernel nodes (CUDA 12); not yet checked on a device.
- Memory: the graph's allocations live in its private pool and are never returned while the
  entry lives; the static outputs are overwritten by every replay, which is why results leave as
  clones. One pool per entry: entries sharing a pool would share the memory of their
  temporaries, wrong as soon as two of them replay concurrently on two streams. Static inputs
  and the pool are freed when an entry is evicted or cleared, after a device synchronisation,
  so no replay still in flight can touch freed memory.
- Streams: a replay runs on the caller's current stream. When the next replay of the same entry
  comes from another stream, that stream first waits for the previous one (an event), because
  both write the same static buffers.
- Threads: one lock guards the cache; replays (copy in, replay, clone out) and captures happen
  under it, eager fallbacks outside it. Captures use capture_error_mode="thread_local", so
  CUDA work of other threads does not invalidate them, while an illegal call of this thread does.

Cost of a replay. Host: the key (~30 µs of Python for the LSTM forward's 11 arguments plus the
torch switches, measured on a busy CPU-only development machine: an upper bound), one fused
copy of all inputs (`torch._foreach_copy_`), the graph launch, and one clone per output (an
allocation and a copy each). Device (an estimate, not a measurement): every input and output
crosses memory once more, ~0.8 MB per step for the LSTM forward at B=16, H=768, fp16 (gx in;
y, hs, cs, gates out), ~0.2 µs per step at an H200's ~4.8 TB/s. A replay therefore pays off from
a few tens of launches on; for a handful of steps eager is cheaper, which the caller decides
(a minimum T, to be measured on a GPU).

Bounds (least recently used entries go first):
    FUSED_RNN_CUDA_GRAPHS=0                 off (default on; `set_enabled` overrides the env).
    FUSED_RNN_CUDA_GRAPH_MAX_ENTRIES        default 64. A model has few keys per (T, B):
                                            the layers of a stack share theirs (gx is
                                            (T, B, G*H) in every layer); a bidirectional stack
                                            has 4 in training (forward, backward x direction)
                                            and 2 more in evaluation (no stored gates): 64
                                            leave room for ~10 sequence-length buckets.
    FUSED_RNN_CUDA_GRAPH_MAX_BYTES          per device, default a quarter of its memory. An
                                            entry costs its static inputs plus its pool (the
                                            static outputs and the temporaries of one run):
                                            about 0.4 GB each for the forward and the backward
                                            of an LSTM at T=1024, B=16, H=768, fp16 (computed
                                            from the buffer shapes), about a layer's
                                            activations once more. Too small a bound makes
                                            keys evict each other and every call recapture:
                                            `cache_info().captures` shows it.
    FUSED_RNN_CUDA_GRAPH_CAPTURE_AFTER      default 2: a key is captured on its second call, the
                                            first runs eagerly, so one-off shapes (varying
                                            sequence lengths) never pay for a warm-up and a
                                            capture; 1 captures on the first call.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .dispatch import interpreter_enabled

__all__ = ["graphed", "clear_graph_cache", "set_enabled", "enabled", "cache_info", "CacheInfo"]

ENV_SWITCH = "FUSED_RNN_CUDA_GRAPHS"
ENV_MAX_ENTRIES = "FUSED_RNN_CUDA_GRAPH_MAX_ENTRIES"
ENV_MAX_BYTES = "FUSED_RNN_CUDA_GRAPH_MAX_BYTES"
ENV_CAPTURE_AFTER = "FUSED_RNN_CUDA_GRAPH_CAPTURE_AFTER"

DEFAULT_MAX_ENTRIES = 64
DEFAULT_MEMORY_FRACTION = 0.25
DEFAULT_CAPTURE_AFTER = 2
# keys seen but not (yet) captured that are remembered, per allowed entry
_SEEN_PER_ENTRY = 4
# a key whose single entry would exceed the byte bound: never captured
_TOO_BIG = -1

_SCALARS = (type(None), bool, int, str, torch.dtype, torch.device)


# --------------------------------------------------------------------------- switches


_ENABLED: bool | None = None  # None: follow the environment


def set_enabled(flag: bool | None) -> None:
    """Turns CUDA graphs on or off for this process; None returns to FUSED_RNN_CUDA_GRAPHS."""
    global _ENABLED
    _ENABLED = None if flag is None else bool(flag)


def enabled() -> bool:
    """Whether `graphed` may capture and replay (set_enabled, else FUSED_RNN_CUDA_GRAPHS)."""
    if _ENABLED is not None:
        return _ENABLED
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off", "")


def _env_number(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if number < 0:
        raise ValueError(f"{name} must not be negative, got {value!r}")
    return number


def _max_entries() -> int:
    return int(_env_number(ENV_MAX_ENTRIES, DEFAULT_MAX_ENTRIES))


def _capture_after() -> int:
    return max(1, int(_env_number(ENV_CAPTURE_AFTER, DEFAULT_CAPTURE_AFTER)))


def _max_bytes(device: torch.device) -> int:
    default = DEFAULT_MEMORY_FRACTION * _runtime.total_memory(device)
    return int(_env_number(ENV_MAX_BYTES, default))


# --------------------------------------------------------------------------- the CUDA side


class _CudaRuntime:
    """The CUDA operations of the cache, in one object so that tests can replace it with a
    CPU double and run the cache's own logic on CPU tensors."""

    def __init__(self):
        self._streams: dict[int, Any] = {}

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda" and not interpreter_enabled()

    def capturing(self) -> bool:
        return torch.cuda.is_current_stream_capturing()

    def current_stream(self, device: torch.device):
        return torch.cuda.current_stream(device)

    def order_after(self, stream, previous) -> None:
        """Makes `stream` wait for the work queued so far on `previous`."""
        event = torch.cuda.Event()
        event.record(previous)
        stream.wait_event(event)

    def synchronize(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)

    def total_memory(self, device: torch.device) -> int:
        return torch.cuda.get_device_properties(device).total_memory

    def _side_stream(self, device: torch.device):
        # one per device, created on first use (callers hold the cache lock)
        stream = self._streams.get(device.index)
        if stream is None:
            stream = self._streams[device.index] = torch.cuda.Stream(device)
        return stream

    def warmup(self, run: Callable[[], Any], device: torch.device):
        """Runs `run` on the side stream the capture will use; returns its outputs, safe for the
        caller's stream (it waits for the side stream; the allocator learns the new user)."""
        with torch.cuda.device(device):
            side, current = self._side_stream(device), torch.cuda.current_stream(device)
            side.wait_stream(current)  # the static inputs were written on the current stream
            with torch.cuda.stream(side):
                out = run()
            current.wait_stream(side)
            for t in _tensors_of(out):
                t.record_stream(current)
        return out

    def capture(self, run: Callable[[], Any], device: torch.device):
        """Records `run` into a new graph with a private pool: (graph, static outputs, bytes the
        pool reserved). The low-level calls instead of `torch.cuda.graph`, whose entry empties
        the allocator's cache (a cost for the rest of the program on every miss)."""
        with torch.cuda.device(device):
            side = self._side_stream(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(side):
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    before = torch.cuda.memory_reserved(device)
                    out = run()
                except BaseException:
                    try:  # ends the capture; an invalidated capture raises here too
                        graph.capture_end()
                    except Exception:
                        pass
                    raise
                graph.capture_end()
            pool = torch.cuda.memory_reserved(device) - before
            torch.cuda.current_stream(device).wait_stream(side)
        return graph, out, pool

    def replay(self, graph, device: torch.device) -> None:
        if torch.cuda.current_device() != device.index:
            with torch.cuda.device(device):
                graph.replay()
        else:
            graph.replay()


_runtime = _CudaRuntime()


# --------------------------------------------------------------------------- keys


class _Unsupported(Exception):
    """An argument the key cannot describe: the call runs eagerly."""


def _scalar_key(value):
    kind = type(value)
    if kind in _SCALARS:
        return kind, value
    if kind is float:
        return float, value.hex()  # exact bits: nan == nan here, and -0.0 != 0.0
    if kind is tuple or kind is list:
        return kind, tuple(_scalar_key(v) for v in value)
    raise _Unsupported(kind.__name__)


def _dense(t: Tensor) -> bool:
    """Whether t's elements fill its memory exactly once: a permutation of a contiguous layout.
    Overlapping tensors (expanded ones) cannot be copied into, gapped ones are not worth it."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _describe(leaves):
    """(key of the leaves, their one device, positions of the tensors); _Unsupported if any
    leaf cannot be keyed or tensors sit on several devices or none. The hot path of a replay:
    each tensor attribute read costs a few hundred ns, so each is read once."""
    parts, slots, device = [], [], None
    for i, a in enumerate(leaves):
        kind = type(a)
        if kind is Tensor or kind is torch.nn.Parameter:
            if a.layout is not torch.strided or not (a.is_contiguous() or _dense(a)):
                raise _Unsupported("a tensor that is not strided, dense and non-overlapping")
            dev = a.device
            if device is None:
                device = dev
            elif dev != device:
                raise _Unsupported("tensors on several devices")
            parts.append((a.shape, a.stride(), a.dtype))
            slots.append(i)
        elif a is None or kind is bool:
            parts.append(a)  # an int is keyed as (int, value): True and 1 stay apart
        else:
            parts.append(_scalar_key(a))
    if device is None:
        raise _Unsupported("no tensor argument")
    parts.append(device)
    return tuple(parts), device, tuple(slots)


def _state_getters():
    """Zero-argument readers of torch's switches that change the work a launcher's torch ops
    record (module docstring), picked once for the installed torch. torch._C's getters are what
    the public properties call, at a tenth of their cost; the public reads are the fallback."""
    C, mm = torch._C, torch.backends.cuda.matmul
    fp32 = getattr(C, "_get_fp32_precision_getter", None)
    if fp32 is not None:  # torch >= 2.9: also reflects the legacy allow_tf32 / matmul precision
        getters = [functools.partial(fp32, *op) for op in (("generic", "all"), ("cuda", "matmul"))]
    else:
        getters = [lambda: mm.allow_tf32]
    for public in (
        "allow_fp16_reduced_precision_reduction",
        "allow_bf16_reduced_precision_reduction",
        "allow_fp16_accumulation",
    ):
        getter = getattr(C, f"_get_cublas_{public}", None)
        if getter is None and hasattr(mm, public):
            getter = functools.partial(getattr, mm, public)
        if getter is not None:
            getters.append(getter)
    getters.append(torch.are_deterministic_algorithms_enabled)
    try:  # torch >= 2.4 takes the device type
        torch.is_autocast_enabled("cuda")
        autocast = functools.partial(torch.is_autocast_enabled, "cuda")
        autocast_dtype = functools.partial(torch.get_autocast_dtype, "cuda")
    except TypeError:
        autocast, autocast_dtype = torch.is_autocast_enabled, torch.get_autocast_gpu_dtype
    getters.append(lambda: autocast_dtype() if autocast() else None)
    return tuple(getters)


_STATE_GETTERS = _state_getters()


def _torch_state() -> tuple:
    """torch's switches that change what a launcher's torch ops record (module docstring)."""
    return tuple([g() for g in _STATE_GETTERS])


# --------------------------------------------------------------------------- outputs


def _tensors_of(out) -> list[Tensor]:
    """The tensors in an output structure (tensors, None, tuples/lists of them)."""
    if isinstance(out, Tensor):
        return [out]
    if out is None:
        return []
    if type(out) is tuple or type(out) is list:
        return [t for o in out for t in _tensors_of(o)]
    raise TypeError(
        f"fused_rnn: a function run through a CUDA graph returned a {type(out).__name__}; "
        "only tensors, None and tuples/lists of them can be replayed"
    )


def _map(out, f):
    """`out` with f applied to each of its tensors (structure as in `_tensors_of`)."""
    if isinstance(out, Tensor):
        return f(out)
    if out is None:
        return None
    return type(out)(_map(o, f) for o in out)


def _clone(t: Tensor) -> Tensor:
    return t.clone()


def _nbytes(tensors) -> int:
    storages = {}
    for t in tensors:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


# --------------------------------------------------------------------------- the cache


@dataclasses.dataclass(eq=False)
class _Entry:
    graph: Any
    device: torch.device
    slots: tuple[int, ...]  # positions of the tensor arguments among the leaves
    static_inputs: list[Tensor]
    outputs: Any  # static outputs, in fn's structure (graph memory: never handed out)
    nbytes: int
    stream: Any = None  # the stream of the last replay


class CacheInfo(NamedTuple):
    entries: int
    nbytes: int  # static inputs + pools of all entries, all devices
    hits: int
    captures: int
    evictions: int
    eager: int  # calls that ran eagerly (every reason)


_lock = threading.RLock()  # re-entrant: a function being warmed up may itself call graphed
_cache: collections.OrderedDict[Any, _Entry] = collections.OrderedDict()
_seen: collections.OrderedDict[Any, int] = collections.OrderedDict()  # key -> calls or _TOO_BIG
_stats = collections.Counter()


def cache_info() -> CacheInfo:
    with _lock:
        return CacheInfo(
            len(_cache), sum(e.nbytes for e in _cache.values()), _stats["hits"],
            _stats["captures"], _stats["evictions"], _stats["eager"],
        )  # fmt: skip


def clear_graph_cache() -> None:
    """Drops every captured CUDA graph of fused_rnn (freeing their static buffers and memory
    pools) and forgets the keys seen; the statistics of `cache_info` restart at zero."""
    with _lock:
        for device in {e.device for e in _cache.values()}:
            if not _runtime.capturing():  # synchronising is illegal during a capture
                _runtime.synchronize(device)
        _cache.clear()
        _seen.clear()
        _stats.clear()


def _evict(device: torch.device, incoming: int) -> None:
    """Drops least recently used entries until one of `incoming` bytes fits on `device` and the
    count bound leaves a free place. Synchronises a device before dropping its graphs."""
    max_entries, max_bytes = _max_entries(), _max_bytes(device)
    used = sum(e.nbytes for e in _cache.values() if e.device == device)
    victims = []
    count = len(_cache)
    for key, e in _cache.items():  # oldest first
        if count < max_entries and used + incoming <= max_bytes:
            break
        if count >= max_entries or e.device == device:
            victims.append(key)
            count -= 1
            used -= e.nbytes if e.device == device else 0
    for dev in {_cache[k].device for k in victims}:
        _runtime.synchronize(dev)  # no replay in flight may still use what is freed
    for key in victims:
        del _cache[key]
    _stats["evictions"] += len(victims)


def _remember(key, calls: int) -> None:
    _seen[key] = calls
    _seen.move_to_end(key)
    while len(_seen) > _SEEN_PER_ENTRY * max(_max_entries(), 1):
        _seen.popitem(last=False)


def _call(fn, leaves, n_args: int, names):
    return fn(*leaves[:n_args], **dict(zip(names, leaves[n_args:])))


def _replay(entry: _Entry, leaves):
    stream = _runtime.current_stream(entry.device)
    if entry.stream is not None and entry.stream != stream:
        _runtime.order_after(stream, entry.stream)  # both write the same static buffers
    entry.stream = stream
    _copy(entry.static_inputs, [leaves[i] for i in entry.slots])
    _runtime.replay(entry.graph, entry.device)
    _stats["hits"] += 1
    return _map(entry.outputs, _clone)


def _copy(dst: list[Tensor], src: list[Tensor]) -> None:
    if dst:
        torch._foreach_copy_(dst, src)


def _capture(key, fn, leaves, n_args, names, device, slots):
    """Warm-up, capture and insertion of a new entry; returns the warm-up's outputs."""
    sources = [leaves[i] for i in slots]
    static = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
              for t in sources]  # fmt: skip
    _copy(static, sources)
    static_leaves = list(leaves)
    for i, t in zip(slots, static):
        static_leaves[i] = t

    def run():
        return _call(fn, static_leaves, n_args, names)

    out = _runtime.warmup(run, device)  # errors here are fn's own: they propagate unchanged
    _tensors_of(out)  # a TypeError for outputs a replay could not reproduce
    # an output that is (a view of) a static input would change with the next replay's inputs
    inputs = {t.untyped_storage().data_ptr() for t in static}
    out = _map(out, lambda t: t.clone() if t.untyped_storage().data_ptr() in inputs else t)
    limit = _max_bytes(device)
    estimate = _nbytes(static) + _nbytes(_tensors_of(out))
    if estimate > limit:
        _remember(key, _TOO_BIG)
        _stats["eager"] += 1
        return out
    _evict(device, estimate)
    try:
        graph, static_out, pool = _runtime.capture(run, device)
    except Exception as e:
        raise RuntimeError(
            f"fused_rnn: capturing {getattr(fn, '__qualname__', fn)!r} into a CUDA graph failed "
            f"({type(e).__name__}: {e}); {ENV_SWITCH}=0 runs the launches without graphs"
        ) from e
    nbytes = _nbytes(static) + max(pool, _nbytes(_tensors_of(static_out)))
    if nbytes > limit:  # the pool came out larger than the estimate: keep nothing
        _remember(key, _TOO_BIG)
        _stats["eager"] += 1
        return out
    _evict(device, nbytes)
    _cache[key] = _Entry(graph, device, slots, static, static_out, nbytes)
    _seen.pop(key, None)
    _stats["captures"] += 1
    return out


def graphed(fn: Callable, args: tuple, kwargs: dict | None = None, *, key_extra=()):
    """`fn(*args, **kwargs)` under `torch.no_grad()`, through a cached CUDA graph where it can.

    Args:
        fn: the launcher; a pure function of its arguments and of the state in `key_extra`,
            which returns tensors, None, or tuples/lists of them (module docstring: hazards).
        args, kwargs: its arguments. Tensors: strided, dense, on one CUDA device; other values:
            None, bool, int, float, str, dtype, device, tuples/lists of these.
        key_extra: hashable state outside the arguments that changes what fn launches.

    Returns what fn returns; after a replay, fresh clones of the graph's outputs.

    Example::

        out = graphed(lstm.lstm_fwd, (gx, h0, c0, w_hh, None, None, None, False, False, True),
                      {"persistent": False}, key_extra=(dot_precision, poison))
    """
    names = tuple(sorted(kwargs)) if kwargs else ()
    leaves = (*args, *(kwargs[k] for k in names)) if names else tuple(args)
    with torch.no_grad():
        if not enabled():
            return _eager(fn, leaves, len(args), names)
        try:
            parts, device, slots = _describe(leaves)
        except _Unsupported:
            return _eager(fn, leaves, len(args), names)
        if not _runtime.supports(device) or _runtime.capturing():
            return _eager(fn, leaves, len(args), names)
        key = (fn, names, parts, key_extra, _torch_state())
        with _lock:
            entry = _cache.get(key)
            if entry is not None:
                _cache.move_to_end(key)
                return _replay(entry, leaves)
            calls = _seen.get(key, 0)
            if calls != _TOO_BIG and _max_entries() == 0:
                calls = _TOO_BIG  # a cache of no entries: every call runs eagerly
            elif calls != _TOO_BIG and calls + 1 >= _capture_after():
                return _capture(key, fn, leaves, len(args), names, device, slots)
            if calls != _TOO_BIG:
                _remember(key, calls + 1)
        return _eager(fn, leaves, len(args), names)


def _eager(fn, leaves, n_args, names):
    with _lock:
        _stats["eager"] += 1
    return _call(fn, leaves, n_args, names)
