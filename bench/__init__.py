"""Benchmarks of fused_rnn against torch.nn (cuDNN on CUDA).

Run ``fused-rnn-bench`` or ``python -m fused_rnn.bench`` (``--help``, ``--list``). Importing this
package loads only the suite definitions: no torch work, no triton.
"""

from .suites import SUITES, Shape, Suite

__all__ = ["SUITES", "Shape", "Suite", "main"]


def main(argv=None) -> int:
    from .cli import main as _main

    return _main(argv)
