"""Triton kernels of fused_rnn and their launchers: lstm (LSTM and its variants), gru (GRU and
the Elman RNN), shared helpers in _common.

Only Triton and torch are imported here, never fused_rnn itself: imports run one way, modules ->
functional -> dispatch / ops -> kernels. The differentiable entry points and the custom
operators live in fused_rnn (recurrence.py, _ops.py). Imported lazily, when a fused backend
runs: nothing here is imported by `import fused_rnn`.
"""
