"""Named benchmark suites: the sizes each row runs at.

A suite is a list of shapes (cell and sizes) and the modes it runs them in. Sizes follow the
sources the names come from:

- ``fastrnns``: PyTorch's ``benchmarks/fastrnns`` defaults (T=100, B=64, I=H=512).
- ``flashrnn``: the FlashRNN paper's main setting (T=1024, B=16, I=H=768).
- ``deepbench``: Baidu DeepBench training shapes, one per cell (I=H).
- ``small-batch``, ``large``, ``stack``: latency-bound, throughput-bound and multi-layer
  bidirectional cases.
- ``cpu-default``: small enough to finish in about a minute on a 2-core CPU.

No torch import here: ``--list`` and the tests read suites without touching a device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

__all__ = [
    "CELLS",
    "MODES",
    "Shape",
    "Suite",
    "SUITES",
    "get_suite",
    "custom_suite",
    "default_suite_names",
]

CELLS = ("lstm", "gru", "rnn")
MODES = ("fwd", "fwdbwd")


@dataclass(frozen=True)
class Shape:
    """One cell at one size. Input is (T, B, I), sequence-first; proj_size only for LSTM."""

    cell: str
    seq_len: int
    batch: int
    input_size: int
    hidden_size: int
    num_layers: int = 1
    bidirectional: bool = False
    proj_size: int = 0

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"unknown cell {self.cell!r}; expected one of {CELLS}")
        if self.proj_size and self.cell != "lstm":
            raise ValueError("proj_size is only defined for LSTM")
        for name in ("seq_len", "batch", "input_size", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.proj_size < 0 or (self.proj_size and self.proj_size >= self.hidden_size):
            raise ValueError("proj_size must be 0 or in [1, hidden_size)")

    def label(self) -> str:
        """Compact size string for tables and plots, e.g. ``T100 B64 I512 H512 L2 bi``."""
        s = f"T{self.seq_len} B{self.batch} I{self.input_size} H{self.hidden_size}"
        if self.num_layers > 1:
            s += f" L{self.num_layers}"
        if self.bidirectional:
            s += " bi"
        if self.proj_size:
            s += f" P{self.proj_size}"
        return s

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    shapes: tuple[Shape, ...]
    modes: tuple[str, ...] = MODES

    @property
    def cells(self) -> tuple[str, ...]:
        return tuple(c for c in CELLS if any(s.cell == c for s in self.shapes))


def _all_cells(seq_len, batch, input_size, hidden_size, **kw) -> tuple[Shape, ...]:
    return tuple(Shape(c, seq_len, batch, input_size, hidden_size, **kw) for c in CELLS)


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite(
            "fastrnns",
            "PyTorch fastrnns defaults: T=100, B=64, I=H=512",
            _all_cells(100, 64, 512, 512),
        ),
        Suite(
            "flashrnn",
            "FlashRNN setting: T=1024, B=16, I=H=768",
            _all_cells(1024, 16, 768, 768),
        ),
        Suite(
            "deepbench",
            "DeepBench training shapes: LSTM T=25 B=128 H=1024; GRU T=187 B=32 H=1024; "
            "RNN T=50 B=16 H=1760 (I=H)",
            (
                Shape("lstm", 25, 128, 1024, 1024),
                Shape("gru", 187, 32, 1024, 1024),
                Shape("rnn", 50, 16, 1760, 1760),
            ),
        ),
        Suite(
            "small-batch",
            "latency bound: T=1000, B=1, I=H=256",
            _all_cells(1000, 1, 256, 256),
        ),
        Suite(
            "large",
            "throughput bound: T=100, B=256, I=H=1024",
            _all_cells(100, 256, 1024, 1024),
        ),
        Suite(
            "stack",
            "2 layers, bidirectional: T=200, B=32, I=H=512",
            _all_cells(200, 32, 512, 512, num_layers=2, bidirectional=True),
        ),
        Suite(
            "cpu-default",
            "small CPU run (about a minute on 2 cores): T=50 B=16 I=H=128 and T=100 B=32 I=H=256",
            _all_cells(50, 16, 128, 128) + _all_cells(100, 32, 256, 256),
        ),
    )
}


def get_suite(name: str) -> Suite:
    try:
        return SUITES[name]
    except KeyError:
        raise KeyError(f"unknown suite {name!r}; known: {', '.join(SUITES)}") from None


def custom_suite(
    seq_len: int | None = None,
    batch: int | None = None,
    input_size: int | None = None,
    hidden_size: int | None = None,
    num_layers: int | None = None,
    bidirectional: bool = False,
    proj_size: int | None = None,
) -> Suite:
    """The ``custom`` suite from command-line sizes; unset ones take these defaults:
    T=100, B=16, H=256, I=H, 1 layer. With a projection only the LSTM is defined."""
    base = Shape(
        "lstm",
        seq_len or 100,
        batch or 16,
        input_size or hidden_size or 256,
        hidden_size or 256,
        num_layers or 1,
        bidirectional,
        proj_size or 0,
    )
    cells = ("lstm",) if base.proj_size else CELLS
    shapes = tuple(replace(base, cell=c) for c in cells)
    return Suite("custom", f"command-line sizes: {base.label()}", shapes)


def default_suite_names(device_type: str) -> tuple[str, ...]:
    """What runs without ``--suite``: ``cpu-default`` on CPU, ``fastrnns`` and ``flashrnn`` on
    CUDA."""
    return ("cpu-default",) if device_type == "cpu" else ("fastrnns", "flashrnn")
