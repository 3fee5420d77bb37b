"""Triton kernels of fused_rnn: one module per cell (lstm, gru, rnn), shared helpers in _common.

Imported lazily by fused_rnn.dispatch: nothing here is imported by `import fused_rnn`.
"""
