"""Schedules of a stacked network: which layer-directions run at once, and on which CUDA streams.

A network of L layers and D directions is L*D recurrences. Run one after another (the serial
schedule, `functional._stack`'s order since the start), it costs L*D full sequential passes over
T steps, each of which fills a fraction of the GPU at the sizes users run (one stepwise or
persistent layer-direction of the `stack` bench suite, B=32, H=512, uses 32 of an H200's 132
SMs). Two schedules overlap independent work instead:

    "directions"  the forward and reverse recurrences of a layer (independent of each other) run
                  at once: the forward on the caller's stream, the reverse (its input GEMM and
                  its operator call) on a side stream. L passes instead of 2L.
    "wavefront"   unidirectional stacks: the sequence is cut into chunks of K steps; layer l+1
                  runs chunk c as soon as layer l has produced it, so layers overlap like a
                  pipeline (cuDNN has overlapped layers this way since v5). Layer l runs on its
                  own stream (layer 0 on the caller's); chunk c of layer l+1 waits for an event
                  recorded after chunk c of layer l. Each chunk is one operator call, its state
                  carried from the previous chunk: autograd chains the chunks, and runs each
                  chunk's backward on the stream its forward ran on, so the backward pipelines
                  as well, in reverse.

A bidirectional stack gets no wavefront: layer l+1 at step 0 reads [forward h_0 | reverse h_0]
of layer l, and the reverse direction produces h_0 at its last step, after it has read all of
layer l's input; likewise layer l+1's reverse direction starts at step T-1, which needs the
forward direction's last step. So layer l+1 can start nothing before layer l has finished both
directions, and only the two directions of a layer overlap.

Concurrency comes from CUDA streams, not from one launch holding both directions or several
layers: the persistent kernels would need a layer-direction index in their grid and a barrier
per lane, a change to kernels that are being reworked separately. Streams need no kernel change.

The decision (`decide`) is a pure function of the device type, the backend, whether
torch.compile / torch.export is tracing, L, D and T. Serial where overlap cannot help or cannot
be expressed: off CUDA (no streams), for backend="torch" (torch's own ops or the torch loop,
whose per-step host cost dominates), while compiling (one opaque node per layer-direction in the
graph, as before; streams are not traced), while the current stream captures a CUDA graph (a
user's torch.cuda.graph around the model: the capture records the serial order, as before;
side streams and record_stream inside a capture are left unexplored), for one layer-direction,
and for sequences too short to cut into two chunks. `forced` overrides it (tests: on CPU the
stream calls are no-ops and the chunking logic runs in full).

Choice of K (a model: bench/NOTES.md "Schedules of stacked networks"). A chunk-call costs the
host a roughly fixed time h (the input GEMM, the operator's dispatch, the CUDA-graph key and
replay, events), about r = h / t_step steps of device time (`HOST_CALL_STEPS`, an estimate).
With n = T / K chunks the host issues n*L calls, ~T*L*r/K steps' worth, while the device's
critical path is the pipeline, (n + L - 1) chunks of K steps = T + (L-1)*K steps. The wall time
is at least the larger of the two; K balances them: the positive root of
(L-1) K^2 + T K - T L r = 0. K is then rounded so that the n chunks are as equal as they can be
(n = round(T / K), K = ceil(T / n): one chunk length, plus one shorter last chunk at most, so the
CUDA-graph cache gets hits), and kept >= GRAPH_MIN_STEPS so that each chunk's stepwise loop is
replayed from a graph (the last one may be shorter). Fewer than two chunks: serial.

Streams and memory (`CudaStreams`; `functional` runs every stream operation through it so that a
test double can record them, tests/test_schedules.py):
    - a stream waits (`wait` / `wait_event`) before it reads what another produced;
    - a tensor allocated on one stream and read on another is `record_stream`ed for the reader,
      so that the caching allocator does not hand its memory out while the reader still runs
      (the caller's inputs, initial states, weights, masks on the side streams; the side
      streams' outputs on the caller's stream);
    - the caller's current stream waits for every side stream before the network returns;
    - side streams are made once per device and lane (`side`), then reused.
CUDA graphs (fused_rnn._graphs) replay on the current stream, which here may be a side stream:
the graph cache handles that (a replay copies inputs, replays and clones outputs all on the
current stream), and fused_rnn._ops puts the stream in the cache key, so that the layers of a
wavefront, whose chunk calls have equal keys otherwise, each replay their own entry instead of
waiting for one another on a shared one.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import NamedTuple

import torch

from . import _ops

__all__ = ["Schedule", "decide", "forced", "chunk_steps", "streams_for", "CudaStreams"]

SERIAL, DIRECTIONS, WAVEFRONT = "serial", "directions", "wavefront"
NAMES = (SERIAL, DIRECTIONS, WAVEFRONT)

# r: the host's cost of one chunk-call in steps of the device's per-step time (estimates, not
# measurements: ~60-100 µs per call with a graph replay, of which the cache key ~30 µs
# (fused_rnn/_graphs.py) and the operator's dispatch, the input GEMM, copies and events the rest,
# against ~2-5 µs per stepwise step replayed from a graph and ~1.5-2.5 µs per persistent step;
# bench/NOTES.md). Measured wavefront rows on a GPU should replace them.
HOST_CALL_STEPS = {"stepwise": 30.0, "persistent": 60.0}


class Schedule(NamedTuple):
    name: str  # "serial", "directions" or "wavefront"
    chunk: int = 0  # K, the steps of a chunk (wavefront), else 0
    reason: str = ""

    def label(self) -> str:
        return f"{self.name} (K={self.chunk})" if self.name == WAVEFRONT else self.name


_FORCED: Schedule | None = None


@contextlib.contextmanager
def forced(name: str, chunk: int | None = None):
    """Runs every stacked network in the block on schedule `name` ("serial", "directions",
    "wavefront"), on any device and backend (on CPU the stream operations are no-ops, so the
    schedules' logic runs in full), with chunks of `chunk` steps (wavefront; None: `chunk_steps`'
    rule). Where the schedule does not apply it falls back: "wavefront" of a bidirectional stack
    to "directions", "directions" of a unidirectional one to "serial", any schedule of one
    layer-direction to "serial". torch.compile / torch.export
    tracing always runs serial."""
    global _FORCED
    if name not in NAMES:
        raise ValueError(f"unknown schedule {name!r}; known: {', '.join(NAMES)}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    old, _FORCED = _FORCED, Schedule(name, chunk or 0, "forced")
    try:
        yield
    finally:
        _FORCED = old


def chunk_steps(steps: int, layers: int, backend: str = "stepwise") -> int:
    """K for a wavefront of `layers` layers over `steps` steps (module docstring: the model),
    0 where the sequence cannot be cut into two chunks of at least GRAPH_MIN_STEPS."""
    T, L = steps, layers
    if L < 2 or T < 2:
        return 0
    r = HOST_CALL_STEPS.get(backend, HOST_CALL_STEPS["stepwise"])
    k = (-T + math.sqrt(T * T + 4.0 * (L - 1) * T * L * r)) / (2.0 * (L - 1))
    n = min(max(1, round(T / max(k, 1.0))), T // _ops.GRAPH_MIN_STEPS)
    if n < 2:
        return 0
    return -(-T // n)


def decide(device_type: str, backend: str, compiling: bool, layers: int, directions: int,
           steps: int, *, capturing: bool = False) -> Schedule:  # fmt: skip
    """The schedule of a stack of `layers` x `directions` recurrences over `steps` steps on
    concrete `backend` ("torch", "stepwise", "persistent"); `compiling`: torch.compile /
    torch.export is tracing; `capturing`: the current CUDA stream is capturing a graph (the
    user's torch.cuda.graph: serial, the capture records the order of before). Every option
    (zoneout, recurrent dropout, layer norm, inter-layer dropout, packed sequences) runs on
    every schedule."""
    if compiling:
        return Schedule(SERIAL, 0, "torch.compile / torch.export: one node per layer-direction")
    if capturing:
        return Schedule(SERIAL, 0, "the current stream is capturing a CUDA graph")
    units = layers * directions
    if _FORCED is not None:
        name, chunk = _FORCED.name, _FORCED.chunk
        if units == 1:
            return Schedule(SERIAL, 0, "forced, one layer-direction")
        if name == DIRECTIONS and directions == 1:
            return Schedule(SERIAL, 0, "forced directions: unidirectional")
        if name == WAVEFRONT and directions == 2:
            return Schedule(DIRECTIONS, 0, "forced wavefront: bidirectional, directions only")
        if name == WAVEFRONT:
            chunk = chunk or chunk_steps(steps, layers, backend) or max(1, -(-steps // 2))
            return Schedule(WAVEFRONT, min(chunk, steps), "forced")
        return Schedule(name, 0, "forced")
    if device_type != "cuda":
        return Schedule(SERIAL, 0, f"{device_type} tensors: no CUDA streams")
    if backend not in _ops.FUSED_IMPLS:
        return Schedule(SERIAL, 0, f"backend {backend!r}: the fused backends overlap")
    if units == 1:
        return Schedule(SERIAL, 0, "one layer-direction")
    if directions == 2:
        return Schedule(DIRECTIONS, 0, "the two directions of each layer on two streams")
    chunk = chunk_steps(steps, layers, backend)
    if chunk == 0:
        return Schedule(SERIAL, 0, f"T={steps}: too short for two chunks")
    return Schedule(WAVEFRONT, chunk, f"{layers} layers pipelined in chunks of {chunk} steps")


# --------------------------------------------------------------------------- streams


class NoStreams:
    """The stream operations off CUDA (and for the serial schedule): one stream, nothing to
    order. The tokens stand for streams so that the callers' code is the same on every device."""

    def current(self, device):
        return 0

    def side(self, device, lane: int):
        return lane

    def wait(self, consumer, producer) -> None:
        pass

    def event(self, stream):
        return None

    def wait_event(self, stream, event) -> None:
        pass

    def record(self, tensors: Iterable, stream) -> None:
        pass

    def use(self, stream):
        return contextlib.nullcontext()


class CudaStreams(NoStreams):
    """The stream operations on CUDA: side streams cached per (device, lane)."""

    def __init__(self):
        self._side: dict[tuple[int, int], torch.cuda.Stream] = {}

    def current(self, device):
        return torch.cuda.current_stream(device)

    def side(self, device, lane: int):
        key = (device.index, lane)
        stream = self._side.get(key)
        if stream is None:
            stream = self._side[key] = torch.cuda.Stream(device)
        return stream

    def wait(self, consumer, producer) -> None:
        """`consumer` waits for everything queued on `producer` so far (an event)."""
        if consumer != producer:
            consumer.wait_stream(producer)

    def event(self, stream):
        ev = torch.cuda.Event()
        ev.record(stream)
        return ev

    def wait_event(self, stream, event) -> None:
        stream.wait_event(event)

    def record(self, tensors: Iterable, stream) -> None:
        """The caching allocator keeps each tensor's memory until `stream`'s work queued so far
        is done, wherever the tensor is freed."""
        for t in tensors:
            if t is not None and t.is_cuda:
                t.record_stream(stream)

    def use(self, stream):
        return torch.cuda.stream(stream)


_NO_STREAMS = NoStreams()
_CUDA_STREAMS = CudaStreams()


def streams_for(device: torch.device):
    """The stream operations for tensors on `device`."""
    return _CUDA_STREAMS if device.type == "cuda" else _NO_STREAMS
