"""The autotuner's workload: one call of the tuned network on synthetic tensors.

fused_rnn.dispatch times `workload(problem, backend, device)()` for each candidate backend when
autotuning a key. The call goes through the public functional API (fused_rnn.functional) with
the backend named explicitly, so what is timed is what a module runs: the input GEMMs, the
recurrence of every layer and direction, and with `problem.grad` the backward to the input and
every weight. Tensors have the call's sizes and dtype, weights torch.nn's init range; they are
drawn from a private generator (the caller's random state is left alone). Dropout is left out:
it is the same torch op on every backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from . import functional
from .dispatch import Problem

__all__ = ["workload"]

_TORCH_DTYPES = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "tf32": torch.float32,  # the TF32 flags in force when the call was made stay in force
    "fp64": torch.float64,
}


def workload(p: Problem, backend: str, device: torch.device) -> Callable[[], object]:
    """A callable that runs one call of `p` on `backend` (forward, and backward if p.grad)."""
    device = torch.device(device)
    dtype = _TORCH_DTYPES[p.dtype]
    gen = torch.Generator().manual_seed(0)
    k = 1 / math.sqrt(p.hidden)
    params: list[torch.Tensor] = []

    def tensor(*shape, scale=k, param=True):
        t = (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * scale
        t = t.to(device=device, dtype=dtype).requires_grad_(p.grad)
        if param:
            params.append(t)
        return t

    G = functional.gate_count(p.mode, p.coupled)
    H, P = p.hidden, p.proj
    R = P or H
    nonlinearity = {"RNN_TANH": "tanh", "RNN_RELU": "relu"}.get(p.mode)
    if p.cell:
        x = tensor(p.batch, p.input_size, scale=1.0, param=False)
        h = tensor(p.batch, H, scale=1.0, param=False).detach()
        ws = [tensor(G * H, p.input_size), tensor(G * H, H), tensor(G * H), tensor(G * H)]
        if p.mode == "LSTM":
            c = h.clone()
            w_ch = tensor((G - 1) * H) if p.peephole else None
            kw = dict(w_ch=w_ch, coupled_gates=p.coupled, backend=backend)
            call = lambda: functional.lstm_cell(x, (h, c), *ws, **kw)
        elif p.mode == "GRU":
            call = lambda: functional.gru_cell(x, h, *ws, backend=backend)
        else:
            call = lambda: functional.rnn_cell(x, h, *ws, nonlinearity=nonlinearity,
                                               backend=backend)  # fmt: skip
    else:
        D = 2 if p.bidirectional else 1
        x = tensor(p.steps, p.batch, p.input_size, scale=1.0, param=False)
        weights = []
        for layer in range(p.layers):
            for _ in range(D):
                ws = [tensor(G * H, p.input_size if layer == 0 else R * D), tensor(G * H, R)]
                ws += [tensor(G * H), tensor(G * H)]
                if P:
                    ws.append(tensor(P, H))
                if p.peephole:
                    ws.append(tensor((G - 1) * H))
                weights.append(ws)
        kw = dict(num_layers=p.layers, bidirectional=p.bidirectional, backend=backend)
        if p.mode == "LSTM":
            kw.update(proj_size=P, peephole=p.peephole, coupled_gates=p.coupled)
            call = lambda: functional.lstm(x, None, weights, **kw)
        elif p.mode == "GRU":
            call = lambda: functional.gru(x, None, weights, **kw)
        else:
            call = lambda: functional.rnn(x, None, weights, nonlinearity=nonlinearity, **kw)

    def run():
        with torch.autocast(device.type, enabled=False), torch.set_grad_enabled(p.grad):
            out = call()
            y = out[0] if isinstance(out, tuple) else out
            if p.grad:
                torch.autograd.grad(y.float().sum(), [x, *params])
            return y

    return run
