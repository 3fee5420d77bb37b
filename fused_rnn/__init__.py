"""fused_rnn: torch.nn's recurrent layers with the recurrence in fused Triton kernels.

`fused_rnn.LSTM`, `GRU`, `RNN`, `LSTMCell`, `GRUCell` and `RNNCell` are drop-in replacements for
their torch.nn namesakes. backend="auto" (the default) runs, per call, the
backend measured fastest for it on CUDA (torch's cuDNN op where nothing was measured; see
fused_rnn.dispatch, `explain`, `set_autotune`); on CPU it runs plain torch. Triton is imported
only when a fused backend is used.
"""

from importlib.metadata import PackageNotFoundError, version

# _ops registers the fused_rnn:: custom operators (torch only; what a loaded torch.export program
# calls); triton is imported when one of them runs
from . import _ops, _tuning, dispatch, functional, reference  # noqa: F401
from ._graphs import clear_graph_cache
from .convert import convert, revert
from .dispatch import available_backends, explain, set_autotune
from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNBase, RNNCell, RNNCellBase

# the autotuner of backend="auto" times calls through the functional layer, above dispatch
dispatch.register_workload(_tuning.workload)

try:
    __version__ = version("fused-rnn")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "LSTM",
    "GRU",
    "RNN",
    "LSTMCell",
    "GRUCell",
    "RNNCell",
    "RNNBase",
    "RNNCellBase",
    "available_backends",
    "convert",
    "revert",
    "clear_graph_cache",
    "explain",
    "set_autotune",
    "dispatch",
    "functional",
    "reference",
    "__version__",
]
